"""A plain LoRA fine-tuning loop: cross-entropy on a classifier's logits.

The Laplace posterior is taken at the weights a fine-tune ends with; this loop is what
the demo and the benchmarks train with (the examples write theirs out, to be read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from laplace_llm.progress import progress_bar

__all__ = ["train_lora"]


def train_lora(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    epochs: int,
    lr: float,
    *,
    optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    on_epoch: Callable[[int, float], None] | None = None,
    progress: bool = False,
    desc: str = "fine-tune",
) -> list[float]:
    """Train the trainable parameters of ``model`` with cross-entropy on its logits.

    The model is in train mode during each epoch and in eval mode after it (and at the
    end), so ``on_epoch`` can evaluate it.

    Parameters
    ----------
    model : nn.Module
        returns logits ``(batch, C)`` for a dict batch with ``labels`` ``(batch,)``, e.g.
        :class:`~laplace_llm.LLMClassifier`; only parameters with ``requires_grad``
        (the LoRA weights) are trained.
    loader : iterable of dict batches
        must have a length for ``schedule="cosine"``.
    epochs : int
        passes over ``loader``.
    lr : float
        learning rate (the peak of the cosine schedule).
    optimizer : type, default torch.optim.AdamW
    weight_decay : float, default 0
    schedule : {"constant", "cosine"}, default "constant"
        ``"cosine"`` anneals the rate to zero over all steps, so the run settles in a
        minimum, where the Laplace approximation is meant to be taken.
    on_epoch : callable, optional
        called as ``on_epoch(epoch, train_loss)`` after every epoch (1-based), with the
        mean loss over the epoch's examples.
    progress : bool, default False
        tqdm bar over epochs.
    desc : str
        label of the bar.

    Returns
    -------
    list of float
        the mean training loss of every epoch.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine'; got {schedule!r}.")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, lr=lr, weight_decay=weight_decay)
    sched = None
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    losses = []
    bar = progress_bar(range(1, epochs + 1), enabled=progress, desc=desc, leave=False)
    for epoch in bar:
        model.train()
        total, n = 0.0, 0
        for batch in loader:
            loss = nn.functional.cross_entropy(model(batch), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(batch["labels"])
            n += len(batch["labels"])
        model.eval()
        losses.append(total / n)
        bar.set_postfix(train_nll=f"{losses[-1]:.3f}", refresh=False)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses
