"""``LoRALaplace``: laplace-torch's ``KronLaplace`` over the LoRA weights of a model.

Registered as ``Laplace(model, likelihood, subset_of_weights="lora",
hessian_structure="kron")`` once :mod:`laplace_llm` is imported. What it shares with the
other structures is :class:`~laplace_llm.posterior.base.LoRALaplaceBase`; here are the
low-rank K-FAC factors: their accumulation and merge, the decomposed posterior and its
state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from laplace import KronLaplace

from laplace_llm.curvature.kfac import LoRAKFAC
from laplace_llm.distributed import collective_step, collective_timeout
from laplace_llm.matrix import LowRankFactor, LowRankKron, LowRankKronDecomposed, compress_root
from laplace_llm.options import KFACOptions, Truncation, expose_options
from laplace_llm.posterior.base import LoRALaplaceBase

__all__ = ["LoRALaplace", "all_reduce_kron"]

logger = logging.getLogger(__name__)


@expose_options
class LoRALaplace(LoRALaplaceBase, KronLaplace):
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
        (targets ``(batch, k)`` floats; see :mod:`laplace_llm.prior.regression`).
    sigma_noise, prior_precision, prior_mean, temperature, enable_backprop, dict_key_x, dict_key_y, asdl_fisher_kwargs
        as laplace-torch's ``KronLaplace``, in the base's order.
    damping : bool, default False
        as laplace-torch's ``KronLaplace`` (keyword only).
    backend : type, optional
        :class:`~laplace_llm.curvature.kfac.LoRAKFAC` (the default) or a subclass.
    backend_kwargs, seed, jacobian_free, lora_modules
        as :class:`~laplace_llm.posterior.base.LoRALaplaceBase` (``lora_modules=["lm_head"]``
        is last-layer LoRA Laplace).
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
    _backend_class = LoRAKFAC
    _option_names = KFACOptions.names()
    # the backend contracts Jacobians with the K-FAC posterior block by block
    _moments_without_jacobians = True

    def __init__(self, model, likelihood: str, *args, damping: bool = False, **kwargs):
        self.damping = damping  # KronLaplace's, passed on by _parent_arguments
        super().__init__(model, likelihood, *args, **kwargs)

    def _parent_arguments(self, asdl_fisher_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        return {"damping": self.damping, "asdl_fisher_kwargs": asdl_fisher_kwargs}

    def _is_fitted(self) -> bool:
        return getattr(self, "H_facs", None) is not None

    # -------------------------------------------------------------------- fit
    def _add_batch(self, X, y: torch.Tensor, N: int, H: LowRankKron | None):
        # the backend streams each batch into the low-rank factors
        return self.backend.kron(X, y, N=N, into=self.backend.empty_kron() if H is None else H)

    def _halfway_curvature(self, H: LowRankKron) -> LowRankKron:
        # the sketches' Ω adapted again, to the first half's data (sketch_readapt)
        return H.readapt_() if self.backend.readapt_sketches else H

    def _finish_curvature(self, H: LowRankKron) -> LowRankKron:
        # pending sketches stay pending: a distributed fit sums them before they are
        # decomposed (in _merge), so that the result equals one process' fit (with a
        # Gaussian Ω: a distributed fit does not adapt it, see LowRankFactor.adapt_omega_)
        return H

    def _all_reduce(self, H: LowRankKron) -> LowRankKron:
        return all_reduce_kron(H, names=[b.name for b in self.blocks])

    def _merge(self, H_new: LowRankKron, loss: torch.Tensor, N: int, override: bool) -> None:
        """Make ``H_new`` the curvature (``override``) or add it to the current fit."""
        if override or not self._is_fitted():
            self.H_facs = H_new.compress_()  # decomposes each sketched factor, once
            self.loss = loss
            self.n_data = N
            return
        # A factors are averages over the data: reweight both fits to the union
        n_old = self.n_data
        old = self._rescale_A(self.H_facs, n_old / (n_old + N))
        new = self._rescale_A(H_new, N / (n_old + N))
        # the old factors' isotropic remainders ρ (I − Q Qᵀ) are not in their roots, so
        # not in the sum's sketch: carry them into the sum's kept eigenpairs
        carried = {}
        for F in old.kfacs:
            for f in F:
                if isinstance(f, LowRankFactor) and id(f) not in carried:
                    lam, Q = f.eigh()
                    carried[id(f)] = (Q, f.remainder(lam))
        total = (old + new).compress_()
        done = set()
        for F, T in zip(old.kfacs, total.kfacs):
            for f, t in zip(F, T):
                if id(f) in carried and id(t) not in done:
                    done.add(id(t))
                    t.add_isotropic_(*carried[id(f)])
        self.H_facs = total
        self.loss = self.loss + loss
        self.n_data = n_old + N

    @staticmethod
    def _rescale_A(kron: LowRankKron, factor: float) -> LowRankKron:
        # map each distinct A once, so that a shared input factor stays shared
        scaled = kron.map_factors(lambda f, n: f * factor)
        return LowRankKron(
            [[F[0], S[1]] if len(F) == 2 else list(F) for F, S in zip(kron.kfacs, scaled.kfacs)]
        )

    def _posterior_changed(self) -> None:
        self.H = self._decompose()

    def _decompose(self):
        """Eigendecompose the fitted factors with this posterior's damping and truncation."""
        return self.H_facs.decompose(
            damping=self.damping, remainder=self.truncation == Truncation.ISOTROPIC
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
        if not self._is_fitted():
            return super().log_det_posterior_precision
        return self.posterior_precision.logdet()

    def _evidence_terms(
        self, delta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per block ``log det(P_b/δ_b)`` and linearised scatter, in the Kronecker eigenbasis.

        ``Σ log1p(c/δ)`` and ``Σ δ·c/(c+δ)·‖projected d‖²`` over the eigenspaces of each
        block (:meth:`~laplace_llm.matrix.LowRankKronDecomposed.evidence_terms`).
        """
        return self.posterior_precision.evidence_terms(delta)

    def square_norm(self, value: torch.Tensor) -> torch.Tensor:
        """Return ``(θ − μ)ᵀ P (θ − μ)`` for the posterior precision ``P``."""
        if not self._is_fitted():
            return super().square_norm(value)
        delta = value - self.mean
        return delta @ self.posterior_precision.bmm(delta, exponent=1)

    def posterior_nbytes(self) -> int:
        """Bytes held by the fitted curvature factors and their eigendecomposition.

        A shared input factor (``share_input_factors``) and its eigenpairs count once;
        :func:`laplace_llm.tools.memory.posterior_bytes` predicts this number from the shapes.
        """
        self._check_H_init()
        return self.H_facs.nbytes() + self.H.nbytes()

    def low_rank_report(self, n_leading: int = 5) -> list:
        """Report how much of each large factor the rank ``n_kfac`` keeps.

        Per large factor: the share of its exact trace kept at ``n_kfac``, its leading
        eigenvalues and the ranks that would keep 90% / 99% (a list of
        :class:`laplace_llm.posterior.low_rank.FactorReport`; definitions there).
        """
        from laplace_llm.posterior.low_rank import low_rank_report

        self._check_H_init()
        return low_rank_report(self.H_facs, self.blocks, n_leading)

    # ------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """Return the base's state with ``H`` the factors' :meth:`LowRankKron.to_state`, and ``damping``.

        ``options`` is all of :meth:`KFACOptions.to_dict`.
        """
        state = super().state_dict()
        state["H"] = self.H_facs.to_state()
        state["damping"] = bool(self.damping)
        return state

    def _load_curvature(self, state_dict: dict[str, Any]) -> None:
        self.H_facs = LowRankKron.from_state(
            state_dict["H"], devices=[b.module.weight.device for b in self.blocks],
            sketch_size=self.options.sketch_columns, sketch_seed=self.options.sketch_seed,
            names=[b.name for b in self.blocks],
        )

    def _partial_state(self, H: LowRankKron) -> list:
        """Return the factors' :meth:`LowRankKron.to_state`, each low-rank one with its ``chunk``.

        Nothing is truncated: a root holds its columns not yet truncated, so the resumed
        fit truncates when and as the uninterrupted one does.
        """
        state = H.to_state()
        for row, F in zip(state, H.kfacs):
            for entry, f in zip(row, F):
                if "same_as" not in entry and isinstance(f, LowRankFactor):
                    entry["chunk"] = f.chunk
        return state

    def _from_partial_state(self, state: list) -> LowRankKron:
        chunks = [[entry.pop("chunk", None) for entry in row] for row in state]
        kron = LowRankKron.from_state(
            state, devices=[b.module.weight.device for b in self.blocks],
            sketch_size=self.options.sketch_columns, sketch_seed=self.options.sketch_seed,
            names=[b.name for b in self.blocks],
            # as the interrupted fit's factors (LoRAKFAC.empty_kron)
            sketch_adapt=(self.options.sketch_adapt_columns if self.backend.adapt_sketches
                          else 0),
        )
        for row, F in zip(chunks, kron.kfacs):
            for chunk, f in zip(row, F):
                if chunk is not None:
                    f.chunk = int(chunk)
        return kron

    @classmethod
    def _load_arguments(cls, state: dict[str, Any]) -> dict[str, Any]:
        kwargs = super()._load_arguments(state)
        kwargs["damping"] = state["damping"]
        # files written before the option existed left truncated directions to the prior
        kwargs.setdefault("truncation", Truncation.PRIOR)
        return kwargs


def _factor_name(i: int, j: int, names: Sequence[str] | None) -> str:
    name = f" ({names[i]})" if names is not None and i < len(names) else ""
    side = "G (output gradients)" if j == 0 else "A (inputs)"
    return f"curvature factor {side} of block {i}{name}"


def all_reduce_kron(kron: LowRankKron, group=None, *, timeout: float | timedelta | None = None,
                    names: Sequence[str] | None = None) -> LowRankKron:
    """Replace every factor by its sum over the processes of ``group``, in place.

    Parameters
    ----------
    kron : LowRankKron
        this process's curvature, normalised with the global data set size.
    group : ProcessGroup, optional
    timeout : float or timedelta, optional
        seconds after which a rank that has not arrived at a factor's reduction fails it
        (see :func:`collective_timeout`); default the group's own timeout.
    names : sequence of str, optional
        the blocks' names (e.g. ``layers.1.self_attn.q_proj.lora_A``), for the error.

    Returns
    -------
    LowRankKron
        ``kron``, now holding the sum.

    Raises
    ------
    CollectiveTimeoutError
        a rank did not arrive within the timeout, or the connection to one broke; the
        message names the factor and its block.
    """
    with collective_timeout(timeout, group):
        return _all_reduce_kron(kron, group, names)


def _all_reduce_kron(kron: LowRankKron, group, names: Sequence[str] | None) -> LowRankKron:
    world = dist.get_world_size(group)
    done: dict[int, object] = {}  # a shared factor is reduced once (in place: not twice!)
    for i, F in enumerate(kron.kfacs):
        for j, f in enumerate(F):
            if id(f) in done:
                F[j] = done[id(f)]
                continue
            what = _factor_name(i, j, names)
            if not isinstance(f, LowRankFactor):
                with collective_step(f"all-reduce of the {what}", group):
                    dist.all_reduce(f, op=dist.ReduceOp.SUM, group=group)
                done[id(f)] = f
                continue
            if f.sketch_size:  # the sketches of the shards add up to the whole data's
                if f.adapted is not None:
                    raise ValueError(
                        f"The {what} sketched its data with a test matrix adapted to this "
                        "process's first batch, so the processes' sketches do not add up. "
                        "Fit with fit(distributed=True), which keeps Ω Gaussian, or with "
                        "sketch_adapt=0."
                    )
                sketch = f.sketch().clone()
                with collective_step(f"all-reduce of the sketch of the {what}", group):
                    dist.all_reduce(sketch, op=dist.ReduceOp.SUM, group=group)
                trace = f.exact_trace
                if trace is not None:
                    trace = trace.clone()
                    with collective_step(f"all-reduce of the exact trace of the {what}", group):
                        dist.all_reduce(trace, op=dist.ReduceOp.SUM, group=group)
                F[j] = LowRankFactor(sketch[:, :0], f.rank, f.chunk, trace, f.sketch_size,
                                     f.sketch_seed).set_sketch_(sketch)
                done[id(f)] = F[j]
                continue
            f.compress_()
            width = torch.tensor([f.root.shape[1]], device=f.device)
            widths = [torch.zeros_like(width) for _ in range(world)]
            with collective_step(f"gathering the root widths of the {what}", group):
                dist.all_gather(widths, width, group=group)
            m = int(max(w.item() for w in widths))
            # all_gather needs equal shapes: zero columns add nothing to R Rᵀ
            padded = torch.zeros(f.side, m, device=f.device, dtype=f.dtype)
            padded[:, : f.root.shape[1]] = f.root
            roots = [torch.empty_like(padded) for _ in range(world)]
            with collective_step(f"gathering the roots of the {what}", group):
                dist.all_gather(roots, padded, group=group)
            trace = f.exact_trace
            if trace is not None:  # the exact traces add up (low-rank diagnostics)
                trace = trace.clone()
                with collective_step(f"all-reduce of the exact trace of the {what}", group):
                    dist.all_reduce(trace, op=dist.ReduceOp.SUM, group=group)
            F[j] = LowRankFactor(compress_root(torch.cat(roots, 1), f.rank), f.rank, f.chunk, trace)
            done[id(f)] = F[j]
    return kron
