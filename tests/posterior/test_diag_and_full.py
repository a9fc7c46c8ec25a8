"""Diagonal and full Laplace over LoRA weights, and regression for every structure.

References (DESIGN.md oracle 1 and 2):

- laplace-torch's own ``Laplace(model, lik, "all", "diag" | "full")`` on a model whose
  only trainable parameters are the LoRA ones (and a ``modules_to_save`` head), with
  ``CurvlinopsGGN`` (exact GGN) for ``fisher_type="ggn"`` and ``CurvlinopsEF`` for
  ``"ef"``; laplace-torch refuses ``DiagLaplace`` + ``CurvlinopsEF`` on dict batches, so
  that pair is checked against the diagonal of its ``FullLaplace`` with the EF.
- ``fisher_type="mc"`` is stochastic: checked against a brute-force sum over
  ``torch.func`` Jacobians with the same sampled labels / noise (same generator).

Models are float64. Measured: diag agrees to 1e-16 on the tensor-input MLP and to 7e-8
on the tiny Llama, whose attention softmax runs in float32 (transformers casts it), so the
rounding of the backward pass depends on the cotangents; full agrees to ~2e-8 (up to 8e-7
for an ill-conditioned EF regression GLM variance) because laplace-torch's
``Curvlinops*.full`` multiplies its operator by a float32 identity (ours equals the
torch.func GGN to 5e-17). We assert the issue's 1e-5 relative everywhere. Llama models use eager attention because curvlinops'
full GGN needs forward-mode AD, which PyTorch's CPU SDPA kernel lacks.
"""

import pytest
import torch
from laplace import Laplace
from laplace.baselaplace import BaseLaplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from laplace.utils.enums import TuningMethod
from torch.utils.data import DataLoader, TensorDataset

import laplace_llm
import tests.fixtures.models
from laplace_llm import LLMClassifier, LoRADiagLaplace, LoRAFullLaplace, LoRALaplace
from laplace_llm.models.discovery import LoRAModelError
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items
from tests.fixtures.models import tiny_llama_lora

REFERENCE_BACKEND = {"ggn": CurvlinopsGGN, "ef": CurvlinopsEF}
RTOL = 1e-5


def rel(a, b) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def lora_mlp(seed=0, head=True, d_out=3):
    """Peft MLP (float64): LoRA r=2 on l1 and, with ``head``, l2 trained in full."""
    return tests.fixtures.models.lora_mlp(seed, d_out=d_out, target_modules=("l1",) if head else ("l1", "l2"),
                                 modules_to_save=("l2",) if head else None)


def mlp_loader(likelihood, n=13, batch_size=5, seed=1, d_out=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    if likelihood == "regression":
        y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, d_out, (n,), generator=g)
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def llama(seed=0, **kwargs):
    peft_model = tiny_llama_lora(seed=seed, dtype=torch.float64, hidden=16, layers=1, r=2,
                                 _attn_implementation="eager", **kwargs)
    return LLMClassifier(peft_model, TARGET_IDS)


def llama_loader(likelihood, n=9, length=5, batch_size=4, seed=0):
    items = token_items(n, length, seed=seed, min_length=2)
    if likelihood == "regression":
        g = torch.Generator().manual_seed(seed + 7)
        for it in items:
            it["labels"] = torch.randn(len(TARGET_IDS), generator=g, dtype=torch.float64)
    return DataLoader(DictDataset(items), batch_size=batch_size)


def fit_both(model, loader, likelihood, structure, fisher, ref_structure=None, **kw):
    la = Laplace(model, likelihood, subset_of_weights="lora", hessian_structure=structure,
                 fisher_type=fisher, **kw)
    la.fit(loader)
    ref = Laplace(model, likelihood, subset_of_weights="all",
                  hessian_structure=ref_structure or structure,
                  backend=REFERENCE_BACKEND[fisher], **kw)
    ref.fit(loader)
    return la, ref


