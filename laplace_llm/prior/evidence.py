"""The prior's scatter term of the evidence, for every LoRA posterior structure.

The Laplace evidence is ``log p(D|θ*) − ½ (log det(P Λ₀⁻¹) + S)`` with posterior
precision ``P = τH + Λ₀``. laplace-torch charges the prior at the fine-tuned weights,
``S = dᵀΛ₀d`` with ``d = θ* − μ₀``: right when ``θ*`` is the mode under that prior, i.e.
when fine-tuning used the matching weight decay. Post-hoc it is not: the optimiser moved
weights the data do not determine, and their size then reads as a broad prior.

The posterior is the Gaussian of a quadratic (linearised) model,
``log p(D|θ) ≈ log p(D|θ*) − ½ (θ−θ*)ᵀ τH (θ−θ*)``. Its exact evidence, taken at its own
mode under the prior ``N(μ₀, Λ₀⁻¹)``, has the scatter

    S_lin = min_θ (θ−θ*)ᵀ τH (θ−θ*) + (θ−μ₀)ᵀ Λ₀ (θ−μ₀) = dᵀΛ₀d − (Λ₀d)ᵀ P⁻¹ (Λ₀d)

(completing the square). In an eigenbasis of ``τH`` with an isotropic prior ``δ`` this is
``Σᵢ δ dᵢ² λᵢ/(λᵢ+δ)``: a weight counts in proportion to how well the data determine it,
so ``0 ≤ S_lin ≤ dᵀΛ₀d``, with equality as ``H → ∞``. This is MacKay's evidence
re-estimation with the network re-trained under each prior, done in closed form for the
model the predictive uses. The mean of the predictive stays ``θ*``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import torch

__all__ = ["linearised_scatter", "optimize_prior_until_converged"]


def linearised_scatter(
    delta: torch.Tensor,
    prior_precision_diag: torch.Tensor,
    solve: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Return ``dᵀΛ₀d − (Λ₀d)ᵀ P⁻¹ (Λ₀d)``, the linearised model's scatter.

    Parameters
    ----------
    delta : torch.Tensor
        ``d = θ* − μ₀``, shape ``(P,)``.
    prior_precision_diag : torch.Tensor
        the diagonal of ``Λ₀``, shape ``(P,)``.
    solve : callable
        ``v ↦ P⁻¹ v`` for the posterior precision ``P``; differentiable in the prior
        precision, so ``marglik`` can follow its gradient.
    """
    weighted = prior_precision_diag * delta
    solved = solve(weighted)
    # the two terms nearly cancel where the data determine little (on the real MiniLM the
    # result is a seventh of either), so the long sums are taken in float64
    w = weighted.double()
    return (w @ delta.double() - w @ solved.double()).to(weighted.dtype)


#: Restarts of laplace-torch's Adam loop (100 steps each by default) before giving up.
MAX_ROUNDS = 20
#: Converged when no prior precision moves by more than this fraction in a round (1%:
#: well inside what moves a predictive; on the real MiniLM the slope of the evidence in
#: log δ is then below 1, against 38 after laplace-torch's single loop).
RTOL = 1e-2
#: ... or when a round raises the log evidence by less than this (nats): a prior whose
#: evidence keeps rising towards δ → ∞ (a block the data leave to the prior) stops there.
ATOL_NATS = 1e-3


def optimize_prior_until_converged(la, parent: Callable[..., None], args, kwargs) -> None:
    """Run laplace-torch's ``optimize_prior_precision`` (``parent``) until marglik converges.

    laplace-torch takes a fixed number of Adam steps on ``log δ`` from ``init_prior_prec``.
    Adam's step shrinks once the first, steep gradients have filled its second-moment
    estimate, and the linearised evidence is flat in ``log δ`` far from the data's
    curvature scale, so 100 steps can stop well short of the optimum (measured on the
    real MiniLM: δ 50.8, evidence gradient 38 per unit of ``log δ``, against the
    optimum 140.5). The loop is restarted from where it stopped, with fresh Adam state,
    until a round moves no prior precision by more than ``RTOL`` or raises the log
    evidence by less than ``ATOL_NATS``; a warning says when ``MAX_ROUNDS`` rounds did
    not get there. Other methods, and ``evidence="map"``
    (laplace-torch's own evidence, kept step for step as laplace-torch runs it), call
    ``parent`` once.
    """
    bound = inspect.signature(parent).bind(*args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    parent(**call)
    if str(call["method"]) != "marglik" or la.options.evidence != "linearised":
        return
    with torch.no_grad():
        evidence = la.log_marginal_likelihood().item()
    for _ in range(MAX_ROUNDS - 1):
        before = la.prior_precision.detach().clone()
        parent(**{**call, "init_prior_prec": before})
        with torch.no_grad():
            now = la.log_marginal_likelihood().item()
        gain, evidence = now - evidence, now
        if ((la.prior_precision - before).abs() <= RTOL * before).all() or gain < ATOL_NATS:
            return
    warnings.warn(
        f"marglik did not converge in {MAX_ROUNDS} rounds of {call['n_steps']} steps: the "
        f"last round still moved the prior precision by more than {RTOL:.0e} relative and "
        f"raised the log evidence by more than {ATOL_NATS:.0e}. "
        "Pass a larger n_steps or lr, or check the fit.",
        stacklevel=3,
    )
