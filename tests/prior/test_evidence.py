"""The evidences of :mod:`laplace_llm.prior.evidence` and marglik's loop around them.

References:

- *Closed form.* A model linear in its Bayesian weights (two plain heads on frozen
  features, ``lora_modules`` selecting them), a Gaussian likelihood and ``θ*`` at least
  squares: the linearised evidence is the exact log marginal likelihood
  ``Σ_c log N(y_c; Φμ₀, σ²I + ΦΦᵀ/δ_c)``; laplace-torch's formula equals it at the ridge
  mode of each prior. K-FAC with the exact GGN is exact for such heads, and the two heads
  act on different outputs, so the curvature is block diagonal. float64: measured 1e-15
  relative, asserted at 1e-10.
- *Dense minimum.* On a tiny Llama with truncated factors, the posterior precision as a
  dense matrix ``P`` (``to_matrix``), ``τH = P − Λ₀``, and the scatter found by solving
  ``P θ = τH θ* + Λ₀ μ₀`` for the quadratic model's minimiser and evaluating
  ``(θ−θ*)ᵀτH(θ−θ*) + (θ−μ₀)ᵀΛ₀(θ−μ₀)`` there (1e-13 relative measured, 1e-9 asserted).
- *float64.* The eigenbasis sums in float32 against the same sums in float64.
"""

import warnings

import pytest
import torch
from laplace import Laplace
from laplace.utils.enums import TuningMethod
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset

import laplace_llm
from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.matrix import LowRankKronDecomposed
from laplace_llm.posterior.base import LoRALaplaceBase
from laplace_llm.prior.evidence import ATOL_NATS, until_converged
from tests.fixtures.batches import TARGET_IDS, token_loader
from tests.fixtures.models import tiny_llama_lora

# ---------------------------------------------------------------- closed form


class TwoHeads(torch.nn.Module):
    """Frozen tanh features (with LoRA, which stays at its values) and two linear heads."""

    def __init__(self, d_in=4, hidden=6):
        super().__init__()
        self.features = torch.nn.Linear(d_in, hidden)
        self.head_a = torch.nn.Linear(hidden, 2, bias=False)
        self.head_b = torch.nn.Linear(hidden, 1, bias=False)

    def forward(self, x):
        h = torch.tanh(self.features(x))
        return torch.cat([self.head_a(h), self.head_b(h)], -1)


N, MU0 = 15, 0.1


