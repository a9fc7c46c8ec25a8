"""``LoRADiagLaplace``: laplace-torch's ``DiagLaplace`` over the LoRA weights of a model.

``Laplace(model, likelihood, subset_of_weights="lora", hessian_structure="diag")`` gives
it (``_key = ("lora", "diag")``). Its curvature is the sum of squared per-example LoRA
gradients (:mod:`laplace_llm.curvature.per_example`), so with ``fisher_type="ggn"`` or
``"ef"`` it equals laplace-torch's ``DiagLaplace`` over the same parameters with its GGN /
EF backends; the rest is :class:`~laplace_llm.posterior.base.LoRALaplaceBase`.
"""

from __future__ import annotations

import torch
from laplace import DiagLaplace

from laplace_llm.posterior.base import LoRALaplaceBase
from laplace_llm.prior.evidence import diag_evidence_terms

__all__ = ["LoRADiagLaplace"]


class LoRADiagLaplace(LoRALaplaceBase, DiagLaplace):
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
        :mod:`laplace_llm.models.selection`); the others stay at their MAP values.
    seed : int, optional
        seed of the samples of ``fisher_type="mc"``.
    jacobian_free : bool, default True
        GLM Jacobians from the hooks (one forward, ``C`` backwards) instead of
        laplace-torch's ``torch.func`` ones.
    options : KFACOptions, optional
        the options object of :class:`~laplace_llm.LoRALaplace`; only ``fisher_type``
        (``"mc"``, ``"ggn"`` or ``"ef"``), ``mc_samples`` and ``evidence`` matter here.
    **kfac_options
        ``fisher_type``, ``mc_samples`` and ``evidence`` as keywords, when ``options`` is
        not given (defaults those of :class:`~laplace_llm.options.KFACOptions`).
    **kwargs
        laplace-torch's arguments (``sigma_noise``, ``prior_precision``, ``prior_mean``,
        ``temperature``, ``dict_key_x``, ``dict_key_y``, ...).
    """

    _key = ("lora", "diag")

    def _evidence_terms(
        self, delta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per parameter ``log1p(τh/δ)`` and linearised scatter ``δ·τh/(τh+δ)·d²``."""
        d = torch.zeros_like(self.mean) if delta is None else delta
        logdet, scatter = diag_evidence_terms(self._H_factor * self.H, self.prior_precision_diag, d)
        return logdet, None if delta is None else scatter
