"""Post-hoc calibration baselines that Laplace is compared with.

:class:`TemperatureScaling` (Guo et al., 2017, "On Calibration of Modern Neural Networks")
divides a classifier's logits by one scalar ``T`` fitted to minimise the negative
log-likelihood of a labelled validation split. It needs that split, which the Laplace
approximation (evidence-tuned prior) does not, and it changes no ranking of the classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["TemperatureScaling"]


class TemperatureScaling:
    """Logits divided by one temperature fitted on labelled validation data.

    Parameters
    ----------
    model : nn.Module, optional
        Returns logits ``(batch, C)`` for a batch (e.g. :class:`laplace_llm.LLMClassifier`).
        Needed to fit on, or predict for, batches rather than logits.

    Attributes
    ----------
    temperature : float or None
        ``T > 0`` after :meth:`fit`.

    Examples
    --------
    >>> ts = TemperatureScaling(clf)
    >>> ts.fit(val_loader)          # or ts.fit(val_logits, val_labels)
    >>> probs = ts(test_batch)      # (batch, C)
    """

    def __init__(self, model: nn.Module | None = None):
        self.model = model
        self.temperature: float | None = None

    @torch.no_grad()
    def _logits(self, batch: Any) -> torch.Tensor:
        if self.model is None:
            raise ValueError(
                "This TemperatureScaling has no model: pass logits (batch, C) instead of "
                "batches, or build it as TemperatureScaling(model)."
            )
        return self.model(batch).detach().double()

    def _collect(self, loader: Iterable[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = [], []
        for batch in loader:
            if not isinstance(batch, Mapping) or "labels" not in batch:
                raise ValueError(
                    "Temperature scaling fits on labelled batches: each batch must be a dict "
                    "with 'labels'."
                )
            logits.append(self._logits(batch).cpu())
            labels.append(torch.as_tensor(batch["labels"]).cpu())
        if not logits:
            raise ValueError("The validation loader yielded no batch; give labelled data.")
        return torch.cat(logits), torch.cat(labels)

    def fit(self, data: Any, labels: torch.Tensor | None = None) -> float:
        """Fit ``T`` by minimising the validation negative log-likelihood.

        The NLL of ``softmax(β f)`` is convex in ``β = 1/T``, so the one-dimensional
        minimum is found by Newton steps on ``β`` safeguarded by bisection; the result
        is deterministic and exact to ``1e-10`` in ``β``.

        Parameters
        ----------
        data : torch.Tensor or iterable of dict batches
            Validation logits ``(N, C)`` (then ``labels`` is required), or a loader of
            labelled batches (then the model computes the logits).
        labels : torch.Tensor, optional
            ``(N,)`` class indices for logits.

        Returns
        -------
        float
            The fitted temperature ``T``.
        """
        if isinstance(data, torch.Tensor):
            if labels is None:
                raise ValueError("Fitting on logits needs their labels: fit(logits, labels).")
            logits, y = data.detach().double().cpu(), torch.as_tensor(labels).cpu()
        else:
            logits, y = self._collect(data)
        if logits.ndim != 2 or y.shape != (logits.shape[0],):
            raise ValueError(
                f"Expected logits (N, C) and labels (N,); got {tuple(logits.shape)} and "
                f"{tuple(y.shape)}."
            )
        if logits.shape[0] == 0:
            raise ValueError("No validation data: temperature scaling needs labelled examples.")
        if not torch.isfinite(logits).all():
            raise ValueError("The validation logits contain NaN or Inf; check the model.")
        y = y.long()
        if y.min() < 0 or y.max() >= logits.shape[1]:
            raise ValueError(f"Labels must lie in 0..{logits.shape[1] - 1}.")
        self.temperature = 1.0 / _fit_inverse_temperature(logits, y)
        return self.temperature

    def __call__(self, x: Any) -> torch.Tensor:
        """Class probabilities ``softmax(f / T)``.

        Parameters
        ----------
        x : torch.Tensor or batch
            Logits ``(batch, C)`` or a batch for the model.

        Returns
        -------
        torch.Tensor
            ``(batch, C)`` float64 probabilities.
        """
        if self.temperature is None:
            raise RuntimeError("Call `fit` on labelled validation data before predicting.")
        logits = x.detach().double() if isinstance(x, torch.Tensor) else self._logits(x)
        return torch.softmax(logits / self.temperature, dim=-1)


def _fit_inverse_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """``argmin_β mean NLL(softmax(β f), y)`` over ``β ∈ (0, β_max]``."""
    target = logits.gather(1, y[:, None])[:, 0]

    def derivatives(beta: float) -> tuple[float, float]:
        p = torch.softmax(beta * logits, dim=-1)
        mean_f = (p * logits).sum(1)
        var_f = (p * logits.square()).sum(1) - mean_f.square()
        # d/dβ NLL = E_p[f] − f_y ; d²/dβ² = Var_p[f] ≥ 0 (convex)
        return float((mean_f - target).mean()), float(var_f.mean())

    lo, hi = 0.0, 1.0
    while derivatives(hi)[0] < 0:  # the minimum lies beyond hi
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            return hi  # separable data: the NLL keeps falling as T → 0
    beta = 0.5 * (lo + hi)
    for _ in range(200):
        d1, d2 = derivatives(beta)
        if d1 > 0:
            hi = beta
        else:
            lo = beta
        step = beta - d1 / d2 if d2 > 0 else None
        beta = step if step is not None and lo < step < hi else 0.5 * (lo + hi)
        if hi - lo < 1e-10 or abs(d1) < 1e-12:
            break
    return beta
