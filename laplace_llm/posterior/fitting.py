"""The fit of a LoRA Laplace approximation: the loop over batches and the merge of fits.

:class:`LoRAFitting` holds :meth:`~LoRAFitting.fit` of
:class:`~laplace_llm.posterior.base.LoRALaplaceBase` (modes restored, seeded probes,
checked batches, :class:`~laplace_llm.errors.NonFiniteError` naming the batch; fit
checkpoints, fits across processes and FSDP passes) and the defaults of the accumulation
that a leaf replaces (``_add_batch``, ``_finish_curvature``, ``_partial_state``,
``_all_reduce``, ``_merge``): a curvature held as one tensor ``H``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from torch.utils.data import DataLoader

from laplace_llm import sharding
from laplace_llm.checks import check_batch, loader_size
from laplace_llm.distributed import (
    all_reduce_sum,
    as_timeout,
    collective_step,
    collective_timeout,
    process_rank,
)
from laplace_llm.errors import NonFiniteError
from laplace_llm.posterior.checkpoint import FitCheckpoint
from laplace_llm.progress import progress_bar as show_progress

__all__ = ["LoRAFitting"]


class LoRAFitting:
    """The fit loop of :class:`~laplace_llm.posterior.base.LoRALaplaceBase`.

    A base of that class, never used alone.
    """

    def _n_outputs_of(self, first_batch: Any) -> int:
        n = getattr(self.model, "n_outputs", None)
        if isinstance(n, int):
            return 2 * n if self.likelihood == "reward_modeling" else n
        X = first_batch if isinstance(first_batch, Mapping) else first_batch[0]
        with torch.no_grad():
            return self.model(X).shape[-1]

    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
        distributed: bool = False,
        *,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume_from: str | os.PathLike | None = None,
        timeout: float | timedelta | None = None,
    ) -> None:
        """Fit the posterior at the model's current LoRA weights.

        Parameters
        ----------
        train_loader : DataLoader
            dict batches (``input_ids``, optional ``attention_mask``, ``labels``) or
            ``(X, y)`` tuples; ``train_loader.dataset`` must have a length. Regression
            targets are floats of shape ``(batch, k)``.
        override : bool, default True
            ``False`` adds this data to the current fit, as laplace-torch does. A
            low-rank factor of the current fit is its kept rank-``k`` root plus its
            isotropic remainder ``ρ (I − Q Qᵀ)``: the root is summed with the new data
            (through the sketch), cut to rank ``k``, and the remainder is carried into
            the sum's kept eigenpairs by Rayleigh–Ritz on their span
            (:meth:`~laplace_llm.matrix.LowRankFactor.add_isotropic_`), so each kept
            eigenvalue moves towards the completed sum's by at most ``ρ``. What the old
            truncation discarded beyond that isotropic estimate stays lost: the
            directions it dropped cannot return. The exact traces add up.
        progress_bar : bool, default False
            tqdm bar over batches.
        distributed : bool, default False
            every process of the initialised ``torch.distributed`` group passes its
            own shard (e.g. through a ``DistributedSampler``); the curvature, loss and
            data size are summed over processes, so each ends with the posterior of
            the whole data set (see :mod:`laplace_llm.distributed`).
        checkpoint : str or PathLike, optional
            file (or folder, meaning its ``laplace_fit_checkpoint.safetensors``) to which
            the curvature accumulated so far is written, atomically, every
            ``checkpoint_every`` batches and when the process receives SIGTERM or SIGINT
            (the current batch finishes, the file is written, then the signal's previous
            handler acts: ``KeyboardInterrupt`` for SIGINT, the end of the process for a
            default SIGTERM). Handlers are installed only during the fit, in the main
            thread. Under ``distributed`` every process writes its own
            ``<checkpoint>.rank<r>``. The file is left in place when the fit completes.
            See :mod:`laplace_llm.posterior.checkpoint`.
        checkpoint_every : int, optional
            also write the checkpoint every this many batches (counted from the
            loader's first); default: only on a signal.
        resume_from : str or PathLike, optional
            a checkpoint written by an interrupted ``fit`` of this model: its batches are
            read from the loader again and skipped (no forward pass), the rest are
            accumulated, and the posterior equals the uninterrupted fit's (bit for bit on
            the same machine). The loader must yield the same batches in the same order
            (a shuffled ``DataLoader`` needs ``generator=torch.Generator().manual_seed(s)``
            made anew); the model, adapter, data, options, ``seed`` and ``override`` must
            be those of the interrupted call (``override=False``: on the posterior it
            added to). Pass the same path as ``checkpoint`` to keep checkpointing.
        timeout : float or timedelta, optional
            under ``distributed`` (or with an FSDP2-sharded model): how long, in seconds,
            a rank waits for the others at a collective step (summing the data size, the
            curvature's reductions at the end, the mean, and a sharded model's forward
            passes) before it fails with :class:`~laplace_llm.errors.CollectiveTimeoutError`
            naming the step and the ranks that had not arrived. Applied to the process
            group while the fit runs and restored afterwards. It must exceed the spread of
            the ranks' arrival, e.g. how much later the slowest rank finishes its batches
            than the fastest. ``None``: the group's own timeout (``init_process_group``'s,
            30 minutes for gloo, 10 for nccl). A rank that died fails the next collective at
            once, whatever the timeout.

        Raises
        ------
        NonFiniteError
            a batch gave NaN or Inf activations or gradients (the message names it);
            nothing is kept of this fit.
        PosteriorFileError
            ``resume_from`` is not a fit checkpoint (e.g. a finished posterior), is the
            checkpoint of another fit (model, weights, structure, options, seed, data
            size, loader length, processes, ``override``), or the loader yields other
            batches than it saw; ``checkpoint`` names a file that is not a fit checkpoint.
        CollectiveTimeoutError
            under ``distributed`` or with a sharded model: a rank did not arrive at a
            collective step within ``timeout``, or the connection to one broke (it died);
            raised on every rank that waited, naming the step and those ranks.
        ValueError
            ``timeout`` is not a positive number of seconds or ``timedelta``.
        """
        timeout = as_timeout(timeout)
        N = loader_size(train_loader)
        with collective_timeout(timeout):
            if distributed:
                N = int(all_reduce_sum(N, device=self._device, step="summing the data size").item())
            ckpt = FitCheckpoint.start(self, train_loader, N, override, distributed, checkpoint,
                                       checkpoint_every, resume_from)
            # sketches summed across processes must share their test matrices
            if hasattr(self.backend, "adapt_sketches"):
                self.backend.adapt_sketches = not distributed and process_rank()[1] == 1
            H_new, loss, n_outputs = self._accumulate(train_loader, N, progress_bar, ckpt)
            if distributed:
                H_new = self._all_reduce(H_new)
                loss = all_reduce_sum(loss, device=self._device,
                                      step="summing the loss").to(self._dtype)
            self._merge(H_new, loss, N, override)
            self.n_outputs = n_outputs
            self.model.output_size = n_outputs
            # gathered if sharded (a collective)
            mean = sharding.full_vector(self.params, step="gathering the mean").to(self._dtype)
        self.mean = mean if self.enable_backprop else mean.detach()
        self._posterior_changed()

    def _accumulate(self, train_loader: DataLoader, N: int, progress_bar: bool = False,
                    ckpt: FitCheckpoint | None = None):
        """Curvature, summed loss and number of outputs of this process's batches.

        Each batch is checked before its forward pass; the model is in eval mode
        meanwhile and its modules' modes are restored afterwards. With ``ckpt`` the
        batches a resumed checkpoint has seen are skipped, and checkpoints are written
        between batches (:class:`~laplace_llm.posterior.checkpoint.FitCheckpoint`).

        Returns
        -------
        H
            the curvature of the batches, normalised for a data set of ``N`` examples
            (:meth:`_add_batch`, then :meth:`_finish_curvature`).
        loss : torch.Tensor
            the summed loss (scalar).
        n_outputs : int
        """
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        backend = self.backend
        backend.generator = None
        if self.seed is not None:
            backend.generator = torch.Generator(device=self._device).manual_seed(self.seed)
        H, loss, n_outputs, start = None, 0.0, None, 0
        if ckpt is not None and ckpt.resumed is not None:
            start = ckpt.start_batch
            H = self._from_partial_state(ckpt.resumed["H"])
            loss = ckpt.resumed["loss"].to(self._device)
            n_outputs = ckpt.resumed["n_outputs"]
            ckpt.restore_generator(backend.generator)

        def state():
            return self._partial_state(H), loss, n_outputs, backend.generator

        model.eval()
        if hasattr(backend, "sharded"):  # checked once for the fit's batches
            backend.sharded = sharding.sharded_model(model)
        X = data = None
        # None unless sharded: then every rank makes as many passes as the busiest
        n_batches = sharding.batches_to_run(model, train_loader, skip=start)
        halfway = _halfway(train_loader)
        i = -1
        try:
            desc = f"[LoRA {self._key[1]}]"
            with ckpt.signals() if ckpt is not None else contextlib.nullcontext():
                for i, data in enumerate(show_progress(train_loader, enabled=progress_bar, desc=desc)):
                    if ckpt is not None:
                        ckpt.see(i, data)
                    if i < start:  # seen by the resumed checkpoint
                        continue
                    if n_outputs is None:
                        n_outputs = self._n_outputs_of(data)
                    if i == halfway and H is not None:
                        H = self._halfway_curvature(H)
                    X, y = check_batch(
                        data, i, n_outputs, self._device, self.dict_key_x, self.dict_key_y,
                        likelihood=self.likelihood, dtype=self._dtype,
                    )
                    try:
                        with _sharded_pass(n_batches, i):
                            loss_b, H = self._add_batch(X, y, N, H)
                    except FloatingPointError as err:
                        # one error type for every structure, naming the batch
                        raise NonFiniteError(f"Batch {i}: {err}") from None
                    loss = loss + loss_b
                    if ckpt is not None:
                        ckpt.after_batch(i + 1, state)
                if ckpt is not None:
                    ckpt.check_length(i + 1)
                if H is None:
                    raise ValueError("The train loader yielded no batch.")
                idle = range(i + 1 - start, n_batches or 0)  # a sharded model's passes are collective
                if len(idle) and X is None:  # every batch was skipped: any one will do
                    X, y = check_batch(data, i, n_outputs, self._device, self.dict_key_x,
                                       self.dict_key_y, likelihood=self.likelihood,
                                       dtype=self._dtype)
                for k in idle:
                    with _sharded_pass(n_batches, start + k, idle=True):
                        self._add_batch(X, y, N, None)  # idle: discarded
                    if ckpt is not None:
                        ckpt.after_batch(i + 1, state)
        finally:
            for m, mode in modes:
                if m.training != mode:  # nn.Module's __setattr__ is slow on many modules
                    m.training = mode
            if hasattr(backend, "sharded"):
                backend.sharded = None
        return self._finish_curvature(H), loss, n_outputs

    def _add_batch(self, X: Any, y: torch.Tensor, N: int, H):
        """Return the loss of one batch and ``H`` with the batch's curvature added.

        ``H`` is ``None`` at the first batch. Here: laplace-torch's curvature closure of
        the per-example backend (squared or outer products of LoRA gradients).
        """
        loss_b, H_b = self._curv_closure(X, y, N=N)
        return loss_b, H_b if H is None else H.add_(H_b)

    def _halfway_curvature(self, H):
        """Return the curvature of the first half of the batches, before the second half's.

        Here: ``H`` itself. (The Kronecker posterior adapts its sketches again.)
        """
        return H

    def _finish_curvature(self, H):
        """Return the accumulated curvature as the posterior keeps it."""
        return H.to(self._dtype)

    def _partial_state(self, H):
        """Return the curvature accumulated so far as a fit checkpoint stores it.

        Tensors and plain values only, not finalised (:meth:`_finish_curvature` is not
        applied), so that :meth:`_from_partial_state` continues the accumulation exactly.
        Here: the tensor ``H`` itself.
        """
        return H

    def _from_partial_state(self, state):
        """Return the curvature of a checkpoint's :meth:`_partial_state`, on the model's device."""
        return state.to(self._device)

    def _all_reduce(self, H):
        """Return the sum of ``H`` over the processes of the ``torch.distributed`` group."""
        import torch.distributed as dist

        size = "×".join(str(n) for n in H.shape)
        with collective_step(f"all-reduce of the curvature ({size} entries over "
                             f"{len(self.blocks)} LoRA blocks)"):
            dist.all_reduce(H, op=dist.ReduceOp.SUM)
        return H

    def _merge(self, H_new, loss: torch.Tensor, N: int, override: bool) -> None:
        """Make ``H_new`` the curvature (``override``) or add it to the current fit."""
        if override or not self._is_fitted():
            self.H, self.loss, self.n_data = H_new, loss, N
        else:
            self.H, self.loss, self.n_data = self.H + H_new, self.loss + loss, self.n_data + N

    def _posterior_changed(self) -> None:
        """Drop what was derived from the previous curvature."""
        self._posterior_scale = None


def _halfway(train_loader) -> int | None:
    """Index of the first batch of the loader's second half; ``None`` if it has no length or one batch."""
    try:
        n = len(train_loader)
    except TypeError:  # e.g. a batch sampler without a length
        return None
    return n // 2 if n >= 2 else None


def _sharded_pass(n_batches: int | None, i: int, idle: bool = False):
    """Return the context of batch ``i``'s passes: a collective step if the model is sharded.

    ``n_batches`` is :func:`~laplace_llm.sharding.batches_to_run`'s count, ``None`` for an
    unsharded model, whose passes are this rank's own.
    """
    if n_batches is None:
        return contextlib.nullcontext()
    what = (f"the forward and backward pass of batch {i} (an idle pass: this rank's batches "
            "are done, but FSDP2 gathers the sharded weights with every rank)" if idle else
            f"the forward and backward pass of batch {i} (FSDP2 gathers the sharded weights "
            "with every rank)")
    return collective_step(what)