def test_factory_returns_each_structure_with_a_unique_key():
    model = llama()
    for structure, cls in [("kron", LoRALaplace), ("diag", LoRADiagLaplace), ("full", LoRAFullLaplace)]:
        la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure=structure)
        assert type(la) is cls and cls._key == ("lora", structure)
        assert la.n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)

    def subclasses(c):
        return set(c.__subclasses__()).union(*[subclasses(s) for s in c.__subclasses__()])

    keys = [c._key for c in subclasses(BaseLaplace) if hasattr(c, "_key")]
    for key in [("lora", "kron"), ("lora", "diag"), ("lora", "full")]:
        assert keys.count(key) == 1, key


CASES = [
    (structure, fisher, likelihood)
    for structure in ("diag", "full")
    for fisher in ("ggn", "ef")
    for likelihood in ("classification", "regression")
]


@pytest.mark.parametrize("structure,fisher,likelihood", CASES)
def test_mlp_equals_laplace_torch(structure, fisher, likelihood):
    """Tensor batches, LoRA on l1 and a full head: curvature, evidence, its prior
    optimum and the GLM predictive equal laplace-torch's Diag/FullLaplace."""
    model = lora_mlp()
    loader = mlp_loader(likelihood)
    kw = dict(prior_precision=0.8)
    if likelihood == "regression":
        kw["sigma_noise"] = 0.6
    la, ref = fit_both(model, loader, likelihood, structure, fisher, **kw)
    check_against_reference(la, ref, loader.dataset.tensors[0][:4], likelihood)


@pytest.mark.parametrize("structure,fisher,likelihood", [
    ("diag", "ggn", "classification"), ("full", "ggn", "classification"),
    ("full", "ef", "classification"), ("diag", "ggn", "regression"),
    ("full", "ggn", "regression"), ("full", "ef", "regression"),
])
def test_llama_equals_laplace_torch(structure, fisher, likelihood):
    """Padded dict batches through LLMClassifier (4 selected logits, read as 4
    regression outputs for ``likelihood="regression"``)."""
    model = llama()
    loader = llama_loader(likelihood)
    kw = dict(prior_precision=0.8)
    if likelihood == "regression":
        kw["sigma_noise"] = 0.6
    la, ref = fit_both(model, loader, likelihood, structure, fisher, **kw)
    batch = next(iter(llama_loader(likelihood, n=3, seed=5)))
    check_against_reference(la, ref, batch, likelihood)


def test_llama_diag_ef_equals_diagonal_of_laplace_torch_full_ef():
    """laplace-torch refuses DiagLaplace with CurvlinopsEF on dict batches; the diagonal
    of its full EF is the same quantity."""
    model = llama()
    loader = llama_loader("classification")
    la, ref = fit_both(model, loader, "classification", "diag", "ef", ref_structure="full")
    assert rel(la.H, ref.H.diagonal()) < RTOL


def check_against_reference(la, ref, x, likelihood):
    assert rel(la.H, ref.H) < RTOL
    torch.testing.assert_close(la.loss, ref.loss, rtol=1e-10, atol=0)
    lml, ref_lml = la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    assert abs((lml - ref_lml) / ref_lml) < RTOL
    if likelihood == "regression":
        f, v = la(x, pred_type="glm")
        g, w = ref(x, pred_type="glm")
        torch.testing.assert_close(f, g, rtol=1e-10, atol=1e-12)
        assert rel(v, w) < RTOL
        fj, vj = la(x, pred_type="glm", joint=True)
        gj, wj = ref(x, pred_type="glm", joint=True)
        assert rel(vj, wj) < RTOL
    else:
        Js, _ = ref.backend.jacobians(x)
        assert rel(la.functional_variance(Js), ref.functional_variance(Js)) < RTOL
        # the Jacobian-free GLM predictive against laplace-torch's
        assert rel(la._glm_predictive_distribution(x)[1], ref._glm_predictive_distribution(x)[1]) < RTOL
        assert rel(la(x, link_approx="probit"), ref(x, link_approx="probit")) < RTOL
    la.optimize_prior_precision(method="marglik", n_steps=60, prior_structure="scalar")
    ref.optimize_prior_precision(method="marglik", n_steps=60)
    assert rel(la.prior_precision, ref.prior_precision) < RTOL


