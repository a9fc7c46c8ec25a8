"""Many classes: the GLM's ``top_k`` against the full GLM, and probes in chunks.

References, independent of the code under test:

- ``top_k``: the full GLM covariance ``Σ`` (every class's Jacobian; itself checked
  against the explicit Jacobians of ``torch.func``, ``la.backend.jacobians``, contracted
  by laplace-torch's ``functional_variance``), merged here by hand: ``A Σ Aᵀ`` with ``A``
  keeping each example's ``k`` largest MAP logits (found with ``argsort`` of the
  classifier's own output) and replacing every other logit by the MAP-softmax-weighted
  mean of the rest (the Jacobian of their log-sum-exp). ``top_k = C`` must be the full
  computation bit for bit, ``top_k = C − 1`` equal to it; for ``k < C`` the selected
  rows and columns equal the full ones (float64 models: the same Jacobians contracted
  with the same posterior: 1e-9 relative, measured ~1e-15), and the whole equals the
  hand-merged full covariance to 1e-5 (the rest's Jacobian comes from one backward pass
  of a weighted cotangent against a weighted sum of per-class Jacobians: transformers'
  norms compute in float32 inside, so they differ by float32 rounding, measured 4e-8,
  as in ``test_kfac.py``). The cost is counted: ``k + 1`` backward passes, not ``C``.
- Chunks of probes (``PROBE_CHUNK``): the factors of a ggn fit equal their definitions
  (per-sequence ``torch.func`` Jacobians of the LoRA modules' outputs, as in
  ``test_kfac.py``) when the C probes run in several chunks, and the GLM over C = 20 >
  16 classes equals the explicit Jacobians' covariance.
"""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from laplace_llm import LLMClassifier, LoRADiagLaplace, LoRALaplace
from laplace_llm.curvature import kfac, kfac_probes
from laplace_llm.curvature.top_k import expand_covariance, top_classes
from laplace_llm.matrix import LowRankFactor
from tests.fixtures.batches import DictDataset, left_pad, token_items
from tests.fixtures.models import tiny_llama_lora

DT = torch.float64
C = 12
TARGETS = list(range(4, 4 + C))  # the letters A..L of the tiny tokenizer


