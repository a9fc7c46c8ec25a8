"""The output-gradient probes of K-FAC: mc, ggn and ef, for classification and regression.

A probe is one vector of output cotangents ``v`` with a weight; its output gradients
``g = Jᵀ v`` reach the hooked modules (the formulas are in the docstring of
:mod:`laplace_llm.curvature.kfac`). Probes run :data:`PROBE_CHUNK` at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from laplace_llm.errors import NonFiniteError

__all__ = ["KFACProbes", "PROBE_CHUNK"]


class KFACProbes:
    """The probes of :class:`~laplace_llm.curvature.kfac.LoRAKFAC` (a base of it, never used alone)."""

    def probes(self, f: torch.Tensor, y: torch.Tensor | None) -> list[tuple[torch.Tensor, float]]:
        """Output cotangents ``v (B, C)`` and weights whose ``Σ w JᵀvvᵀJ`` is the Fisher."""
        self._check_outputs(f)
        if self.likelihood == "regression":
            return self._regression_probes(f, y)
        p = torch.softmax(f.detach().to(self.factor_dtype()), dim=-1)
        if self.fisher_type == "ggn":
            return _GGNProbes(p, f.dtype)
        if self.fisher_type == "ef":
            labels = [y]
            weight = 1.0
        else:
            labels = [
                torch.multinomial(p, 1, generator=self.generator).squeeze(-1)
                for _ in range(self.mc_samples)
            ]
            weight = 1.0 / self.mc_samples
        C = f.shape[-1]
        return [
            ((p - nn.functional.one_hot(lab.to(p.device), C).to(p.dtype)).to(f.dtype), weight)
            for lab in labels
        ]

    def _check_outputs(self, f: torch.Tensor) -> None:
        """Refuse non-finite model outputs before they reach a sampler or a softmax.

        Raises
        ------
        NonFiniteError
            naming the LoRA modules whose weights are not finite, if any.
        """
        if bool(torch.isfinite(f.detach()).all()):
            return
        bad = []
        for b in self.blocks:
            w = b.module.weight.detach()
            w = w.to_local() if hasattr(w, "to_local") else w  # a sharded (DTensor) weight
            if not bool(torch.isfinite(w).all()):
                bad.append(b.module_name)
        where = (f"the LoRA weights of {bad[:3]}{' …' if len(bad) > 3 else ''} are not finite"
                 if bad else "every LoRA weight is finite, so the inputs or the base model "
                 "produce them")
        raise NonFiniteError(
            f"NaN or Inf in the model's outputs of this batch: {where}. Check that the "
            "fine-tuned weights are finite, the inputs, and the model's dtype (fp16 "
            "overflows easily; use bf16 or float32)."
        )

    def _regression_probes(self, f, y) -> list[tuple[torch.Tensor, float]]:
        B, k = f.shape
        if self.fisher_type == "ggn":
            eye = torch.eye(k, device=f.device, dtype=f.dtype)
            return [(eye[c].expand(B, k), 1.0) for c in range(k)]
        if self.fisher_type == "ef":
            r = f.detach().to(self.factor_dtype()) - y.to(device=f.device, dtype=self.factor_dtype())
            return [(r.to(f.dtype), 2.0)]
        dtype = self.factor_dtype()
        return [
            (torch.randn(f.shape, generator=self.generator, device=f.device, dtype=dtype).to(f.dtype),
             1.0 / self.mc_samples)
            for _ in range(self.mc_samples)
        ]

    def output_gradients(
        self,
        f: torch.Tensor,
        outputs: list[torch.Tensor],
        probes: list[torch.Tensor],
        keep_graph: bool = False,
    ) -> list[list[torch.Tensor]]:
        """``grads[i][j]``: gradient of ``⟨f, probes[i]⟩`` w.r.t. ``outputs[j]``.

        ``keep_graph``: keep the graph after the last probe too (more probes follow).
        """
        grads = []
        for i, v in enumerate(probes):
            g = torch.autograd.grad(
                f, outputs, grad_outputs=v, retain_graph=keep_graph or i < len(probes) - 1,
                allow_unused=True,
            )
            grads.append([torch.zeros_like(o) if gi is None else gi for gi, o in zip(g, outputs)])
        return grads


class _GGNProbes(Sequence):
    """The C ggn probes, the columns of ``S = diag(√p) − p √pᵀ``, made when read.

    Column ``c`` is ``S[:, :, c]``, computed as ``diag(√p)[:, c] − p √p_c`` with the
    same floating-point operations as the dense ``S``, but ``S`` itself (``B × C × C``:
    32 MiB at ``B = 8``, ``C = 1,000``) is never formed: a chunk of probes takes
    ``B × C`` per probe. Items are ``(v (B, C), 1.0)``; slices give lists.
    """

    def __init__(self, p: torch.Tensor, dtype: torch.dtype):
        self.p, self.sp, self.dtype = p, p.sqrt(), dtype

    def __len__(self) -> int:
        return self.p.shape[-1]

    def _column(self, c: int) -> tuple[torch.Tensor, float]:
        sp_c = self.sp[:, c : c + 1]
        v = -(self.p * sp_c)
        v[:, c] += sp_c[:, 0]
        return v.to(self.dtype), 1.0

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._column(c) for c in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._column(index)


#: probes (backward passes) whose output gradients are held at once, in ``fit`` and in
#: the GLM predictive: a ggn fit or a GLM over C classes runs C backward passes, whose
#: gradients of every LoRA module's output (``B × T × d_out`` each) are turned into
#: factor columns or Jacobians chunk by chunk, so that their memory stays that of 16
#: probes at any C (at C ≤ 16 there is one chunk, as before)
PROBE_CHUNK = 16


def _chunks(items: list) -> Iterator[tuple[int, list]]:
    """``(start, items[start:start + PROBE_CHUNK])`` for each chunk of ``items``."""
    for start in range(0, len(items), PROBE_CHUNK):
        yield start, items[start : start + PROBE_CHUNK]