@pytest.mark.parametrize("call", ["no arguments", "TuningMethod.MARGLIK"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_default_evidence_and_marglik_equal_laplace_torch(structure, likelihood, call):
    """With no evidence argument, ``log_marginal_likelihood`` equals laplace-torch's over
    the same weights (Kron at full rank), and the prior of ``optimize_prior_precision()``
    (laplace-torch's default method, also spelled as its enum) is laplace-torch's with
    ``prior_structure="layerwise"``, our one change of default, to 1e-6."""
    model = lora_mlp()
    loader = mlp_loader(likelihood)
    kw = dict(prior_precision=0.8)
    if likelihood == "regression":
        kw["sigma_noise"] = 0.6
    extra = dict(n_kfac=64) if structure == "kron" else {}
    la = Laplace(model, likelihood, subset_of_weights="lora", hessian_structure=structure,
                 fisher_type="ggn", **extra, **kw)
    la.fit(loader)
    ref = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                  backend=CurvlinopsGGN, **kw)
    ref.fit(loader)
    assert la.options.evidence == "map"
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood(),
                               rtol=1e-6, atol=0)
    args = {} if call == "no arguments" else {"method": TuningMethod.MARGLIK}
    la.optimize_prior_precision(**args)
    ref.optimize_prior_precision(**args, prior_structure="layerwise")
    assert la.prior_precision.shape == (la.n_layers,) and la.n_layers > 1
    torch.testing.assert_close(la.prior_precision, ref.prior_precision, rtol=1e-6, atol=0)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood(),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_regression_evidence_and_its_gradients_equal_laplace_torch(structure):
    """log p(D | δ, σ) and its gradient in both, at several (δ, σ) pairs, against
    laplace-torch ``"all"`` with the same structure (Kron at full rank: n_kfac ≥ every
    side) and against central finite differences (step 1e-6: error ~1e-9 relative).

    laplace-torch 0.3's ``KronDecomposed.__mul__`` turns the tensor ``1/σ²`` into a
    Python number (``pow(scalar, 1/len(ls))`` warns "Converting a tensor with
    requires_grad=True to a scalar"), so its Kron gradient in σ misses the log-det term
    (measured 2606 vs 2759 at δ=0.1, σ=0.3); for Kron the gradient is checked against
    finite differences only."""
    model = lora_mlp()
    loader = mlp_loader("regression")
    extra = dict(n_kfac=64) if structure == "kron" else {}
    la = Laplace(model, "regression", subset_of_weights="lora", hessian_structure=structure,
                 fisher_type="ggn", **extra)
    la.fit(loader)
    ref = Laplace(model, "regression", subset_of_weights="all", hessian_structure=structure,
                  backend=CurvlinopsGGN)
    ref.fit(loader)
    for delta, sigma in [(0.1, 0.3), (1.0, 1.0), (5.0, 0.8), (30.0, 2.5)]:
        vals, grads = [], []
        for obj in (la, ref):
            d = torch.tensor(delta, dtype=torch.float64, requires_grad=True)
            s = torch.tensor(sigma, dtype=torch.float64, requires_grad=True)
            lml = obj.log_marginal_likelihood(d, s)
            vals.append(lml.detach())
            grads.append(torch.stack(torch.autograd.grad(lml, (d, s))))
        # laplace-torch's CurvlinopsGGN.full multiplies its operator by a float32
        # identity: its H is 2e-8 off the torch.func GGN (ours: 5e-17), hence 1e-7 here
        assert abs((vals[0] - vals[1]) / vals[1]) < 1e-7
        if structure != "kron":
            assert rel(grads[0], grads[1]) < 1e-7
        h = 1e-6
        fd = []
        for dd, ds in [(h, 0.0), (0.0, h)]:
            up = la.log_marginal_likelihood(torch.tensor(delta + dd, dtype=torch.float64), torch.tensor(sigma + ds, dtype=torch.float64))
            down = la.log_marginal_likelihood(torch.tensor(delta - dd, dtype=torch.float64), torch.tensor(sigma - ds, dtype=torch.float64))
            fd.append((up - down) / (2 * h))
        assert rel(grads[0], torch.stack(fd)) < 1e-6
    x = loader.dataset.tensors[0][:4]
    f, v = la(x)
    g, w = ref(x)
    torch.testing.assert_close(f, g)
    # Kron's roots go through a Gram-matrix eigh (√eps-level rounding): 5e-8 measured
    assert rel(v, w) < 1e-6


