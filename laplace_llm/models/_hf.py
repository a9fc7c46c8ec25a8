"""Hugging Face helpers shared by the model wrappers.

What :class:`~laplace_llm.models.classifier.LLMClassifier` and
:class:`~laplace_llm.models.candidates.CandidateScorer` both need of a transformers model:
the model inside a peft wrapper, its text config, device and output vocabulary, the
transforms some families apply after ``lm_head``, and positions from an attention mask.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["position_ids_from_mask", "last_token_index"]


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a peft ``PeftModel`` (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _text_config(config: Any) -> Any:
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _accepts(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` names the parameter ``name``.

    ``**kwargs`` does not count: transformers forwards them to attention functions, which
    may not expect (or may misuse) an input the model itself does not name.
    """
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _output_vocab_size(hf_model: nn.Module, head: nn.Module) -> int:
    for attr in ("out_features", "num_embeddings"):
        value = getattr(head, attr, None)
        if isinstance(value, int):
            return value
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[0]
    return int(_text_config(hf_model.config).vocab_size)


def _model_device(hf_model: nn.Module) -> torch.device:
    # The input embedding's device is where input ids must go, also for models dispatched
    # over several devices with accelerate.
    get_emb = getattr(hf_model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(hf_model.parameters()).device


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so that padding does not shift them.

    Parameters
    ----------
    attention_mask : torch.Tensor
        ``(batch, T)``, 1 on real tokens, 0 on padding.

    Returns
    -------
    torch.Tensor
        ``(batch, T)`` long: ``cumsum(mask) - 1`` clamped at 0 (padding positions get 0 or
        the last real position; they are masked out of attention anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding.

    Parameters
    ----------
    attention_mask : torch.Tensor
        ``(batch, T)``, 1 on real tokens, 0 on padding.

    Returns
    -------
    torch.Tensor
        ``(batch,)`` long, the largest ``t`` with ``attention_mask[i, t] == 1``.

    Raises
    ------
    ValueError
        If a row has no real token.
    """
    mask = attention_mask != 0
    empty = ~mask.any(-1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask rows {rows} have no real token (all zeros); remove empty "
            "sequences from the batch."
        )
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask, positions, -1).amax(-1)


def _post_head_transform(hf_model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Apply the transforms transformers applies after ``lm_head`` in some families' ``forward``."""
    config = _text_config(hf_model.config)
    model_type = str(getattr(config, "model_type", ""))
    scale = getattr(hf_model, "logit_scale", None)
    if model_type.startswith("cohere") and isinstance(scale, (int, float)):
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if model_type.startswith("granite") and scaling is not None:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
