"""CandidateScorer against the naive computation and the curvature oracles.

References, all independent of the key/value cache and of the call-layout hooks:

* scores: :class:`tests.fixtures.naive_candidates.NaiveScorer`, one full forward of the unpadded
  prompt + candidate per candidate with the full-vocabulary log-softmax;
* K-FAC factors: their definitions (module docstring of ``laplace_llm.models.candidates``)
  computed example by example from ``torch.func`` Jacobians of the naive scores with
  respect to a perturbation of each module's output at the example's positions;
* evidence and GLM covariance: laplace-torch's own ``KronLaplace`` on the naive model with
  those definition factors, whose GLM predictive takes ``torch.func`` Jacobians of the
  naive model.

Models are float64. Measured agreement is 1e-14 to 1e-15 (scores), ~1e-14 (factors) and
~1e-15 (GLM covariance); transformers computes norms of some families in float32
inside (see test_curvature.py), which bounds what can be promised across families at
~1e-7. We assert the issue's 1e-5 (absolute for scores, relative Frobenius otherwise):
every modelling error these tests exist to catch (a position counted twice or missed,
padding leaking in, a wrong cache position, rows summed to the wrong example) is ≥ 1e-3.
"""

import pytest
import torch
from laplace import KronLaplace, Laplace
from laplace.curvature import CurvlinopsGGN
from laplace.utils.matrix import Kron
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from laplace_llm import CandidateScorer, LLMClassifier, LoRALaplace
from laplace_llm.matrix import LowRankFactor
from laplace_llm.models.candidates import MISSING_LOGIT
from tests.fixtures.batches import DictDataset
from tests.fixtures.models import CAUSAL_LORA_BUILDERS, tiny_tokenizer
from tests.fixtures.naive_candidates import NaiveScorer, candidate_batch, position_jacobians, split

DT = torch.float64
FAMILIES = ["llama", "qwen2", "gpt2", "gpt_neox"]


def dense(f):
    return f.to_dense() if isinstance(f, LowRankFactor) else f


