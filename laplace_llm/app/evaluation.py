"""Predict with a MAP model and its Laplace posterior over a loader, and score the results.

Shared by the demo, ``laplace-llm evaluate`` and the examples. A *method* is one way of turning a
batch into class probabilities ``(batch, C)``:

* ``"map"``: softmax of the fine-tuned model's logits;
* ``"la_probit"``: the Laplace GLM predictive with the probit approximation;
* ``"la_mc"``: the Laplace GLM predictive averaged over Monte-Carlo logit samples.

Metrics per method and split are ``accuracy``, ``nll``, ``brier`` and ``ece`` (15 bins)
from :mod:`laplace_llm.metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import tqdm
from torch import nn

from laplace_llm import metrics

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "METRICS",
    "collect_probs",
    "format_table",
    "score",
    "write_reliability",
]

#: Prediction methods, in report order.
METHODS = ("map", "la_probit", "la_mc")
#: Display names of the methods.
METHOD_LABELS = {"map": "MAP", "la_probit": "LA (GLM probit)", "la_mc": "LA (GLM MC)",
                 "llla_probit": "LLLA (probit)", "llla_mc": "LLLA (MC)"}
#: Metric names, in report order.
METRICS = ("accuracy", "nll", "brier", "ece")
#: Confidence bins of ECE and of the reliability diagrams.
N_BINS = 15


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def _map_probs(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return torch.softmax(model(batch).double(), dim=-1)


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
        A subset of :data:`METHODS`.
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

    Returns
    -------
    probs : dict of str to torch.Tensor
        Method -> ``(N, C)`` float64 probabilities, rows in loader order.
    labels : torch.Tensor
        ``(N,)`` long.
    """
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    if la is None and any(m != "map" for m in methods):
        raise ValueError("Laplace methods need a fitted posterior `la`.")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    labels = []
    # LoRALaplace passes `generator` on to the Monte-Carlo samples (laplace-torch 0.3
    # would draw them from the global generator), so the caller's random state is untouched
    for batch in tqdm.tqdm(loader, desc=desc, disable=not progress, leave=False):
        _predict_batch(model, la, batch, device, methods, mc_samples, generator, fitting,
                       out, labels)
    return {m: torch.cat(v) for m, v in out.items()}, torch.cat(labels)


def _predict_batch(model, la, batch, device, methods, mc_samples, generator, fitting, out,
                   labels) -> None:
    """Append each method's probabilities ``(batch, C)`` of one batch to ``out``."""
    batch = _to_device(batch, device)
    labels.append(batch["labels"].cpu())
    for method in methods:
        if method == "map":
            p = _map_probs(model, batch)
        elif method == "la_probit":
            p = la(batch, pred_type="glm", link_approx="probit", fitting=fitting)
        else:
            p = la(
                batch, pred_type="glm", link_approx="mc", n_samples=mc_samples,
                generator=generator, fitting=fitting,
            )
        out[method].append(p.detach().double().cpu())


def score(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, Brier score and ECE (15 bins) of ``probs (N, C)`` for ``labels (N,)``."""
    return {
        "accuracy": metrics.accuracy(probs, labels),
        "nll": metrics.nll(probs, labels),
        "brier": metrics.brier(probs, labels),
        "ece": metrics.ece(probs, labels, n_bins=N_BINS),
    }


def write_reliability(
    probs: Mapping[str, torch.Tensor], labels: torch.Tensor, path: str | Path
) -> Path:
    """Reliability diagrams of the methods in ``probs``, side by side, as a PNG."""
    named = {METHOD_LABELS.get(m, m): p for m, p in probs.items()}
    return metrics.plot_reliability(named, labels, path, n_bins=N_BINS)


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Format a plain-text table of ``results[split][method][metric]``.

    Returns
    -------
    str
        One row per split and method, columns :data:`METRICS`; NLL, Brier and ECE lower is
        better, accuracy higher.
    """
    header = f"{'split':<10} {'method':<16} " + " ".join(f"{m:>9}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for split, by_method in results.items():
        for method, values in by_method.items():
            cells = " ".join(f"{values[m]:>9.4f}" for m in METRICS)
            lines.append(f"{split:<10} {METHOD_LABELS.get(method, method):<16} {cells}")
    return "\n".join(lines)