def rel(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def batch_of(n, seed):
    items = token_items(n, 7, seed=seed, min_length=2, n_classes=C)
    items = [left_pad(it) if i % 2 else it for i, it in enumerate(items)]
    return next(iter(DataLoader(DictDataset(items), batch_size=n)))


@pytest.fixture(scope="module")
def fitted():
    clf = LLMClassifier(tiny_llama_lora(seed=0, dtype=DT), TARGETS)
    loader = DataLoader(DictDataset(token_items(10, 7, seed=1, min_length=2, n_classes=C)),
                        batch_size=5)
    la = LoRALaplace(clf, "classification", fisher_type="ggn", n_kfac=3, lr_threshold=0,
                     prior_precision=0.5)
    la.fit(loader)
    return la


def selected_mask(clf, batch, k):
    """``(B, C)`` bool: each example's k largest MAP logits, found independently."""
    with torch.no_grad():
        f = clf(batch)
    order = torch.argsort(f, dim=-1, descending=True)[:, :k]
    keep = torch.zeros_like(f, dtype=torch.bool)
    keep[torch.arange(f.shape[0])[:, None], order] = True
    return keep


def merged_reference(clf, batch, var, k, joint=False):
    """``A Σ Aᵀ``: the selected logits kept, each other one the rest's softmax-weighted mean."""
    with torch.no_grad():
        f = clf(batch).to(DT)
    keep = selected_mask(clf, batch, k)
    B, C_ = f.shape
    A = torch.zeros(B, C_, C_, dtype=DT)
    for b in range(B):
        rest = ~keep[b]
        q = torch.softmax(f[b, rest], -1)
        for c in range(C_):
            if keep[b, c]:
                A[b, c, c] = 1.0
            else:
                A[b, c, rest] = q
    if joint:
        A = torch.block_diag(*A)
        return A @ var @ A.T
    return A @ var @ A.transpose(1, 2)


def count_probes(la, monkeypatch):
    seen = []
    original = la.backend.output_gradients

    def counting(f, outputs, probes, keep_graph=False):
        seen.append(len(probes))
        return original(f, outputs, probes, keep_graph)

    monkeypatch.setattr(la.backend, "output_gradients", counting)
    return seen


def test_top_k_of_all_classes_is_the_full_glm_bit_for_bit(fitted):
    batch = batch_of(4, seed=5)
    prior = [fitted.prior_precision]
    for joint in (False, True):
        full = fitted._glm_predictive_distribution(batch, joint=joint)
        for k in (C, C + 5):
            got = fitted.glm_moments_over_priors(batch, prior, joint=joint, top_k=k)[0]
            assert torch.equal(got[0], full[0]) and torch.equal(got[1], full[1])
    for link in ("probit", "mc"):
        probs = fitted(batch, link_approx=link, generator=torch.Generator().manual_seed(0))
        assert torch.equal(fitted(batch, link_approx=link, top_k=C,
                                  generator=torch.Generator().manual_seed(0)), probs)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_equals_the_full_glm_with_the_rest_merged(fitted, k, monkeypatch):
    batch = batch_of(4, seed=6)
    clf = fitted.model
    f_full, var_full = fitted._glm_predictive_distribution(batch)
    Js, f_ref = fitted.backend.jacobians(batch)  # torch.func, over every class
    assert rel(var_full, fitted.functional_variance(Js)) < 1e-5

    keep = selected_mask(clf, batch, k)
    both = keep[:, :, None] & keep[:, None, :]
    seen = count_probes(fitted, monkeypatch)
    f_mu, f_var = fitted.glm_moments_over_priors(batch, [fitted.prior_precision], top_k=k)[0]
    assert sum(seen) == k + 1  # k classes and the rest, not C
    assert torch.equal(f_mu, f_full)
    assert rel(f_var[both], var_full[both]) < 1e-9  # the selected block is the full GLM's
    assert rel(f_var, merged_reference(clf, batch, var_full, k)) < 1e-5
    assert torch.linalg.eigvalsh(f_var).min() > -1e-12  # a covariance

    # joint covariance across the batch: the same merge, example by example
    _, cov_full = fitted._glm_predictive_distribution(batch, joint=True)
    _, cov = fitted.glm_moments_over_priors(batch, [fitted.prior_precision], joint=True,
                                            top_k=k)[0]
    assert rel(cov, merged_reference(clf, batch, cov_full, k, joint=True)) < 1e-5


def test_top_k_of_all_but_one_class_is_the_full_glm(fitted):
    batch = batch_of(4, seed=11)
    _, var_full = fitted._glm_predictive_distribution(batch)
    _, var = fitted.glm_moments_over_priors(batch, [fitted.prior_precision], top_k=C - 1)[0]
    assert rel(var, var_full) < 1e-9


def test_top_k_probit_and_mc_links_use_the_merged_covariance(fitted):
    batch = batch_of(4, seed=7)
    k = 4
    f_mu, f_var = fitted._glm_predictive_distribution(batch)
    merged = merged_reference(fitted.model, batch, f_var, k)
    var = merged.diagonal(dim1=1, dim2=2)
    expected = torch.softmax(f_mu / torch.sqrt(1 + math.pi / 8 * var), -1)
    got = fitted(batch, link_approx="probit", top_k=k)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    # the Monte-Carlo link draws from the merged (singular) covariance
    mc = fitted(batch, link_approx="mc", top_k=k, n_samples=500,
                generator=torch.Generator().manual_seed(0))
    ref = fitted._glm_predictive_samples(f_mu, merged, 500, False,
                                         torch.Generator().manual_seed(0)).mean(0)
    torch.testing.assert_close(mc, ref, rtol=1e-5, atol=1e-7)


def test_top_k_on_a_diagonal_posterior_merges_the_same_way():
    clf = LLMClassifier(tiny_llama_lora(seed=2, dtype=DT), TARGETS)
    la = LoRADiagLaplace(clf, "classification", fisher_type="ggn", prior_precision=0.5)
    la.fit(DataLoader(DictDataset(token_items(8, 6, seed=3, n_classes=C)), batch_size=4))
    batch = batch_of(3, seed=8)
    f_full, var_full = la._glm_predictive_distribution(batch)
    f_mu, f_var = la.glm_moments_over_priors(batch, [la.prior_precision], top_k=5)[0]
    assert torch.equal(f_mu, f_full)
    assert rel(f_var, merged_reference(clf, batch, var_full, 5)) < 1e-12


def test_expand_covariance_copies_the_selected_block_and_the_rests_row():
    classes = torch.tensor([[2, 0], [1, 3]])
    small = torch.arange(18, dtype=DT).reshape(2, 3, 3)  # coarse index 2: the rest
    out = expand_covariance(small, classes, 4)
    coarse = [{2: 0, 0: 1, 1: 2, 3: 2}, {1: 0, 3: 1, 0: 2, 2: 2}]  # class -> coarse index
    for n in range(2):
        for c in range(4):
            for d in range(4):
                assert out[n, c, d] == small[n, coarse[n][c], coarse[n][d]]
    joint = expand_covariance(torch.arange(36, dtype=DT).reshape(6, 6), classes, 4, joint=True)
    flat = [coarse[n][c] + 3 * n for n in range(2) for c in range(4)]
    assert torch.equal(joint, torch.arange(36, dtype=DT).reshape(6, 6)[flat][:, flat])
    assert top_classes(torch.tensor([[0.1, 3.0, 2.0]]), 2).tolist() == [[1, 2]]
    assert top_classes(torch.zeros(2, 3), 3) is None and top_classes(torch.zeros(2, 3), None) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"top_k": 0}, ValueError, "at least 1"),
        ({"top_k": 2.0}, TypeError, "positive integer"),
        ({"top_k": True}, TypeError, "positive integer"),
        ({"top_k": 2, "pred_type": "nn", "link_approx": "mc"}, ValueError, "n_samples forwards"),
        ({"top_k": 2, "link_approx": "bridge"}, ValueError, "probit"),
    ],
)
def test_top_k_refusals_name_the_fix(fitted, kwargs, error, match):
    with pytest.raises(error, match=match):
        fitted(batch_of(2, seed=9), **kwargs)