def test_regression_noise_tuning_converges_to_the_evidence_maximum():
    """optimize_prior_and_noise restarts laplace-torch's regression-example loop (Adam on
    log δ and log σ) until a round gains under 1e-3 nats. Reference: the maximiser of
    laplace-torch's own DiagLaplace evidence by L-BFGS to a gradient of 1e-10. One round
    of 80 steps stops short of it (more than 1% off here); the rounds land within 1e-2."""
    model = lora_mlp()
    loader = mlp_loader("regression")
    la, ref = fit_both(model, loader, "regression", "diag", "ggn")
    prior, sigma = laplace_llm.optimize_prior_and_noise(la, n_steps=80, lr=0.1)
    log_prior = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_prior, log_sigma], lr=0.1)
    for _ in range(80):
        opt.zero_grad()
        (-ref.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        opt.step()
    one_round = (log_prior.detach().exp(), log_sigma.detach().exp())
    lbfgs = torch.optim.LBFGS([log_prior, log_sigma], max_iter=500, tolerance_grad=1e-10,
                              tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = -ref.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        loss.backward()
        return loss

    lbfgs.step(closure)
    best = (log_prior.detach().exp(), log_sigma.detach().exp())
    assert rel(one_round[0], best[0]) > 1e-2
    assert rel(prior, best[0]) < 1e-2
    assert abs(sigma / best[1] - 1).item() < 1e-2
    assert float(la.sigma_noise) == pytest.approx(float(sigma))


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mc_fisher_equals_brute_force_with_the_same_samples(structure, likelihood):
    """fisher_type="mc": Σ_n (J_nᵀ v_n)(J_nᵀ v_n)ᵀ with v = p − onehot(ŷ), ŷ ~ Cat(p)
    (classification) or v = ε ~ N(0, I) (regression), drawn from a generator seeded as
    the fit's; J from torch.func."""
    model = llama()
    loader = llama_loader(likelihood, n=7)
    la = Laplace(model, likelihood, subset_of_weights="lora", hessian_structure=structure,
                 fisher_type="mc", mc_samples=2, seed=3)
    la.fit(loader)
    gen = torch.Generator().manual_seed(3)
    H = torch.zeros(la.n_params, la.n_params, dtype=torch.float64)
    for batch in loader:
        Js, f = la.backend.jacobians(batch)
        for _ in range(2):
            if likelihood == "regression":
                v = torch.randn(f.shape, generator=gen, dtype=torch.float64)
            else:
                p = torch.softmax(f, -1)
                y = torch.multinomial(p, 1, generator=gen).squeeze(-1)
                v = p - torch.nn.functional.one_hot(y, f.shape[-1]).double()
            g = torch.einsum("bc,bcp->bp", v, Js)
            H += g.T @ g / 2
    ref = H.diagonal() if structure == "diag" else H
    assert rel(la.H, ref) < RTOL


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_lora_modules_equal_a_fit_with_the_other_lora_weights_frozen(structure):
    """lora_modules=["*.q_proj"] on a q/v LoRA model gives the posterior of the same model
    with v_proj's LoRA frozen: curvature, evidence, GLM predictive and weight samples."""
    kw = dict(fisher_type="ggn", prior_precision=0.5)
    if structure == "kron":
        kw.update(n_kfac=64)
    loader = llama_loader("classification")
    model = llama()
    flags = [p.requires_grad for p in model.parameters()]
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure=structure,
                 lora_modules=["*.q_proj"], **kw)
    assert [p.requires_grad for p in model.parameters()] == flags  # model left as it was
    la.fit(loader)
    frozen = llama()
    for name, p in frozen.named_parameters():
        if "v_proj" in name:
            p.requires_grad_(False)
    ref = Laplace(frozen, "classification", subset_of_weights="lora", hessian_structure=structure, **kw)
    ref.fit(loader)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert la.n_params == ref.n_params < total
    assert all("q_proj" in b.name for b in la.blocks)
    torch.testing.assert_close(la.mean, ref.mean)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-10, atol=0)
    batch = next(iter(llama_loader("classification", n=3, seed=4)))
    torch.testing.assert_close(la(batch), ref(batch), rtol=1e-9, atol=1e-12)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(la.sample(5, generator=g1), ref.sample(5, generator=g2))
    # NN samples move only the selected weights and restore them
    v_before = [p.detach().clone() for n, p in model.named_parameters() if "v_proj.lora" in n]
    la(batch, pred_type="nn", link_approx="mc", n_samples=3)
    v_after = [p for n, p in model.named_parameters() if "v_proj.lora" in n]
    assert all(torch.equal(a, b) for a, b in zip(v_before, v_after))


