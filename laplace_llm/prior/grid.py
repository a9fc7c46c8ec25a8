"""GLM moments under many prior precisions from one pass over the data.

The posterior precision ``τH + δ`` changes with the prior, the Jacobians of the
logits do not. A grid of ``K`` priors (laplace-torch's ``gridsearch``, or a benchmark
comparing priors) therefore needs one forward and ``C`` backward passes per batch, not
``K`` of each: the Jacobians are contracted with each posterior in turn.

:func:`glm_moments_over_priors` gives the moments; :func:`one_pass_gridsearch` runs
laplace-torch's ``_gridsearch`` contract (its ``validate``, losses, link approximations,
error handling and choice) on moments computed this way, with a stateful metric reset
before each prior.
"""

from __future__ import annotations

import logging
import math
from collections.abc import MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torchmetrics
from laplace.utils import validate

from laplace_llm.curvature.top_k import check_top_k, merge_rest
from laplace_llm.progress import progress_bar as show_progress

logger = logging.getLogger(__name__)


# errors laplace-torch's gridsearch scores as an infinite loss
def _is_posterior_failure(err: Exception) -> bool:
    return isinstance(err, torch.linalg.LinAlgError) or "not positive definite" in str(err)


def _as_grid(prior_precisions) -> list:
    if isinstance(prior_precisions, torch.Tensor) and prior_precisions.ndim <= 1:
        return list(prior_precisions.reshape(-1))
    if isinstance(prior_precisions, (int, float)):
        return [prior_precisions]
    return list(prior_precisions)


@contextmanager
def _prior_restored(la):
    saved = la.prior_precision.detach().clone()
    try:
        yield
    finally:
        la.prior_precision = saved


