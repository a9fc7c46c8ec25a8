"""The two evidences ``log_marginal_likelihood`` can return, and marglik's loop around them.

Both are ``log p(D|θ*) − ½ (log det(P Λ₀⁻¹) + S)`` with posterior precision
``P = τH + Λ₀`` and ``d = θ* − μ₀``; they differ in the prior's scatter ``S``.

``evidence="map"`` (the default) is laplace-torch's: ``S = dᵀΛ₀d``, the prior charged at
the fine-tuned weights. It is exact for the Laplace approximation at the mode of the
posterior under the prior being scored, i.e. when fine-tuning used the matching weight
decay. A laplace-torch user switching to ``subset_of_weights="lora"`` gets the same
number, and marglik the same prior, as ``KronLaplace`` at full rank.

``evidence="linearised"`` is the evidence of the Gaussian (linearised) model the
posterior describes, taken at that model's own mode (Antorán et al., 2022, "Adapting the
Linearised Laplace Model Evidence for Modern Deep Learning", ICML). The likelihood is the
quadratic ``log p(D|θ*) − ½ (θ−θ*)ᵀ τH (θ−θ*)``, which assumes that the likelihood's
gradient at ``θ*`` is zero: a MAP trained to convergence without weight decay. Completing
the square gives

    S_lin = min_θ (θ−θ*)ᵀ τH (θ−θ*) + (θ−μ₀)ᵀ Λ₀ (θ−μ₀) = dᵀ (Λ₀⁻¹ + (τH)⁻¹)⁻¹ d
          = (Λ₀d)ᵀ P⁻¹ (τH d),

in an eigenbasis of ``P`` with an isotropic prior ``δ`` per block
``Σᵢ δ·cᵢ/(cᵢ+δ)·(projected d)ᵢ²`` with ``cᵢ = τλᵢ``: a weight counts in proportion to how
well the data determine it, so ``0 ≤ S_lin ≤ dᵀΛ₀d``. Where the data determine little,
its marglik picks a tighter prior than laplace-torch's, often ``δ → ∞`` (the posterior
collapses to the fine-tuned weights: :func:`warn_if_prior_diverges` says so).
The form ``dᵀΛ₀d − (Λ₀d)ᵀP⁻¹(Λ₀d)`` is a difference of two nearly equal numbers where
``δ ≫ τλ``, which float32 cannot resolve; every structure here evaluates it term by term
instead (Kronecker eigenbasis, diagonal) or in float64 (full), with ``log1p`` in the
log-det ratio, so float32 agrees with float64.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from laplace.utils.enums import TuningMethod

__all__ = [
    "diag_evidence_terms",
    "full_evidence_terms",
    "optimize_prior_until_converged",
    "until_converged",
    "warn_if_prior_diverges",
]

logger = logging.getLogger(__name__)


def diag_evidence_terms(
    curvature: torch.Tensor, prior_precision_diag: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per parameter ``log det(P/Λ₀)`` and linearised scatter of a diagonal posterior.

    Parameters
    ----------
    curvature : torch.Tensor
        ``τH``, shape ``(P,)``.
    prior_precision_diag : torch.Tensor
        the diagonal of ``Λ₀``, shape ``(P,)``.
    delta : torch.Tensor
        ``d = θ* − μ₀``, shape ``(P,)``.

    Returns
    -------
    ``log1p(τh/δ)`` and ``δ·τh/(τh+δ)·d²``, each ``(P,)``.
    """
    c, p = curvature, prior_precision_diag
    return torch.log1p(c / p), p * c / (c + p) * delta.square()