def linear_model():
    """The model, its data loader, features Φ ``(N, 6)``, targets ``(N, 3)``, head setter."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["features"],
                     modules_to_save=["head_a", "head_b"], init_lora_weights=False)
    model = get_peft_model(TwoHeads().double(), cfg).double()
    inner = model.base_model.model
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        Phi = torch.tanh(inner.features(X))
    Y = Phi @ torch.randn(6, 3, generator=g, dtype=torch.float64)
    Y += 0.3 * torch.randn(N, 3, generator=g, dtype=torch.float64)
    heads = [inner.head_a.modules_to_save.default, inner.head_b.modules_to_save.default]

    def set_heads(W):  # (3, 6): one row per output
        with torch.no_grad():
            heads[0].weight.copy_(W[:2])
            heads[1].weight.copy_(W[2:])

    set_heads(torch.linalg.lstsq(Phi, Y).solution.T)  # θ* at least squares
    return model, DataLoader(TensorDataset(X, Y), batch_size=4), Phi, Y, set_heads


def exact_lml(Phi, Y, deltas, sigma):
    """``Σ_c log N(y_c; Φμ₀, σ²I + ΦΦᵀ/δ_c)``: head a (outputs 0, 1) has prior δ₀, head b δ₁."""
    out = 0.0
    for c in range(3):
        cov = sigma**2 * torch.eye(N, dtype=torch.float64) + Phi @ Phi.T / deltas[0 if c < 2 else 1]
        normal = torch.distributions.MultivariateNormal(Phi.sum(1) * MU0, cov)
        out = out + normal.log_prob(Y[:, c])
    return out


def linear_laplace(structure, evidence, model, loader):
    la = Laplace(model, "regression", subset_of_weights="lora", hessian_structure=structure,
                 lora_modules=["head_a", "head_b"], fisher_type="ggn", evidence=evidence,
                 prior_mean=MU0)
    la.fit(loader)
    return la


PRIORS = [((0.5, 0.5), 0.3), ((0.1, 3.0), 1.0), ((30.0, 2.0), 0.2), ((1e4, 1e-3), 0.5)]


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_linearised_evidence_is_the_exact_marginal_likelihood_of_a_linear_model(structure):
    """Scalar and per-block priors, several noises, from δ = 1e-3 to 1e4."""
    model, loader, Phi, Y, _ = linear_model()
    la = linear_laplace(structure, "linearised", model, loader)
    assert [b.role for b in la.blocks] == ["linear", "linear"]
    for deltas, sigma in PRIORS:
        for prior in (torch.tensor(deltas[:1]), torch.tensor(deltas)):
            prior = prior.double()
            s = torch.tensor(sigma, dtype=torch.float64)
            exact = exact_lml(Phi, Y, prior.expand(2), s)
            torch.testing.assert_close(la.log_marginal_likelihood(prior, s), exact,
                                       rtol=1e-10, atol=0)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_laplace_torchs_evidence_is_exact_at_the_ridge_mode(structure):
    """The default evidence charges the prior at ``θ*``: exact where ``θ*`` is the
    posterior mode under the prior being scored (ridge regression with that δ and σ)."""
    model, loader, Phi, Y, set_heads = linear_model()
    for deltas, sigma in PRIORS[:3]:
        rows = []
        for c in range(3):
            d = deltas[0 if c < 2 else 1]
            A = Phi.T @ Phi / sigma**2 + d * torch.eye(6, dtype=torch.float64)
            rows.append(torch.linalg.solve(A, Phi.T @ Y[:, c] / sigma**2 + d * MU0))
        set_heads(torch.stack(rows))
        la = Laplace(model, "regression", subset_of_weights="lora", hessian_structure=structure,
                     lora_modules=["head_a", "head_b"], fisher_type="ggn", prior_mean=MU0)
        la.fit(loader)
        assert la.options.evidence == "map"  # the default
        prior = torch.tensor(deltas, dtype=torch.float64)
        s = torch.tensor(sigma, dtype=torch.float64)
        torch.testing.assert_close(la.log_marginal_likelihood(prior, s),
                                   exact_lml(Phi, Y, prior, s), rtol=1e-10, atol=0)


def exact_optimum(Phi, Y, per_block):
    """Maximise the closed form in (log δ, log σ) with L-BFGS to a gradient of 1e-12."""
    log_prior = torch.zeros(2 if per_block else 1, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_prior, log_sigma], max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -exact_lml(Phi, Y, log_prior.exp().expand(2), log_sigma.exp())
        loss.backward()
        return loss

    opt.step(closure)
    return log_prior.detach().exp(), log_sigma.detach().exp()


@pytest.mark.parametrize("prior_structure", ["scalar", "layerwise"])
def test_type_ii_maximum_likelihood_finds_the_exact_optimum(prior_structure):
    """optimize_prior_and_noise on the linearised evidence lands on the closed form's
    maximiser in (δ, σ). Its rounds stop when one gains under 1e-3 nats; measured
    within 8e-4 relative of the optimum (one round of 100 Adam steps: 2%), asserted
    at 3e-3. No warning: the optimum is finite and reached."""
    model, loader, Phi, Y, _ = linear_model()
    la = linear_laplace("kron", "linearised", model, loader)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prior, sigma = laplace_llm.optimize_prior_and_noise(la, prior_structure=prior_structure)
    best_prior, best_sigma = exact_optimum(Phi, Y, prior_structure == "layerwise")
    torch.testing.assert_close(prior, best_prior, rtol=3e-3, atol=0)
    torch.testing.assert_close(sigma, best_sigma, rtol=3e-3, atol=0)


# ------------------------------------------------------- truncated Kronecker


def fitted(evidence="linearised", dtype=torch.float64, **kw):
    model = LLMClassifier(tiny_llama_lora(seed=0, dtype=dtype, hidden=32), TARGET_IDS)
    kw = {"fisher_type": "ggn", "n_kfac": 3, "lr_threshold": 4, "prior_precision": 0.3, **kw}
    la = LoRALaplace(model, "classification", evidence=evidence, **kw)
    la.fit(token_loader(n=6, length=5, batch_size=6))
    return la


def dense_scatter(la):
    P = la.posterior_precision.to_matrix()
    P0 = torch.diag(la.prior_precision_diag)
    H = P - P0
    theta, mu0 = la.mean, la.prior_mean * torch.ones_like(la.mean)
    theta_lin = torch.linalg.solve(P, H @ theta + P0 @ mu0)
    diff, off = theta_lin - theta, theta_lin - mu0
    return diff @ H @ diff + off @ P0 @ off, (theta - mu0) @ P0 @ (theta - mu0), H


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("truncation", ["isotropic", "prior"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "prior mean"])
def test_low_rank_scatter_equals_the_explicit_minimum(truncation, prior, damping):
    """Truncated factors (rank 3 of side 32), both truncations, damping, a scalar or
    per-block prior and a non-zero prior mean: the scatter is the quadratic model's
    minimum and the log-det ratio is the dense one."""
    la = fitted(truncation=truncation, damping=damping,
                prior_mean=0.05 if prior == "prior mean" else 0.0)
    if prior == "layerwise":
        la.prior_precision = torch.linspace(0.1, 3.0, la.n_layers, dtype=torch.float64)
    lin, at_map, _ = dense_scatter(la)
    torch.testing.assert_close(la.scatter, lin, rtol=1e-9, atol=0)
    assert 0 < la.scatter < at_map
    dense_ratio = torch.linalg.slogdet(la.posterior_precision.to_matrix())[1] \
        - la.prior_precision_diag.log().sum()
    torch.testing.assert_close(la.log_det_ratio, dense_ratio, rtol=1e-9, atol=0)
    torch.testing.assert_close(la.log_marginal_likelihood(),
                               la.log_likelihood - 0.5 * (dense_ratio + lin), rtol=1e-12, atol=0)


def test_map_evidence_is_laplace_torchs_scatter():
    la = fitted(evidence="map")
    _, at_map, _ = dense_scatter(la)
    torch.testing.assert_close(la.scatter, at_map, rtol=1e-12, atol=0)


def test_scatter_limits():
    """In the eigenbasis of ``τH`` the scatter is ``Σ δ dᵢ² λᵢ/(λᵢ+δ)``: a prior far
    weaker than every curvature eigenvalue (here λ ≥ 2.4e-7, δ = 1e-12) charges the
    weights in full, as laplace-torch does; a strong one charges ``dᵀτHd``, only what
    the data determine."""
    la = fitted()
    la.prior_precision = 1e-12
    _, at_map, H = dense_scatter(la)
    assert torch.linalg.eigvalsh(H).min() > 1e-7
    torch.testing.assert_close(la.scatter, at_map, rtol=1e-4, atol=0)
    la.prior_precision = 1e7
    _, _, H = dense_scatter(la)
    d = la.mean
    torch.testing.assert_close(la.scatter, d @ H @ d, rtol=1e-5, atol=0)


def as_float32(P: LowRankKronDecomposed) -> LowRankKronDecomposed:
    def cast(nested):
        return [[t.float() for t in ts] for ts in nested]

    return LowRankKronDecomposed(cast(P.eigenvectors), cast(P.eigenvalues), P.sides,
                                 P.deltas.float(), P.tau.float(), P.damping, cast(P.remainders))


@pytest.mark.parametrize("damping", [False, True])
def test_float32_evidence_terms_match_float64(damping):
    """The eigenbasis sums in float32 on the float64 posterior's eigenpairs, from δ = 1e-2
    to 1e6: log-det ratio and scatter within 1e-4 relative of float64 per block (measured
    ≤ 2e-7). Without damping, the difference form ``dᵀΛ₀d − (Λ₀d)ᵀP⁻¹(Λ₀d)`` in float32
    is off by 24% at δ = 1e4 and 100% at δ = 1e6 here (damping's curvature part grows with
    ``√δ``, so there it does not cancel as badly)."""
    la = fitted(damping=damping)
    d = la.mean - la.prior_mean
    for delta in (1e-2, 1.0, 1e2, 1e4, 1e6):
        la.prior_precision = delta
        P = la.posterior_precision
        logdet, scatter = P.evidence_terms(d)
        logdet32, scatter32 = as_float32(P).evidence_terms(d.float())
        torch.testing.assert_close(logdet32.double(), logdet, rtol=1e-4, atol=0)
        torch.testing.assert_close(scatter32.double(), scatter, rtol=1e-4, atol=0)
    if not damping:
        P32, w = as_float32(P), (delta * d).float()
        naive = w @ d.float() - w @ P32.bmm(w, exponent=-1)
        assert abs(naive.double() / scatter.sum() - 1) > 1e-2


@pytest.mark.parametrize("evidence", ["linearised", "map"])
def test_evidence_gradient_in_the_prior_equals_finite_differences(evidence):
    """``marglik`` follows autograd through the eigenspace sums; central differences of
    the log evidence in log δ (float64, step 1e-5: error ~1e-10) agree to 1e-6."""
    la = fitted(evidence)
    log_delta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    lml = la.log_marginal_likelihood(prior_precision=log_delta.exp())
    (grad,) = torch.autograd.grad(lml, log_delta)
    h = 1e-5
    with torch.no_grad():
        up = la.log_marginal_likelihood(prior_precision=torch.tensor(0.4 + h, dtype=torch.float64).exp())
        down = la.log_marginal_likelihood(prior_precision=torch.tensor(0.4 - h, dtype=torch.float64).exp())
    torch.testing.assert_close(grad, (up - down) / (2 * h), rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------ marglik


def quiet_marglik(la, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.optimize_prior_precision(**kw)
    return [str(w.message) for w in caught if "link_approx" not in str(w.message)]


@pytest.mark.parametrize("structure", ["scalar", "layerwise"])
def test_float32_and_float64_optima_agree(structure):
    """The linearised marglik on the tiny Llama, fitted in float32 and in float64, with
    a tempered posterior (τ = 1000, as a thousand times the data) so that some priors
    have a finite optimum. Those agree within 1% (measured ≤ 1.1e-3); the blocks whose
    prior goes towards infinity are the same in both and are named by the warning."""
    runs = {}
    for dtype in (torch.float32, torch.float64):
        la = fitted(dtype=dtype, temperature=1e-3, prior_precision=1.0)
        messages = quiet_marglik(la, method="marglik", prior_structure=structure)
        flagged = [b.name for b in la.blocks if any(f"{b.name}," in m or f"{b.name} " in m
                                                    for m in messages)]
        runs[dtype] = (la.prior_precision.double(), flagged, messages)
    (p32, f32, m32), (p64, f64, m64) = runs[torch.float32], runs[torch.float64]
    assert f32 == f64
    finite = torch.tensor([b.name not in f64 for b in la.blocks])
    if structure == "scalar":
        assert f64 == [] and m32 == m64 == []
        torch.testing.assert_close(p32, p64, rtol=1e-2, atol=0)
    else:
        assert 0 < int(finite.sum()) < la.n_layers
        torch.testing.assert_close(p32[finite], p64[finite], rtol=1e-2, atol=0)
        assert (p32[~finite] > 1e4).all() and (p64[~finite] > 1e4).all()


@pytest.mark.parametrize("call", ["no arguments", "enum", "string"])
def test_linearised_marglik_restarts_for_every_spelling_of_the_method(call):
    """``optimize_prior_precision()`` (laplace-torch's default method) and
    ``method=TuningMethod.MARGLIK`` restart the loop as ``method="marglik"`` does
    (str() of the enum member is not its value on Python 3.11)."""
    kw = {"no arguments": {}, "enum": {"method": TuningMethod.MARGLIK},
          "string": {"method": "marglik"}}[call]
    one = fitted()
    super(LoRALaplaceBase, one).optimize_prior_precision(method="marglik")
    la = fitted()
    quiet_marglik(la, **kw, prior_structure="scalar")
    reference = fitted()
    quiet_marglik(reference, method="marglik", prior_structure="scalar")
    torch.testing.assert_close(la.prior_precision, reference.prior_precision, rtol=0, atol=0)
    assert la.prior_precision.item() > 3 * one.prior_precision.item()


def test_marglik_restarts_until_converged_and_warns_when_it_cannot():
    """On these random labels the linearised evidence rises all the way to δ → ∞ (under
    the quadratic model, no fine-tuning explains the data best): laplace-torch's single
    loop of 100 Adam steps stops early; the restarted loop climbs further, never lowering
    the evidence, until a round gains under 1e-3 nats, and warns that the prior goes
    towards infinity. One Adam step per round cannot get there in 20 rounds, and says so.
    With ``evidence="map"`` the loop is laplace-torch's, step for step."""
    one = fitted()
    super(LoRALaplaceBase, one).optimize_prior_precision(method="marglik")
    la = fitted()
    messages = quiet_marglik(la, method="marglik", prior_structure="scalar")
    assert len(messages) == 1 and "towards infinity" in messages[0]
    assert "shared by all 8 blocks," in messages[0]
    assert la.prior_precision.item() > 3 * one.prior_precision.item()
    assert la.log_marginal_likelihood().item() > one.log_marginal_likelihood().item()
    short = fitted()
    with pytest.warns(UserWarning, match="did not converge in 20 rounds of 1 steps"):
        short.optimize_prior_precision(method="marglik", n_steps=1, prior_structure="scalar")
    at_map, reference = fitted(evidence="map"), fitted(evidence="map")
    at_map.optimize_prior_precision(method="marglik")  # the default: one prior per block
    super(LoRALaplaceBase, reference).optimize_prior_precision(method="marglik",
                                                               prior_structure="layerwise")
    assert torch.equal(at_map.prior_precision, reference.prior_precision)


def test_a_round_that_lowers_the_evidence_keeps_the_best_values():
    """Scripted rounds: the evidence rises, then a round overshoots and lowers it; the
    values of the best round are put back and the loop stops."""
    values = iter([-10.0, -5.0, -7.0])
    state = {"x": torch.tensor([1.0])}
    rounds = iter([torch.tensor([2.0]), torch.tensor([40.0])])

    def run_round(start):
        state["x"] = next(rounds)

    def put(v):
        state["x"] = v[0]

    assert until_converged(run_round, lambda: (state["x"],), put, lambda: next(values))
    assert state["x"].item() == 2.0
    # and a round that gains under ATOL_NATS ends it at that round's values
    values = iter([-10.0, -10.0 + ATOL_NATS / 2])
    rounds = iter([torch.tensor([3.0])])
    state["x"] = torch.tensor([1.0])
    assert until_converged(run_round, lambda: (state["x"],), put, lambda: next(values))
    assert state["x"].item() == 3.0


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_warning_names_the_blocks_whose_prior_goes_to_infinity(structure):
    """laplace-torch's evidence with per-block priors on LoRA adapters that were never
    trained (``lora_B = 0``): each ``lora_B`` block's evidence ``−½ log det(1 + τH/δ)``
    rises for ever in δ (nothing to charge the prior with), while its ``lora_A`` partner
    has no curvature (zero output gradient) and a finite weight, whose evidence
    falls in δ. The warning names exactly the ``lora_B`` blocks (Kronecker and diagonal
    score every block in one pass, full once per block)."""
    model = LLMClassifier(tiny_llama_lora(seed=0, dtype=torch.float64, hidden=32,
                                          init_lora_weights=True), TARGET_IDS)
    kw = dict(n_kfac=3, lr_threshold=4) if structure == "kron" else {}
    la = Laplace(model, "classification", subset_of_weights="lora", hessian_structure=structure,
                 fisher_type="ggn", **kw)
    la.fit(token_loader(n=6, length=5, batch_size=6))
    messages = quiet_marglik(la, method="marglik", prior_structure="layerwise")
    assert len(messages) == 1
    lora_b = [b.name for b in la.blocks if b.role == "lora_B"]
    named = [b.name for b in la.blocks if b.name in messages[0]]
    assert named == lora_b and len(lora_b) == 4
