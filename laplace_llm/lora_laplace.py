"""``LoRALaplace``: laplace-torch's ``KronLaplace`` over the LoRA weights of a model.

Registered as ``Laplace(model, likelihood, subset_of_weights="lora",
hessian_structure="kron")`` once :mod:`laplace_llm` is imported.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import tqdm
from laplace import KronLaplace, ParametricLaplace
from laplace.baselaplace import BaseLaplace
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from laplace_llm.curvature import FISHER_TYPES, KFAC_APPROXES, LoRAKFAC
from laplace_llm.discovery import find_blocks
from laplace_llm.matrix import LowRankFactor, LowRankKron, LowRankKronDecomposed

__all__ = ["LoRALaplace"]

logger = logging.getLogger(__name__)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}; got {value!r}.")
    return int(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")
    return value


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
    likelihood : {"classification", "reward_modeling"}
    n_kfac : int, default 16
        rank kept for large factors.
    lr_threshold : int, default 128
        factors with side ``≤ lr_threshold`` stay dense (the ``r × r`` LoRA side).
    fisher_type : {"mc", "ggn", "ef"}, default "mc"
        Monte-Carlo Fisher (one backward per sample), exact GGN (``C`` backwards), or
        empirical Fisher.
    mc_samples : int, default 1
    kfac_approx : {"expand", "reduce"}, default "expand"
        how K-FAC treats the sequence axis (Eschenhagen et al., 2023).
    seed : int, optional
        seed of the labels sampled by ``fisher_type="mc"``; ``None`` uses torch's
        global generator.
    jacobian_free : bool, default True
        GLM predictive from hooked activations and ``C`` backward passes (no
        parameter-long Jacobian); ``False`` uses laplace-torch's ``torch.func``
        Jacobians. ``enable_backprop=True`` always uses the latter.
    **kwargs
        the remaining arguments of laplace-torch's ``KronLaplace`` (``prior_precision``,
        ``temperature``, ``damping``, ``dict_key_x``, ``dict_key_y``, ...).
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
        n_kfac: int = 16,
        lr_threshold: int = 128,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        seed: int | None = None,
        jacobian_free: bool = True,
    ):
        self.n_kfac = _check_int("n_kfac", n_kfac, 1)
        self.lr_threshold = _check_int("lr_threshold", lr_threshold, 0)
        self.fisher_type = _check_choice("fisher_type", fisher_type, FISHER_TYPES)
        self.kfac_approx = _check_choice("kfac_approx", kfac_approx, KFAC_APPROXES)
        self.mc_samples = _check_int("mc_samples", mc_samples, 1)
        self.seed = None if seed is None else _check_int("seed", seed, 0)
        self.jacobian_free = bool(jacobian_free)
        if likelihood not in ("classification", "reward_modeling"):
            raise ValueError(
                "LoRALaplace supports likelihood='classification' (selected logits) and "
                f"'reward_modeling'; got {likelihood!r}."
            )
        if backend is not None and not (isinstance(backend, type) and issubclass(backend, LoRAKFAC)):
            raise ValueError(
                "subset_of_weights='lora' computes its curvature with laplace_llm.LoRAKFAC; "
                f"got backend={backend!r}. Leave `backend` unset."
            )
        self.blocks = find_blocks(model)
        backend_kwargs = dict(backend_kwargs or {})
        backend_kwargs.update(
            fisher_type=self.fisher_type,
            mc_samples=self.mc_samples,
            kfac_approx=self.kfac_approx,
            n_kfac=self.n_kfac,
            lr_threshold=self.lr_threshold,
            blocks=self.blocks,
        )
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend or LoRAKFAC,
            damping=damping,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
        )
        if [b.name for b in self.blocks] != [
            n for n, p in model.named_parameters() if p.requires_grad
        ]:  # pragma: no cover - find_blocks raises first
            raise RuntimeError("LoRA blocks do not line up with the trainable parameters.")

    # ------------------------------------------------------------ dtype/device
    @property
    def _dtype(self) -> torch.dtype:
        # bf16/fp16 models keep their posterior in float32: eigh and the evidence
        # need it, and CPU has no bf16 eigh kernel
        p = next(self.model.parameters())
        return torch.float64 if p.dtype == torch.float64 else torch.float32

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
    def _validate_loader(self, train_loader: DataLoader) -> int:
        dataset = getattr(train_loader, "dataset", None)
        try:
            N = len(dataset)
        except TypeError:
            raise TypeError(
                "The train loader needs a `dataset` with a length (the data set size N "
                "scales the curvature); pass a torch DataLoader over a sized dataset."
            ) from None
        if N == 0:
            raise ValueError("The train loader is empty (its dataset has length 0).")
        return N

    def _validate_batch(self, data: Any, n_outputs: int | None, i: int):
        if isinstance(data, Mapping):
            for key in (self.dict_key_x, self.dict_key_y):
                if key not in data:
                    raise KeyError(
                        f"Batch {i} has no '{key}' (keys: {sorted(data.keys())}). Batches are "
                        f"dicts with '{self.dict_key_x}', optional 'attention_mask', and "
                        f"'{self.dict_key_y}'; set dict_key_x/dict_key_y if yours differ."
                    )
            X, y = data, data[self.dict_key_y]
            x_main = data[self.dict_key_x]
        else:
            X, y = data
            x_main = X
        device = self._device
        for t in (X.values() if isinstance(X, Mapping) else [X]):
            if isinstance(t, torch.Tensor) and t.device.type != device.type:
                raise ValueError(
                    f"Batch {i} is on {t.device} but the model is on {device}; move the "
                    "batch (or the model) so that both are on the same device."
                )
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(
                f"Labels of batch {i} have dtype {y.dtype}; classification labels must be "
                "integer class indices (torch.long), not probabilities or floats."
            )
        batch_size = x_main.shape[0] if isinstance(x_main, torch.Tensor) else len(x_main)
        if y.ndim != 1 or y.shape[0] != batch_size:
            raise ValueError(
                f"Labels of batch {i} have shape {tuple(y.shape)} but the batch has "
                f"{batch_size} inputs; give one integer label per input."
            )
        if n_outputs is not None and y.numel() and (y.min() < 0 or y.max() >= n_outputs):
            raise ValueError(
                f"Labels of batch {i} lie in [{int(y.min())}, {int(y.max())}] but the model has "
                f"{n_outputs} outputs; labels must be in 0..{n_outputs - 1}."
            )
        return X, y.to(device)

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
        N = self._validate_loader(train_loader)
        if distributed:
            from laplace_llm.distributed import all_reduce_sum

            N = int(all_reduce_sum(N, device=self._device).item())
        if not override and getattr(self, "H_facs", None) is None:
            override = True
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
            n_batches = 0
            for i, data in enumerate(
                tqdm.tqdm(train_loader, disable=not progress_bar, desc="[LoRA K-FAC]")
            ):
                if n_outputs is None:
                    n_outputs = self._n_outputs_of(data)
                X, y = self._validate_batch(data, n_outputs, i)
                if H_new is None:
                    H_new = backend.empty_kron()
                try:
                    loss_b, H_new = backend.kron(X, y, N=N, into=H_new)
                except FloatingPointError as err:
                    raise FloatingPointError(f"Batch {i}: {err}") from None
                loss = loss + loss_b
                n_batches += 1
            if n_batches == 0:
                raise ValueError("The train loader yielded no batch.")
        finally:
            for m, mode in modes:
                m.training = mode

        H_new = H_new.compress_()
        if distributed:
            from laplace_llm.distributed import all_reduce_kron, all_reduce_sum

            H_new = all_reduce_kron(H_new)
            loss = all_reduce_sum(loss, device=self._device).to(self._dtype)
        if override:
            self.H_facs = H_new
            self.loss = loss
            self.n_data = N
        else:
            # A factors are averages over the data: reweight both fits to the union
            n_old = self.n_data
            old = self._rescale_A(self.H_facs, n_old / (n_old + N))
            new = self._rescale_A(H_new, N / (n_old + N))
            self.H_facs = (old + new).compress_()
            self.loss = self.loss + loss
            self.n_data = n_old + N
        self.n_outputs = n_outputs
        self.model.output_size = self.n_outputs
        mean = parameters_to_vector(self.params).to(self._dtype)
        self.mean = mean if self.enable_backprop else mean.detach()
        self.H = self.H_facs.decompose(damping=self.damping)

    @staticmethod
    def _rescale_A(kron: LowRankKron, factor: float) -> LowRankKron:
        return LowRankKron([[F[0], F[1] * factor] if len(F) == 2 else list(F) for F in kron.kfacs])

    # -------------------------------------------------------------- posterior
    @property
    def posterior_precision(self) -> LowRankKronDecomposed:
        self._check_H_init()
        return self.H * self._H_factor + self.prior_precision

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        if getattr(self, "H_facs", None) is None:  # before fit: the prior
            return self.prior_precision_diag.log().sum()
        return self.posterior_precision.logdet()

    def square_norm(self, value: torch.Tensor) -> torch.Tensor:
        delta = value - self.mean
        if getattr(self, "H_facs", None) is None:
            return (delta * self.prior_precision_diag) @ delta
        return delta @ self.posterior_precision.bmm(delta, exponent=1)

    def posterior_nbytes(self) -> int:
        """Bytes held by the fitted curvature factors and their eigendecomposition."""
        self._check_H_init()
        eig = sum(
            t.numel() * t.element_size()
            for qs, ls in zip(self.H.eigenvectors, self.H.eigenvalues)
            for t in (*qs, *ls)
        )
        return self.H_facs.nbytes() + eig

    # ------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        self._check_H_init()
        state = ParametricLaplace.state_dict(self)
        state["H"] = kron_to_state(self.H_facs)
        state["n_kfac"] = self.n_kfac
        state["lr_threshold"] = self.lr_threshold
        state["fisher_type"] = self.fisher_type
        state["kfac_approx"] = self.kfac_approx
        state["block_names"] = [b.name for b in self.blocks]
        state["block_shapes"] = [list(b.shape) for b in self.blocks]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = state_dict.get("block_names")
        if names is not None and names != [b.name for b in self.blocks]:
            raise ValueError(
                "This posterior was fitted on other LoRA blocks than this model has "
                f"(first differences: {_first_diff(names, [b.name for b in self.blocks])}); "
                "load it with the model and adapter it was fitted on."
            )
        shapes = state_dict.get("block_shapes")
        if shapes is not None and [tuple(s) for s in shapes] != [b.shape for b in self.blocks]:
            raise ValueError(
                "The posterior's LoRA block shapes differ from this model's (different "
                "rank r or hidden size); load it with the model it was fitted on."
            )
        ParametricLaplace.load_state_dict(self, state_dict)
        self.H_facs = kron_from_state(state_dict["H"])
        self.H = self.H_facs.decompose(damping=self.damping)

    def save(self, path) -> None:
        """Write the fitted posterior to a safetensors file (no pickle); see
        :mod:`laplace_llm.serialization` for the format."""
        from laplace_llm.serialization import save_posterior

        save_posterior(self, path)

    @classmethod
    def load(cls, path, model: nn.Module, check_weights: bool = True, **kwargs) -> LoRALaplace:
        """Read a posterior written by :meth:`save` for ``model``; refuses damaged files
        and files fitted on another model (other blocks, or other LoRA weights unless
        ``check_weights=False``)."""
        from laplace_llm.serialization import load_posterior

        return load_posterior(path, model, check_weights=check_weights, **kwargs)

    # ------------------------------------------------------------ predictives
    @torch.enable_grad()
    def _glm_predictive_distribution(self, X, joint: bool = False, diagonal_output: bool = False):
        self._check_H_init()
        if self.jacobian_free and not self.enable_backprop:
            moments = self.backend.glm_moments(X, self.posterior_precision, joint=joint)
            if moments is not None:
                f_mu, f_var = moments
                if joint:
                    f_mu = f_mu.flatten()
                elif diagonal_output:
                    f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
                return f_mu, f_var.detach()
        Js, f_mu = self.backend.jacobians(X, enable_backprop=self.enable_backprop)
        Js, f_mu = Js.to(self._dtype), f_mu.to(self._dtype)
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

    def sample_adapters(self, n_samples: int, out_dir, seed: int = 0) -> list:
        """Write ``n_samples`` posterior draws of the LoRA weights as peft adapter folders
        (``PeftModel.from_pretrained`` loads them); the draws are those of
        ``self.sample(n_samples, torch.Generator().manual_seed(seed))``. See
        :func:`laplace_llm.generation.sample_adapters`."""
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
            return super()._glm_functional_samples(
                f_mu, f_var, n_samples, diagonal_output, generator
            )
        _, info = torch.linalg.cholesky_ex(f_var)
        if not bool((info != 0).any()):
            return super()._glm_functional_samples(f_mu, f_var, n_samples, False, generator)
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
        self._check_H_init()
        self._warn_if_weights_changed()
        missing = x.get("candidate_mask") if isinstance(x, Mapping) else None
        if (pred_type == "glm" and str(link_approx).startswith("bridge")
                and missing is not None and not bool(torch.as_tensor(missing).all())):
            raise ValueError(
                f"link_approx={link_approx!r} divides by each logit's variance, which is 0 "
                "for a missing candidate (candidate_mask 0): use link_approx='probit' or 'mc'."
            )
        classification = self.likelihood == "classification" or (
            self.likelihood == "reward_modeling" and fitting
        )
        if generator is not None and classification and link_approx == "mc":
            # laplace-torch 0.3 validates `generator` but samples from the global
            # generator; pass it on so that seeded predictions reproduce
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


def _first_diff(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"block {i}: file has '{x}', model has '{y}'"
    return f"file has {len(a)} blocks, model has {len(b)}"


def kron_to_state(kron: LowRankKron) -> list[list[dict[str, Any]]]:
    """Plain (tensors, ints, strings) representation of a :class:`LowRankKron`."""
    out = []
    for F in kron.kfacs:
        out.append(
            [
                {"root": f.root, "rank": f.rank} if isinstance(f, LowRankFactor) else {"dense": f}
                for f in F
            ]
        )
    return out


def kron_from_state(state: list[list[dict[str, Any]]]) -> LowRankKron:
    kfacs = []
    for F in state:
        kfacs.append(
            [LowRankFactor(f["root"], f["rank"]) if "root" in f else f["dense"] for f in F]
        )
    return LowRankKron(kfacs)

