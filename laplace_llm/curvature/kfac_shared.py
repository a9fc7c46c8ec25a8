"""Shared input factors: blocks whose modules read the same input hold one factor ``A``.

The ``lora_A`` of q, k and v of one attention layer read the same input; with
``share_input_factors`` they hold the very same factor object, found here from the
recorded calls (by tensor identity) and checked against the factors already held.
"""

from __future__ import annotations

import torch

from laplace_llm.matrix import LowRankKron
from laplace_llm.models.discovery import KronBlock

__all__ = ["KFACSharedInputs"]


class KFACSharedInputs:
    """The shared input factors of :class:`~laplace_llm.curvature.kfac.LoRAKFAC` (a base of it, never used alone)."""

    def _input_classes(self, per_module) -> dict[int, int]:
        """Weight blocks (by index) mapped to the first block that read the same inputs.

        Same inputs: in every call of the batch, the same tensor (storage, offset, shape,
        strides) or an equal one. Equality is tested among sibling layers only (one
        attention or MLP module), which is where it occurs: peft casts a bf16 input to
        float32 adapters once per adapter, so q/k/v then read equal copies.
        """
        classes: dict[int, int] = {}
        reps: dict[str, list[tuple[int, list[torch.Tensor]]]] = {}
        for i, b in enumerate(self.blocks):
            calls = per_module.get(b.module_name)
            if b.kind != "weight" or not calls:
                continue
            inputs = [(a, layout) for a, _, layout in calls]
            siblings = reps.setdefault(_parent_layer(b), [])
            for j, theirs in siblings:
                if _same_inputs(inputs, theirs):
                    classes[i] = j
                    break
            else:
                siblings.append((i, inputs))
                classes[i] = i
        return classes

    def _same_input_groups(self, classes: dict[int, int]) -> list[list[int]]:
        """Return the groups (two or more block indices) of weight blocks reading the same inputs."""
        groups: dict[int, list[int]] = {}
        for i, j in classes.items():
            groups.setdefault(j, []).append(i)
        return [g for g in groups.values() if len(g) > 1]

    def _check_shared(self, kron: LowRankKron, classes: dict[int, int]) -> None:
        """Refuse a batch in which blocks sharing an input factor read different inputs."""
        owner: dict[int, int] = {}
        for i, F in enumerate(kron.kfacs):
            if i not in classes:
                continue
            if owner.setdefault(id(F[1]), classes[i]) != classes[i]:
                raise ValueError(
                    f"Block '{self.blocks[i].name}' shares its input factor with another "
                    "block, but the two layers read different inputs in this batch. Fit "
                    "with share_input_factors=False."
                )


def _tensor_identity(t: torch.Tensor) -> tuple:
    """Return what makes two live tensors views of the same values."""
    return (t.device, t.dtype, t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    return _tensor_identity(x) == _tensor_identity(y) or (
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
    )


def _same_inputs(a: list, b: list) -> bool:
    """Whether two modules' ``(input, layout)`` calls are the same tensors or equal ones."""
    if len(a) != len(b):
        return False
    for (x, lx), (y, ly) in zip(a, b):
        if not _same_tensor(x, y):
            return False
        if (lx is None) != (ly is None):
            return False
        if lx is not None and lx is not ly and not (
            _same_tensor(lx.mask, ly.mask) and _same_tensor(lx.example, ly.example)
        ):
            return False
    return True


def _parent_layer(block: KronBlock) -> str:
    """Name of the module holding the block's layer (``…layers.3.self_attn`` for q_proj)."""
    layer = block.module_name
    if block.role in ("lora_A", "lora_B"):
        layer = layer.rsplit("." + block.role, 1)[0]
    return layer.rpartition(".")[0]
