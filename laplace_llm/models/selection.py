"""Choose which LoRA blocks are Bayesian (``lora_modules``).

A *layer name* is the name of the module that owns a block, with peft's
``.lora_A.<adapter>``, ``.lora_B.<adapter>`` or ``.modules_to_save.<adapter>`` tail
removed: both blocks of a LoRA pair on ``...layers.0.self_attn.q_proj`` have the layer
name ``...layers.0.self_attn.q_proj``. A pattern selects the layers whose name matches
it as a shell glob (:func:`fnmatch.fnmatchcase`) either in full or after a dot, so
``"lm_head"`` selects ``...lm_head``, ``"*.q_proj"`` every ``q_proj`` and
``"layers.1.*"`` everything in layer 1. The blocks that are not selected keep their
MAP (fine-tuned) values: the posterior is that of the same model with those weights
frozen.

With LoRA on the language-model head and ``lora_modules=["lm_head"]`` this is
last-layer Laplace over LoRA (LLLA in Yang et al., 2024). For a sequence classifier
whose head is trained in full (peft ``modules_to_save``), ``lora_modules=["classifier"]``
(or the head's name) selects that head alone: last-layer Laplace over a plain head.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from laplace_llm.models.discovery import KronBlock, LoRAModelError

__all__ = ["layer_name", "select_blocks", "restrict_to_blocks"]

_TAILS = ("lora_A", "lora_B", "modules_to_save")


def layer_name(block: KronBlock) -> str:
    """Name of the layer a block belongs to (peft's adapter tails removed)."""
    parts = block.module_name.split(".")
    for tail in _TAILS:
        if tail in parts[:-1]:
            return ".".join(parts[: parts.index(tail)])
    return block.module_name


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def select_blocks(blocks: list[KronBlock], lora_modules: Sequence[str] | str | None) -> list[KronBlock]:
    """Return the blocks whose layer matches one of ``lora_modules`` (all when ``None``).

    Parameters
    ----------
    blocks : list of KronBlock
        from :func:`laplace_llm.models.discovery.find_blocks`.
    lora_modules : sequence of str, str or None
        layer names or glob patterns (see the module docstring).

    Returns
    -------
    list of KronBlock
        in the order of ``blocks``.

    Raises
    ------
    LoRAModelError
        a pattern matches no layer.
    """
    if lora_modules is None:
        return list(blocks)
    if isinstance(lora_modules, str):
        lora_modules = [lora_modules]
    patterns = list(lora_modules)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"lora_modules must be a non-empty list of layer names or glob patterns; got "
            f"{lora_modules!r}. Leave it None to use every LoRA layer."
        )
    names = [layer_name(b) for b in blocks]
    available = sorted(set(names))
    for p in patterns:
        if not any(_matches(n, p) for n in names):
            raise LoRAModelError(
                f"lora_modules pattern {p!r} matches none of the model's LoRA layers: "
                + ", ".join(available[:12])
                + (f" and {len(available) - 12} more" if len(available) > 12 else "")
                + ". Use one of these names, a suffix of one (e.g. 'lm_head'), or a glob "
                "such as '*.q_proj'."
            )
    # A selection of trainable plain heads alone is allowed: for a sequence classifier
    # whose head is trained in full (peft ``modules_to_save``), that head is the last
    # layer, and its Laplace is last-layer Laplace.
    chosen = [b for b, n in zip(blocks, names) if any(_matches(n, p) for p in patterns)]
    return chosen


def restrict_to_blocks(la, blocks: list[KronBlock], prior_precision, prior_mean) -> None:
    """Make a laplace-torch Laplace object's parameters those of ``blocks``.

    laplace-torch takes every parameter with ``requires_grad`` (``params``,
    ``n_params``, ``n_layers``); after a module selection the others are constants at
    their current (MAP) values. The prior is set afterwards, so that a per-block prior
    precision or a full prior mean refers to the selected blocks.

    Parameters
    ----------
    la : laplace.baselaplace.ParametricLaplace
        just constructed (not fitted) over all trainable parameters.
    blocks : list of KronBlock
        the selection, in ``model.parameters()`` order.
    prior_precision, prior_mean
        as the Laplace constructor takes them.
    """
    named = dict(la.model.named_parameters())
    params = [named[b.name] for b in blocks]
    if len(params) != len(la.params):
        la.params = params
        la.n_params = sum(p.numel() for p in params)
        la.n_layers = len(params)
        la.is_subset_params = True
    la.prior_precision = prior_precision
    la.prior_mean = prior_mean
    la.mean = la.prior_mean

