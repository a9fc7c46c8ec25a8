"""The Jacobian-free GLM predictive of K-FAC: mean and covariance of the outputs.

:meth:`KFACGLM.glm_moments` computes ``J P⁻¹ Jᵀ`` per block from the recorded inputs and
output gradients (one backward per output class, ``PROBE_CHUNK`` of them at a time),
never forming the Jacobian of all LoRA weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from laplace_llm.curvature.kfac_hooks import (
    _layout_positions,
    _per_module_calls,
    as_positions,
    sequence_mask,
)
from laplace_llm.curvature.kfac_probes import _chunks
from laplace_llm.curvature.top_k import expand_covariance, rest_weights, top_classes
from laplace_llm.models.discovery import KronBlock

__all__ = ["KFACGLM"]


class KFACGLM:
    """The GLM predictive of :class:`~laplace_llm.curvature.kfac.LoRAKFAC` (a base of it, never used alone)."""

    def glm_moments(
        self, x: Any, precision, joint: bool = False, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | list | None:
        """GLM mean and covariance of the logits without a parameter-long Jacobian.

        One forward and ``C`` backward passes give, per block, the activations ``a``
        and the output gradients ``g^{(c)}`` of every logit; the block Jacobian of
        logit ``c`` of example ``n`` is ``J = Σ_t g_t aᵀ`` (``d_out × d_in``, one LoRA
        side being ``r``), contracted at once with the block's ``P⁻¹``. The backward
        passes run :data:`~laplace_llm.curvature.kfac_probes.PROBE_CHUNK` at a time, so the output gradients held at once
        do not grow with ``C``; the Jacobians kept are ``B × C`` times a block's weights.

        Parameters
        ----------
        x : batch (dict or tensor) of ``B`` inputs.
        precision : LowRankKronDecomposed or a sequence of them
            posterior precision ``P`` over the blocks. A sequence (e.g. one per prior
            precision of a grid) contracts the same Jacobians with each, so ``K``
            precisions cost one forward and ``C`` backward passes, not ``K`` of each.
        joint : bool
            ``(B·C, B·C)`` covariance across the batch instead of ``(B, C, C)``.
        top_k : int, optional
            the exact covariance of each example's ``k`` logits of highest MAP value (its
            ``k`` most probable classes) and of the rest's log-sum-exp, from ``k + 1``
            backward passes instead of ``C``; every other class moves with the rest (see
            :mod:`laplace_llm.curvature.top_k`). ``None`` or ``k ≥ C``: all classes.

        Returns
        -------
        (f_mu, f_var) : ``(B, C)`` and ``(B, C, C)`` (or ``(B·C, B·C)``), or ``None``
            when a hooked module without a call layout saw another batch size than
            the logits (the caller then falls back to explicit Jacobians). Calls with a
            layout add each row's Jacobian to its example's. For a sequence of
            precisions, a list of such pairs in the same order.
        """
        several = isinstance(precision, (list, tuple))
        precisions = list(precision) if several else [precision]
        if not precisions:
            raise ValueError("glm_moments needs at least one posterior precision.")
        dtype = precisions[0].deltas.dtype
        with torch.enable_grad(), self.recording() as rec:
            f = self.model(x)
            B, C = f.shape
            outputs = rec.outputs()
        if any(
            a.shape[0] != B and layout is None
            for calls in rec.calls.values()
            for a, _, layout in calls
        ):
            return None
        classes = top_classes(f, top_k)
        if classes is None:
            eye = torch.eye(C, device=f.device, dtype=f.dtype)
            probes = [eye[c].expand(B, C) for c in range(C)]
        else:  # probe j: each example's j-th most probable logit; the last: the rest's
            probes = [
                nn.functional.one_hot(classes[:, j], C).to(f.dtype) for j in range(classes.shape[1])
            ]
            probes.append(rest_weights(f, classes).to(f.dtype))
        K = len(probes)
        mask = sequence_mask(x)
        shape = (B * K, B * K) if joint else (B, K, K)
        f_vars = [torch.zeros(shape, device=f.device, dtype=dtype) for _ in precisions]
        per_block = list(zip(*(p._blocks() for p in precisions)))
        # per block, the Jacobians (B, S, *shape) of the chunks of probes so far; a
        # block's are contracted (and freed) in the last chunk, so that with one chunk
        # (C ≤ PROBE_CHUNK) one block's Jacobian exists at a time
        jacobians: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        for start, chunk in _chunks(probes):
            last = start + len(chunk) >= K
            with torch.enable_grad():
                grads = self.output_gradients(f, outputs, chunk, keep_graph=not last)
            per_module = _per_module_calls(rec, grads)
            del grads
            for i, b in enumerate(self.blocks):
                J = self._block_jacobian(b, per_module.get(b.module_name, []), mask, dtype, B)
                if J is not None:
                    jacobians[i].append(J)
                if last and jacobians[i]:  # else the module did not act: zero Jacobian
                    J = torch.cat(jacobians[i], 1).reshape(B * K, *b.shape)
                    jacobians[i] = []
                    _add_covariance(f_vars, J, per_block[i], B, K, joint, f.device)
            del per_module
        if classes is not None:
            f_vars = [expand_covariance(v, classes, C, joint) for v in f_vars]
        f = f.detach().to(dtype)
        if several:
            return [(f, f_var) for f_var in f_vars]
        return f, f_vars[0]

    def _block_jacobian(self, b: KronBlock, calls, mask, dtype, B: int) -> torch.Tensor | None:
        """Jacobian ``(B, S, *b.shape)`` of ``S`` probes' logits for one block, or ``None``.

        ``calls``: the module's ``(input, [gradient of each probe], layout)``; ``None``
        when the module did not act on the batch.
        """
        J = None
        for a, gs, layout in calls:
            if layout is None:
                a, m = as_positions(a.to(dtype), mask)
                g = torch.stack([as_positions(gc.to(dtype), mask)[0] for gc in gs], 1)
            else:
                a, g, m, example = _layout_positions(a, gs, layout, dtype)
                g = torch.stack(g, 1)
            g = g * m[:, None, :, None]  # (rows, S, T, d_out), padding dropped
            Jc = torch.einsum("bctd,bte->bcde", g, a) if b.kind == "weight" else g.sum(2)
            if layout is not None:  # rows to their examples (B·S rows → B)
                Jc = torch.zeros(B, *Jc.shape[1:], device=Jc.device, dtype=Jc.dtype).index_add_(
                    0, example, Jc
                )
            J = Jc if J is None else J + Jc
        return J


def _add_covariance(f_vars, J, precisions, B: int, K: int, joint: bool, device) -> None:
    """Add one block's ``J P⁻¹ Jᵀ`` to each covariance of ``f_vars``, in place.

    ``J``: ``(B·K, *block shape)``; ``precisions``: the block's part of each posterior
    precision, in the order of ``f_vars``.
    """
    J_flat = J.reshape(B * K, -1).to(device)
    for pb, f_var in zip(precisions, f_vars):
        PJ = pb.apply(J, -1).reshape(B * K, -1).to(device)
        if joint:
            f_var += J_flat @ PJ.T
        else:
            f_var += torch.einsum("bcp,bdp->bcd", J_flat.reshape(B, K, -1), PJ.reshape(B, K, -1))
