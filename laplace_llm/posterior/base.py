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
the fit loop is :mod:`~laplace_llm.posterior.fitting` and the state and files
:mod:`~laplace_llm.posterior.files` (bases of the class), the checks of a predictive's
arguments :mod:`~laplace_llm.posterior.predictive_checks`. :func:`load` reads a file as
the class its ``hessian_structure`` names in :data:`STRUCTURES`. A leaf supplies how its curvature accumulates batch by batch and how
two fits merge. The defaults here are those of a curvature held as one tensor ``H`` (diag
``(P,)``, full ``(P, P)``) from per-example LoRA gradients
(:mod:`laplace_llm.curvature.per_example`); the Kronecker leaf replaces them by low-rank
factors.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from laplace.baselaplace import BaseLaplace, ParametricLaplace
from torch import nn

from laplace_llm import serialization, sharding
from laplace_llm.curvature.per_example import LoRAPerExampleCurvature
from laplace_llm.curvature.top_k import merge_rest
from laplace_llm.errors import LoRAModelError, PosteriorFileError
from laplace_llm.matrix import factor_dtype
from laplace_llm.models.discovery import find_blocks
from laplace_llm.models.selection import restrict_to_blocks, select_blocks
from laplace_llm.options import Evidence, KFACOptions, check_int
from laplace_llm.posterior.files import LoRAFiles
from laplace_llm.posterior.fitting import LoRAFitting
from laplace_llm.posterior.predictive_checks import (
    check_top_k_call,
    refuse_bridge_for_missing_candidates,
)
from laplace_llm.prior.evidence import optimize_prior_until_converged
from laplace_llm.prior.grid import glm_moments_over_priors, one_pass_gridsearch, replayed_moments

__all__ = ["LoRALaplaceBase", "STRUCTURES", "LIKELIHOODS", "OPTIONS", "load"]

LIKELIHOODS = ("classification", "regression", "reward_modeling")
#: The :class:`~laplace_llm.options.KFACOptions` fields that every structure uses (its
#: probes and the evidence); the others only shape Kronecker factors.
OPTIONS = ("fisher_type", "mc_samples", "evidence")
#: ``hessian_structure`` → class, filled as each leaf is defined (its ``_key``
#: ``("lora", structure)``); :func:`load` reads it.
STRUCTURES: dict[str, type[LoRALaplaceBase]] = {}


class LoRALaplaceBase(LoRAFitting, LoRAFiles, ParametricLaplace):
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

    #: the prior structure marglik tunes when the call names none and starts from a
    #: scalar: one precision per Kronecker block (see :meth:`optimize_prior_precision`)
    default_prior_structure: str = "layerwise"

    def optimize_prior_precision(self, *args: Any, **kwargs: Any) -> None:
        """Tune the prior as laplace-torch does, one precision per block by default.

        laplace-torch's arguments, with one change of default: ``prior_structure`` is
        :attr:`default_prior_structure` (``"layerwise"``: one precision per LoRA block)
        instead of ``"scalar"``, also when passed as ``None``. On fitted LoRA fine-tunes of a causal LM one scalar
        for blocks of very different scale (``A``, ``B``, every layer) made the predictive
        under-confident; the choice and its measurements are in ``docs/results/
        smollm2.md`` (the prior study). ``prior_structure="scalar"`` gives laplace-torch's
        default back, and with it ``KronLaplace``'s prior at full rank.

        With the default ``evidence="map"`` marglik is laplace-torch's loop, step for
        step; with ``evidence="linearised"`` it is restarted until it converges (see
        :func:`~laplace_llm.prior.evidence.optimize_prior_until_converged`). Either way a
        warning names the blocks whose prior marglik drives towards infinity.
        """
        # prior_structure is laplace-torch's sixth parameter (after pred_type, method,
        # n_steps, lr, init_prior_prec); None, or leaving it out, means our default
        if kwargs.get("prior_structure") is None and len(args) < 6:
            kwargs["prior_structure"] = self.default_prior_structure
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
        refuse_bridge_for_missing_candidates(x, pred_type, link_approx)
        classification = self.likelihood == "classification" or (
            self.likelihood == "reward_modeling" and fitting
        )
        top_k = check_top_k_call(top_k, pred_type, link_approx, classification)
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

    # ------------------------------------------------------------------ files
    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module, check_weights: bool = True, **kwargs: Any
    ) -> LoRALaplaceBase:
        """Read a posterior written by :meth:`save` for ``model``: :func:`laplace_llm.load`.

        The posterior is built as the class of the file's ``hessian_structure``,
        whichever class ``load`` is called on.
        """
        return load(path, model, check_weights=check_weights, **kwargs)


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


def _block_slices(blocks) -> list[slice]:
    """Return the slice of each block in the flat parameter vector."""
    out, start = [], 0
    for b in blocks:
        out.append(slice(start, start + b.numel))
        start += b.numel
    return out


