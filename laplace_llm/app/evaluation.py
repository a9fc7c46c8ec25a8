"""Predict with a MAP model and its Laplace posterior over a loader, and score the results.

Shared by the demo, ``laplace-llm evaluate`` and the examples. A *method* is one way of turning a
batch into class probabilities ``(batch, C)``:

* ``"map"``: softmax of the fine-tuned model's logits;
* ``"la_probit"``: the Laplace GLM predictive with the probit approximation;
* ``"la_mc"``: the Laplace GLM predictive averaged over Monte-Carlo logit samples;
* ``"ts"``: the baseline, softmax of the logits divided by a temperature fitted on labelled
  validation data (:class:`~laplace_llm.tools.baselines.TemperatureScaling`).

Metrics per method and split (:func:`score`) are ``accuracy``, ``nll``, ``brier``, ``ece``
(15 bins) and ``aurc`` (area under the risk–coverage curve, max-probability confidence)
from :mod:`laplace_llm.tools.metrics`. Between an in-distribution split and out-of-distribution
inputs, :func:`ood_score` gives ``ood_auroc`` (max-probability confidence) and
``ood_auroc_entropy`` (negated entropy); reports add them to the in-distribution rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from laplace_llm.progress import progress_bar
from laplace_llm.tools import metrics

__all__ = [
    "METHODS",
    "BASELINES",
    "METHOD_LABELS",
    "METRICS",
    "OOD_METRICS",
    "collect_probs",
    "format_table",
    "ood_score",
    "score",
    "write_reliability",
    "write_risk_coverage",
]

#: Prediction methods, in report order.
METHODS = ("map", "la_probit", "la_mc")
#: Methods that need something besides the posterior (temperature scaling: validation data).
BASELINES = ("ts",)
#: Display names of the methods.
METHOD_LABELS = {"map": "MAP", "ts": "Temperature scaling (validation)",
                 "la_probit": "LA (GLM probit)", "la_mc": "LA (GLM MC)",
                 "llla_probit": "LLLA (probit)", "llla_mc": "LLLA (MC)"}
#: Metric names of :func:`score`, in report order.
METRICS = ("accuracy", "nll", "brier", "ece", "aurc")
#: Metric names of :func:`ood_score`, in report order.
OOD_METRICS = ("ood_auroc", "ood_auroc_entropy")
#: Confidence bins of ECE and of the reliability diagrams.
N_BINS = 15


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def collect_probs(
    model: nn.Module,
    la: Any,
    loader: Iterable[Mapping[str, Any]],
    methods: Iterable[str] = METHODS,
    mc_samples: int = 1000,
    seed: int = 0,
    progress: bool = False,
    desc: str = "predict",
    fitting: bool = False,
    ts: Any = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Class probabilities of every method on every example of ``loader``.

    Parameters
    ----------
    model : nn.Module
        The classifier (e.g. :class:`~laplace_llm.LLMClassifier`) returning logits
        ``(batch, C)``; used for ``"map"``.
    la : LoRALaplace or None
        Fitted posterior of ``model``; needed for the ``"la_*"`` methods.
    loader : iterable of dict batches
        With ``labels`` ``(batch,)``.
    methods : iterable of str
        A subset of :data:`METHODS` and :data:`BASELINES`.
    mc_samples : int
        Logit samples per input of ``"la_mc"``.
    seed : int
        Seed of the ``"la_mc"`` samples, so that reports are reproducible.
    progress : bool
        Show a tqdm bar over batches.
    desc : str
        Label of the progress bar.
    fitting : bool
        Reward models: predict preference pairs ``(batch, 2, T)`` as two-way
        classification (laplace-torch's ``fitting=True``), the probability that each
        answer is preferred, instead of the reward's mean and variance.
    ts : TemperatureScaling, optional
        Fitted temperature scaling of ``model``; needed for ``"ts"``.

    Returns
    -------
    probs : dict of str to torch.Tensor
        Method -> ``(N, C)`` float64 probabilities, rows in loader order.
    labels : torch.Tensor
        ``(N,)`` long.
    """
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS + BASELINES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS + BASELINES}")
    if la is None and any(m in METHODS[1:] for m in methods):
        raise ValueError("Laplace methods need a fitted posterior `la`.")
    if "ts" in methods and (ts is None or ts.temperature is None):
        raise ValueError("Method 'ts' needs a fitted TemperatureScaling `ts` (call ts.fit "
                         "on labelled validation data first).")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    labels = []
    # LoRALaplace passes `generator` on to the Monte-Carlo samples (laplace-torch 0.3
    # would draw them from the global generator), so the caller's random state is untouched
    for batch in progress_bar(loader, enabled=progress, desc=desc, leave=False):
        _predict_batch(model, la, ts, batch, device, methods, mc_samples, generator, fitting,
                       out, labels)
    return {m: torch.cat(v) for m, v in out.items()}, torch.cat(labels)


