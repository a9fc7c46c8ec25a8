"""Accuracy and calibration metrics of predictive class probabilities.

Every function takes ``probs`` of shape ``(N, C)`` (rows are probability vectors, e.g. the
output of ``Laplace.__call__``) and integer ``labels`` of shape ``(N,)``, as torch tensors
or numpy arrays, and computes in float64 numpy. Scalar metrics are returned as ``float``.

Binning convention of :func:`ece` and :func:`reliability_data`: ``n_bins`` equal-width bins
of the confidence ``max_c probs[n, c]``, bin ``b`` holding ``b/n_bins < conf <= (b+1)/n_bins``
(the first bin also holds 0), as in Guo et al. (2017), "On Calibration of Modern Neural
Networks". A confidence exactly on an edge goes to the lower bin, up to float rounding of
the edges (``numpy.linspace``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["accuracy", "brier", "ece", "nll", "plot_reliability", "reliability_data"]


def _as_arrays(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    def to_numpy(x):
        if hasattr(x, "detach"):  # torch tensor on any device and dtype
            x = x.detach().cpu().double().numpy()
        return np.asarray(x)

    p = to_numpy(probs).astype(np.float64)
    y = to_numpy(labels)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must be (N,) = ({p.shape[0]},), got shape {y.shape}")
    if p.shape[0] == 0:
        raise ValueError("probs is empty (N = 0)")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(y == np.round(y)):
            raise ValueError("labels must be integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be in [0, {p.shape[1]}), got range [{y.min()}, {y.max()}]")
    return p, y.astype(np.int64)


def accuracy(probs: Any, labels: Any) -> float:
    """Fraction of rows whose most probable class is the label.

    Parameters
    ----------
    probs : array_like, (N, C)
    labels : array_like, (N,)

    Returns
    -------
    float
        In [0, 1]; ties go to the lowest class index (``argmax``).
    """
    p, y = _as_arrays(probs, labels)
    return float(np.mean(p.argmax(1) == y))


def nll(probs: Any, labels: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels.

    Parameters
    ----------
    probs : array_like, (N, C)
    labels : array_like, (N,)
    eps : float
        Probabilities are clamped to ``[eps, 1]`` first, so a zero probability gives the
        finite value ``-log(eps)`` instead of infinity.

    Returns
    -------
    float
        ``mean_n -log(probs[n, labels[n]])``.
    """
    p, y = _as_arrays(probs, labels)
    picked = np.clip(p[np.arange(len(y)), y], eps, 1.0)
    return float(-np.mean(np.log(picked)))


def brier(probs: Any, labels: Any) -> float:
    """Multi-class Brier score.

    Parameters
    ----------
    probs : array_like, (N, C)
    labels : array_like, (N,)

    Returns
    -------
    float
        ``mean_n sum_c (probs[n, c] - [c == labels[n]])**2``, in [0, 2].
    """
    p, y = _as_arrays(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def reliability_data(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin confidence, accuracy and count of a reliability diagram.

    Parameters
    ----------
    probs : array_like, (N, C)
    labels : array_like, (N,)
    n_bins : int
        Number of equal-width confidence bins (see the module docstring).

    Returns
    -------
    dict of numpy.ndarray
        ``"bin_edges"`` ``(n_bins + 1,)``; ``"confidence"`` and ``"accuracy"``
        ``(n_bins,)``, the mean confidence and the accuracy of the rows in each bin (NaN
        for an empty bin); ``"count"`` ``(n_bins,)`` int, summing to N.
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p, y = _as_arrays(probs, labels)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" on the inner edges puts conf == edge into the lower bin: (lo, hi].
    index = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(index, weights=correct, minlength=n_bins) / count
    return {"bin_edges": edges, "confidence": mean_conf, "accuracy": mean_acc, "count": count}


def ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Compute the expected calibration error with equal-width confidence bins.

    Parameters
    ----------
    probs : array_like, (N, C)
    labels : array_like, (N,)
    n_bins : int

    Returns
    -------
    float
        ``sum_b (count_b / N) |accuracy_b - confidence_b|`` over non-empty bins, in [0, 1].
    """
    data = reliability_data(probs, labels, n_bins)
    count = data["count"]
    full = count > 0
    gap = np.abs(data["accuracy"][full] - data["confidence"][full])
    return float(np.sum(count[full] / count.sum() * gap))


def plot_reliability(
    named_probs: Mapping[str, Any], labels: Any, path: str | Path, n_bins: int = 15
) -> Path:
    """Write reliability diagrams, one panel per model, to a PNG file.

    Parameters
    ----------
    named_probs : Mapping[str, array_like]
        Model name -> probs ``(N, C)``, all for the same ``labels``.
    labels : array_like, (N,)
    path : str or Path
        Output file; parent folders are created.
    n_bins : int

    Returns
    -------
    Path
        ``path``. Each panel shows per-bin accuracy as bars against the diagonal of perfect
        calibration, with the model's accuracy and ECE in its title.
    """
    # Figure + Agg canvas directly: no pyplot global state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not named_probs:
        raise ValueError("named_probs is empty: give at least one model's probabilities")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(named_probs)
    fig = Figure(figsize=(3.2 * n, 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, probs) in zip(axes, named_probs.items()):
        data = reliability_data(probs, labels, n_bins)
        edges = data["bin_edges"]
        width = edges[1] - edges[0]
        acc = np.nan_to_num(data["accuracy"])
        ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(
            f"{name}\nacc {accuracy(probs, labels):.3f}, ECE {ece(probs, labels, n_bins):.3f}",
            fontsize=9,
        )
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path
