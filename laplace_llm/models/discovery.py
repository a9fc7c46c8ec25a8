"""Find the Kronecker blocks of a LoRA model.

A *block* is one trainable parameter together with the linear module that uses it:
the ``weight`` (``d_out × d_in``, two Kronecker factors) or ``bias`` (one factor) of a
peft ``lora_A`` / ``lora_B`` module or of a plain trainable ``nn.Linear`` such as a
``modules_to_save`` classification head. Blocks come in the order of
``model.parameters()`` restricted to ``requires_grad``, which is laplace-torch's
``self.params`` order, so a flat parameter vector splits into blocks in sequence.

Every Laplace structure over LoRA weights (Kronecker now; diagonal, full and
last-layer later) starts from :func:`find_blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from laplace_llm.errors import LoRAModelError
from laplace_llm.sharding import plain_module_type, refuse_unsupported_sharding

__all__ = ["KronBlock", "find_blocks", "LoRAModelError"]


@dataclass(frozen=True)
class KronBlock:
    """One parameter and the linear module that applies it.

    Attributes
    ----------
    name : str
        parameter name in ``model.named_parameters()``.
    module_name : str
        name of the owning module.
    module : nn.Linear
    kind : {"weight", "bias"}
    role : {"lora_A", "lora_B", "linear"}
    adapter : str or None
        peft adapter name for LoRA blocks.
    shape : tuple of int
        ``(d_out, d_in)`` for a weight, ``(d_out,)`` for a bias: the factor sides.
    """

    name: str
    module_name: str
    module: nn.Module
    kind: str
    role: str
    adapter: str | None
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of parameters of the block."""
        n = 1
        for s in self.shape:
            n *= s
        return n


def _lora_role(module_name: str) -> tuple[str | None, str | None]:
    parts = module_name.split(".")
    for role in ("lora_A", "lora_B"):
        if role in parts[:-1]:
            return role, parts[parts.index(role) + 1]
    return None, None


def _lora_layers(model: nn.Module):
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "merged_adapters"):
            yield name, module


def find_blocks(model: nn.Module) -> list[KronBlock]:
    """Kronecker blocks of the trainable parameters of ``model``.

    Parameters
    ----------
    model : nn.Module
        a peft LoRA model, possibly wrapped (e.g. by :class:`laplace_llm.LLMClassifier`).

    Returns
    -------
    list of KronBlock
        in ``model.parameters()`` order (trainable parameters only).

    Raises
    ------
    LoRAModelError
        no trainable LoRA parameter; adapters merged or disabled; trainable LoRA
        parameters of an inactive adapter; trainable parameters that belong to
        no supported block (LoRA on embeddings, DoRA magnitudes, LayerNorm, ...); or a
        model sharded by FSDP1 or DeepSpeed ZeRO-3 (FSDP2 ``fully_shard`` is supported,
        see :mod:`laplace_llm.sharding`).
    """
    refuse_unsupported_sharding(model)
    for name, layer in _lora_layers(model):
        if getattr(layer, "merged_adapters", None):
            raise LoRAModelError(
                f"LoRA layer '{name}' has merged adapters {layer.merged_adapters}: the "
                "Laplace posterior is over the separate LoRA factors. Call "
                "`model.unmerge_adapter()` (or load the adapter without merging) first."
            )
        if getattr(layer, "disable_adapters", False):
            raise LoRAModelError(
                f"Adapters of LoRA layer '{name}' are disabled, so the LoRA weights do not "
                "act on the output. Re-enable them (e.g. leave the `disable_adapter()` "
                "context) before fitting."
            )

    modules = dict(model.named_modules())
    active_by_layer = {
        name: set(getattr(layer, "active_adapters", []) or []) for name, layer in _lora_layers(model)
    }
    blocks: list[KronBlock] = []
    unsupported: list[str] = []
    inactive: list[str] = []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module_name, _, attr = pname.rpartition(".")
        module = modules.get(module_name)
        if module is None or plain_module_type(module) is not nn.Linear or attr not in ("weight", "bias"):
            unsupported.append(f"{pname} {tuple(p.shape)} in {type(module).__name__}")
            continue
        role, adapter = _lora_role(module_name)
        if role is not None:
            layer_name = module_name.rsplit("." + role, 1)[0]
            active = active_by_layer.get(layer_name)
            if active is not None and adapter not in active:
                inactive.append(pname)
                continue
        shape = (module.out_features, module.in_features) if attr == "weight" else (
            module.out_features,
        )
        blocks.append(
            KronBlock(pname, module_name, module, attr, role or "linear", adapter, shape)
        )
    lora_like = any("lora_" in name for name in unsupported + inactive)
    if not any(b.role != "linear" for b in blocks) and not lora_like:
        raise LoRAModelError(
            "The model has no trainable LoRA parameters. Wrap it with "
            "`peft.get_peft_model(model, LoraConfig(...))` (or load a LoRA adapter with "
            "`is_trainable=True`) so that `lora_A`/`lora_B` weights require grad; for a "
            "model without LoRA use laplace-torch's subset_of_weights='all' or 'last_layer'."
        )
    if unsupported:
        raise LoRAModelError(
            "These trainable parameters fit no supported Kronecker block (only the "
            "weights and biases of LoRA `lora_A`/`lora_B` modules and of plain nn.Linear "
            "layers are supported): " + ", ".join(unsupported[:10])
            + (f" and {len(unsupported) - 10} more" if len(unsupported) > 10 else "")
            + ". Freeze them with `p.requires_grad_(False)` or leave them out of LoRA "
            "(no LoRA on embeddings, no DoRA, no trainable norms)."
        )
    if inactive:
        raise LoRAModelError(
            "These LoRA parameters are trainable but their adapter is not active, so they "
            "do not change the output: " + ", ".join(inactive[:10])
            + ". Activate the adapter with `model.set_adapter(...)` or freeze them."
        )
    if not any(b.role != "linear" for b in blocks):
        raise LoRAModelError(
            "The model has trainable nn.Linear layers but no trainable LoRA parameters; "
            "subset_of_weights='lora' needs a peft LoRA model (`peft.get_peft_model`)."
        )
    return blocks
