"""``LoRALaplace``: laplace-torch's ``KronLaplace`` over the LoRA weights of a model.

Registered as ``Laplace(model, likelihood, subset_of_weights="lora",
hessian_structure="kron")`` once :mod:`laplace_llm` is imported.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tqdm
from laplace import KronLaplace, ParametricLaplace
from laplace.baselaplace import BaseLaplace
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from laplace_llm import serialization
from laplace_llm.curvature import LoRAKFAC
from laplace_llm.discovery import find_blocks
from laplace_llm.errors import LoRAModelError, PosteriorFileError
from laplace_llm.evidence import optimize_prior_until_converged
from laplace_llm.matrix import LowRankKron, LowRankKronDecomposed, factor_dtype
from laplace_llm.module_selection import restrict_to_blocks, select_blocks
from laplace_llm.options import Evidence, KFACOptions, Truncation, check_int, expose_options
from laplace_llm.prior_grid import glm_moments_over_priors, one_pass_gridsearch, replayed_moments
from laplace_llm.validation import check_batch, loader_size

__all__ = ["LoRALaplace"]

logger = logging.getLogger(__name__)


@expose_options
class LoRALaplace(KronLaplace):
    """Kronecker-factored Laplace approximation over LoRA weights with low-rank factors.

    Everything of laplace-torch's ``KronLaplace`` applies (``fit``,
    ``log_marginal_likelihood``, ``optimize_prior_precision``, the GLM and NN
    predictives, ``sample``, ``state_dict``); the posterior is restricted to the
    trainable ``lora_A``/``lora_B`` weights (and trainable plain ``nn.Linear`` heads),
    and each factor of side above ``lr_threshold`` is kept at rank ``n_kfac``, so
    memory is ``O(d·n_kfac + r²)`` per block.

    Parameters
    ----------
    model : nn.Module
        returns logits ``(batch, C)`` for a batch, e.g. :class:`laplace_llm.LLMClassifier`.
    likelihood : {"classification", "reward_modeling", "regression"}
        ``"regression"``: ``k`` real outputs with Gaussian noise ``sigma_noise``
        (targets ``(batch, k)`` floats; see :mod:`laplace_llm.regression`).
    sigma_noise, prior_precision, prior_mean, temperature, enable_backprop, dict_key_x, dict_key_y, damping, asdl_fisher_kwargs
        as laplace-torch's ``KronLaplace``.
    backend : type, optional
        :class:`~laplace_llm.LoRAKFAC` (the default) or a subclass.
    backend_kwargs : dict, optional
        further arguments of the backend.
    seed : int, optional
        seed of the labels sampled by ``fisher_type="mc"``; ``None`` uses torch's
        global generator.
    jacobian_free : bool, default True
        GLM predictive from hooked activations and ``C`` backward passes (no
        parameter-long Jacobian); ``False`` uses laplace-torch's ``torch.func``
        Jacobians. ``enable_backprop=True`` always uses the latter.
    lora_modules : list of str or str, optional
        layer names or glob patterns of the Bayesian LoRA layers (see
        :mod:`laplace_llm.module_selection`; ``["lm_head"]`` is last-layer LoRA
        Laplace); the others stay at their MAP values. ``None``: every LoRA layer.
    options : KFACOptions, optional
        the K-FAC options as one object; default ``KFACOptions(**kfac_options)``.
    **kfac_options
        the fields of :class:`~laplace_llm.options.KFACOptions`, each also an attribute:
        ``n_kfac`` (16, rank kept for large factors), ``lr_threshold`` (128, factors of
        side ``≤`` it stay dense), ``fisher_type`` (``"mc"``, ``"ggn"`` or ``"ef"``),
        ``mc_samples`` (1) and ``kfac_approx`` (``"expand"`` or ``"reduce"``, how K-FAC
        treats the sequence axis, Eschenhagen et al., 2023).
    """

    _key = ("lora", "kron")

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
        backend: type[LoRAKFAC] | None = None,
        damping: bool = False,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        *,
        seed: int | None = None,
        jacobian_free: bool = True,
        lora_modules: list[str] | str | None = None,
        options: KFACOptions | None = None,
        **kfac_options: Any,
    ):
        unknown = sorted(set(kfac_options) - set(KFACOptions.names()))
        if unknown:
            raise TypeError(
                f"LoRALaplace got unexpected keyword arguments {unknown}; its own options are "
                f"{list(KFACOptions.names())}, seed, jacobian_free and lora_modules, besides "
                "KronLaplace's."
            )
        self.options = options if options is not None else KFACOptions(**kfac_options)
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self.jacobian_free = bool(jacobian_free)
        if likelihood not in ("classification", "reward_modeling", "regression"):
            raise ValueError(
                "LoRALaplace supports likelihood='classification' (selected logits), "
                f"'reward_modeling' and 'regression'; got {likelihood!r}."
            )
        if backend is not None and not (isinstance(backend, type) and issubclass(backend, LoRAKFAC)):
            raise ValueError(
                "subset_of_weights='lora' computes its curvature with laplace_llm.LoRAKFAC; "
                f"got backend={backend!r}. Leave `backend` unset."
            )
        self.lora_modules = None if lora_modules is None else list(
            [lora_modules] if isinstance(lora_modules, str) else lora_modules
        )
        self.blocks = select_blocks(find_blocks(model), self.lora_modules)
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
            backend=backend or LoRAKFAC,
            damping=damping,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
        )
        # the prior refers to the selected blocks (lora_modules), set once they are known
        restrict_to_blocks(self, self.blocks, prior_precision, prior_mean)

    # ------------------------------------------------------------ dtype/device
    @property
    def _dtype(self) -> torch.dtype:
        # bf16/fp16 models keep their posterior in float32: eigh and the evidence
        # need it, and CPU has no bf16 eigh kernel
        return factor_dtype(next(self.model.parameters()).dtype)

    def _init_H(self) -> None:
        # no d×d allocation (KronLaplace's would); curvature appears in fit()
        self.H = None

    def _check_H_init(self) -> None:
        if getattr(self, "H_facs", None) is None:
            raise AttributeError(
                "This LoRALaplace is not fitted: call `la.fit(train_loader)` first."
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
            KronLaplace.prior_precision.fset(self, prior_precision)
        except ValueError as err:
            raise ValueError(
                f"{err} LoRALaplace takes a scalar prior precision or one per LoRA block "
                f"({self.n_layers} blocks: one per trainable parameter tensor)."
            ) from err

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
    ) -> None:
        """Fit the posterior at the model's current LoRA weights.

        Parameters
        ----------
        train_loader : DataLoader
            dict batches (``input_ids``, optional ``attention_mask``, ``labels``) or
            ``(X, y)`` tuples; ``train_loader.dataset`` must have a length.
        override : bool, default True
            ``False`` adds this data to the current fit, as laplace-torch does.
        progress_bar : bool, default False
            tqdm bar over batches.
        distributed : bool, default False
            every process of the initialised ``torch.distributed`` group passes its
            own shard (e.g. through a ``DistributedSampler``); the curvature, loss and
            data size are summed over processes, so each ends with the posterior of
            the whole data set (see :mod:`laplace_llm.distributed`).
        """
        N = loader_size(train_loader)
        if distributed:
            from laplace_llm.distributed import all_reduce_sum

            N = int(all_reduce_sum(N, device=self._device).item())
        H_new, loss, n_outputs = self._accumulate(train_loader, N, progress_bar)
        if distributed:
            from laplace_llm.distributed import all_reduce_kron, all_reduce_sum

            H_new = all_reduce_kron(H_new)
            loss = all_reduce_sum(loss, device=self._device).to(self._dtype)
        self._merge(H_new, loss, N, override)
        self.n_outputs = n_outputs
        self.model.output_size = self.n_outputs
        mean = parameters_to_vector(self.params).to(self._dtype)
        self.mean = mean if self.enable_backprop else mean.detach()
        self.H = self._decompose()

    def _decompose(self):
        """Eigendecompose the fitted factors with this posterior's damping and truncation."""
        return self.H_facs.decompose(
            damping=self.damping, remainder=self.truncation == Truncation.ISOTROPIC
        )

    def _accumulate(
        self, train_loader: DataLoader, N: int, progress_bar: bool = False
    ) -> tuple[LowRankKron, torch.Tensor, int]:
        """K-FAC, summed loss and number of outputs of this process's batches.

        Each batch is checked before its forward pass; the model is in eval mode
        meanwhile and its modules' modes are restored afterwards.

        Returns
        -------
        H : LowRankKron
            the curvature, normalised for a data set of ``N`` examples, compressed.
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
        model.eval()
        try:
            H_new = None
            loss = 0.0
            n_outputs = None
            for i, data in enumerate(
                tqdm.tqdm(train_loader, disable=not progress_bar, desc="[LoRA K-FAC]")
            ):
                if n_outputs is None:
                    n_outputs = self._n_outputs_of(data)
                X, y = check_batch(
                    data, i, n_outputs, self._device, self.dict_key_x, self.dict_key_y,
                    likelihood=self.likelihood, dtype=self._dtype,
                )
                if H_new is None:
                    H_new = backend.empty_kron()
                try:
                    loss_b, H_new = backend.kron(X, y, N=N, into=H_new)
                except FloatingPointError as err:
                    # the same error type (NonFiniteError), naming the batch
                    raise type(err)(f"Batch {i}: {err}") from None
                loss = loss + loss_b
            if H_new is None:
                raise ValueError("The train loader yielded no batch.")
        finally:
            for m, mode in modes:
                m.training = mode
        return H_new.compress_(), loss, n_outputs

    def _merge(self, H_new: LowRankKron, loss: torch.Tensor, N: int, override: bool) -> None:
        """Make ``H_new`` the curvature (``override``) or add it to the current fit."""
        if override or getattr(self, "H_facs", None) is None:
            self.H_facs = H_new
            self.loss = loss
            self.n_data = N
            return
        # A factors are averages over the data: reweight both fits to the union
        n_old = self.n_data
        old = self._rescale_A(self.H_facs, n_old / (n_old + N))
        new = self._rescale_A(H_new, N / (n_old + N))
        self.H_facs = (old + new).compress_()
        self.loss = self.loss + loss
        self.n_data = n_old + N

    @staticmethod
    def _rescale_A(kron: LowRankKron, factor: float) -> LowRankKron:
        # map each distinct A once, so that a shared input factor stays shared
        scaled = kron.map_factors(lambda f, n: f * factor)
        return LowRankKron(
            [[F[0], S[1]] if len(F) == 2 else list(F) for F, S in zip(kron.kfacs, scaled.kfacs)]
        )

    # -------------------------------------------------------------- posterior
    @property
    def posterior_precision(self) -> LowRankKronDecomposed:
        """Posterior precision ``τ H + δ`` (decomposed, low rank plus prior)."""
        self._check_H_init()
        return self.H * self._H_factor + self.prior_precision

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        """Log-determinant of the posterior precision (the prior's before ``fit``)."""
        if getattr(self, "H_facs", None) is None:  # before fit: the prior
            return self.prior_precision_diag.log().sum()
        return self.posterior_precision.logdet()

    def optimize_prior_precision(self, *args: Any, **kwargs: Any) -> None:
        """Tune the prior as laplace-torch does.

        With the default ``evidence="map"`` marglik is laplace-torch's loop, step for
        step; with ``evidence="linearised"`` it is restarted until it converges (see
        :func:`~laplace_llm.evidence.optimize_prior_until_converged`). Either way a
        warning names the blocks whose prior marglik drives towards infinity.
        """
        optimize_prior_until_converged(self, super().optimize_prior_precision, args, kwargs)

    @property
    def log_det_ratio(self) -> torch.Tensor:
        """``log det P − log det P₀``; with the linearised evidence as a sum of ``log1p``."""
        if self.evidence == Evidence.MAP or getattr(self, "H_facs", None) is None:
            return super().log_det_ratio
        return self.posterior_precision.evidence_terms()[0].sum()

    @property
    def scatter(self) -> torch.Tensor:
        """The prior's term of the evidence, per ``options.evidence``.

        ``"map"`` (default): laplace-torch's ``dᵀΛ₀d``; ``"linearised"``: the linearised
        model's, at its own mode, term by term in the Kronecker eigenbasis (see
        :mod:`laplace_llm.evidence`).
        """
        if self.evidence == Evidence.MAP or getattr(self, "H_facs", None) is None:
            return super().scatter
        return self.posterior_precision.evidence_terms(self.mean - self.prior_mean)[1].sum()

    def _evidence_per_block(self, prior_precision: torch.Tensor) -> torch.Tensor:
        """Return the evidence's prior terms ``−½ (log det(P_b/δ_b) + S_b)`` per block.

        The evidence is their sum plus the log-likelihood; used to score each block's
        prior on its own (:func:`~laplace_llm.evidence.warn_if_prior_diverges`).
        """
        self.prior_precision = prior_precision
        d = self.mean - self.prior_mean
        logdet, scatter = self.posterior_precision.evidence_terms(d)
        if self.evidence == Evidence.MAP:
            scatter = torch.stack([self.prior_precision_diag[s].mul(d[s].square()).sum()
                                   for s in _block_slices(self.blocks)])
        return -0.5 * (logdet + scatter)

    def square_norm(self, value: torch.Tensor) -> torch.Tensor:
        """Return ``(θ − μ)ᵀ P (θ − μ)`` for the posterior precision ``P``."""
        delta = value - self.mean
        if getattr(self, "H_facs", None) is None:
            return (delta * self.prior_precision_diag) @ delta
        return delta @ self.posterior_precision.bmm(delta, exponent=1)

    def posterior_nbytes(self) -> int:
        """Bytes held by the fitted curvature factors and their eigendecomposition.

        A shared input factor (``share_input_factors``) and its eigenpairs count once;
        :func:`laplace_llm.memory.posterior_bytes` predicts this number from the shapes.
        """
        self._check_H_init()
        return self.H_facs.nbytes() + self.H.nbytes()

    def low_rank_report(self, n_leading: int = 5) -> list:
        """Report how much of each large factor the rank ``n_kfac`` keeps.

        Per large factor: the share of its exact trace kept at ``n_kfac``, its leading
        eigenvalues and the ranks that would keep 90% / 99% (a list of
        :class:`laplace_llm.diagnostics.FactorReport`; definitions there).
        """
        from laplace_llm.diagnostics import low_rank_report

        self._check_H_init()
        return low_rank_report(self.H_facs, self.blocks, n_leading)

    # ------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """laplace-torch's state plus the curvature factors, options and LoRA blocks.

        Holds tensors and plain values only (``torch.load(weights_only=True)`` reads
        it); ``H`` is :meth:`LowRankKron.to_state` of the factors, ``options`` is
        :meth:`KFACOptions.to_dict`.
        """
        self._check_H_init()
        state = ParametricLaplace.state_dict(self)
        state["H"] = self.H_facs.to_state()
        state["options"] = self.options.to_dict()
        state["damping"] = bool(self.damping)
        state["dict_key_x"] = self.dict_key_x
        state["dict_key_y"] = self.dict_key_y
        state["hessian_structure"] = self._key[1]
        state["lora_modules"] = self.lora_modules
        state["block_names"] = [b.name for b in self.blocks]
        state["block_shapes"] = [list(b.shape) for b in self.blocks]
        return state

    def load_state_dict(self, state_dict: dict[str, Any], check_weights: bool = False) -> None:
        """Restore a :meth:`state_dict` fitted on this model's LoRA blocks.

        Parameters
        ----------
        state_dict : dict
            from :meth:`state_dict` (or read from a posterior file).
        check_weights : bool, default False
            also refuse a state whose mean differs from the model's current LoRA weights.

        Raises
        ------
        ValueError
            the state was fitted on other LoRA blocks (names or shapes), or, with
            ``check_weights``, on other LoRA weights.
        """
        self._check_state(state_dict, check_weights)
        ParametricLaplace.load_state_dict(self, state_dict)
        device = self._device
        self.mean = self.mean.to(device)
        self.prior_mean = self.prior_mean.to(device)
        self.prior_precision = self.prior_precision.to(device)
        self.loss = torch.as_tensor(self.loss, dtype=self._dtype)
        self.H_facs = LowRankKron.from_state(
            state_dict["H"], devices=[b.module.weight.device for b in self.blocks]
        )
        self.H = self._decompose()

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
        if check_weights:
            current = parameters_to_vector(self.params).detach().to(self._dtype)
            mean = state_dict["mean"].to(current.device)
            if current.shape != mean.shape or not torch.equal(current, mean):
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
        serialization.check_overwrite(path, state["block_names"], state["block_shapes"])
        serialization.write_state(state, path)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module, check_weights: bool = True, **kwargs: Any
    ) -> LoRALaplace:
        """Read a posterior written by :meth:`save` for ``model``.

        The posterior is built with the file's options, as the class of its
        ``hessian_structure`` (:class:`LoRALaplace`, :class:`~laplace_llm.LoRADiagLaplace`
        or :class:`~laplace_llm.LoRAFullLaplace`, whichever class ``load`` is called on),
        then :meth:`load_state_dict`.

        Parameters
        ----------
        path : str or PathLike
            a posterior file, or a folder holding one under
            :data:`~laplace_llm.serialization.POSTERIOR_FILENAME` (the peft adapter
            folder or ``Trainer`` checkpoint that :meth:`save` or
            :class:`~laplace_llm.hf.LaplaceCallback` wrote it into).
        model : nn.Module
            the model (with the adapter) the posterior was fitted on.
        check_weights : bool, default True
            refuse the file if the model's LoRA weights differ from the fitted ones.
        **kwargs
            further :class:`LoRALaplace` arguments (e.g. ``jacobian_free``); they
            override the file's options.

        Raises
        ------
        PosteriorFileError
            damaged file, other format or version, or a model with other LoRA blocks or
            weights.
        """
        path = serialization.posterior_path(path)
        if path.parent.is_dir() and not path.exists() and path.name == serialization.POSTERIOR_FILENAME:
            raise FileNotFoundError(
                f"'{path.parent}' holds no posterior ('{path.name}'); write one there with "
                "`la.save(folder)` or laplace_llm.hf.LaplaceCallback, or pass the posterior "
                "file's path."
            )
        state = serialization.read_state(path)
        structure = state["hessian_structure"]
        la_cls = _lora_class(structure)
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

    @classmethod
    def _load_arguments(cls, state: dict[str, Any]) -> dict[str, Any]:
        """Return the constructor arguments of :meth:`load` from a state (besides model, likelihood)."""
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
        if "damping" in state:  # kron only
            kwargs["damping"] = state["damping"]
            # files written before the option existed left truncated directions to the prior
            kwargs.setdefault("truncation", Truncation.PRIOR)
        return kwargs

    # ------------------------------------------------------------ predictives
    # the backend contracts Jacobians with the K-FAC posterior block by block
    _moments_without_jacobians = True

    @torch.enable_grad()
    def _glm_predictive_distribution(self, X, joint: bool = False, diagonal_output: bool = False):
        self._check_H_init()
        replayed = replayed_moments(self, X, joint, diagonal_output)
        if replayed is not None:
            return replayed
        if self._moments_without_jacobians and self.jacobian_free and not self.enable_backprop:
            moments = self.backend.glm_moments(X, self.posterior_precision, joint=joint)
            if moments is not None:
                f_mu, f_var = moments
                if joint:
                    f_mu = f_mu.flatten()
                elif diagonal_output:
                    f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
                return f_mu, f_var.detach()
        f_mu, Js = self._glm_jacobians(X)
        if joint:
            f_mu = f_mu.flatten()
            f_var = self.functional_covariance(Js)
        else:
            f_var = self.functional_variance(Js)
            if diagonal_output:
                f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
        if not self.enable_backprop:
            return f_mu.detach(), f_var.detach()
        return f_mu, f_var

    def _glm_jacobians(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, C)`` and their Jacobians ``(B, C, P)`` in the posterior's dtype."""
        Js, f_mu = self.backend.jacobians(X, enable_backprop=self.enable_backprop)
        return f_mu.to(self._dtype), Js.to(self._dtype)

    def glm_moments_over_priors(self, X, prior_precisions, joint: bool = False) -> list:
        """GLM moments ``(f_mu, f_var)`` of the logits of batch ``X`` under each prior.

        The Jacobians are computed once and contracted with each posterior, so a grid
        of ``K`` priors costs about one predictive, not ``K``. Each entry of
        ``prior_precisions`` is what ``prior_precision`` accepts; the current prior is
        left unchanged. See :func:`laplace_llm.prior_grid.glm_moments_over_priors`.
        """
        return glm_moments_over_priors(self, X, prior_precisions, joint=joint)

    def _gridsearch(self, loss, interval, val_loader, pred_type, link_approx="probit",
                    n_samples=100, progress_bar=False):
        # laplace-torch's contract, on moments of every prior from one pass
        return one_pass_gridsearch(self, loss, interval, val_loader, pred_type, link_approx,
                                   n_samples, progress_bar)

    def sample_adapters(self, n_samples: int, out_dir, seed: int = 0) -> list:
        """Write ``n_samples`` posterior draws of the LoRA weights as peft adapter folders.

        ``PeftModel.from_pretrained`` loads them; the draws are those of
        ``self.sample(n_samples, torch.Generator().manual_seed(seed))``. See
        :func:`laplace_llm.generation.sample_adapters`.
        """
        from laplace_llm.generation import sample_adapters

        return sample_adapters(self, n_samples, out_dir, seed=seed)

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
        start = 0
        for p in self.params:
            n = p.numel()
            p.data.copy_(vector[start : start + n].view_as(p))
            start += n

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

    def _warn_if_weights_changed(self) -> None:
        current = parameters_to_vector(self.params).detach().to(self._dtype)
        if current.shape != self.mean.shape or not torch.equal(current, self.mean.detach()):
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
        **model_kwargs,
    ):
        """Predict as laplace-torch does; a ``generator`` also seeds the Monte-Carlo samples."""
        return predict(self, super().__call__, x, pred_type, joint, link_approx, n_samples,
                       diagonal_output, generator, fitting, **model_kwargs)


