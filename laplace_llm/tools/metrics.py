"""Accuracy and calibration metrics of predictive class probabilities.

Every function takes ``probs`` of shape ``(N, C)`` (rows are probability vectors, e.g. the
output of ``Laplace.__call__``) and integer ``labels`` of shape ``(N,)``, as torch tensors
or numpy arrays, and computes in float64 numpy. Scalar metrics are returned as ``float``.

Binning convention of :func:`ece` and :func:`reliability_data`: ``n_bins`` equal-width bins
of the confidence ``max_c probs[n, c]``, bin ``b`` holding ``b/n_bins < conf <= (b+1)/n_bins``
(the first bin also holds 0), as in Guo et al. (2017), "On Calibration of Modern Neural
Networks". A confidence exactly on an edge goes to the lower bin, up to float rounding of
the edges (``numpy.linspace``).

Uncertainty beyond calibration: :func:`risk_coverage` and :func:`aurc` score selective
prediction (answer the most confident inputs first; Geifman & El-Yaniv, 2017), and
:func:`ood_auroc` scores how well a confidence separates in-distribution from
out-of-distribution inputs. A score for these is ``"max_prob"`` (``max_c p_c``, higher is
more confident) or ``"entropy"`` (``-Σ_c p_c log p_c``, used negated).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    # accuracy and calibration
    "accuracy",
    "brier",
    "ece",
    "nll",
    "reliability_data",
    "plot_reliability",
    # selective prediction and out-of-distribution detection
    "confidence",
    "risk_coverage",
    "aurc",
    "ood_auroc",
    "plot_risk_coverage",
]

CONFIDENCES = ("max_prob", "entropy")


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


def _probs_only(probs: Any) -> np.ndarray:
    p = probs.detach().cpu().double().numpy() if hasattr(probs, "detach") else np.asarray(probs)
    p = p.astype(np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty (N, C) array, got shape {p.shape}")
    return p


def confidence(probs: Any, kind: str = "max_prob") -> np.ndarray:
    """Per-row confidence of predictive probabilities; higher means more confident.

    Parameters
    ----------
    probs : array_like, (N, C)
    kind : {"max_prob", "entropy"}
        ``max_c p_c``, or the negated entropy ``Σ_c p_c log p_c``.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` float64.
    """
    if kind not in CONFIDENCES:
        raise ValueError(f"kind must be one of {CONFIDENCES}, got {kind!r}")
    p = _probs_only(probs)
    if kind == "max_prob":
        return p.max(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    return plogp.sum(1)


def risk_coverage(probs: Any, labels: Any, kind: str = "max_prob") -> dict[str, np.ndarray]:
    """Risk–coverage curve of selective prediction.

    Inputs are answered in order of decreasing confidence; after the ``k`` most
    confident, the coverage is ``k / N`` and the risk is the error rate among them. Ties
    in confidence are answered together (the curve has one point per distinct
    confidence), so the result does not depend on the order of the rows.

    Parameters
    ----------
    probs : array_like, (N, C)
    labels : array_like, (N,)
    kind : {"max_prob", "entropy"}
        Confidence that orders the inputs (see :func:`confidence`).

    Returns
    -------
    dict of numpy.ndarray
        ``"coverage"`` and ``"risk"``, each ``(M,)`` with ``M`` the number of distinct
        confidences, coverage increasing to 1.
    """
    p, y = _as_arrays(probs, labels)
    conf = confidence(p, kind)
    wrong = (p.argmax(1) != y).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    conf, wrong = conf[order], wrong[order]
    errors = np.cumsum(wrong)
    # the last index of each group of equal confidences closes that group
    last = np.r_[conf[1:] != conf[:-1], True]
    k = np.arange(1, len(conf) + 1)[last]
    return {"coverage": k / len(conf), "risk": errors[last] / k}


def aurc(probs: Any, labels: Any, kind: str = "max_prob") -> float:
    """Area under the risk–coverage curve (lower is better).

    The mean over ``k = 1..N`` of the error rate among the ``k`` most confident inputs
    (Geifman et al., 2019, "Bias-Reduced Uncertainty Estimation for Deep Neural
    Classifiers"); inputs of equal confidence share the risk of their group. A perfect
    ranking of a model with error rate ``e`` reaches ``e + (1 - e) log(1 - e)``; a
    random ranking gives about ``e``.

    Parameters
    ----------
    probs : array_like, (N, C)
    labels : array_like, (N,)
    kind : {"max_prob", "entropy"}

    Returns
    -------
    float
        In [0, 1].
    """
    curve = risk_coverage(probs, labels, kind)
    N = _probs_only(probs).shape[0]
    k_end = np.rint(curve["coverage"] * N).astype(np.int64)
    k_start = np.r_[0, k_end[:-1]]
    # each k inside a tie group gets the group's risk
    return float(np.sum((k_end - k_start) * curve["risk"]) / N)


def ood_auroc(probs_in: Any, probs_out: Any, kind: str = "max_prob") -> float:
    """AUROC of telling in-distribution from out-of-distribution inputs by confidence.

    The probability that a random in-distribution input is more confident than a random
    out-of-distribution one, ties counting one half (the Mann–Whitney statistic). 0.5 is
    chance, 1 perfect separation.

    Parameters
    ----------
    probs_in : array_like, (N_in, C)
        Predictive probabilities of in-distribution inputs.
    probs_out : array_like, (N_out, C')
        Of out-of-distribution inputs (``C'`` may differ from ``C``).
    kind : {"max_prob", "entropy"}

    Returns
    -------
    float
        In [0, 1].
    """
    s_in = confidence(probs_in, kind)
    s_out = confidence(probs_out, kind)
    scores = np.r_[s_in, s_out]
    ranks = _average_ranks(scores)
    n_in, n_out = len(s_in), len(s_out)
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u / (n_in * n_out))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    for end in np.r_[np.nonzero(sorted_x[1:] != sorted_x[:-1])[0] + 1, len(x)]:
        ranks[order[start:end]] = (start + 1 + end) / 2
        start = end
    return ranks


def plot_risk_coverage(
    named_probs: Mapping[str, Any], labels: Any, path: str | Path, kind: str = "max_prob"
) -> Path:
    """Write risk–coverage curves of several models into one PNG panel.

    Parameters
    ----------
    named_probs : Mapping[str, array_like]
        Model name -> probs ``(N, C)``, all for the same ``labels``.
    labels : array_like, (N,)
    path : str or Path
        Output file; parent folders are created.
    kind : {"max_prob", "entropy"}

    Returns
    -------
    Path
        ``path``; the legend gives each model's AURC.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not named_probs:
        raise ValueError("named_probs is empty: give at least one model's probabilities")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(4.2, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, probs in named_probs.items():
        curve = risk_coverage(probs, labels, kind)
        ax.step(curve["coverage"], curve["risk"], where="post",
                label=f"{name} (AURC {aurc(probs, labels, kind):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage")
    ax.set_ylabel("risk (error rate)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path
