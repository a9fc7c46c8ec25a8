"""The Hugging Face ``Trainer`` workflow: a callback that fits the posterior after training.

:class:`LaplaceCallback` fits :class:`~laplace_llm.LoRALaplace` on the trainer's training
data at the end of training (and, with ``at_checkpoints=True``, at every saved
checkpoint), tunes the prior precision by the marginal likelihood, logs the evidence and
writes the posterior as :data:`~laplace_llm.serialization.POSTERIOR_FILENAME` into the
folder (``args.output_dir``, ``checkpoint-<step>``), beside the adapter the trainer saves
there, where ``LoRALaplace.load(folder, model)`` and ``laplace-llm evaluate --adapter``
find it.

What the fit sees. The callback does not iterate the trainer's (shuffled, possibly
``drop_last``, possibly padded across processes) training loader: it takes that loader's
``dataset`` and ``collate_fn`` and builds a loader of its own in dataset order without
dropping or repeating examples, so ``N = len(train_dataset)`` and the fit is the one a
user gets by hand with ``DataLoader(train_dataset, batch_size, collate_fn=collator)``.
Under a distributed trainer (``torchrun``, ``accelerate launch``: an initialised
``torch.distributed`` group) process ``r`` of ``W`` takes examples ``r, r + W, …`` and
calls ``fit(distributed=True)``; every process ends with the same posterior and only the
main process writes files.

How the numbers reach the trainer's loggers. Callbacks are not handed the trainer, so
:meth:`LaplaceCallback.attach` (``LaplaceCallback(...).attach(trainer)``) adds the
callback and keeps a reference: the metrics ``laplace/log_marglik`` and
``laplace/prior_precision`` then go through ``trainer.log``, i.e. into
``trainer.state.log_history`` and every reporting integration (TensorBoard, W&B, …). A
callback passed as ``Trainer(callbacks=[...])`` without ``attach`` appends the same
entries to ``state.log_history`` (and so to ``trainer_state.json``) and the
``logging`` logger of this module only, and warns once.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from laplace_llm import serialization
from laplace_llm.checks import loader_size
from laplace_llm.distributed import as_timeout, process_rank, process_seed, shard
from laplace_llm.models.classifier import LLMClassifier
from laplace_llm.options import KFACOptions, check_int
from laplace_llm.posterior.checkpoint import CHECKPOINT_FILENAME, checkpoint_file
from laplace_llm.posterior.kron import LoRALaplace

__all__ = ["LaplaceCallback", "EVIDENCE_FILENAME"]

logger = logging.getLogger(__name__)

#: The evidence table across checkpoints, written into ``args.output_dir``.
EVIDENCE_FILENAME = "laplace_evidence.json"
#: Folder name prefix of the trainer's checkpoints (transformers' ``PREFIX_CHECKPOINT_DIR``).
CHECKPOINT_PREFIX = "checkpoint"

_LAPLACE_ARGS = {"prior_precision", "temperature", "seed", "jacobian_free", "options",
                 "damping", *KFACOptions.names()}


class _ToDevice:
    """A collate function that moves the batch's tensors to ``device``."""

    def __init__(self, collate: Callable | None, device: torch.device):
        self.collate = collate
        self.device = device

    def __call__(self, items):
        batch = self.collate(items) if self.collate is not None else torch.utils.data.default_collate(items)
        if isinstance(batch, Mapping):
            return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()}
        return batch


