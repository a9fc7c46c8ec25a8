"""Diagonal and full Laplace approximations over LoRA weights.

``Laplace(model, likelihood, subset_of_weights="lora", hessian_structure="diag")``
gives :class:`LoRADiagLaplace` (laplace-torch's ``DiagLaplace``, ``_key = ("lora",
"diag")``) and ``hessian_structure="full"`` gives :class:`LoRAFullLaplace`
(``FullLaplace``, ``_key = ("lora", "full")``). Both share with :class:`LoRALaplace`
the LoRA discovery (:func:`laplace_llm.find_blocks`), the module selection
(``lora_modules``), the probes and hooks of :class:`laplace_llm.LoRAKFAC` and the batch
checks; their curvature is the sum of squared (diag) or outer products (full) of
per-example LoRA gradients (:mod:`laplace_llm.per_example`), so with
``fisher_type="ggn"`` or ``"ef"`` they equal laplace-torch's ``DiagLaplace`` /
``FullLaplace`` over the same parameters with its GGN / EF backends.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import tqdm
from laplace import DiagLaplace, FullLaplace
from laplace.baselaplace import ParametricLaplace
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from laplace_llm.curvature import LoRAKFAC
from laplace_llm.discovery import find_blocks
from laplace_llm.evidence import (
    diag_evidence_terms,
    full_evidence_terms,
    optimize_prior_until_converged,
)
from laplace_llm.lora_laplace import LoRALaplace, _block_slices, predict
from laplace_llm.module_selection import restrict_to_blocks, select_blocks
from laplace_llm.options import Evidence, KFACOptions, check_int
from laplace_llm.per_example import LoRAPerExampleCurvature
from laplace_llm.validation import check_batch, loader_size

__all__ = ["LoRADiagLaplace", "LoRAFullLaplace", "LIKELIHOODS", "MAX_FULL_PARAMS", "OPTIONS"]

LIKELIHOODS = ("classification", "regression", "reward_modeling")
#: The :class:`~laplace_llm.options.KFACOptions` fields that diag and full use (their
#: probes and the evidence); the others only shape Kronecker factors.
OPTIONS = ("fisher_type", "mc_samples", "evidence")
#: Default of :class:`LoRAFullLaplace`'s ``max_params`` (and of ``laplace-llm fit
#: --max-params``): a ``P × P`` float32 matrix at ``P = 10⁴`` is 400 MB.
MAX_FULL_PARAMS = 10_000


class _LoRAParametric:
    """The LoRA part of :class:`LoRADiagLaplace` and :class:`LoRAFullLaplace`.

    What they add to their laplace-torch parent: LoRA blocks, the hooked curvature backend, checked batches,
    and predictives that restore the MAP weights. Not a Laplace class itself (no
    ``_key``); it comes first in the method resolution order.
    """

    _structure = ""

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
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        *,
        lora_modules: list[str] | str | None = None,
        seed: int | None = None,
        jacobian_free: bool = True,
        options: KFACOptions | None = None,
        **kfac_options: Any,
    ):
        unknown = sorted(set(kfac_options) - set(OPTIONS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword arguments {unknown}; of the "
                f"K-FAC options it takes {list(OPTIONS)} (the others shape Kronecker factors: "
                "hessian_structure='kron')."
            )
        # the same options object and defaults as LoRALaplace; only OPTIONS matter here
        self.options = options if options is not None else KFACOptions(**kfac_options)
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self.jacobian_free = bool(jacobian_free)
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"{type(self).__name__} supports likelihood in {LIKELIHOODS}; got {likelihood!r}."
            )
        if backend is not None and not (
            isinstance(backend, type) and issubclass(backend, LoRAPerExampleCurvature)
        ):
            raise ValueError(
                "subset_of_weights='lora' computes its curvature with "
                f"laplace_llm.LoRAPerExampleCurvature; got backend={backend!r}. Leave "
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
            backend=backend or LoRAPerExampleCurvature,
            backend_kwargs=backend_kwargs,
        )
        restrict_to_blocks(self, self.blocks, prior_precision, prior_mean)

    def _check_size(self, n_params: int, model: nn.Module) -> None:
        pass

    @property
    def fisher_type(self):
        """``self.options.fisher_type`` (see :class:`~laplace_llm.options.KFACOptions`)."""
        return self.options.fisher_type

    @property
    def mc_samples(self) -> int:
        """``self.options.mc_samples`` (see :class:`~laplace_llm.options.KFACOptions`)."""
        return self.options.mc_samples

    # ----------------------------------------------------- shared with LoRALaplace
    _dtype = LoRALaplace._dtype
    _n_outputs_of = LoRALaplace._n_outputs_of
    _set_params = LoRALaplace._set_params
    _nn_functional_samples = LoRALaplace._nn_functional_samples
    _nn_predictive_classification = LoRALaplace._nn_predictive_classification
    _warn_if_weights_changed = LoRALaplace._warn_if_weights_changed
    # semi-definite GLM covariances (missing text candidates) drawn through eigh
    _glm_functional_samples = LoRALaplace._glm_functional_samples
    save = LoRALaplace.save
    load = LoRALaplace.__dict__["load"]

    def _init_H(self) -> None:
        # allocated by fit (a dense P×P before fitting would defeat max_params)
        self.H = None

    def _check_H_init(self) -> None:
        if getattr(self, "H", None) is None:
            raise AttributeError(
                f"This {type(self).__name__} is not fitted: call `la.fit(train_loader)` first."
            )

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        if getattr(self, "H", None) is None:  # before fit: the prior
            return self.prior_precision_diag.log().sum()
        return super().log_det_posterior_precision

    def optimize_prior_precision(self, *args: Any, **kwargs: Any) -> None:
        """Tune the prior as :meth:`LoRALaplace.optimize_prior_precision` does."""
        optimize_prior_until_converged(self, super().optimize_prior_precision, args, kwargs)

    @property
    def log_det_ratio(self) -> torch.Tensor:
        """``log det P − log det P₀``; with the linearised evidence as in :meth:`_evidence_terms`."""
        if self.options.evidence == Evidence.MAP or getattr(self, "H", None) is None:
            return super().log_det_ratio
        return self._evidence_terms()[0].sum()

    @property
    def scatter(self) -> torch.Tensor:
        """The prior's term of the evidence, per ``options.evidence`` (as LoRALaplace's)."""
        if self.options.evidence == Evidence.MAP or getattr(self, "H", None) is None:
            return super().scatter
        return self._evidence_terms()[1].sum()

    def _evidence_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def square_norm(self, value: torch.Tensor) -> torch.Tensor:
        if getattr(self, "H", None) is None:
            delta = value - self.mean
            return (delta * self.prior_precision_diag) @ delta
        return super().square_norm(value)

    # --------------------------------------------------------------------- fit
    def fit(self, train_loader: DataLoader, override: bool = True, progress_bar: bool = False) -> None:
        """Fit the posterior at the model's current LoRA weights.

        Parameters
        ----------
        train_loader : DataLoader
            dict batches (``input_ids``, optional ``attention_mask``, ``labels``) or
            ``(X, y)`` tuples; ``train_loader.dataset`` must have a length. Regression
            targets are floats of shape ``(batch, k)``.
        override : bool, default True
            ``False`` adds this data to the current fit.
        progress_bar : bool, default False
        """
        N = loader_size(train_loader)
        if getattr(self, "H", None) is None:
            override = True
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        backend = self.backend
        backend.generator = None
        if self.seed is not None:
            backend.generator = torch.Generator(device=self._device).manual_seed(self.seed)
        model.eval()
        H, loss, n_outputs = None, 0.0, None
        try:
            desc = f"[LoRA {self._structure}]"
            for i, data in enumerate(tqdm.tqdm(train_loader, disable=not progress_bar, desc=desc)):
                if n_outputs is None:
                    n_outputs = self._n_outputs_of(data)
                X, y = check_batch(
                    data, i, n_outputs, self._device, self.dict_key_x, self.dict_key_y,
                    likelihood=self.likelihood, dtype=self._dtype,
                )
                try:
                    loss_b, H_b = self._curv_closure(X, y, N=N)
                except FloatingPointError as err:
                    raise FloatingPointError(f"Batch {i}: {err}") from None
                H = H_b if H is None else H.add_(H_b)
                loss = loss + loss_b
            if H is None:
                raise ValueError("The train loader yielded no batch.")
        finally:
            for m, mode in modes:
                m.training = mode
        H = H.to(self._dtype)
        if override:
            self.H, self.loss, self.n_data = H, loss, N
        else:
            self.H, self.loss, self.n_data = self.H + H, self.loss + loss, self.n_data + N
        self.n_outputs = n_outputs
        self.model.output_size = n_outputs
        mean = parameters_to_vector(self.params).to(self._dtype)
        self.mean = mean if self.enable_backprop else mean.detach()
        self._posterior_scale = None

    # ------------------------------------------------------------- predictive
    @torch.enable_grad()
    def _glm_jacobians(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, C)`` and their Jacobians ``(B, C, P)`` in the posterior's dtype."""
        out = None
        if self.jacobian_free and not self.enable_backprop:
            out = self.backend.block_jacobians(X)
        if out is None:
            Js, f_mu = self.backend.jacobians(X, enable_backprop=self.enable_backprop)
        else:
            f_mu, Js = out
        return f_mu.to(self._dtype), Js.to(self._dtype)

    # the predictive and gridsearch of LoRALaplace; the GLM goes through Jacobians here
    _moments_without_jacobians = False
    _glm_predictive_distribution = LoRALaplace._glm_predictive_distribution
    glm_moments_over_priors = LoRALaplace.glm_moments_over_priors
    _gridsearch = LoRALaplace._gridsearch

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
        return predict(self, super().__call__, x, pred_type, joint, link_approx, n_samples,
                       diagonal_output, generator, fitting, **model_kwargs)

    # ------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """laplace-torch's state (``H`` one tensor) plus the options and LoRA blocks.

        The same keys as :meth:`LoRALaplace.state_dict` but ``damping``; ``options``
        holds the fields of :data:`OPTIONS`.
        """
        self._check_H_init()
        state = ParametricLaplace.state_dict(self)
        state["options"] = {k: v for k, v in self.options.to_dict().items() if k in OPTIONS}
        state["dict_key_x"] = self.dict_key_x
        state["dict_key_y"] = self.dict_key_y
        state["hessian_structure"] = self._key[1]
        state["lora_modules"] = self.lora_modules
        state["block_names"] = [b.name for b in self.blocks]
        state["block_shapes"] = [list(b.shape) for b in self.blocks]
        return state

    _load_arguments = LoRALaplace.__dict__["_load_arguments"]

    def load_state_dict(self, state_dict: dict[str, Any], check_weights: bool = False) -> None:
        """Restore a :meth:`state_dict` fitted on this model's (selected) LoRA blocks.

        Parameters
        ----------
        state_dict : dict
        check_weights : bool, default False
            also refuse a state whose mean differs from the model's current LoRA weights.

        Raises
        ------
        ValueError
            other LoRA blocks (check ``lora_modules`` and the adapter) or, with
            ``check_weights``, other LoRA weights.
        """
        LoRALaplace._check_state(self, state_dict, check_weights)
        ParametricLaplace.load_state_dict(self, state_dict)
        device = self._device
        self.mean = self.mean.to(device)
        self.H = self.H.to(device=device, dtype=self._dtype)
        self.prior_mean = self.prior_mean.to(device)
        self.prior_precision = self.prior_precision.to(device)
        self.loss = torch.as_tensor(self.loss, dtype=self._dtype)
        self._posterior_scale = None


class LoRADiagLaplace(_LoRAParametric, DiagLaplace):
    """Diagonal Laplace approximation over LoRA weights (laplace-torch's ``DiagLaplace``).

    The curvature is the diagonal of the GGN (``fisher_type="ggn"``, ``C`` backward
    passes per batch), of the Monte-Carlo Fisher (``"mc"``) or of the empirical Fisher
    (``"ef"``), from per-example LoRA gradients; memory ``O(P)``.

    Parameters
    ----------
    model : nn.Module
        returns ``(batch, C)`` outputs: logits (classification), a reward
        (``reward_modeling``) or ``k`` regression outputs (``regression``).
    likelihood : {"classification", "regression", "reward_modeling"}
    lora_modules : list of str, optional
        layer names or glob patterns of the Bayesian LoRA layers (see
        :mod:`laplace_llm.module_selection`); the others stay at their MAP values.
    seed : int, optional
        seed of the samples of ``fisher_type="mc"``.
    jacobian_free : bool, default True
        GLM Jacobians from the hooks (one forward, ``C`` backwards) instead of
        laplace-torch's ``torch.func`` ones.
    options : KFACOptions, optional
        the options object of :class:`LoRALaplace`; only ``fisher_type`` (``"mc"``,
        ``"ggn"`` or ``"ef"``), ``mc_samples`` and ``evidence`` matter here.
    **kfac_options
        ``fisher_type``, ``mc_samples`` and ``evidence`` as keywords, when ``options`` is
        not given
        (defaults those of :class:`~laplace_llm.options.KFACOptions`).
    **kwargs
        laplace-torch's arguments (``sigma_noise``, ``prior_precision``, ``prior_mean``,
        ``temperature``, ``dict_key_x``, ``dict_key_y``, ...).
    """

    _key = ("lora", "diag")
    _structure = "diag"

    def _evidence_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per parameter ``log1p(τh/δ)`` and linearised scatter ``δ·τh/(τh+δ)·d²``."""
        return diag_evidence_terms(self._H_factor * self.H, self.prior_precision_diag,
                                   self.mean - self.prior_mean)

    def _evidence_per_block(self, prior_precision: torch.Tensor) -> torch.Tensor:
        """``−½ (log det(P_b/Λ₀_b) + S_b)`` per block (see LoRALaplace's)."""
        self.prior_precision = prior_precision
        logdet, scatter = self._evidence_terms()
        if self.options.evidence == Evidence.MAP:
            scatter = self.prior_precision_diag * (self.mean - self.prior_mean).square()
        both = logdet + scatter
        return torch.stack([-0.5 * both[s].sum() for s in _block_slices(self.blocks)])