def predict(
    la,
    parent_call,
    x,
    pred_type,
    joint,
    link_approx,
    n_samples,
    diagonal_output,
    generator,
    fitting,
    **model_kwargs,
):
    """Predict for every LoRA Laplace class, around its laplace-torch parent's ``__call__``.

    Checks that the posterior is fitted and still centred on the model's weights,
    refuses bridge links for batches with missing candidates, and passes ``generator``
    on to the Monte-Carlo samples, which laplace-torch 0.3 validates but then draws from
    torch's global generator; everything else is ``parent_call``.
    """
    la._check_H_init()
    la._warn_if_weights_changed()
    _refuse_bridge_for_missing_candidates(x, pred_type, link_approx)
    classification = la.likelihood == "classification" or (
        la.likelihood == "reward_modeling" and fitting
    )
    if generator is not None and classification and link_approx == "mc":
        if not isinstance(generator, torch.Generator) or generator.device != la._device:
            raise ValueError("Invalid random generator (check type and device).")
        if pred_type == "glm":
            f_mu, f_var = la._glm_predictive_distribution(x)
            return la._glm_predictive_samples(
                f_mu, f_var, n_samples, diagonal_output, generator
            ).mean(0)
        if pred_type == "nn":
            fs = la._nn_functional_samples(x, n_samples, generator, **model_kwargs)
            return torch.softmax(fs, dim=-1).mean(0)
    return parent_call(
        x, pred_type, joint, link_approx, n_samples, diagonal_output, generator, fitting,
        **model_kwargs,
    )


def _refuse_bridge_for_missing_candidates(x: Any, pred_type: str, link_approx: str) -> None:
    """Raise ValueError for a bridge link over a batch with missing candidates."""
    missing = x.get("candidate_mask") if isinstance(x, Mapping) else None
    if (pred_type == "glm" and str(link_approx).startswith("bridge")
            and missing is not None and not bool(torch.as_tensor(missing).all())):
        raise ValueError(
            f"link_approx={link_approx!r} divides by each logit's variance, which is 0 "
            "for a missing candidate (candidate_mask 0): use link_approx='probit' or 'mc'."
        )


def _lora_class(structure: str) -> type | None:
    """Return the Laplace class registered as ``("lora", structure)`` (its ``_key``).

    Found among the subclasses of ``ParametricLaplace``, as laplace-torch's ``Laplace``
    does, so that this module needs no import of the other structures.
    """
    stack = [ParametricLaplace]
    while stack:
        c = stack.pop()
        if c.__dict__.get("_key") == ("lora", structure):
            return c
        stack.extend(c.__subclasses__())
    return None


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