def test_last_layer_lora_is_llla():
    """LoRA on lm_head too; lora_modules=["lm_head"] keeps only the head's LoRA pair
    Bayesian (LLLA) and equals a fit with the attention LoRA frozen."""
    targets = ("q_proj", "v_proj", "lm_head")
    loader = llama_loader("classification")
    model = llama(target_modules=targets)
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron",
                 lora_modules=["lm_head"], fisher_type="ggn", n_kfac=128)
    la.fit(loader)
    assert [b.role for b in la.blocks] == ["lora_A", "lora_B"]
    assert all("lm_head" in b.name for b in la.blocks)
    frozen = llama(target_modules=targets)
    for name, p in frozen.named_parameters():
        if "lm_head" not in name:
            p.requires_grad_(False)
    ref = Laplace(frozen, "classification", subset_of_weights="all", hessian_structure="kron",
                  backend=CurvlinopsGGN)
    ref.fit(loader)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-8, atol=0)
    batch = next(iter(llama_loader("classification", n=3, seed=4)))
    torch.testing.assert_close(la(batch), ref(batch), rtol=1e-8, atol=1e-10)


def test_lora_modules_errors_name_the_available_layers():
    model = llama()
    with pytest.raises(LoRAModelError, match=r"'k_proj'.*q_proj"):
        Laplace(model, "classification", subset_of_weights="lora", lora_modules=["k_proj"])
    with pytest.raises(ValueError, match="non-empty"):
        Laplace(model, "classification", subset_of_weights="lora", hessian_structure="diag",
                lora_modules=[])
    # a per-block prior refers to the selected blocks
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="diag",
                 lora_modules="q_proj", prior_precision=torch.tensor([1.0, 2.0]))
    assert la.n_layers == 2
    assert la.prior_precision_diag.shape == (la.n_params,)


def test_full_refuses_above_max_params_with_the_memory_it_would_take():
    model = llama()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"over {n} LoRA weights.*{n * n * 8 / 1024:.1f} KiB.*max_params={n}"):
        Laplace(model, "classification", subset_of_weights="lora", hessian_structure="full",
                max_params=n - 1)
    assert [p.requires_grad for p in model.parameters()] == flags
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="full",
                 max_params=n)
    assert la.n_params == n