def rel(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def scorer(family="llama", C=3, seed=0, **kwargs):
    model = CAUSAL_LORA_BUILDERS[family](seed=seed, dtype=DT)
    return CandidateScorer(model, n_candidates=C, **kwargs)


def loader(batch, batch_size=3):
    return DataLoader(DictDataset(split(batch, 0)), batch_size=batch_size)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_scores_equal_naive_full_forwards(family, side):
    """Per-example candidates of 1 to 4 tokens after prompts of 2 to 6, padded on
    ``side``: equal to C full forwards with the full-vocabulary log-softmax."""
    sc = scorer(family, C=3)
    batch = candidate_batch(5, 3, seed=1, left=side == "left")
    assert len(set(batch["candidate_attention_mask"].sum(-1).flatten().tolist())) > 1
    with torch.no_grad():
        got, want = sc(batch), NaiveScorer(sc.model)(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - want).abs().max() < 1e-12


def test_mean_reduction_equals_naive_mean():
    sc = scorer("llama", C=3, reduction="mean")
    batch = candidate_batch(4, 3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(
            sc(batch), NaiveScorer(sc.model, reduction="mean")(batch), rtol=0, atol=1e-12
        )


def test_fixed_texts_are_shared_by_every_example():
    """from_texts: label strings of 1, 2 and 3 tokens scored after every prompt."""
    tok = tiny_tokenizer(padding_side="left")
    model = CAUSAL_LORA_BUILDERS["qwen2"](seed=0, dtype=DT)
    texts = [" good", " the red cat", " not bad"]
    sc = CandidateScorer.from_texts(model, tok, texts)
    assert sc.candidate_attention_mask.sum(-1).tolist() == [1, 3, 2]
    prompts = tok(["Question : is the dog good ?", "a cat"], padding=True, return_tensors="pt")
    per_example = {
        **prompts,
        "candidate_ids": sc.candidate_ids.expand(2, -1, -1),
        "candidate_attention_mask": sc.candidate_attention_mask.expand(2, -1, -1),
    }
    with torch.no_grad():
        torch.testing.assert_close(
            sc(dict(prompts)), NaiveScorer(model)(per_example), rtol=0, atol=1e-12
        )


def test_single_token_candidates_match_llm_classifier():
    """With one-token candidates the scores are the selected logits minus the
    log-partition: the same softmax, and (every Fisher probe sums to zero over classes)
    the same K-FAC factors and evidence as LLMClassifier over those token ids."""
    model = CAUSAL_LORA_BUILDERS["llama"](seed=3, dtype=DT)
    ids = torch.tensor([[11], [12], [13], [14]])
    sc = CandidateScorer(model, ids)
    clf = LLMClassifier(model, ids[:, 0])
    batch = candidate_batch(6, 4, seed=3, left=True)
    prompts = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(sc(prompts).softmax(-1), clf(prompts).softmax(-1))
    fits = []
    for model_ in (sc, clf):
        la = LoRALaplace(model_, "classification", fisher_type="ggn", n_kfac=200)
        la.fit(loader(prompts))
        fits.append(la)
    for F, G in zip(fits[0].H_facs.kfacs, fits[1].H_facs.kfacs):
        for f, g in zip(F, G):
            assert rel(dense(f), dense(g)) < 1e-10
    torch.testing.assert_close(
        fits[0].log_marginal_likelihood(), fits[1].log_marginal_likelihood()
    )


def definition_factors(la, naive, batch, approx):
    """K-FAC factors by their definition, example by example (see module docstring); a
    module of the LM head acts at the predicting positions only."""
    N = batch["input_ids"].shape[0]
    kfacs = []
    for block in la.blocks:
        d_out, d_in = block.shape
        G = torch.zeros(d_out, d_out, dtype=DT)
        A = torch.zeros(d_in, d_in, dtype=DT)
        for b in range(N):
            head = block.module_name.split(".lora_")[0].endswith("lm_head")
            J, a, f0 = position_jacobians(naive, block.module, batch, b, head)  # (C, T_n, d_out)
            p = f0.softmax(-1)
            Lam = torch.diag(p) - torch.outer(p, p)
            if approx == "expand":
                G += torch.einsum("cti,cd,dtj->ij", J, Lam, J)
                A += a.T @ a / (N * a.shape[0])
            else:
                Js = J.sum(1)
                G += Js.T @ Lam @ Js
                A += torch.outer(a.mean(0), a.mean(0)) / N
        kfacs.append([G, A])
    return kfacs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factors_equal_definitions(family, approx):
    """Mixed left/right padding, candidates of different lengths, batches of 3 with B·C
    continuation rows: every factor equals its definition; low-rank factors at full rank."""
    sc = scorer(family, C=3)
    batch = candidate_batch(5, 3, seed=4, left=family == "llama")
    la = LoRALaplace(sc, "classification", fisher_type="ggn", kfac_approx=approx, n_kfac=200,
                     lr_threshold=0)
    la.fit(loader(batch))
    for F, (G, A) in zip(la.H_facs.kfacs, definition_factors(la, NaiveScorer(sc.model), batch, approx)):
        assert rel(dense(F[0]), G) < 1e-5
        assert rel(dense(F[1]), A) < 1e-5


def test_factors_with_lora_on_the_lm_head_equal_definitions():
    """LoRA on lm_head too: the head runs once on the prompts' last positions (batch B)
    and once on the predicting continuation positions (one row each)."""
    model = CAUSAL_LORA_BUILDERS["llama"](
        seed=1, dtype=DT, target_modules=("q_proj", "v_proj", "lm_head")
    )
    sc = CandidateScorer(model, n_candidates=3)
    batch = candidate_batch(4, 3, seed=13, left=True)
    assert any("lm_head" in b.name for b in LoRALaplace(sc, "classification").blocks)
    for approx in ("expand", "reduce"):
        la = LoRALaplace(sc, "classification", fisher_type="ggn", kfac_approx=approx,
                         n_kfac=200)
        la.fit(loader(batch))
        for F, (G, A) in zip(la.H_facs.kfacs,
                             definition_factors(la, NaiveScorer(sc.model), batch, approx)):
            assert rel(dense(F[0]), G) < 1e-5
            assert rel(dense(F[1]), A) < 1e-5
    test = candidate_batch(2, 3, seed=14)
    naive_la = LoRALaplace(NaiveScorer(sc.model), "classification", jacobian_free=False)
    Js, _ = naive_la.backend.jacobians(test)
    _, f_var = la._glm_predictive_distribution(test)
    assert rel(f_var, la.functional_variance(Js)) < 1e-5


def laplace_torch_reference(la, naive, batch, approx):
    """laplace-torch's KronLaplace on the naive model with the definition factors."""
    ref = KronLaplace(naive, "classification", prior_precision=la.prior_precision,
                      backend=CurvlinopsGGN)
    ref.H_facs = Kron(definition_factors(la, naive, batch, approx))
    ref.H = ref.H_facs.decompose()
    with torch.no_grad():
        f = naive(batch)
    ref.loss = torch.nn.functional.cross_entropy(f, batch["labels"], reduction="sum")
    ref.n_data = batch["input_ids"].shape[0]
    ref.mean = parameters_to_vector(ref.params).detach()
    ref.n_outputs = f.shape[-1]
    return ref


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_evidence_and_glm_equal_laplace_torch_on_the_naive_model(approx):
    sc = scorer("gpt_neox", C=3, seed=1)
    naive = NaiveScorer(sc.model)
    batch = candidate_batch(4, 3, seed=5, left=True)
    la = LoRALaplace(sc, "classification", fisher_type="ggn", kfac_approx=approx, n_kfac=200,
                     prior_precision=0.7)
    la.fit(loader(batch))
    ref = laplace_torch_reference(la, naive, batch, approx)
    torch.testing.assert_close(la.loss, ref.loss, rtol=1e-10, atol=0)
    assert abs((la.log_marginal_likelihood() - ref.log_marginal_likelihood()).item()) < 1e-5 * abs(
        ref.log_marginal_likelihood().item()
    )
    la.prior_precision = ref.prior_precision = 2.5
    test = candidate_batch(3, 3, seed=6)
    f_mu, f_var = la._glm_predictive_distribution(test)
    r_mu, r_var = ref._glm_predictive_distribution(test)
    assert rel(f_mu, r_mu) < 1e-10 and rel(f_var, r_var) < 1e-5
    _, f_cov = la._glm_predictive_distribution(test, joint=True)
    _, r_cov = ref._glm_predictive_distribution(test, joint=True)
    assert rel(f_cov, r_cov) < 1e-5
    torch.testing.assert_close(la(test, link_approx="probit"), ref(test, link_approx="probit"))


def test_glm_covariance_equals_torch_func_jacobians_of_the_naive_model():
    """Low-rank posterior (n_kfac=3), mc Fisher, a trained-head-free Llama: the
    Jacobian-free covariance equals ``J P⁻¹ Jᵀ`` with ``J`` from ``torch.func`` on the
    naive model, contracted by laplace-torch's ``functional_variance``."""
    sc = scorer("llama", C=4, seed=2)
    la = LoRALaplace(sc, "classification", n_kfac=3, lr_threshold=0, seed=0)
    la.fit(loader(candidate_batch(8, 4, seed=7)))
    test = candidate_batch(3, 4, seed=8, left=True)
    naive_la = LoRALaplace(NaiveScorer(sc.model), "classification", jacobian_free=False)
    Js, f = naive_la.backend.jacobians(test)
    f_mu, f_var = la._glm_predictive_distribution(test)
    assert rel(f_mu, f) < 1e-10
    assert rel(f_var, la.functional_variance(Js)) < 1e-5


def test_a_question_does_not_depend_on_its_batch():
    """The same question alone and among others (longer prompts and candidates, other
    padding): MAP probabilities and GLM moments equal."""
    sc = scorer("gpt2", C=3)
    la = LoRALaplace(sc, "classification", n_kfac=4, lr_threshold=0, seed=0)
    la.fit(loader(candidate_batch(6, 3, seed=9)))
    others = candidate_batch(4, 3, seed=10, prompt_len=(5, 9), cand_len=(3, 6), left=True)
    alone = candidate_batch(1, 3, seed=11)
    mixed = {}
    for k in alone:
        a, o = alone[k], others[k]
        if a.ndim >= 2:  # pad the lone question to the others' sizes (right padding)
            a2 = torch.zeros(1, *o.shape[1:], dtype=a.dtype)
            a2[(slice(None),) + tuple(slice(0, s) for s in a.shape[1:])] = a
            a = a2
        mixed[k] = torch.cat([o[:2], a, o[2:]])
    with torch.no_grad():
        torch.testing.assert_close(sc(mixed)[2], sc(alone)[0], rtol=0, atol=1e-12)
    mu_a, var_a = la._glm_predictive_distribution(alone)
    mu_m, var_m = la._glm_predictive_distribution(mixed)
    torch.testing.assert_close(mu_m[2], mu_a[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(var_m[2], var_a[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(la(mixed)[2], la(alone)[0], rtol=1e-10, atol=1e-14)


def masked_batch():
    batch = candidate_batch(4, 3, seed=12)
    present = torch.ones(4, 3, dtype=torch.long)
    present[0, 2] = 0  # a question with two answers
    present[3, 0] = 0
    batch["candidate_mask"] = present
    batch["candidate_attention_mask"][0, 2] = 0  # its padding has no token at all
    batch["labels"] = torch.tensor([1, 0, 2, 2])
    return batch


@pytest.mark.parametrize("fisher_type", ["ggn", "mc", "ef"])
def test_missing_candidates_get_probability_zero_and_finite_curvature(fisher_type):
    sc = scorer("llama", C=3)
    batch = masked_batch()
    with torch.no_grad():
        f = sc(batch)
    assert f[0, 2] == MISSING_LOGIT and f[3, 0] == MISSING_LOGIT
    p = f.softmax(-1)
    assert p[0, 2] == 0 and p[3, 0] == 0
    # the present candidates keep their naive scores
    with torch.no_grad():
        torch.testing.assert_close(f, NaiveScorer(sc.model)(batch), rtol=0, atol=1e-12)
    la = LoRALaplace(sc, "classification", fisher_type=fisher_type, n_kfac=200, seed=0)
    la.fit(loader(batch, batch_size=4))
    assert torch.isfinite(la.log_marginal_likelihood())
    f_mu, f_var = la._glm_predictive_distribution(batch)
    assert torch.isfinite(f_var).all()
    assert f_var[0, 2].abs().max() == 0 and f_var[0, :, 2].abs().max() == 0
    for kwargs in (dict(link_approx="probit"), dict(link_approx="mc", n_samples=50),
                   dict(pred_type="nn", link_approx="mc", n_samples=5)):
        probs = la(batch, **kwargs)
        assert probs[0, 2] == 0 and probs[3, 0] == 0
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="use link_approx='probit' or 'mc'"):
        la(batch, link_approx="bridge")
    if fisher_type == "ggn":  # and the Jacobian-free covariance stays exact with masks
        naive_la = LoRALaplace(NaiveScorer(sc.model), "classification", jacobian_free=False)
        Js, _ = naive_la.backend.jacobians(batch)
        assert rel(f_var, la.functional_variance(Js)) < 1e-5



@pytest.mark.parametrize("structure", ["diag", "full"])
def test_missing_candidates_with_diag_and_full(structure):
    """Diag and full share kron's handling of missing candidates: their zero-variance
    logits are sampled through eigh (MC keeps probability 0 there) and bridge is refused."""
    sc = scorer("llama", C=3)
    batch = masked_batch()
    la = Laplace(sc, "classification", subset_of_weights="lora", hessian_structure=structure,
                 fisher_type="ggn")
    la.fit(loader(batch, batch_size=4))
    _, f_var = la._glm_predictive_distribution(batch)
    assert f_var[0, 2].abs().max() == 0 and f_var[0, :, 2].abs().max() == 0
    probs = la(batch, link_approx="mc", n_samples=50, generator=torch.Generator().manual_seed(0))
    assert probs[0, 2] == 0 and probs[3, 0] == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="use link_approx='probit' or 'mc'"):
        la(batch, link_approx="bridge")
    # laplace-torch's enums (str() "LinkApprox.BRIDGE_NORM") are refused the same way
    from laplace.utils.enums import LinkApprox, PredType

    with pytest.raises(ValueError, match="use link_approx='probit' or 'mc'"):
        la(batch, pred_type=PredType.GLM, link_approx=LinkApprox.BRIDGE_NORM)

# ------------------------------------------------------------------------ errors
def test_bad_candidates_are_refused_with_the_fix():
    tok = tiny_tokenizer()
    model = CAUSAL_LORA_BUILDERS["llama"](seed=0, dtype=DT)
    with pytest.raises(ValueError, match="encodes to no token"):
        CandidateScorer.from_texts(model, tok, [" good", ""])
    with pytest.raises(ValueError, match="at least 2"):
        CandidateScorer.from_texts(model, tok, [" good"])
    with pytest.raises(ValueError, match="at least 2"):
        CandidateScorer(model, n_candidates=1)
    with pytest.raises(ValueError, match="same tokens"):
        CandidateScorer.from_texts(model, tok, [" good", "good"])
    sc = CandidateScorer(model, n_candidates=3)
    batch = candidate_batch(2, 3, seed=0)
    empty = dict(batch, candidate_attention_mask=batch["candidate_attention_mask"].clone())
    empty["candidate_attention_mask"][1, 2] = 0
    with pytest.raises(ValueError, match="candidate 2 of example 1 has no token"):
        sc(empty)
    with pytest.raises(ValueError, match="3 candidates per example but this scorer has n_outputs=4"):
        CandidateScorer(model, n_candidates=4)(batch)
    one = dict(batch, candidate_mask=torch.tensor([[1, 0, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="fewer than 2 present candidates"):
        sc(one)
    long = candidate_batch(1, 3, prompt_len=(1020, 1020), cand_len=(5, 5))
    with pytest.raises(ValueError, match="exceed the model's context of 1024"):
        sc(long)
    with pytest.raises(ValueError, match="no 'candidate_ids'"):
        sc({"input_ids": batch["input_ids"]})
    holes = dict(batch, candidate_attention_mask=torch.ones_like(batch["candidate_ids"]))
    holes["candidate_attention_mask"][0, 0, 0] = 0
    with pytest.raises(ValueError, match="real tokens first"):
        sc(holes)


def test_marglik_tuning_and_posterior_files_work_unchanged(tmp_path):
    """marglik tuning raises the evidence of the scorer's posterior; a saved posterior
    loads onto a new scorer of the same model and predicts the same (float64, exact up to
    the file's float64 round trip)."""
    sc = scorer("qwen2", C=3, seed=4)
    data = candidate_batch(8, 3, seed=15, left=True)
    la = LoRALaplace(sc, "classification", n_kfac=4, lr_threshold=0, seed=0)
    la.fit(loader(data, batch_size=4))
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(method="marglik", n_steps=50)
    assert la.log_marginal_likelihood().item() > before
    test = candidate_batch(3, 3, seed=16)
    la.save(tmp_path / "posterior.safetensors")
    other = LoRALaplace.load(tmp_path / "posterior.safetensors", CandidateScorer(sc.model, n_candidates=3))
    torch.testing.assert_close(other(test), la(test), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(other.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_bf16_model_scores_and_posterior_close_to_float32():
    """bf16 weights (same seed as float32): scores are returned in float32 and the
    posterior is kept in float32. Measured on this batch: scores differ by 0.005 (of
    magnitude 19: bf16 keeps 8 bits), the evidence by 0.01 % and probabilities by 0.003;
    we assert ten times those."""
    batch = candidate_batch(6, 3, seed=1, left=True)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        sc = CandidateScorer(CAUSAL_LORA_BUILDERS["llama"](seed=0, dtype=dtype), n_candidates=3)
        with torch.no_grad():
            f = sc(batch)
        la = LoRALaplace(sc, "classification", n_kfac=4, lr_threshold=0, fisher_type="ggn")
        la.fit(loader(batch))
        out[dtype] = (f, la.log_marginal_likelihood(), la(batch))
    (f32, lml32, p32), (f16, lml16, p16) = out[torch.float32], out[torch.bfloat16]
    assert f16.dtype == torch.float32 and p16.dtype == torch.float32
    assert (f16 - f32).abs().max() < 0.05
    assert abs((lml16 - lml32) / lml32) < 1e-3
    assert (p16 - p32).abs().max() < 0.03


def test_candidate_ids_outside_the_vocabulary_and_strings_are_refused():
    model = CAUSAL_LORA_BUILDERS["gpt2"](seed=0, dtype=DT)
    with pytest.raises(ValueError, match=r"candidate token ids \[100\] are outside"):
        CandidateScorer(model, torch.tensor([[5, 100], [6, 7]]))
    from laplace_llm.models.candidates import encode_candidates

    with pytest.raises(TypeError, match="got the string"):
        encode_candidates(tiny_tokenizer(), " good")


def test_a_model_that_does_not_fill_its_cache_is_refused():
    """Gradient checkpointing in training mode turns transformers' cache off; scoring must
    then stop instead of reading continuations without their prompt."""
    sc = scorer("llama", C=3)
    sc.model.base_model.model.gradient_checkpointing_enable()
    sc.train()
    try:
        with pytest.raises(RuntimeError, match="gradient_checkpointing_disable"):
            sc(candidate_batch(2, 3, seed=0))
    finally:
        sc.model.base_model.model.gradient_checkpointing_disable()
        sc.eval()


def test_lora_modules_select_blocks_of_a_candidate_scorer():
    """lora_modules with text candidates: only the selected layers' blocks, each factor
    equal to its definition (the same per-example sums over the prompt call and the B·C
    continuation rows as without a selection)."""
    sc = scorer("llama", C=3, seed=3)
    batch = candidate_batch(5, 3, seed=15, left=True)
    la = LoRALaplace(sc, "classification", fisher_type="ggn", n_kfac=200, lr_threshold=0,
                     lora_modules=["*.v_proj"])
    la.fit(loader(batch))
    assert la.blocks and all(".v_proj." in b.name for b in la.blocks)
    assert la.n_params < sum(p.numel() for p in sc.parameters() if p.requires_grad)
    for F, (G, A) in zip(la.H_facs.kfacs,
                         definition_factors(la, NaiveScorer(sc.model), batch, "expand")):
        assert rel(dense(F[0]), G) < 1e-5
        assert rel(dense(F[1]), A) < 1e-5


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_diag_and_full_over_candidates_equal_the_ggn_of_torch_func_jacobians(structure):
    """Diag and full Laplace with text candidates and a lora_modules selection: the
    per-example gradients sum each example's prompt row and its continuation rows (call
    layouts), so the GGN curvature equals ``Σ_n J_nᵀ (diag p − p pᵀ) J_n`` and the GLM
    covariance ``J P⁻¹ Jᵀ``, with ``J`` from ``torch.func`` on the naive model (C full
    forwards) over the same selected weights. Float64; measured: curvature 7e-8 (the
    attention softmax runs in float32 and its rounding depends on the cotangents, as in
    tests/posterior/test_diag_and_full.py), GLM covariance 2e-16; asserted 1e-5 and 1e-8 relative."""
    sc = scorer("llama", C=3, seed=1)
    naive_la = LoRALaplace(NaiveScorer(sc.model), "classification", jacobian_free=False,
                           lora_modules=["*.q_proj"])
    batch = candidate_batch(5, 3, seed=16, left=True)
    la = Laplace(sc, "classification", subset_of_weights="lora", hessian_structure=structure,
                 fisher_type="ggn", lora_modules=["*.q_proj"], prior_precision=0.7)
    la.fit(loader(batch))
    assert [b.name for b in la.blocks] == [b.name for b in naive_la.blocks]
    Js, f = naive_la.backend.jacobians(batch)
    p = f.softmax(-1)
    Lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    ggn = torch.einsum("bcp,bcd,bdq->pq", Js, Lam, Js)
    want = ggn.diagonal() if structure == "diag" else ggn
    assert rel(la.H, want) < 1e-5
    test = candidate_batch(3, 3, seed=17)
    Jt, ft = naive_la.backend.jacobians(test)
    f_mu, f_var = la._glm_predictive_distribution(test)
    assert rel(f_mu, ft) < 1e-10
    assert rel(f_var, la.functional_variance(Jt)) < 1e-8
