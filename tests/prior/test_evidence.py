"""The default evidence: the linearised model's, at its own mode.

Reference: the posterior precision as a dense matrix ``P`` (``to_matrix``; for low-rank
factors that is the low-rank-plus-remainder matrix the posterior uses), ``τH = P − Λ₀``,
and the scatter found by minimising the quadratic model's negative log joint explicitly:
solve ``P θ = τH θ* + Λ₀ μ₀`` for the minimiser and evaluate
``(θ−θ*)ᵀτH(θ−θ*) + (θ−μ₀)ᵀΛ₀(θ−μ₀)`` there. The library computes the closed form
``dᵀΛ₀d − (Λ₀d)ᵀP⁻¹(Λ₀d)`` through the Kronecker eigenspaces instead. float64 throughout;
the two agree to ~1e-13 relative, asserted at 1e-9.
"""

import warnings

import pytest
import torch

from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.posterior.base import LoRALaplaceBase
from tests.batches import TARGET_IDS, token_loader
from tests.models import tiny_llama_lora


def fitted(evidence="linearised", **kw):
    model = LLMClassifier(tiny_llama_lora(seed=0, dtype=torch.float64, hidden=32), TARGET_IDS)
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


@pytest.mark.parametrize("truncation", ["isotropic", "prior"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "prior mean"])
def test_low_rank_scatter_equals_the_explicit_minimum(truncation, prior):
    """Truncated factors (rank 3 of side 32), both truncations, a scalar or per-block
    prior and a non-zero prior mean: the scatter is the quadratic model's minimum."""
    la = fitted(truncation=truncation, prior_mean=0.05 if prior == "prior mean" else 0.0)
    if prior == "layerwise":
        la.prior_precision = torch.linspace(0.1, 3.0, la.n_layers, dtype=torch.float64)
    lin, at_map, _ = dense_scatter(la)
    torch.testing.assert_close(la.scatter, lin, rtol=1e-9, atol=0)
    assert 0 < la.scatter < at_map
    log_det_ratio = la.log_det_posterior_precision - la.log_det_prior_precision
    torch.testing.assert_close(la.log_marginal_likelihood(),
                               la.log_likelihood - 0.5 * (log_det_ratio + lin), rtol=1e-12, atol=0)


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


@pytest.mark.parametrize("evidence", ["linearised", "map"])
def test_evidence_gradient_in_the_prior_equals_finite_differences(evidence):
    """``marglik`` follows autograd through the eigenspace solve; central differences of
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


def test_marglik_picks_a_tighter_prior_than_laplace_torchs_evidence():
    """The linearised scatter is below laplace-torch's at every δ, so the evidence's slope
    is higher everywhere and its maximiser lies above laplace-torch's."""
    lin, at_map = fitted(), fitted(evidence="map")
    lin.optimize_prior_precision(method="marglik")  # its maximum is at δ → ∞
    at_map.optimize_prior_precision(method="marglik")
    assert lin.prior_precision.item() > at_map.prior_precision.item()


def test_marglik_restarts_until_converged_and_warns_when_it_cannot():
    """On these random labels the linearised evidence rises all the way to δ → ∞ (under
    the quadratic model, no fine-tuning explains the data best): laplace-torch's single
    loop of 100 Adam steps stops early; the restarted loop climbs further, never lowering
    the evidence, until a round gains under 1e-3 nats. One Adam step per round cannot get
    there in 20 rounds, and says so. With ``evidence="map"`` the loop is laplace-torch's,
    step for step."""
    one = fitted()
    super(LoRALaplaceBase, one).optimize_prior_precision(method="marglik")
    la = fitted()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # converged: no warning
        warnings.filterwarnings("ignore", message="By default `link_approx`")
        la.optimize_prior_precision(method="marglik")
    assert la.prior_precision.item() > 3 * one.prior_precision.item()
    assert la.log_marginal_likelihood().item() > one.log_marginal_likelihood().item()
    short = fitted()
    with pytest.warns(UserWarning, match="did not converge in 20 rounds of 1 steps"):
        short.optimize_prior_precision(method="marglik", n_steps=1)
    at_map, reference = fitted(evidence="map"), fitted(evidence="map")
    at_map.optimize_prior_precision(method="marglik")
    super(LoRALaplaceBase, reference).optimize_prior_precision(method="marglik")
    assert torch.equal(at_map.prior_precision, reference.prior_precision)