class LoRAFullLaplace(_LoRAParametric, FullLaplace):
    """Full (dense) Laplace approximation over LoRA weights (laplace-torch's ``FullLaplace``).

    For small selections: memory ``O(P²)``.

    Parameters
    ----------
    max_params : int, default MAX_FULL_PARAMS (10 000)
        refuse more LoRA weights than this (a ``P × P`` matrix of float32 at
        ``P = 10⁴`` is 400 MB, and fitting and predicting hold about three of them).
        Raise it if the memory is there, or select fewer layers with ``lora_modules``.
    **kwargs
        as :class:`LoRADiagLaplace`.
    """

    _key = ("lora", "full")
    _structure = "full"

    def __init__(
        self, model: nn.Module, likelihood: str, *args, max_params: int = MAX_FULL_PARAMS,
        **kwargs,
    ):
        self.max_params = check_int("max_params", max_params, 1)
        super().__init__(model, likelihood, *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """:meth:`LoRADiagLaplace.state_dict`'s keys plus ``max_params``."""
        state = super().state_dict()
        state["max_params"] = self.max_params
        return state

    @classmethod
    def _load_arguments(cls, state: dict[str, Any]) -> dict[str, Any]:
        kwargs = super()._load_arguments(state)
        kwargs["max_params"] = state.get("max_params", MAX_FULL_PARAMS)
        return kwargs

    def _evidence_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``log det(P/Λ₀)`` and the linearised scatter ``(Λ₀d)ᵀP⁻¹(τHd)``, in float64."""
        return full_evidence_terms(self._H_factor * self.H, self.prior_precision_diag,
                                   self.mean - self.prior_mean)

    def _check_size(self, n_params: int, model: nn.Module) -> None:
        if n_params <= self.max_params:
            return
        p = next(model.parameters())
        size = 8 if p.dtype == torch.float64 else 4
        nbytes = n_params * n_params * size
        raise ValueError(
            f"hessian_structure='full' over {n_params} LoRA weights needs dense "
            f"{n_params}×{n_params} matrices: {_human(nbytes)} each ({size}-byte floats), and "
            f"fit and predictions hold about three ({_human(3 * nbytes)}). That exceeds "
            f"max_params={self.max_params}. Pass max_params={n_params} (or more) if the "
            "memory is available, select fewer layers with lora_modules=[...], or use "
            "hessian_structure='kron' or 'diag'."
        )


def _human(nbytes: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(max(nbytes, 1), 1024)), len(units) - 1)
    return f"{nbytes / 1024 ** i:.1f} {units[i]}"