def test_backends_and_targets_are_checked():
    model = lora_mlp()
    with pytest.raises(ValueError, match="Leave `backend` unset"):
        Laplace(model, "classification", subset_of_weights="lora", hessian_structure="diag",
                backend=CurvlinopsGGN)
    la = Laplace(model, "regression", subset_of_weights="lora", hessian_structure="diag")
    X = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="real-valued targets"):
        la.fit(DataLoader(TensorDataset(X, torch.zeros(4, 3, dtype=torch.long)), batch_size=2))
    with pytest.raises(ValueError, match=r"unsqueeze"):
        la.fit(DataLoader(TensorDataset(X, torch.zeros(4, dtype=torch.float64)), batch_size=2))
    with pytest.raises(AttributeError, match="not fitted"):
        la(X)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_posterior_file_round_trip_keeps_structure_selection_and_noise(tmp_path, structure):
    """A regression posterior over a module selection, saved and loaded: same class,
    blocks, σ and predictions."""
    model = llama()
    la = Laplace(model, "regression", subset_of_weights="lora", hessian_structure=structure,
                 lora_modules=["*.v_proj"], sigma_noise=0.7, fisher_type="ggn", prior_precision=2.0)
    la.fit(llama_loader("regression"))
    la.save(tmp_path / "post.safetensors")
    back = LoRALaplace.load(tmp_path / "post.safetensors", model)
    assert type(back) is type(la) and back.lora_modules == ["*.v_proj"]
    assert float(back.sigma_noise) == pytest.approx(0.7)
    batch = next(iter(llama_loader("regression", n=3, seed=2)))
    for a, b in zip(back(batch), la(batch)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(back.log_marginal_likelihood(), la.log_marginal_likelihood())


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_reward_model_pairs_equal_laplace_torch(structure):
    """Preference pairs (B, 2, T) run as 2B sequences: each example's gradient sums its
    two sequences; the posterior and the reward's mean and variance on single sequences
    equal laplace-torch's reward_modeling Diag/FullLaplace (BERT reward model, float64;
    1e-5 relative as above)."""
    from tests.posterior.test_reward import pair_items, reward_model, singles

    model = reward_model("bert")
    model.model.base_model.model.config._attn_implementation = "eager"
    loader = DataLoader(DictDataset(pair_items(10, 6, seed=0)), batch_size=4)
    la, ref = fit_both(model, loader, "reward_modeling", structure, "ggn", prior_precision=0.5)
    assert rel(la.H, ref.H) < RTOL
    lml, ref_lml = la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    assert abs((lml - ref_lml) / ref_lml) < RTOL
    x = singles(3, 6, seed=1)
    (m, v), (rm, rv) = la(x), ref(x)
    torch.testing.assert_close(m, rm)
    assert v.shape == (3, 1, 1) and rel(v, rv) < RTOL


def test_plain_head_alone_is_last_layer_laplace():
    """A sequence classifier's fully trained head (peft ``modules_to_save``) can be the
    only Bayesian layer: lora_modules=["classifier"] equals laplace-torch's KronLaplace
    on the same model with every other weight frozen (the head's weight and bias)."""
    from tests.fixtures.batches import token_loader
    from tests.fixtures.models import tiny_bert_seqcls_lora

    torch.manual_seed(0)
    loader = token_loader(n=9, length=5, batch_size=4, n_classes=3, vocab=64)
    model = LLMClassifier(tiny_bert_seqcls_lora(num_labels=3, seed=0).double())
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure="kron",
                 lora_modules=["classifier"], fisher_type="ggn", n_kfac=512, prior_precision=0.7)
    la.fit(loader)
    assert [b.role for b in la.blocks] == ["linear", "linear"]
    frozen = LLMClassifier(tiny_bert_seqcls_lora(num_labels=3, seed=0).double())
    for name, p in frozen.named_parameters():
        if "classifier" not in name:
            p.requires_grad_(False)
    ref = Laplace(frozen, "classification", subset_of_weights="all", hessian_structure="kron",
                  backend=CurvlinopsGGN, prior_precision=0.7)
    ref.fit(loader)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood(),
                               rtol=1e-8, atol=0)
    batch = next(iter(token_loader(n=3, length=5, n_classes=3, vocab=64, seed=4)))
    torch.testing.assert_close(la(batch), ref(batch), rtol=1e-8, atol=1e-10)
