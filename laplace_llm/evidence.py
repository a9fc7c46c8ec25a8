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

from collections.abc import Callable

import torch

__all__ = ["linearised_scatter"]


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
    return weighted @ delta - weighted @ solve(weighted)
