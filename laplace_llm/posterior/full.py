"""``LoRAFullLaplace``: laplace-torch's ``FullLaplace`` over the LoRA weights of a model.

``Laplace(model, likelihood, subset_of_weights="lora", hessian_structure="full")`` gives
it (``_key = ("lora", "full")``). Its curvature is the sum of outer products of
per-example LoRA gradients (:mod:`laplace_llm.curvature.per_example`), a dense ``P × P``
matrix, so it refuses more than ``max_params`` LoRA weights; the rest is
:class:`~laplace_llm.posterior.base.LoRALaplaceBase`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from laplace import FullLaplace
from torch import nn

from laplace_llm.options import check_int
from laplace_llm.posterior.base import LoRALaplaceBase
from laplace_llm.prior.evidence import full_evidence_terms

__all__ = ["LoRAFullLaplace", "MAX_FULL_PARAMS"]

#: Default of :class:`LoRAFullLaplace`'s ``max_params`` (and of ``laplace-llm fit
#: --max-params``): a ``P × P`` float32 matrix at ``P = 10⁴`` is 400 MB.
MAX_FULL_PARAMS = 10_000


class LoRAFullLaplace(LoRALaplaceBase, FullLaplace):
    """Full (dense) Laplace approximation over LoRA weights (laplace-torch's ``FullLaplace``).

    For small selections: memory ``O(P²)``.

    Parameters
    ----------
    max_params : int, default MAX_FULL_PARAMS (10 000)
        refuse more LoRA weights than this (a ``P × P`` matrix of float32 at
        ``P = 10⁴`` is 400 MB, and fitting and predicting hold about three of them).
        Raise it if the memory is there, or select fewer layers with ``lora_modules``.
    **kwargs
        as :class:`~laplace_llm.LoRADiagLaplace`.
    """

    _key = ("lora", "full")

    def __init__(
        self, model: nn.Module, likelihood: str, *args, max_params: int = MAX_FULL_PARAMS,
        **kwargs,
    ):
        self.max_params = check_int("max_params", max_params, 1)
        super().__init__(model, likelihood, *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Return the base's state plus ``max_params``."""
        state = super().state_dict()
        state["max_params"] = self.max_params
        return state

    @classmethod
    def _load_arguments(cls, state: dict[str, Any]) -> dict[str, Any]:
        kwargs = super()._load_arguments(state)
        kwargs["max_params"] = state.get("max_params", MAX_FULL_PARAMS)
        return kwargs

    def _evidence_terms(
        self, delta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``log det(P/Λ₀)`` and the linearised scatter ``(Λ₀d)ᵀP⁻¹(τHd)``, in float64."""
        d = torch.zeros_like(self.mean) if delta is None else delta
        logdet, scatter = full_evidence_terms(self._H_factor * self.H, self.prior_precision_diag, d)
        return logdet, None if delta is None else scatter

    #: ``P`` couples the blocks, so the evidence does not separate over them:
    #: :func:`~laplace_llm.prior.evidence.warn_if_prior_diverges` evaluates it once per block
    _evidence_per_block = None

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