def glm_moments_over_priors(
    la, X: Any, prior_precisions: Sequence | torch.Tensor, joint: bool = False,
    top_k: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """GLM mean and covariance of the logits of ``X`` under each prior precision.

    Parameters
    ----------
    la : a fitted LoRA Laplace object (``LoRALaplace``, ``LoRADiagLaplace``,
        ``LoRAFullLaplace``).
    X : one batch, as the predictive takes it.
    prior_precisions : sequence, or a 1-d tensor
        each entry anything ``la.prior_precision`` accepts: a positive scalar or one
        value per LoRA block. A 1-d tensor is a grid of scalar priors (as laplace-torch's
        gridsearch interval); per-block priors go in a list, ``[tensor_of_n_layers]``.
    joint : bool
        the ``(B·C, B·C)`` covariance across the batch instead of ``(B, C, C)``.
    top_k : int, optional
        the exact covariance of each example's ``top_k`` most probable classes and of
        the other classes merged into one, from ``top_k + 1`` backward passes (Kronecker
        posteriors). See :mod:`laplace_llm.curvature.top_k`.

    Returns
    -------
    list of ``(f_mu, f_var)``, one per prior, equal to what ``la``'s predictive
    computes with that prior set. ``la.prior_precision`` is left as it was.
    """
    la._check_H_init()
    top_k = check_top_k(top_k)
    grid = _as_grid(prior_precisions)
    if not grid:
        raise ValueError("glm_moments_over_priors needs at least one prior precision.")
    with _prior_restored(la):
        moments = _kron_moments(la, X, grid, joint, top_k)
        if moments is not None:
            return moments
        f_mu, Js = la._glm_jacobians(X)
        out = []
        for prior in grid:
            la.prior_precision = prior
            f_var = la.functional_covariance(Js) if joint else la.functional_variance(Js)
            f_var = merge_rest(f_mu, f_var, top_k, joint)
            out.append((f_mu.flatten() if joint else f_mu, f_var.detach()))
        return out


def _kron_moments(la, X, grid, joint, top_k=None):
    """Jacobian-free moments of every prior at once (K-FAC posteriors), else ``None``."""
    if not getattr(la, "_moments_without_jacobians", False):
        return None
    if not la.jacobian_free or la.enable_backprop:
        return None
    precisions = []
    for prior in grid:
        la.prior_precision = prior
        precisions.append(la.posterior_precision)
    with torch.enable_grad():
        # top_k only when given: a backend's glm_moments of before top_k still serves
        extra = {} if top_k is None else {"top_k": top_k}
        moments = la.backend.glm_moments(X, precisions, joint=joint, **extra)
    if moments is None:
        return None
    return [(f_mu.flatten() if joint else f_mu, f_var.detach()) for f_mu, f_var in moments]


class _Replay:
    """Moments computed ahead, served to ``_glm_predictive_distribution`` by batch and prior."""

    def __init__(self) -> None:
        self.by_batch: dict[int, tuple[Any, list]] = {}

    def add(self, X: Any, priors: list[torch.Tensor], moments: list) -> None:
        # X is kept alive, so its id stays its own while the replay lasts
        self.by_batch[id(X)] = (X, list(zip(priors, moments)))

    def lookup(self, X: Any, prior: torch.Tensor):
        entry = self.by_batch.get(id(X))
        if entry is None or entry[0] is not X:
            return None
        for p, moments in entry[1]:
            if p.shape == prior.shape and torch.equal(p, prior):
                return moments
        return None


def replayed_moments(la, X: Any, joint: bool, diagonal_output: bool):
    """Return what a running :func:`one_pass_gridsearch` computed for ``X`` at this prior.

    ``None`` when nothing was computed ahead for this call (then the caller computes).
    """
    replay = getattr(la, "_glm_replay", None)
    if replay is None or joint:
        return None
    moments = replay.lookup(X, la.prior_precision.detach())
    if moments is None:
        return None
    if isinstance(moments, Exception):  # the error the direct computation raised
        raise moments
    # copies: laplace-torch's bridge link updates the moments in place, and f_mu is
    # shared by all priors of a batch
    f_mu, f_var = moments[0].clone(), moments[1].clone()
    if diagonal_output:
        f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
    return f_mu, f_var


def one_pass_gridsearch(
    la,
    loss,
    interval,
    val_loader,
    pred_type="glm",
    link_approx="probit",
    n_samples: int = 100,
    progress_bar: bool = False,
) -> torch.Tensor:
    """Score each prior of ``interval`` on ``val_loader``; return the lowest-scoring one.

    laplace-torch's ``_gridsearch`` contract: each prior is set, ``laplace.utils.validate``
    scores the predictive on the validation batches with ``loss``, a posterior that
    fails (``LinAlgError``, not positive definite) scores ``inf``, and the first prior
    with the lowest score wins. Two differences:

    - For the ``"glm"`` predictive the batches are read once and kept, and each batch's
      moments under every prior come from one set of Jacobians; the predictive is then
      served those moments. The ``"nn"`` predictive samples weights and is run per prior.
    - A ``torchmetrics.Metric`` loss (the default ``RunningNLLMetric``) is reset before
      each prior. laplace-torch 0.3 never resets it, so its k-th score is the running
      mean over the first k priors and its choice depends on the grid's order.
    """
    grid = _as_grid(interval)
    batches: Any = val_loader
    if pred_type == "glm":  # a str, or laplace-torch's PredType (a str enum: str() of it is "PredType.GLM")
        la.model.eval()  # as validate does, before the Jacobians are taken
        batches, replay = _precompute(la, grid, val_loader, progress_bar)
        la._glm_replay = replay
    scores = []
    try:
        bar = show_progress(grid, enabled=progress_bar, desc="[Grid search]")
        for prior in bar:
            la.prior_precision = prior
            if isinstance(loss, torchmetrics.Metric):
                loss.reset()
            try:
                score = validate(la, batches, loss, pred_type=pred_type,
                                 link_approx=link_approx, n_samples=n_samples,
                                 dict_key_y=la.dict_key_y)
            except RuntimeError as err:
                if not _is_posterior_failure(err):
                    raise
                score = math.inf
            scores.append(score)
            bar.set_postfix(prior=f"{float(torch.as_tensor(prior).reshape(-1)[0]):.3e}",
                            loss=f"{score:.4f}")
    finally:
        la._glm_replay = None
    la._gridsearch_scores = list(zip(grid, scores))
    logger.debug("gridsearch scores: %s", la._gridsearch_scores)
    return grid[int(np.argmin(scores))]


def _precompute(la, grid, val_loader, progress_bar):
    """Read the batches once; store each batch's moments under every prior of ``grid``."""
    keys = []
    with _prior_restored(la):
        for prior in grid:
            la.prior_precision = prior
            keys.append(la.prior_precision.detach().clone())
    batches, replay = [], _Replay()
    desc = "[Grid search | Jacobians, all priors]"
    for data in show_progress(val_loader, enabled=progress_bar, desc=desc):
        if isinstance(data, MutableMapping):
            X = data
        else:  # validate moves X to the device; moved once here, it moves no more
            X, *rest = data
            X = X.to(la._device)
            data = (X, *rest)
        batches.append(data)
        try:
            moments = glm_moments_over_priors(la, X, grid)
        except RuntimeError as err:
            if not _is_posterior_failure(err):
                raise
            moments = [_each_or_error(la, X, prior) for prior in grid]
        replay.add(X, keys, moments)
    return batches, replay


def _each_or_error(la, X, prior):
    """One prior's moments, or the error raised where its posterior is not positive definite."""
    try:
        return glm_moments_over_priors(la, X, [prior])[0]
    except RuntimeError as err:
        if not _is_posterior_failure(err):
            raise
        return err
