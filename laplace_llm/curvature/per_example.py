"""Per-example gradients of LoRA blocks from hooked activations and output gradients.

For one example ``n`` and one output cotangent (*probe*) ``v_n``, the gradient of
``⟨f_n, v_n⟩`` with respect to a weight block is ``Σ_t g_{n,t} a_{n,t}ᵀ`` (``d_out × d_in``)
and with respect to a bias ``Σ_t g_{n,t}``, where ``a`` is the module's input and
``g = Jᵀv`` its output gradient, both caught by the hooks of :class:`LoRAKFAC` in one
forward and one backward per probe (see :mod:`laplace_llm.curvature.kfac` for the probes
of each ``fisher_type`` and likelihood). The sum runs over every position, padding
included: a padding position that does not reach the output has ``g = 0``, and one
that does belongs to the exact gradient. One LoRA side is the rank ``r``, so a block
gradient costs ``B·d·r`` numbers.

Stacking them gives

- the diagonal curvature ``Σ_{n,probe} w · G_{n,probe}²`` and the full curvature
  ``Σ_{n,probe} w · vec(G) vec(G)ᵀ`` over the LoRA weights, which equal laplace-torch's
  ``diag``/``full`` of its GGN (``fisher_type="ggn"``) or empirical Fisher (``"ef"``)
  backends on the same parameters;
- with the ``C`` identity probes, the Jacobian ``(B, C, P)`` of the outputs with respect
  to the LoRA weights, for the GLM predictive.

A module may see more rows than the batch has examples (preference pairs: ``(B, 2, T)``
inputs run as ``2B`` sequences); rows ``j·B'/B … (j+1)·B'/B`` then belong to example
``j`` (row-major flattening). Calls that carry a :class:`~laplace_llm.curvature.kfac.CallLayout`
(text candidates of :class:`~laplace_llm.models.candidates.CandidateScorer`: a prompt call and a
continuation call per batch) say themselves which example each row belongs to and which
positions are real; an example's gradient sums its rows of every call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from laplace_llm.curvature.kfac import LoRAKFAC, NonFiniteError
from laplace_llm.curvature.kfac_hooks import _layout_positions, _per_module_calls

__all__ = ["LoRAPerExampleCurvature", "block_gradients"]

Probes = list[tuple[torch.Tensor, float]]


def block_gradients(
    backend: LoRAKFAC, x: Any, make_probes: Callable[[torch.Tensor], Probes]
) -> tuple[torch.Tensor, Probes, list[torch.Tensor]] | None:
    """Per-example, per-probe gradients of every block of ``backend``.

    Parameters
    ----------
    backend : LoRAKFAC
        gives the model, the blocks, the hooks and the factor dtype.
    x : batch of ``B`` inputs (dict or tensor).
    make_probes : callable
        ``f (B, C) -> [(v (B, C), weight), ...]``.

    Returns
    -------
    (f, probes, grads) or None
        ``f`` the outputs ``(B, C)`` (detached), the probes, and per block a tensor
        ``(S, B, *block.shape)`` in the factor dtype (``S`` probes, weights not
        applied). ``None`` when a hooked module saw a number of rows that is not a
        multiple of ``B``.
    """
    dtype = backend.factor_dtype()
    with torch.enable_grad(), backend.recording() as rec:
        f = backend.model(x)
        if f.ndim != 2:
            raise ValueError(f"The model must return outputs (batch, C); got {tuple(f.shape)}.")
        probes = make_probes(f)
        outputs = rec.outputs()
        grads = backend.output_gradients(f, outputs, [v for v, _ in probes])
    B, S = f.shape[0], len(probes)
    per_module = _per_module_calls(rec, grads)
    out = []
    for b in backend.blocks:
        G = None
        for a, gs, layout in per_module.get(b.module_name, []):
            if layout is not None:  # rows of several calls to their examples
                a, g, m, example = _layout_positions(a, gs, layout, dtype)
                g = torch.stack(g) * m[None, :, :, None]  # (S, R, T, d_out), padding dropped
                Gr = torch.einsum("srtd,rte->srde", g, a) if b.kind == "weight" else g.sum(2)
                Gc = torch.zeros(S, B, *Gr.shape[2:], device=Gr.device, dtype=dtype)
                Gc.index_add_(1, example, Gr)
                G = Gc if G is None else G + Gc
                continue
            if a.shape[0] % B:
                return None
            a = a.to(dtype).reshape(B, -1, a.shape[-1])
            g = torch.stack([gi.to(dtype) for gi in gs]).reshape(S, B, -1, gs[0].shape[-1])
            Gc = torch.einsum("sbtd,bte->sbde", g, a) if b.kind == "weight" else g.sum(2)
            G = Gc if G is None else G + Gc
        if G is None:  # the module did not act on this batch
            G = torch.zeros(S, B, *b.shape, device=b.module.weight.device, dtype=dtype)
        out.append(G)
    return f.detach(), probes, out


class LoRAPerExampleCurvature(LoRAKFAC):
    """:class:`LoRAKFAC` plus diagonal and full curvature and explicit Jacobians.

    Same arguments as :class:`LoRAKFAC` (``kfac_approx``, ``n_kfac`` and
    ``lr_threshold`` only matter for :meth:`kron`). ``diag``/``full`` follow
    laplace-torch's ``CurvatureInterface``: they return ``(loss, H)`` of one batch,
    not scaled with the data set size.
    """

    def _curvature_gradients(self, x, y) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        res = block_gradients(self, x, lambda f: self.probes(f, y))
        if res is None:
            raise ValueError(
                "A LoRA layer saw a number of rows that is not a multiple of the batch "
                "size, so its per-example gradients are undefined; use "
                "hessian_structure='kron' for this model."
            )
        f, probes, grads = res
        dtype = self.factor_dtype()
        S, B = len(probes), f.shape[0]
        w = torch.tensor([wi for _, wi in probes], device=f.device, dtype=dtype).sqrt()
        flat = torch.cat([G.reshape(S, B, -1) for G in grads], dim=-1) * w.view(S, 1, 1)
        loss = self.lossfunc(f.to(dtype), y)
        if not (torch.isfinite(f).all() and torch.isfinite(flat).all()):
            raise NonFiniteError(
                "NaN or Inf in the outputs or in the LoRA layers' gradients of this batch. "
                "Check the inputs, the model's dtype (fp16 overflows easily) and that the "
                "fine-tuned weights are finite."
            )
        return self.factor * loss.detach(), flat.reshape(S * B, -1), f

    def diag(self, x, y, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and diagonal curvature ``(P,)`` of one batch."""
        loss, flat, _ = self._curvature_gradients(x, y)
        return loss, flat.square().sum(0)

    def full(self, x, y, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and full curvature ``(P, P)`` of one batch."""
        loss, flat, _ = self._curvature_gradients(x, y)
        return loss, flat.T @ flat

    def block_jacobians(self, x) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return the outputs ``(B, C)`` and their Jacobian ``(B, C, P)`` over the blocks' weights.

        From one forward and ``C`` backward passes; ``None`` when a module's rows are
        not a multiple of the batch (use laplace-torch's ``jacobians`` then).
        """

        def identity(f):
            eye = torch.eye(f.shape[-1], device=f.device, dtype=f.dtype)
            return [(eye[c].expand_as(f), 1.0) for c in range(f.shape[-1])]

        res = block_gradients(self, x, identity)
        if res is None:
            return None
        f, _, grads = res
        C, B = f.shape[1], f.shape[0]
        Js = torch.cat([G.reshape(C, B, -1) for G in grads], dim=-1).transpose(0, 1)
        return f, Js
