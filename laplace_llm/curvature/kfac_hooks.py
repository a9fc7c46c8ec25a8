"""The hooks of K-FAC: what each LoRA module sees in a forward, and the positions of each example.

:class:`ModuleRecorder` keeps each watched module's inputs and outputs per call, with the
call's :class:`~laplace_llm.models.call_layout.CallLayout`; the helpers here turn the calls
into per-module inputs and output gradients, and a layout's rows into each example's
real positions (see the module docstring of :mod:`laplace_llm.curvature.kfac`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from laplace_llm.models.call_layout import CallLayout

__all__ = ["ModuleRecorder", "sequence_mask", "as_positions"]


class ModuleRecorder:
    """Forward hooks that keep each watched module's inputs and outputs.

    ``calls[module_name]`` is a list of ``(input, output, layout)`` per call, inputs
    detached, outputs attached to the graph so that gradients can be taken
    with respect to them; ``layout`` is what ``layout()`` returned during the call
    (a :class:`CallLayout` or ``None``).
    """

    def __init__(self, modules: dict[str, nn.Module], layout=None):
        self.modules = modules
        self.layout = layout
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, Any]]] = {}
        self._handles = []

    def __enter__(self) -> ModuleRecorder:
        """Register the forward hooks."""
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, inputs, output):
            layout = self.layout() if self.layout is not None else None
            self.calls.setdefault(name, []).append((inputs[0].detach(), output, layout))

        return hook

    def __exit__(self, *exc) -> None:
        """Remove the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def outputs(self) -> list[torch.Tensor]:
        """Return every recorded output, module by module, call by call."""
        return [out for calls in self.calls.values() for _, out, _ in calls]


def sequence_mask(x: Any, dict_key_mask: str = "attention_mask") -> torch.Tensor | None:
    """Attention mask of a batch as ``(B, T)`` (pairs ``(B, 2, T)`` flattened)."""
    if not isinstance(x, Mapping) or x.get(dict_key_mask) is None:
        return None
    mask = x[dict_key_mask]
    return mask.reshape(-1, mask.shape[-1])


def as_positions(t: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` as ``(B, T, d)`` and its 0/1 mask ``(B, T)`` of real positions.

    The batch mask applies when ``t`` has the batch's sequence shape; modules that
    see one position per sequence (a head after pooling, ``lm_head`` on the last
    token) have ``T = 1`` and every position real.
    """
    if t.ndim == 2:
        t = t.unsqueeze(1)
    else:
        t = t.reshape(t.shape[0], -1, t.shape[-1])
    if mask is not None and tuple(mask.shape) == tuple(t.shape[:2]):
        m = mask.to(device=t.device, dtype=t.dtype)
    else:
        m = torch.ones(t.shape[:2], device=t.device, dtype=t.dtype)
    return t, m


def _per_module_calls(rec: ModuleRecorder, grads: list[list[torch.Tensor]] | None):
    """Group the recorded inputs, probe gradients and call layouts by module.

    Returns ``{module: [(input, [gradient of each probe], layout), ...]}``; ``grads``
    follow ``rec.outputs()``, i.e. module by module, call by call.
    """
    j = 0
    per_module: dict[str, list[tuple[torch.Tensor, list[torch.Tensor], Any]]] = {}
    for name, calls in rec.calls.items():
        for a, _, layout in calls:
            gs = [] if grads is None else [g[j] for g in grads]
            per_module.setdefault(name, []).append((a, gs, layout))
            j += 1
    return per_module


def _has_layouts(calls) -> bool:
    """Whether a module's calls carry layouts; all of them or none must."""
    flags = {layout is not None for _, _, layout in calls}
    if len(flags) > 1:
        raise ValueError(
            "Some calls of a LoRA module carried a call_layout and others did not: a model "
            "that sets `call_layout` must set it around every call of its LoRA modules."
        )
    return flags == {True}


def _layout_positions(a, gs, layout: CallLayout, dtype):
    """Return the positions of one call with a layout.

    That is ``a (R, T, d_in)``, ``[g (R, T, d_out)]``, mask ``(R, T)`` and example ``(R,)``.
    """
    a = a.to(dtype)
    a = a.unsqueeze(1) if a.ndim == 2 else a.reshape(a.shape[0], -1, a.shape[-1])
    if tuple(layout.mask.shape) != tuple(a.shape[:2]) or layout.example.shape != a.shape[:1]:
        raise ValueError(
            f"A call_layout of mask {tuple(layout.mask.shape)} and {layout.example.shape[0]} "
            f"rows does not fit a module call on {tuple(a.shape[:2])} positions; the model "
            "must describe exactly the calls it runs."
        )
    gs = [g.to(dtype).reshape(a.shape[0], a.shape[1], g.shape[-1]) for g in gs]
    m = layout.mask.to(device=a.device, dtype=dtype)
    return a, gs, m, layout.example.to(a.device)
