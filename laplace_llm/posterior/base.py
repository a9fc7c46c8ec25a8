"""What every Laplace approximation over LoRA weights shares, whatever its Hessian structure.

:class:`LoRALaplaceBase` is to laplace-torch's ``ParametricLaplace`` what its
``LLLaplace`` is for the last layer: the subset of weights, not a structure. A structure
is a leaf that inherits from this base first and from laplace-torch's class second, as
``FullLLLaplace(LLLaplace, FullLaplace)`` does:

- :class:`~laplace_llm.posterior.kron.LoRALaplace` (``KronLaplace``, ``("lora", "kron")``),
- :class:`~laplace_llm.posterior.diag.LoRADiagLaplace` (``DiagLaplace``, ``("lora", "diag")``),
- :class:`~laplace_llm.posterior.full.LoRAFullLaplace` (``FullLaplace``, ``("lora", "full")``).

The base holds the argument checks, the LoRA discovery (:func:`~laplace_llm.models.discovery.find_blocks`)
and module selection (``lora_modules``), the fit loop (modes restored, seeded probes,
checked batches, :class:`~laplace_llm.errors.NonFiniteError` naming the batch), the
predictives that restore the MAP weights, prior tuning, the state and the posterior files;
:func:`load` reads a file as the class its ``hessian_structure`` names in
:data:`STRUCTURES`. A leaf supplies how its curvature accumulates batch by batch and how
two fits merge. The defaults here are those of a curvature held as one tensor ``H`` (diag
``(P,)``, full ``(P, P)``) from per-example LoRA gradients
(:mod:`laplace_llm.curvature.per_example`); the Kronecker leaf replaces them by low-rank
factors.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from laplace.baselaplace import BaseLaplace, ParametricLaplace
from torch import nn
from torch.utils.data import DataLoader

from laplace_llm import serialization, sharding
from laplace_llm.checks import check_batch, loader_size
from laplace_llm.curvature.per_example import LoRAPerExampleCurvature
from laplace_llm.curvature.top_k import check_top_k, merge_rest
from laplace_llm.distributed import all_reduce_sum, as_timeout, collective_step, collective_timeout
from laplace_llm.errors import LoRAModelError, NonFiniteError, PosteriorFileError
from laplace_llm.matrix import factor_dtype
from laplace_llm.models.discovery import find_blocks
from laplace_llm.models.selection import restrict_to_blocks, select_blocks
from laplace_llm.options import Evidence, KFACOptions, check_int
from laplace_llm.posterior.checkpoint import FitCheckpoint
from laplace_llm.prior.evidence import optimize_prior_until_converged
from laplace_llm.prior.grid import glm_moments_over_priors, one_pass_gridsearch, replayed_moments
from laplace_llm.progress import progress_bar as show_progress

__all__ = ["LoRALaplaceBase", "STRUCTURES", "LIKELIHOODS", "OPTIONS", "load"]

LIKELIHOODS = ("classification", "regression", "reward_modeling")
#: The :class:`~laplace_llm.options.KFACOptions` fields that every structure uses (its
#: probes and the evidence); the others only shape Kronecker factors.
OPTIONS = ("fisher_type", "mc_samples", "evidence")
#: ``hessian_structure`` → class, filled as each leaf is defined (its ``_key``
#: ``("lora", structure)``); :func:`load` reads it.
STRUCTURES: dict[str, type[LoRALaplaceBase]] = {}


class LoRALaplaceBase(ParametricLaplace):
    """The LoRA subset of weights of a laplace-torch Laplace approximation.

    Not a Laplace class itself (no ``_key``; laplace-torch's ``Laplace`` never returns
    it): a leaf inherits from it first and from its laplace-torch structure second.

    Parameters
    ----------
    model : nn.Module
        returns ``(batch, C)`` outputs: logits (classification, e.g.
        :class:`laplace_llm.LLMClassifier`), a reward (``reward_modeling``) or ``k``
        regression outputs (``regression``, targets ``(batch, k)`` floats).
    likelihood : {"classification", "regression", "reward_modeling"}
    sigma_noise, prior_precision, prior_mean, temperature, enable_backprop, dict_key_x, dict_key_y
        as laplace-torch's; ``prior_precision`` is a positive scalar or one value per
        LoRA block.
    backend : type, optional
        the leaf's curvature backend (:attr:`_backend_class`) or a subclass.
    backend_kwargs : dict, optional
        further arguments of the backend.
    asdl_fisher_kwargs : dict, optional
        laplace-torch's; passed on where the laplace-torch parent takes it (kron).
    seed : int, optional
        seed of the labels sampled by ``fisher_type="mc"``; ``None`` uses torch's
        global generator.
    jacobian_free : bool, default True
        GLM predictive from hooked activations and ``C`` backward passes (no
        parameter-long Jacobian); ``False`` uses laplace-torch's ``torch.func``
        Jacobians. ``enable_backprop=True`` always uses the latter.
    lora_modules : list of str or str, optional
        layer names or glob patterns of the Bayesian LoRA layers (see
        :mod:`laplace_llm.models.selection`; ``["lm_head"]`` is last-layer LoRA Laplace);
        the others stay at their MAP values. ``None``: every LoRA layer.
    options : KFACOptions, optional
        the curvature options as one object; default ``KFACOptions(**kfac_options)``.
    **kfac_options
        the fields of :class:`~laplace_llm.options.KFACOptions` that the structure takes
        (:attr:`_option_names`), as keywords.
    """

    #: the curvature backend a leaf computes with (``backend`` may subclass it)
    _backend_class: type = LoRAPerExampleCurvature
    #: the :class:`KFACOptions` fields a leaf takes as keywords and writes to its files
    _option_names: tuple[str, ...] = OPTIONS
    #: the GLM predictive contracts hooked quantities with the posterior block by block
    #: (no Jacobian) when the backend can (``backend.glm_moments``)
    _moments_without_jacobians = False
    #: the ``top_k`` of the predictive call running now (``None``: every class)
    _glm_top_k: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Enter a leaf with its own ``_key`` ``("lora", structure)`` in :data:`STRUCTURES`."""
        super().__init_subclass__(**kwargs)
        key = cls.__dict__.get("_key")
        if key is not None and key[0] == "lora":
            STRUCTURES[key[1]] = cls

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        sigma_noise: float | torch.Tensor = 1.0,
        prior_precision: float | torch.Tensor = 1.0,
        prior_mean: float | torch.Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        *,
        seed: int | None = None,
        jacobian_free: bool = True,
        lora_modules: list[str] | str | None = None,
        options: KFACOptions | None = None,
        **kfac_options: Any,
    ):
        name = type(self).__name__
        unknown = sorted(set(kfac_options) - set(self._option_names))
        if unknown:
            others = "" if set(self._option_names) == set(KFACOptions.names()) else (
                " (the others shape Kronecker factors: hessian_structure='kron')")
            raise TypeError(
                f"{name} got unexpected keyword arguments {unknown}; its own options are "
                f"{list(self._option_names)}{others}, seed, jacobian_free and lora_modules, "
                "besides laplace-torch's."
            )
        self.options = options if options is not None else KFACOptions(**kfac_options)
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self.jacobian_free = bool(jacobian_free)
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"{name} supports likelihood='classification' (selected logits), "
                f"'reward_modeling' and 'regression'; got {likelihood!r}."
            )
        expected = self._backend_class
        if backend is not None and not (isinstance(backend, type) and issubclass(backend, expected)):
            raise ValueError(
                f"subset_of_weights='lora' computes {name}'s curvature with "
                f"{expected.__module__}.{expected.__name__}; got backend={backend!r}. Leave "
                "`backend` unset."
            )
        self.lora_modules = None if lora_modules is None else list(
            [lora_modules] if isinstance(lora_modules, str) else lora_modules
        )
        self.blocks = select_blocks(find_blocks(model), self.lora_modules)
        self._check_size(sum(b.numel for b in self.blocks), model)
        backend_kwargs = dict(backend_kwargs or {})
        backend_kwargs.update(options=self.options, blocks=self.blocks)
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=1.0,
            prior_mean=0.0,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend or expected,
            backend_kwargs=backend_kwargs,
            **self._parent_arguments(asdl_fisher_kwargs),
        )
        # the prior refers to the selected blocks (lora_modules), set once they are known
        restrict_to_blocks(self, self.blocks, prior_precision, prior_mean)

    def _parent_arguments(self, asdl_fisher_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """Return the arguments of the laplace-torch parent's constructor beyond the common ones."""
        return {}

    def _check_size(self, n_params: int, model: nn.Module) -> None:
        """Refuse a selection of ``n_params`` LoRA weights this structure cannot hold."""

    @property
    def fisher_type(self):
        """``self.options.fisher_type`` (see :class:`~laplace_llm.options.KFACOptions`)."""
        return self.options.fisher_type

    @property
    def mc_samples(self) -> int:
        """``self.options.mc_samples`` (see :class:`~laplace_llm.options.KFACOptions`)."""
        return self.options.mc_samples

    @property
    def evidence(self):
        """``self.options.evidence`` (see :class:`~laplace_llm.options.KFACOptions`)."""
        return self.options.evidence

    # ------------------------------------------------------------ dtype/state
    @property
    def _dtype(self) -> torch.dtype:
        # bf16/fp16 models keep their posterior in float32: eigh and the evidence
        # need it, and CPU has no bf16 eigh kernel
        return factor_dtype(next(self.model.parameters()).dtype)

    def _init_H(self) -> None:
        # curvature appears in fit(): no allocation before (a dense P×P, or d×d Kronecker
        # factors, would defeat the structure's memory bound)
        self.H = None

    def _is_fitted(self) -> bool:
        return getattr(self, "H", None) is not None

    def _check_H_init(self) -> None:
        if not self._is_fitted():
            raise AttributeError(
                f"This {type(self).__name__} is not fitted: call `la.fit(train_loader)` first."
            )

    # ----------------------------------------------------------------- priors
    @BaseLaplace.prior_precision.setter
    def prior_precision(self, prior_precision) -> None:
        """Set the prior precision: a positive scalar or one per LoRA block."""
        if isinstance(prior_precision, torch.Tensor):
            bad = not bool(torch.isfinite(prior_precision).all() and (prior_precision > 0).all())
        elif np.isscalar(prior_precision) and np.isreal(prior_precision):
            bad = not (math.isfinite(prior_precision) and prior_precision > 0)
        else:
            bad = False  # the parent setter reports the type
        if bad:
            raise ValueError(
                f"Prior precision must be finite and > 0; got {prior_precision!r}. Use a "
                "positive scalar or one positive value per LoRA block "
                f"({self.n_layers} blocks)."
            )
        try:
            # the structure's setter (KronLaplace's takes one value or one per block)
            super(LoRALaplaceBase, type(self)).prior_precision.fset(self, prior_precision)
        except ValueError as err:
            raise ValueError(
                f"{err} {type(self).__name__} takes a scalar prior precision or one per LoRA "
                f"block ({self.n_layers} blocks: one per trainable parameter tensor)."
            ) from err

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        """Log-determinant of the posterior precision (the prior's before ``fit``)."""
        if not self._is_fitted():
            return self.prior_precision_diag.log().sum()
        return super().log_det_posterior_precision

    def square_norm(self, value: torch.Tensor) -> torch.Tensor:
        """Return ``(θ − μ)ᵀ P (θ − μ)`` for the posterior precision ``P`` (the prior's before ``fit``)."""
        if not self._is_fitted():
            delta = value - self.mean
            return (delta * self.prior_precision_diag) @ delta
        return super().square_norm(value)

    def optimize_prior_precision(self, *args: Any, **kwargs: Any) -> None:
        """Tune the prior as laplace-torch does.

        With the default ``evidence="map"`` marglik is laplace-torch's loop, step for
        step; with ``evidence="linearised"`` it is restarted until it converges (see
        :func:`~laplace_llm.prior.evidence.optimize_prior_until_converged`). Either way a
        warning names the blocks whose prior marglik drives towards infinity.
        """
        optimize_prior_until_converged(self, super().optimize_prior_precision, args, kwargs)

    @property
    def log_det_ratio(self) -> torch.Tensor:
        """``log det P − log det P₀``; with the linearised evidence as a sum of ``log1p``."""
        if self.options.evidence == Evidence.MAP or not self._is_fitted():
            return super().log_det_ratio
        return self._evidence_terms()[0].sum()

    @property
    def scatter(self) -> torch.Tensor:
        """The prior's term of the evidence, per ``options.evidence``.

        ``"map"`` (default): laplace-torch's ``dᵀΛ₀d``; ``"linearised"``: the linearised
        model's, at its own mode, term by term (see :mod:`laplace_llm.prior.evidence`
        and the leaf's :meth:`_evidence_terms`).
        """
        if self.options.evidence == Evidence.MAP or not self._is_fitted():
            return super().scatter
        return self._evidence_terms(self.mean - self.prior_mean)[1].sum()

    def _evidence_terms(
        self, delta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``log det(P/Λ₀)`` and the linearised scatter of ``delta``, as terms to sum.

        The terms are per block (kron: the Kronecker eigenbasis), per parameter (diag)
        or one each (full); the scatter is ``None`` without ``delta`` (``d = θ* − μ₀``).
        No term is a difference of two large numbers, so float32 agrees with float64.
        Abstract: kron.py, diag.py and full.py each implement it for their curvature.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define _evidence_terms")

    def _evidence_per_block(self, prior_precision: torch.Tensor) -> torch.Tensor:
        """Return the evidence's prior terms ``−½ (log det(P_b/Λ₀_b) + S_b)`` per block.

        The evidence is their sum plus the log-likelihood; used to score each block's
        prior on its own (:func:`~laplace_llm.prior.evidence.warn_if_prior_diverges`),
        for a structure whose evidence separates over the blocks (kron, diag; full sets
        it to ``None``).
        """
        self.prior_precision = prior_precision
        d = self.mean - self.prior_mean
        logdet, scatter = self._evidence_terms(d)
        if self.options.evidence == Evidence.MAP:
            scatter = self.prior_precision_diag * d.square()
        return -0.5 * (self._sum_per_block(logdet) + self._sum_per_block(scatter))

    def _sum_per_block(self, terms: torch.Tensor) -> torch.Tensor:
        """Sum per-parameter ``terms`` ``(P,)`` to one per block; per-block ones pass through."""
        if terms.numel() != sum(b.numel for b in self.blocks):
            return terms.reshape(len(self.blocks))
        return torch.stack([terms[s].sum() for s in _block_slices(self.blocks)])

    # -------------------------------------------------------------------- fit
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
            ``False`` adds this data to the current fit, as laplace-torch does.
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
        X = data = None
        # None unless sharded: then every rank makes as many passes as the busiest
        n_batches = sharding.batches_to_run(model, train_loader, skip=start)
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
                m.training = mode
        return self._finish_curvature(H), loss, n_outputs

    def _add_batch(self, X: Any, y: torch.Tensor, N: int, H):
        """Return the loss of one batch and ``H`` with the batch's curvature added.

        ``H`` is ``None`` at the first batch. Here: laplace-torch's curvature closure of
        the per-example backend (squared or outer products of LoRA gradients).
        """
        loss_b, H_b = self._curv_closure(X, y, N=N)
        return loss_b, H_b if H is None else H.add_(H_b)

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

    # ------------------------------------------------------------- predictive
    @torch.enable_grad()
    def _glm_predictive_distribution(self, X, joint: bool = False, diagonal_output: bool = False):
        self._check_H_init()
        top_k = self._glm_top_k
        replayed = None if top_k is not None else replayed_moments(self, X, joint, diagonal_output)
        if replayed is not None:
            return replayed
        if self._moments_without_jacobians and self.jacobian_free and not self.enable_backprop:
            extra = {} if top_k is None else {"top_k": top_k}  # older backends lack it
            moments = self.backend.glm_moments(X, self.posterior_precision, joint=joint, **extra)
            if moments is not None:
                f_mu, f_var = moments
                if joint:
                    f_mu = f_mu.flatten()
                elif diagonal_output:
                    f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
                return f_mu, f_var.detach()
        f_mu, Js = self._glm_jacobians(X)
        if joint:
            f_var = merge_rest(f_mu, self.functional_covariance(Js), top_k, joint=True)
            f_mu = f_mu.flatten()
        else:
            f_var = merge_rest(f_mu, self.functional_variance(Js), top_k)
            if diagonal_output:
                f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
        if not self.enable_backprop:
            return f_mu.detach(), f_var.detach()
        return f_mu, f_var

    @torch.enable_grad()
    def _glm_jacobians(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, C)`` and their Jacobians ``(B, C, P)`` in the posterior's dtype."""
        out = None
        # per-example backends give them from the hooks; K-FAC's rarely needs them
        block_jacobians = getattr(self.backend, "block_jacobians", None)
        if block_jacobians is not None and self.jacobian_free and not self.enable_backprop:
            out = block_jacobians(X)
        if out is None:
            if sharding.sharded_model(self.model):
                raise ValueError(
                    "The torch.func Jacobians (jacobian_free=False, enable_backprop=True, or "
                    "LoRA modules that see another batch size than the logits) do not run on "
                    "an FSDP-sharded model; use the default jacobian_free=True."
                )
            Js, f_mu = self.backend.jacobians(X, enable_backprop=self.enable_backprop)
        else:
            f_mu, Js = out
        return f_mu.to(self._dtype), Js.to(self._dtype)

    def glm_moments_over_priors(self, X, prior_precisions, joint: bool = False,
                                top_k: int | None = None) -> list:
        """GLM moments ``(f_mu, f_var)`` of the logits of batch ``X`` under each prior.

        The Jacobians are computed once and contracted with each posterior, so a grid
        of ``K`` priors costs about one predictive, not ``K``. Each entry of
        ``prior_precisions`` is what ``prior_precision`` accepts; the current prior is
        left unchanged; ``top_k`` as in ``__call__``. See
        :func:`laplace_llm.prior.grid.glm_moments_over_priors`.
        """
        return glm_moments_over_priors(self, X, prior_precisions, joint=joint, top_k=top_k)

    def _gridsearch(self, loss, interval, val_loader, pred_type, link_approx="probit",
                    n_samples=100, progress_bar=False):
        # laplace-torch's contract, on moments of every prior from one pass
        return one_pass_gridsearch(self, loss, interval, val_loader, pred_type, link_approx,
                                   n_samples, progress_bar)

    def _glm_functional_samples(
        self, f_mu, f_var, n_samples, diagonal_output=False, generator=None
    ):
        # laplace-torch draws through a Cholesky factor, which a covariance that is only
        # semi-definite lacks (a missing candidate's constant logit of CandidateScorer has
        # zero variance); such a batch element is drawn through its eigh square root,
        # the same Gaussian. Definite covariances take laplace-torch's path unchanged.
        if diagonal_output or f_var.ndim != 3:
            return BaseLaplace._glm_functional_samples(
                self, f_mu, f_var, n_samples, diagonal_output, generator
            )
        _, info = torch.linalg.cholesky_ex(f_var)
        if not bool((info != 0).any()):
            return BaseLaplace._glm_functional_samples(
                self, f_mu, f_var, n_samples, False, generator
            )
        scale = torch.linalg.cholesky_ex(f_var)[0]
        bad = info != 0
        lam, vec = torch.linalg.eigh(f_var[bad])
        scale[bad] = vec * lam.clamp(min=0).sqrt().unsqueeze(-2)
        eps = torch.randn(
            (f_mu.shape[1], n_samples), device=f_mu.device, dtype=f_mu.dtype, generator=generator
        )
        return (f_mu.unsqueeze(-1) + scale @ eps).permute(2, 0, 1)

    def _set_params(self, vector: torch.Tensor) -> None:
        # sharded parameters take their own slice, of rank 0's vector
        sharding.write_vector(self.params, vector, self.model)

    def _nn_functional_samples(self, X, n_samples=100, generator=None, **model_kwargs):
        self._check_H_init()
        outs = []
        try:
            for sample in self.sample(n_samples, generator):
                self._set_params(sample)
                with torch.no_grad():
                    outs.append(self.model(X, **model_kwargs).to(self._dtype))
        finally:
            self._set_params(self.mean)
        return torch.stack(outs)

    def _nn_predictive_classification(self, X, n_samples=100, **model_kwargs):
        probs = torch.softmax(self._nn_functional_samples(X, n_samples, **model_kwargs), dim=-1)
        return probs.mean(0)

    def _weights_equal_mean(self, mean: torch.Tensor) -> bool:
        """Whether the model's LoRA weights are ``mean`` (the posterior mean) bit for bit."""
        return sharding.equals_vector(self.params, mean)  # sharded: this rank's slices

    def _warn_if_weights_changed(self) -> None:
        if not self._weights_equal_mean(self.mean):
            warnings.warn(
                "The model's LoRA weights changed since `fit`: the posterior is centred on "
                "the old weights. Refit with `la.fit(...)` (or restore the fitted adapter).",
                stacklevel=3,
            )

    def __call__(
        self,
        x,
        pred_type="glm",
        joint=False,
        link_approx="probit",
        n_samples=100,
        diagonal_output=False,
        generator=None,
        fitting=False,
        top_k=None,
        **model_kwargs,
    ):
        """Predict as laplace-torch does; a ``generator`` also seeds the Monte-Carlo samples.

        Checks that the posterior is fitted and still centred on the model's weights,
        refuses bridge links for batches with missing candidates, and passes
        ``generator`` on to the Monte-Carlo samples, which laplace-torch 0.3 validates
        but then draws from torch's global generator; everything else is the
        laplace-torch parent's ``__call__``.

        ``top_k`` (classification, ``pred_type="glm"``): the exact logit covariance of
        each example's ``top_k`` most probable classes, and the other classes merged into
        one, from ``top_k + 1`` backward passes instead of ``C``
        (:mod:`laplace_llm.curvature.top_k`). ``None`` (default) or ``top_k ≥ C``: all.
        """
        self._check_H_init()
        self._warn_if_weights_changed()
        _refuse_bridge_for_missing_candidates(x, pred_type, link_approx)
        classification = self.likelihood == "classification" or (
            self.likelihood == "reward_modeling" and fitting
        )
        top_k = _check_top_k_call(top_k, pred_type, link_approx, classification)
        previous, self._glm_top_k = self._glm_top_k, top_k
        try:
            return self._predict(x, pred_type, joint, link_approx, n_samples, diagonal_output,
                                 generator, fitting, classification, **model_kwargs)
        finally:
            self._glm_top_k = previous

    def _predict(self, x, pred_type, joint, link_approx, n_samples, diagonal_output, generator,
                 fitting, classification, **model_kwargs):
        """``__call__`` once its arguments are checked (and ``top_k`` set)."""
        if generator is not None and classification and link_approx == "mc":
            if not isinstance(generator, torch.Generator) or generator.device != self._device:
                raise ValueError("Invalid random generator (check type and device).")
            if pred_type == "glm":
                f_mu, f_var = self._glm_predictive_distribution(x)
                return self._glm_predictive_samples(
                    f_mu, f_var, n_samples, diagonal_output, generator
                ).mean(0)
            if pred_type == "nn":
                fs = self._nn_functional_samples(x, n_samples, generator, **model_kwargs)
                return torch.softmax(fs, dim=-1).mean(0)
        return super().__call__(
            x, pred_type, joint, link_approx, n_samples, diagonal_output, generator, fitting,
            **model_kwargs,
        )

    def sample_adapters(self, n_samples: int, out_dir, seed: int = 0) -> list:
        """Write ``n_samples`` posterior draws of the LoRA weights as peft adapter folders.

        ``PeftModel.from_pretrained`` loads them; the draws are those of
        ``self.sample(n_samples, torch.Generator().manual_seed(seed))``. See
        :func:`laplace_llm.posterior.generation.sample_adapters`.
        """
        from laplace_llm.posterior.generation import sample_adapters

        return sample_adapters(self, n_samples, out_dir, seed=seed)

    # ------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """laplace-torch's state plus the options and the LoRA blocks.

        Holds tensors and plain values only (``torch.load(weights_only=True)`` reads
        it); ``options`` holds the fields of :attr:`_option_names`, ``H`` is the
        structure's curvature (one tensor here).
        """
        self._check_H_init()
        state = ParametricLaplace.state_dict(self)
        state.update(self._file_identity())
        return state

    def _file_identity(self) -> dict[str, Any]:
        """Return what names the fitted posterior in its file and in a fit checkpoint.

        ``options`` (the fields of :attr:`_option_names`), ``dict_key_x``, ``dict_key_y``,
        ``hessian_structure``, ``lora_modules``, ``block_names`` and ``block_shapes``.
        """
        return {
            "options": {k: v for k, v in self.options.to_dict().items()
                        if k in self._option_names},
            "dict_key_x": self.dict_key_x,
            "dict_key_y": self.dict_key_y,
            "hessian_structure": self._key[1],
            "lora_modules": self.lora_modules,
            "block_names": [b.name for b in self.blocks],
            "block_shapes": [list(b.shape) for b in self.blocks],
        }

    def load_state_dict(self, state_dict: dict[str, Any], check_weights: bool = False) -> None:
        """Restore a :meth:`state_dict` fitted on this model's (selected) LoRA blocks.

        Parameters
        ----------
        state_dict : dict
            from :meth:`state_dict` (or read from a posterior file).
        check_weights : bool, default False
            also refuse a state whose mean differs from the model's current LoRA weights.

        Raises
        ------
        ValueError
            the state was fitted on other LoRA blocks (names or shapes; check
            ``lora_modules`` and the adapter), or, with ``check_weights``, on other LoRA
            weights.
        """
        self._check_state(state_dict, check_weights)
        ParametricLaplace.load_state_dict(self, state_dict)
        device = self._device
        self.mean = self.mean.to(device)
        self.prior_mean = self.prior_mean.to(device)
        self.prior_precision = self.prior_precision.to(device)
        self.loss = torch.as_tensor(self.loss, dtype=self._dtype)
        self._load_curvature(state_dict)
        self._posterior_changed()

    def _load_curvature(self, state_dict: dict[str, Any]) -> None:
        """Make the state's ``H`` the curvature, on the model's device in the posterior's dtype."""
        self.H = self.H.to(device=self._device, dtype=self._dtype)

    def _check_state(self, state_dict: dict[str, Any], check_weights: bool) -> None:
        """Refuse a state fitted on other LoRA blocks (or, if asked, other weights)."""
        names = [b.name for b in self.blocks]
        shapes = [list(b.shape) for b in self.blocks]
        theirs = state_dict.get("block_names")
        their_shapes = state_dict.get("block_shapes")
        if (theirs is not None and theirs != names) or (
            their_shapes is not None and [list(s) for s in their_shapes] != shapes
        ):
            theirs = theirs if theirs is not None else names
            their_shapes = their_shapes if their_shapes is not None else shapes
            raise ValueError(
                f"This posterior was fitted on another model: it has {len(theirs)} LoRA "
                f"blocks ({theirs[:2]}…, shapes {[list(s) for s in their_shapes[:2]]}…), the "
                f"model has {len(names)} ({names[:2]}…, shapes {shapes[:2]}…); first "
                f"difference: {_first_diff(theirs, names, their_shapes, shapes)}. Load it "
                "with the model and adapter it was fitted on."
            )
        if check_weights and not self._weights_equal_mean(state_dict["mean"]):
            raise ValueError(
                "This posterior was fitted on other LoRA weights than the model has now "
                "(same blocks, different values): load the adapter it was fitted on, or "
                "pass check_weights=False if you changed the weights on purpose."
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted posterior to a safetensors file (no pickle).

        See :mod:`laplace_llm.serialization` for the format.

        Parameters
        ----------
        path : str or PathLike
            a file, or a folder (e.g. the peft adapter folder of the fitted weights),
            which means its :data:`~laplace_llm.serialization.POSTERIOR_FILENAME`.

        Returns
        -------
        Path
            the file written.

        Raises
        ------
        PosteriorFileError
            ``path`` holds a file that is not a posterior of this model's LoRA blocks
            (another model's posterior, an adapter's weights); nothing is written.
        """
        state = self.state_dict()
        path = serialization.posterior_path(path)
        if not sharding.writes_here(self.model):  # a sharded model's file is rank 0's
            return path
        serialization.check_overwrite(path, state["block_names"], state["block_shapes"])
        serialization.write_state(state, path)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module, check_weights: bool = True, **kwargs: Any
    ) -> LoRALaplaceBase:
        """Read a posterior written by :meth:`save` for ``model``: :func:`laplace_llm.load`.

        The posterior is built as the class of the file's ``hessian_structure``,
        whichever class ``load`` is called on.
        """
        return load(path, model, check_weights=check_weights, **kwargs)

    @classmethod
    def _load_arguments(cls, state: dict[str, Any]) -> dict[str, Any]:
        """Return the constructor arguments of :func:`load` from a state (besides model, likelihood)."""
        kwargs = {
            "temperature": state["temperature"],
            "sigma_noise": state["sigma_noise"],
            "dict_key_x": state["dict_key_x"],
            "dict_key_y": state["dict_key_y"],
            "lora_modules": state["lora_modules"],
            **state["options"],
        }
        # files written before the option existed hold a prior chosen by laplace-torch's
        # evidence (the default again); files that record an evidence keep it
        kwargs.setdefault("evidence", Evidence.MAP)
        return kwargs


def load(
    path: str | os.PathLike, model: nn.Module, check_weights: bool = True, **kwargs: Any
) -> LoRALaplaceBase:
    """Read a posterior written by ``la.save`` for ``model``.

    The posterior is built with the file's options, as the class of its
    ``hessian_structure`` in :data:`STRUCTURES` (:class:`~laplace_llm.LoRALaplace`,
    :class:`~laplace_llm.LoRADiagLaplace` or :class:`~laplace_llm.LoRAFullLaplace`), then
    ``load_state_dict``.

    Parameters
    ----------
    path : str or PathLike
        a posterior file, or a folder holding one under
        :data:`~laplace_llm.serialization.POSTERIOR_FILENAME` (the peft adapter
        folder or ``Trainer`` checkpoint that ``save`` or
        :class:`~laplace_llm.callback.LaplaceCallback` wrote it into).
    model : nn.Module
        the model (with the adapter) the posterior was fitted on.
    check_weights : bool, default True
        refuse the file if the model's LoRA weights differ from the fitted ones.
    **kwargs
        further constructor arguments (e.g. ``jacobian_free``); they override the
        file's options.

    Raises
    ------
    PosteriorFileError
        damaged file, other format or version, a structure this release does not know,
        or a model with other LoRA blocks or weights.
    """
    path = serialization.posterior_path(path)
    if path.parent.is_dir() and not path.exists() and path.name == serialization.POSTERIOR_FILENAME:
        raise FileNotFoundError(
            f"'{path.parent}' holds no posterior ('{path.name}'); write one there with "
            "`la.save(folder)` or laplace_llm.LaplaceCallback, or pass the posterior "
            "file's path."
        )
    state = serialization.read_state(path)
    structure = state["hessian_structure"]
    la_cls = STRUCTURES.get(structure)
    if la_cls is None:
        raise PosteriorFileError(
            f"'{path}' holds a hessian_structure={structure!r} posterior, which this "
            "laplace-llm does not know; read it with the release that wrote it."
        )
    arguments = {**la_cls._load_arguments(state), **kwargs}
    try:
        la = la_cls(model, state["likelihood"], **arguments)
    except LoRAModelError as err:  # e.g. its lora_modules match no layer of this model
        raise PosteriorFileError(f"'{path}': {err}") from None
    try:
        la.load_state_dict(state, check_weights=check_weights)
    except ValueError as err:
        raise PosteriorFileError(f"'{path}': {err}") from None
    return la


def _check_top_k_call(top_k, pred_type: str, link_approx: str, classification: bool):
    """Return a checked ``top_k``, refusing it where it does not apply."""
    top_k = check_top_k(top_k)
    if top_k is None:
        return None
    if not classification:
        raise ValueError(
            "top_k selects the most probable classes of a classification predictive; this "
            "posterior's predictive is a regression (reward models: pass fitting=True for "
            "the pair probabilities). Leave top_k unset."
        )
    if pred_type != "glm":
        raise ValueError(
            f"top_k applies to the GLM predictive (pred_type='glm'); pred_type={pred_type!r} "
            "samples weights and costs n_samples forwards whatever the number of classes, "
            "so it needs no top_k. Leave top_k unset."
        )
    if link_approx in ("bridge", "bridge_norm"):
        raise ValueError(
            f"link_approx={link_approx!r} needs a definite covariance of every logit, and "
            "top_k's is singular (the classes outside the top k move together); use "
            "link_approx='probit' or 'mc' with top_k."
        )
    return top_k


def _refuse_bridge_for_missing_candidates(x: Any, pred_type: str, link_approx: str) -> None:
    """Raise ValueError for a bridge link over a batch with missing candidates."""
    missing = x.get("candidate_mask") if isinstance(x, Mapping) else None
    # == against the strings: laplace-torch passes its str enums, whose str() is "LinkApprox.…"
    if (pred_type == "glm" and link_approx in ("bridge", "bridge_norm")
            and missing is not None and not bool(torch.as_tensor(missing).all())):
        raise ValueError(
            f"link_approx={link_approx!r} divides by each logit's variance, which is 0 "
            "for a missing candidate (candidate_mask 0): use link_approx='probit' or 'mc'."
        )


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


def _block_slices(blocks) -> list[slice]:
    """Return the slice of each block in the flat parameter vector."""
    out, start = [], 0
    for b in blocks:
        out.append(slice(start, start + b.numel))
        start += b.numel
    return out


def _first_diff(a: list[str], b: list[str], a_shapes: list, b_shapes: list) -> str:
    for i, (x, y, sx, sy) in enumerate(zip(a, b, a_shapes, b_shapes)):
        if x != y or list(sx) != list(sy):
            return f"block {i}: file has '{x}' {list(sx)}, model has '{y}' {list(sy)}"
    return f"file has {len(a)} blocks, model has {len(b)}"