def dense(f):
    return f.to_dense() if isinstance(f, LowRankFactor) else f


@pytest.mark.parametrize("stream", [False, True], ids=["gathered", "streamed"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_ggn_factors_from_chunks_of_probes_equal_their_definitions(approx, stream, monkeypatch):
    """C = 12 ggn probes in chunks of 5, 5, 2 (output gradients gathered per chunk), or
    added in each probe's backward (streamed, the default): factors equal the
    per-sequence definition."""
    monkeypatch.setattr(kfac_probes, "PROBE_CHUNK", 5)
    monkeypatch.setattr(kfac.LoRAKFAC, "stream_output_gradients", stream)
    clf = LLMClassifier(tiny_llama_lora(seed=0, dtype=DT), TARGETS)
    items = token_items(5, 6, seed=4, min_length=2, n_classes=C)
    items = [left_pad(it) if i % 2 else it for i, it in enumerate(items)]
    N = len(items)
    la = LoRALaplace(clf, "classification", fisher_type="ggn", kfac_approx=approx, n_kfac=200,
                     lr_threshold=0)
    seen = count_probes(la, monkeypatch)
    la.fit(DataLoader(DictDataset(items), batch_size=3))
    assert seen == ([] if stream else [5, 5, 2, 5, 5, 2])  # two batches, three chunks each

    for block, F in zip(la.blocks, la.H_facs.kfacs):
        d_out, d_in = block.shape
        G_def = torch.zeros(d_out, d_out, dtype=DT)
        A_def = torch.zeros(d_in, d_in, dtype=DT)
        for it in items:
            keep = it["attention_mask"].bool()
            x = {"input_ids": it["input_ids"][keep][None],
                 "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long)}
            J, a, f0 = _position_jacobians(clf, block.module, x)
            p = torch.softmax(f0, -1)
            Lam = torch.diag(p) - torch.outer(p, p)
            if approx == "expand":
                G_def += torch.einsum("cti,cd,dtj->ij", J, Lam, J)
                A_def += a.T @ a / (N * a.shape[0])
            else:
                Js = J.sum(1)
                G_def += Js.T @ Lam @ Js
                A_def += torch.outer(a.mean(0), a.mean(0)) / N
        assert rel(dense(F[0]), G_def) < 1e-5
        torch.testing.assert_close(dense(F[1]), A_def, rtol=1e-10, atol=1e-12)


def _position_jacobians(clf, module, x):
    """``J[c, t, :] = ∂f_c/∂s_t`` for the output ``s`` of ``module``, its inputs, the logits."""
    seen = {}

    def record(mod, inputs, output):
        seen["a"] = inputs[0].detach()[0]
        seen["shape"] = output.shape

    h = module.register_forward_hook(record)
    f0 = clf(x)[0].detach()
    h.remove()

    def f_of(eps):
        h = module.register_forward_hook(lambda m, i, o: o + eps)
        try:
            return clf(x)[0]
        finally:
            h.remove()

    J = torch.func.jacrev(f_of)(torch.zeros(seen["shape"], dtype=DT))[:, 0]
    return J, seen["a"], f0


def test_glm_over_more_classes_than_a_chunk_equals_explicit_jacobians(monkeypatch):
    """C = 20 > PROBE_CHUNK = 16: two chunks of backward passes, as the torch.func GLM."""
    assert kfac_probes.PROBE_CHUNK == 16
    targets = list(range(4, 24))
    clf = LLMClassifier(tiny_llama_lora(seed=1, dtype=DT), targets)
    la = LoRALaplace(clf, "classification", n_kfac=4, lr_threshold=0, prior_precision=0.5,
                     seed=0)
    la.fit(DataLoader(DictDataset(token_items(6, 6, seed=2, n_classes=20)), batch_size=3))
    batch = batch_of(3, seed=10)
    seen = count_probes(la, monkeypatch)
    f_mu, f_var = la._glm_predictive_distribution(batch)
    assert seen == [16, 4]
    Js, f_ref = la.backend.jacobians(batch)
    assert rel(f_mu, f_ref) < 1e-10
    assert rel(f_var, la.functional_variance(Js)) < 1e-5
    _, cov = la._glm_predictive_distribution(batch, joint=True)
    assert rel(cov, la.functional_covariance(Js)) < 1e-5


def test_from_choices_over_a_thousand_single_tokens():
    """C = 1,000 answer tokens: the classifier's logits are the LM's at the last position."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(1100)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                  pad_token="<pad>", padding_side="left")
    model = tiny_llama_lora(seed=0, vocab_size=len(words))
    choices = [f" w{i}" for i in range(1000)]
    clf = LLMClassifier.from_choices(model, tok, choices)
    assert clf.target_ids.tolist() == list(range(2, 1002))
    batch = tok(["w5 w7 w9", "w1 w2 w3"], return_tensors="pt")
    with torch.no_grad():
        got = clf(batch)
        ref = model(**batch).logits[:, -1, 2:1002]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ggn_probes_are_the_columns_of_the_dense_factor_bit_for_bit():
    """Made one at a time (no B × C × C tensor), yet equal to ``diag(√p) − p √pᵀ``."""
    from laplace_llm.curvature.kfac_probes import _GGNProbes

    p = torch.softmax(torch.randn(5, 37, dtype=DT, generator=torch.Generator().manual_seed(0)), -1)
    S = torch.diag_embed(p.sqrt()) - p.unsqueeze(-1) * p.sqrt().unsqueeze(-2)
    probes = _GGNProbes(p, torch.float32)
    assert len(probes) == 37 and len(list(probes)) == 37
    for c in range(37):
        assert torch.equal(probes[c][0], S[:, :, c].float()) and probes[c][1] == 1.0
    assert [torch.equal(v, w) for (v, _), (w, _) in zip(probes[30:], list(probes)[30:])] == [True] * 7
    # their outer products sum to the softmax Hessian diag(p) − p pᵀ (float32 columns)
    outer = sum(v.double()[:, :, None] * v.double()[:, None, :] for v, _ in probes)
    torch.testing.assert_close(outer, torch.diag_embed(p) - p[:, :, None] * p[:, None, :],
                               rtol=0, atol=1e-6)
