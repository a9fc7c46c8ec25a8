"""Gaussian regression over LoRA weights: noise tuning (the target check is in :mod:`laplace_llm.checks`).

``likelihood="regression"`` is laplace-torch's: outputs ``f (batch, k)`` (e.g. a
``num_labels=k`` regression head), targets ``y (batch, k)``, ``p(y | f) = N(f, σ² I)``.
The curvature is the GGN ``JᵀJ`` (or its Monte-Carlo / empirical-Fisher variants, see
:mod:`laplace_llm.curvature.kfac`) and the posterior precision ``JᵀJ/σ² + P₀``, so the log
marginal likelihood is differentiable in both the prior precision and ``σ``.
"""

from __future__ import annotations

import logging
import warnings

import torch

from laplace_llm.checks import check_regression_targets
from laplace_llm.prior.evidence import MAX_ROUNDS, until_converged, warn_if_prior_diverges

__all__ = ["check_regression_targets", "optimize_prior_and_noise"]

logger = logging.getLogger(__name__)


def optimize_prior_and_noise(
    la,
    n_steps: int = 100,
    lr: float = 1e-1,
    prior_structure: str = "scalar",
    init_prior_prec: float | None = None,
    init_sigma_noise: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise the evidence of a fitted regression Laplace in the prior and the noise.

    The log marginal likelihood (per ``la.options.evidence``) is maximised in the prior
    precision and the noise ``σ`` together, by Adam on their logarithms as
    laplace-torch's regression example does, in rounds of ``n_steps`` steps restarted
    from the best values so far until a round gains under 1e-3 nats or moves no value
    by more than 1% (:func:`laplace_llm.prior.evidence.until_converged`; 100 steps alone can
    stop far from the optimum). A warning says when it did not converge in
    ``MAX_ROUNDS`` rounds, and when the prior goes towards infinity
    (:func:`~laplace_llm.prior.evidence.warn_if_prior_diverges`).

    Parameters
    ----------
    la : a fitted Laplace object with ``likelihood="regression"``.
    n_steps : int
        Adam steps per round.
    lr : float
    prior_structure : {"scalar", "layerwise"}
        one prior precision, or one per block (``la.n_layers``).
    init_prior_prec, init_sigma_noise : float, optional
        starting values; default the current ones (their mean for the prior).

    Returns
    -------
    (prior_precision, sigma_noise)
        ``(1,)`` or ``(n_layers,)``, and a scalar; also set on ``la``.
    """
    if la.likelihood != "regression":
        raise ValueError(
            f"Tuning sigma_noise needs likelihood='regression'; this Laplace has {la.likelihood!r}."
        )
    if prior_structure not in ("scalar", "layerwise"):
        raise ValueError(f"prior_structure must be 'scalar' or 'layerwise'; got {prior_structure!r}.")
    dev, dtype = la._device, la._dtype
    p0 = float(la.prior_precision.mean()) if init_prior_prec is None else float(init_prior_prec)
    s0 = float(la.sigma_noise) if init_sigma_noise is None else float(init_sigma_noise)
    if not (p0 > 0 and s0 > 0):
        raise ValueError(f"Initial prior precision and sigma_noise must be > 0; got {p0}, {s0}.")
    n = 1 if prior_structure == "scalar" else la.n_layers

    def run_round(start: tuple[torch.Tensor, torch.Tensor]) -> None:
        log_prior = start[0].log().clone().requires_grad_(True)
        log_sigma = start[1].log().clone().requires_grad_(True)
        opt = torch.optim.Adam([log_prior, log_sigma], lr=lr)
        for _ in range(n_steps):
            opt.zero_grad()
            neg = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
            neg.backward()
            opt.step()
        put((log_prior.detach().exp(), log_sigma.detach().exp()))

    def put(values: tuple[torch.Tensor, torch.Tensor]) -> None:
        la.prior_precision, la.sigma_noise = values

    def get() -> tuple[torch.Tensor, torch.Tensor]:
        return la.prior_precision, torch.as_tensor(la.sigma_noise).reshape(())

    def value() -> float:
        with torch.no_grad():
            return la.log_marginal_likelihood().item()

    run_round((torch.full((n,), p0, device=dev, dtype=dtype), torch.tensor(s0, device=dev, dtype=dtype)))
    if not until_converged(run_round, get, put, value):
        warnings.warn(
            f"The prior precision and sigma_noise did not converge in {MAX_ROUNDS} rounds of "
            f"{n_steps} Adam steps; pass a larger n_steps or lr, or check the fit.",
            stacklevel=2,
        )
    warn_if_prior_diverges(la)
    logger.info("tuned prior precision %s and sigma_noise %.4g", la.prior_precision.tolist(),
                float(la.sigma_noise))
    return la.prior_precision, la.sigma_noise