def full_evidence_terms(
    curvature: torch.Tensor, prior_precision_diag: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log det(P/Λ₀)`` and ``(Λ₀d)ᵀP⁻¹(τHd)`` of a dense posterior, in float64.

    ``P = τH + Λ₀`` is not diagonal in any basis shared with a per-block prior, so the
    two scalars are computed through a float64 Cholesky factor of ``P`` and returned in
    the input's dtype; differentiable in both ``τH`` and ``Λ₀``.

    Parameters
    ----------
    curvature : torch.Tensor
        ``τH``, shape ``(P, P)``.
    prior_precision_diag, delta : torch.Tensor
        ``(P,)`` each.
    """
    dtype = curvature.dtype
    H, p, d = curvature.double(), prior_precision_diag.double(), delta.double()
    L = torch.linalg.cholesky(H + torch.diag(p))
    logdet = 2 * torch.log(torch.diagonal(L)).sum() - torch.log(p).sum()
    solved = torch.cholesky_solve((H @ d).unsqueeze(-1), L).squeeze(-1)
    return logdet.to(dtype), ((p * d) @ solved).to(dtype)


#: Restarts of laplace-torch's Adam loop (100 steps each by default) before giving up.
MAX_ROUNDS = 20
#: Converged when no tuned value moves by more than this fraction in a round (1%:
#: well inside what moves a predictive; on the real MiniLM the slope of the evidence in
#: log δ is then below 1, against 38 after laplace-torch's single loop).
RTOL = 1e-2
#: ... or when a round raises the log evidence by less than this (nats): a prior whose
#: evidence keeps rising towards δ → ∞ (a block the data leave to the prior) stops there.
ATOL_NATS = 1e-3


def until_converged(
    run_round: Callable[[tuple[torch.Tensor, ...]], None],
    get: Callable[[], tuple[torch.Tensor, ...]],
    put: Callable[[tuple[torch.Tensor, ...]], None],
    evidence: Callable[[], float],
) -> bool:
    """Restart an optimiser round after round until the evidence stops rising.

    Each round starts from the best values so far (``run_round(best)`` leaves its result
    for ``get``). A round that raises the log evidence by less than ``ATOL_NATS``, or
    moves no value by more than ``RTOL`` relative, ends the loop; a round that lowers it
    (Adam overshooting near the optimum), or makes it NaN, ends it too and the best
    values so far are put back. The caller has run the first round already.

    Returns
    -------
    bool
        whether it converged within ``MAX_ROUNDS`` rounds in all.
    """
    best, best_value = _copy(get()), evidence()
    for _ in range(MAX_ROUNDS - 1):
        run_round(best)
        now, value = _copy(get()), evidence()
        if not value > best_value:
            put(best)
            return True
        moved = max(float(((a - b).abs() / b.abs()).max()) for a, b in zip(now, best))
        gain = value - best_value
        best, best_value = now, value
        if moved <= RTOL or gain < ATOL_NATS:
            return True
    return False


def _copy(values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(v.detach().clone() for v in values)


def optimize_prior_until_converged(la, parent: Callable[..., None], args, kwargs) -> None:
    """Run laplace-torch's ``optimize_prior_precision`` (``parent``) for a LoRA posterior.

    ``evidence="map"`` (the default) and gridsearch: ``parent`` once, step for step as
    laplace-torch runs it, so the prior equals ``KronLaplace``'s.

    ``evidence="linearised"`` with marglik: laplace-torch takes a fixed number of Adam
    steps on ``log δ`` from ``init_prior_prec``; Adam's step shrinks once the first, steep
    gradients have filled its second-moment estimate, and this evidence is flat in
    ``log δ`` far from the data's curvature scale, so 100 steps can stop well short of
    the optimum (measured on the real MiniLM: δ 50.8, evidence gradient 38 per unit of
    ``log δ``, against the optimum 140.5). The loop is restarted from the best prior so
    far, with fresh Adam state, as :func:`until_converged` says; a warning says when
    ``MAX_ROUNDS`` rounds did not get there.

    After marglik, under either evidence, :func:`warn_if_prior_diverges`.
    """
    bound = inspect.signature(parent).bind(*args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    parent(**call)
    # TuningMethod is a str enum: == compares values, str() of a member does not (3.11)
    if call["method"] != TuningMethod.MARGLIK:
        return
    if la.options.evidence == "linearised":

        def run_round(start):
            parent(**{**call, "init_prior_prec": start[0]})

        def put(values):
            la.prior_precision = values[0]

        def get():
            return (la.prior_precision,)

        if not until_converged(run_round, get, put, lambda: _evidence_value(la)):
            warnings.warn(
                f"marglik did not converge in {MAX_ROUNDS} rounds of {call['n_steps']} "
                f"steps: the last round still moved the prior precision by more than "
                f"{RTOL:.0e} relative and raised the log evidence by more than "
                f"{ATOL_NATS:.0e}. Pass a larger n_steps or lr, or check the fit.",
                stacklevel=3,
            )
    warn_if_prior_diverges(la)


def _evidence_value(la) -> float:
    with torch.no_grad():
        return la.log_marginal_likelihood().item()


#: A prior precision counts as driven towards infinity when the evidence at this many
#: times it is no lower than at the prior found.
DIVERGENCE_FACTOR = 1e4


def warn_if_prior_diverges(la) -> list[str]:
    """Warn when the evidence still rises as a tuned prior precision goes to infinity.

    There the posterior collapses to the fine-tuned weights and the Laplace predictive
    is the MAP's. The test: the evidence at ``DIVERGENCE_FACTOR`` times the prior found,
    for the scalar prior, or block by block for a per-block prior (the others fixed), is
    no lower than at the prior found. Separable structures (Kronecker, diagonal) score
    every block in one pass (``la._evidence_per_block``); the full one evaluates the
    evidence once per block.

    Returns
    -------
    list of str
        the names of the blocks warned about (all blocks for a scalar prior).
    """
    prior = la.prior_precision.detach().clone()
    names = [b.name for b in la.blocks]
    if prior.numel() not in (1, len(names)):
        return []  # a per-parameter prior: no block to name
    per_block = getattr(la, "_evidence_per_block", None)
    try:
        with torch.no_grad():
            if per_block is not None:
                found = per_block(prior)
                if prior.numel() == 1:
                    rising = [bool(per_block(prior * DIVERGENCE_FACTOR).sum() >= found.sum())]
                else:
                    rising = (per_block(prior * DIVERGENCE_FACTOR) >= found).tolist()
            else:
                found = la.log_marginal_likelihood(prior)
                if prior.numel() == 1:
                    rising = [bool(la.log_marginal_likelihood(prior * DIVERGENCE_FACTOR) >= found)]
                else:
                    rising = []
                    for b in range(len(names)):
                        scaled = prior.clone()
                        scaled[b] *= DIVERGENCE_FACTOR
                        rising.append(bool(la.log_marginal_likelihood(scaled) >= found))
    finally:
        la.prior_precision = prior
    if prior.numel() == 1:
        flagged = names if rising[0] else []
        which = f"the prior precision {prior.item():.3g}, shared by all {len(names)} blocks,"
    else:
        flagged = [n for n, r in zip(names, rising) if r]
        shown = ", ".join(flagged[:8]) + (f", … ({len(flagged)} in all)" if len(flagged) > 8 else "")
        which = f"the prior precision of block(s) {shown}"
    if flagged:
        warnings.warn(
            f"marglik drives {which} towards infinity: the {la.options.evidence.value} "
            f"evidence is still rising at {DIVERGENCE_FACTOR:.0e} times the prior found. "
            "There the posterior collapses to the fine-tuned weights and the Laplace "
            "predictive is the MAP's; the data say nothing about these weights' prior "
            "(e.g. weights the fine-tuning did not move, or, with the linearised evidence, "
            "weights the data determine less than the fine-tuning moved them).",
            stacklevel=4,
        )
    return flagged