class LaplaceCallback(TrainerCallback):
    """Fit a LoRA Laplace posterior at the end of training (and at checkpoints).

    Parameters
    ----------
    classifier : callable, optional
        ``classifier(model) -> nn.Module`` returning logits ``(batch, C)`` for a dict
        batch, called with the trainer's model: e.g. ``LLMClassifier`` itself for a
        sequence-classification model, or ``lambda m: LLMClassifier.from_choices(m, tok,
        choices)``. Give this or ``choices``.
    choices : sequence of str, optional
        answer strings of a causal LM (each one token, e.g. ``[" A", " B"]``): the
        classifier is ``LLMClassifier.from_choices(model, tokenizer, choices,
        center=center)``.
    tokenizer : PreTrainedTokenizerBase, optional
        for ``choices``; default the trainer's ``processing_class``.
    center : bool or float, default True
        centring of the ``choices`` classifier's logits (see :class:`LLMClassifier`).
    likelihood : {"classification", "reward_modeling"}, default "classification"
    prior_optimization : {"marglik", "none"}, default "marglik"
        tune the prior precision by the marginal likelihood, or keep the given one.
    marglik_kwargs : dict, optional
        further arguments of ``optimize_prior_precision(method="marglik", ...)``.
    at_end : bool, default True
        fit at the end of training and write into ``output_dir``.
    at_checkpoints : bool, default False
        also fit at every checkpoint the trainer saves and write into that
        ``checkpoint-<step>`` folder; the evidence table (:attr:`evidence`) then has a row
        per checkpoint.
    output_dir : str or PathLike, optional
        where the end-of-training posterior goes; default the trainer's
        ``args.output_dir``, where ``trainer.save_model()`` puts the adapter.
    batch_size : int, optional
        batch size of the fit; default the trainer's ``per_device_train_batch_size``.
    fit_checkpoint_every : int, optional
        checkpoint each fit (:meth:`LoRALaplace.fit <laplace_llm.LoRALaplace.fit>`'s
        ``checkpoint``) into the folder its posterior goes to, as
        ``laplace_fit_checkpoint.safetensors`` (``.rank<r>`` per process under a
        distributed trainer), every this many batches and on SIGTERM/SIGINT; each process
        removes its file once the posterior is written. ``None``: no checkpoint.
    resume_fit : bool, default False
        continue a fit from the checkpoint an interrupted run left in that folder, if
        there is one (needs ``fit_checkpoint_every``): rerun the script (e.g.
        ``trainer.train(resume_from_checkpoint=True)``) and the fit at the same weights
        skips the batches already accumulated. A checkpoint of other weights, data or
        options is refused (:class:`~laplace_llm.errors.PosteriorFileError`); delete it to
        fit afresh.
    fit_timeout : float or timedelta, optional
        under a distributed trainer: how long, in seconds, a process waits for the others
        at each collective step of the fit (``fit(timeout=...)``) before every waiting
        process ends with a :class:`~laplace_llm.errors.CollectiveTimeoutError` naming the
        step and the processes that did not arrive. ``None``: the process group's own
        timeout (the trainer's ``ddp_timeout``, 30 minutes by default).
    **laplace_kwargs
        arguments of :class:`~laplace_llm.LoRALaplace`: the K-FAC options (``n_kfac``,
        ``fisher_type``, …, or ``options``), ``prior_precision``, ``temperature``,
        ``seed``, ``damping``, ``jacobian_free``. Under several processes a ``seed`` is
        offset by the rank, so that their Monte-Carlo labels are independent.

    Attributes
    ----------
    evidence : list of dict
        one row per fit: ``checkpoint`` (folder, or ``None`` before a save), ``step``,
        ``epoch``, ``log_marglik``, ``prior_precision`` (a float, or a list for a
        layerwise prior).
    laplace : LoRALaplace or None
        the latest fitted posterior.

    Raises
    ------
    ValueError
        neither or both of ``classifier`` and ``choices``, an unknown ``likelihood`` or
        ``prior_optimization``, or an argument ``LoRALaplace`` does not take.

    Examples
    --------
    >>> trainer = Trainer(model=peft_model, args=args, train_dataset=train, data_collator=collate)
    >>> cb = LaplaceCallback(choices=[" A", " B", " C", " D"], tokenizer=tok).attach(trainer)
    >>> trainer.train(); trainer.save_model()            # adapter + laplace_posterior.safetensors
    >>> la = LoRALaplace.load(args.output_dir, LLMClassifier.from_choices(peft_model, tok, [...]))
    """

    def __init__(
        self,
        classifier: Callable[[nn.Module], nn.Module] | None = None,
        *,
        choices: Sequence[str] | None = None,
        tokenizer: Any = None,
        center: bool | float = True,
        likelihood: str = "classification",
        prior_optimization: str = "marglik",
        marglik_kwargs: dict[str, Any] | None = None,
        at_end: bool = True,
        at_checkpoints: bool = False,
        output_dir: str | os.PathLike | None = None,
        batch_size: int | None = None,
        fit_checkpoint_every: int | None = None,
        resume_fit: bool = False,
        fit_timeout: float | timedelta | None = None,
        **laplace_kwargs: Any,
    ):
        if (classifier is None) == (choices is None):
            raise ValueError(
                "LaplaceCallback needs exactly one way to build the classifier the posterior "
                "is fitted on: classifier=... (a callable model -> module returning (batch, C) "
                "logits, e.g. classifier=LLMClassifier for a sequence-classification model) "
                "or choices=[' A', ' B', ...] (the answer strings of a causal LM)"
                + ("; got both." if classifier is not None else "; got neither.")
            )
        if classifier is not None and not callable(classifier):
            raise ValueError(
                f"classifier must be callable (model -> nn.Module), got {type(classifier).__name__}; "
                "pass e.g. LLMClassifier or a lambda building one."
            )
        if choices is not None and (
            isinstance(choices, str) or not choices or not all(isinstance(c, str) for c in choices)
        ):
            raise ValueError(
                f"choices must be a non-empty list of answer strings, got {choices!r}; e.g. "
                "[' A', ' B', ' C', ' D']."
            )
        if likelihood not in ("classification", "reward_modeling"):
            raise ValueError(
                f"likelihood must be 'classification' or 'reward_modeling', got {likelihood!r}."
            )
        if prior_optimization not in ("marglik", "none"):
            raise ValueError(
                f"prior_optimization must be 'marglik' or 'none', got {prior_optimization!r}."
            )
        unknown = sorted(set(laplace_kwargs) - _LAPLACE_ARGS)
        if unknown:
            raise ValueError(
                f"LaplaceCallback got unknown arguments {unknown}; the LoRALaplace arguments "
                f"it passes on are {sorted(_LAPLACE_ARGS)}."
            )
        kfac = {k: v for k, v in laplace_kwargs.items() if k in KFACOptions.names()}
        if kfac and "options" in laplace_kwargs:
            raise ValueError("Pass the K-FAC options either one by one or as options=, not both.")
        KFACOptions(**kfac)  # bad values fail now, not after training
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if fit_checkpoint_every is not None:
            check_int("fit_checkpoint_every", fit_checkpoint_every, 1)
        elif resume_fit:
            raise ValueError(
                "resume_fit=True continues the fit checkpoints that fit_checkpoint_every=N "
                "writes: pass fit_checkpoint_every too (e.g. 100 batches)."
            )
        self.classifier = classifier
        self.choices = None if choices is None else list(choices)
        self.tokenizer = tokenizer
        self.center = center
        self.likelihood = likelihood
        self.prior_optimization = prior_optimization
        self.marglik_kwargs = dict(marglik_kwargs or {})
        self.at_end = bool(at_end)
        self.at_checkpoints = bool(at_checkpoints)
        self.output_dir = output_dir
        self.batch_size = batch_size
        self.fit_checkpoint_every = fit_checkpoint_every
        self.resume_fit = bool(resume_fit)
        self.fit_timeout = as_timeout(fit_timeout, "fit_timeout")
        self.laplace_kwargs = laplace_kwargs
        self.trainer = None
        self.evidence: list[dict[str, Any]] = []
        self.laplace: LoRALaplace | None = None
        self._clf: nn.Module | None = None
        self._clf_of: nn.Module | None = None
        self._warned_unattached = False

    # ------------------------------------------------------------------ wiring
    def attach(self, trainer: Any) -> LaplaceCallback:
        """Add this callback to ``trainer`` and log through ``trainer.log``.

        Parameters
        ----------
        trainer : transformers.Trainer

        Returns
        -------
        LaplaceCallback
            ``self``.
        """
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    def _classifier(self, model: nn.Module, processing_class: Any = None) -> nn.Module:
        """Build the classifier over ``model`` (once per model)."""
        if self._clf is not None and self._clf_of is model:
            return self._clf
        if self.classifier is not None:
            clf = self.classifier(model)
            if not isinstance(clf, nn.Module):
                raise TypeError(
                    f"classifier(model) returned {type(clf).__name__}, not an nn.Module "
                    "returning (batch, C) logits; pass e.g. LLMClassifier."
                )
        else:
            tok = self.tokenizer if self.tokenizer is not None else processing_class
            if tok is None or not callable(getattr(tok, "encode", None)):
                raise ValueError(
                    "LaplaceCallback(choices=...) needs the tokenizer that encodes the "
                    "choices: pass tokenizer=... or give the Trainer processing_class=tokenizer."
                )
            clf = LLMClassifier.from_choices(model, tok, self.choices, center=self.center)
        self._clf, self._clf_of = clf, model
        return clf

    def _final_dir(self, args: Any) -> Path:
        return Path(self.output_dir if self.output_dir is not None else args.output_dir)

    # ------------------------------------------------------------------ checks
    def _check_data(self, train_dataloader: DataLoader | None) -> None:
        """Refuse training data the posterior cannot be fitted on, before training."""
        if train_dataloader is None:
            raise ValueError(
                "LaplaceCallback got no training dataloader from the trainer; it fits on the "
                "trainer's train_dataset: give the Trainer one."
            )
        loader_size(train_dataloader, "The trainer's train_dataset",
                    "give the Trainer a map-style dataset (e.g. a list or datasets.Dataset)")
        dataset = train_dataloader.dataset
        collate = train_dataloader.collate_fn
        first = collate([dataset[0]]) if collate is not None else dataset[0]
        if not isinstance(first, Mapping) or "labels" not in first:
            keys = sorted(first) if isinstance(first, Mapping) else type(first).__name__
            raise ValueError(
                f"The trainer's training batches have no 'labels' (got {keys}); the posterior's "
                "likelihood needs one class index per example. Add a 'labels' column of class "
                "indices (for a causal LM over choices, the index of the answer); if the "
                "Trainer removed it, set TrainingArguments(label_names=['labels']) or "
                "remove_unused_columns=False."
            )
        labels = torch.as_tensor(first["labels"])
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(
                f"The trainer's batches have labels of shape {tuple(labels.shape)} and dtype "
                f"{labels.dtype} per batch of one; LaplaceCallback needs one integer class "
                "index per example (shape (batch,)), not token labels of a language-modelling "
                "loss: train on class labels (e.g. a sequence-classification model, or the "
                "answer's index with LLMClassifier) or fit by hand with LoRALaplace."
            )

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, processing_class=None,
                       train_dataloader=None, **kwargs):
        """Check the classifier, the data and the output folder before any training."""
        self._check_data(train_dataloader)
        clf = self._classifier(model, processing_class)
        la = LoRALaplace(clf, self.likelihood, **self._laplace_kwargs(0))
        if self.at_end:
            target = serialization.posterior_path(self._final_dir(args))
            names = [b.name for b in la.blocks]
            serialization.check_overwrite(target, names, [list(b.shape) for b in la.blocks])
        if self.trainer is None and not self._warned_unattached:
            self._warned_unattached = True
            warnings.warn(
                "LaplaceCallback is not attached to its trainer: the evidence goes to "
                "state.log_history and the logging module only, not to the trainer's "
                "reporting integrations. Use LaplaceCallback(...).attach(trainer).",
                stacklevel=2,
            )

    def on_save(self, args, state, control, model=None, processing_class=None,
                train_dataloader=None, **kwargs):
        """Fit at the checkpoint just saved and write the posterior into it."""
        if not self.at_checkpoints:
            return
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        self._fit_and_write(args, state, model, processing_class, train_dataloader, folder)

    def on_train_end(self, args, state, control, model=None, processing_class=None,
                     train_dataloader=None, **kwargs):
        """Fit at the final weights, write the posterior and the evidence table."""
        if self.at_end:
            folder = self._final_dir(args)
            la = self.laplace
            if la is not None and self.evidence and self.evidence[-1]["step"] == state.global_step \
                    and self._clf_of is model and la._weights_equal_mean(la.mean):
                # the last checkpoint's fit is at these very weights
                self._write(state, la, folder)
            else:
                self._fit_and_write(args, state, model, processing_class, train_dataloader,
                                    folder, checkpoint=False)
        if self.at_checkpoints and state.is_world_process_zero:
            path = Path(args.output_dir) / EVIDENCE_FILENAME
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.evidence, indent=2), encoding="utf-8")
            logger.info("evidence across checkpoints:\n%s", self.evidence_table())

    # ---------------------------------------------------------------- fitting
    def _laplace_kwargs(self, rank: int) -> dict[str, Any]:
        kwargs = dict(self.laplace_kwargs)
        if "seed" in kwargs:
            kwargs["seed"] = process_seed(kwargs["seed"], rank)
        return kwargs

    def fit_loader(self, train_dataloader: DataLoader, batch_size: int,
                   device: torch.device) -> DataLoader:
        """Build this process's loader of the fit: its shard of the trainer's dataset, in order.

        Parameters
        ----------
        train_dataloader : DataLoader
            the trainer's training loader; its ``dataset`` and ``collate_fn`` are used.
        batch_size : int
        device : torch.device
            where the batches' tensors are moved.

        Returns
        -------
        DataLoader
            examples ``rank, rank + world, …`` of the dataset, no shuffling, no
            ``drop_last``; its ``dataset`` has the shard's length.
        """
        dataset = shard(train_dataloader.dataset, *process_rank())
        return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                          collate_fn=_ToDevice(train_dataloader.collate_fn, device))

    def fit(self, model: nn.Module, train_dataloader: DataLoader, batch_size: int,
            processing_class: Any = None, folder: str | os.PathLike | None = None) -> LoRALaplace:
        """Fit (and tune) the posterior of ``model`` on the trainer's training data.

        Parameters
        ----------
        model : nn.Module
            the trainer's (unwrapped) model.
        train_dataloader : DataLoader
            the trainer's training loader (see :meth:`fit_loader`).
        batch_size : int
        processing_class : optional
            the trainer's tokenizer, for ``choices``.
        folder : str or PathLike, optional
            where the fit's checkpoint goes with ``fit_checkpoint_every`` (and is resumed
            from with ``resume_fit``); ``None``: no checkpoint.

        Returns
        -------
        LoRALaplace
            fitted on all the data (summed over processes), prior tuned.
        """
        rank, world = process_rank()
        clf = self._classifier(model, processing_class)
        la = LoRALaplace(clf, self.likelihood, **self._laplace_kwargs(rank))
        loader = self.fit_loader(train_dataloader, batch_size, la._device)
        la.fit(loader, distributed=world > 1, timeout=self.fit_timeout,
               **self._checkpoint_arguments(folder, world))
        if self.prior_optimization == "marglik":
            la.optimize_prior_precision(method="marglik", **self.marglik_kwargs)
        self.laplace = la
        return la

    def _checkpoint_arguments(self, folder: str | os.PathLike | None, world: int) -> dict[str, Any]:
        """Return ``fit``'s checkpoint arguments for a posterior written into ``folder``."""
        if self.fit_checkpoint_every is None or folder is None:
            return {}
        path = Path(folder) / CHECKPOINT_FILENAME
        mine = checkpoint_file(path, distributed=world > 1)
        resume = self.resume_fit and mine.is_file()
        if self.resume_fit and not resume:
            logger.info("no fit checkpoint at %s: fitting from the first batch", mine)
        return {"checkpoint": path, "checkpoint_every": self.fit_checkpoint_every,
                "resume_from": path if resume else None}

    def _fit_and_write(self, args, state, model, processing_class, train_dataloader, folder,
                       checkpoint=True) -> None:
        self._check_data(train_dataloader)
        la = self.fit(model, train_dataloader, self.batch_size or args.per_device_train_batch_size,
                      processing_class, folder=folder)
        prior = la.prior_precision.detach().cpu().reshape(-1)
        row = {
            "checkpoint": str(folder) if checkpoint else None,
            "step": state.global_step,
            "epoch": state.epoch,
            "log_marglik": float(la.log_marginal_likelihood().item()),
            "prior_precision": float(prior[0]) if prior.numel() == 1 else prior.tolist(),
        }
        self.evidence.append(row)
        self._log(state, row)
        self._write(state, la, folder)
        if self.fit_checkpoint_every is not None:  # the fit is complete: its checkpoint goes
            mine = checkpoint_file(Path(folder) / CHECKPOINT_FILENAME, distributed=True)
            if mine.is_file():
                mine.unlink()
                logger.info("removed the fit checkpoint %s (the fit is complete)", mine)

    def _write(self, state, la: LoRALaplace, folder: Path) -> None:
        if not state.is_world_process_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = la.save(folder)
        logger.info("wrote the Laplace posterior to %s", path)

    def _log(self, state, row: dict[str, Any]) -> None:
        prior = row["prior_precision"]
        logs = {
            "laplace/log_marglik": row["log_marglik"],
            "laplace/prior_precision": prior if isinstance(prior, float) else sum(prior) / len(prior),
        }
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "epoch": state.epoch, "step": state.global_step})
        logger.info("Laplace at step %d: log marginal likelihood %.4g, prior precision %s",
                    row["step"], row["log_marglik"], prior)

    # ----------------------------------------------------------------- report
    def best_checkpoint(self) -> str | None:
        """Return the checkpoint folder of highest log marginal likelihood (``None`` if none)."""
        rows = [r for r in self.evidence if r["checkpoint"] is not None]
        return max(rows, key=lambda r: r["log_marglik"])["checkpoint"] if rows else None

    def evidence_table(self) -> str:
        """Return the evidence rows as a Markdown table (checkpoint, step, epoch, evidence, prior)."""
        lines = ["| checkpoint | step | epoch | log marglik | prior precision |",
                 "|---|---|---|---|---|"]
        for r in self.evidence:
            prior = r["prior_precision"]
            prior = f"{prior:.4g}" if isinstance(prior, float) else (
                f"mean {sum(prior) / len(prior):.4g} of {len(prior)}")
            name = Path(r["checkpoint"]).name if r["checkpoint"] else "(end)"
            epoch = "" if r["epoch"] is None else f"{r['epoch']:.2f}"
            lines.append(f"| {name} | {r['step']} | {epoch} | {r['log_marglik']:.2f} | {prior} |")
        return "\n".join(lines)