def _predict_batch(model, la, ts, batch, device, methods, mc_samples, generator, fitting, out,
                   labels) -> None:
    """Append each method's probabilities ``(batch, C)`` of one batch to ``out``."""
    batch = _to_device(batch, device)
    labels.append(batch["labels"].cpu())
    logits = None
    if "map" in methods or "ts" in methods:
        with torch.no_grad():  # one forward serves MAP and temperature scaling
            logits = model(batch).double()
    for method in methods:
        if method == "map":
            p = torch.softmax(logits, dim=-1)
        elif method == "ts":
            p = ts(logits)
        elif method == "la_probit":
            p = la(batch, pred_type="glm", link_approx="probit", fitting=fitting)
        else:
            p = la(
                batch, pred_type="glm", link_approx="mc", n_samples=mc_samples,
                generator=generator, fitting=fitting,
            )
        out[method].append(p.detach().double().cpu())


def score(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Score ``probs (N, C)`` against ``labels (N,)``: every metric of :data:`METRICS`.

    Accuracy, NLL, Brier score, ECE (15 bins) and AURC (risk–coverage area, ranked by
    the max probability; lower is better).
    """
    return {
        "accuracy": metrics.accuracy(probs, labels),
        "nll": metrics.nll(probs, labels),
        "brier": metrics.brier(probs, labels),
        "ece": metrics.ece(probs, labels, n_bins=N_BINS),
        "aurc": metrics.aurc(probs, labels, "max_prob"),
    }


def ood_score(probs_in: torch.Tensor, probs_out: torch.Tensor) -> dict[str, float]:
    """OOD AUROC of one method between in-distribution and out-of-distribution inputs.

    Parameters
    ----------
    probs_in : torch.Tensor
        ``(N_in, C)`` probabilities of in-distribution inputs.
    probs_out : torch.Tensor
        ``(N_out, C)`` probabilities of the same method on out-of-distribution inputs.

    Returns
    -------
    dict of str to float
        ``ood_auroc`` (max-probability confidence) and ``ood_auroc_entropy`` (negated
        entropy): 0.5 is chance, 1 perfect separation.
    """
    return {
        "ood_auroc": metrics.ood_auroc(probs_in, probs_out, "max_prob"),
        "ood_auroc_entropy": metrics.ood_auroc(probs_in, probs_out, "entropy"),
    }


def write_reliability(
    probs: Mapping[str, torch.Tensor], labels: torch.Tensor, path: str | Path
) -> Path:
    """Reliability diagrams of the methods in ``probs``, side by side, as a PNG."""
    named = {METHOD_LABELS.get(m, m): p for m, p in probs.items()}
    return metrics.plot_reliability(named, labels, path, n_bins=N_BINS)


def write_risk_coverage(
    probs: Mapping[str, torch.Tensor], labels: torch.Tensor, path: str | Path
) -> Path:
    """Risk–coverage curves of the methods in ``probs`` in one panel, as a PNG."""
    named = {METHOD_LABELS.get(m, m): p for m, p in probs.items()}
    return metrics.plot_risk_coverage(named, labels, path, "max_prob")


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Format a plain-text table of ``results[split][method][metric]``.

    Returns
    -------
    str
        One row per split and method; columns :data:`METRICS`, then those of
        :data:`OOD_METRICS` that any row holds (blank where a row has none). NLL, Brier,
        ECE and AURC lower is better; accuracy and OOD AUROC higher.
    """
    columns = list(METRICS) + [
        m for m in OOD_METRICS if any(m in v for by in results.values() for v in by.values())
    ]
    widths = [max(9, len(c)) for c in columns]
    names = [METHOD_LABELS.get(m, m) for by in results.values() for m in by]
    width = max([16, *map(len, names)])
    header = f"{'split':<10} {'method':<{width}} " + " ".join(
        f"{c:>{w}}" for c, w in zip(columns, widths))
    lines = [header, "-" * len(header)]
    for split, by_method in results.items():
        for method, values in by_method.items():
            cells = " ".join(
                f"{values[c]:>{w}.4f}" if c in values else " " * w
                for c, w in zip(columns, widths)
            )
            lines.append(f"{split:<10} {METHOD_LABELS.get(method, method):<{width}} {cells}".rstrip())
    return "\n".join(lines)
