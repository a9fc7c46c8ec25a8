"""The model builder of the benchmarks: a random-weight Llama with LoRA, and random tokens.

Every size is a Llama-2 proportion (:func:`llama_config`); :func:`lora_llama` builds it
from a seed and wraps it with a peft LoRA adapter whose ``B`` matrices are non-zero (a
trained adapter), unless asked otherwise. :class:`Tokens` is the data: random sequences
with random labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

#: LoRA on the query and value projections (the LoRA paper's default).
QV = ("q_proj", "v_proj")


def llama_config(hidden: int, layers: int, vocab: int = 1024, max_positions: int = 512,
                 intermediate: int | None = None, kv_heads: int | None = None) -> dict:
    """Llama-2 proportions: intermediate 2.6875·h (a multiple of 64), heads of 64."""
    heads = max(hidden // 64, 1)
    if intermediate is None:
        intermediate = int(round(hidden * 2.6875 / 64)) * 64 or 2 * hidden
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads if kv_heads is None else kv_heads,
        max_position_embeddings=max_positions,
    )


def lora_llama(cfg: dict, targets: Sequence[str] = QV, r: int = 8, *, seed: int = 0,
               lm_head_std: float | None = None, b_std: float | None = 0.02,
               **lora: object) -> PeftModel:
    """A random-weight ``LlamaForCausalLM(LlamaConfig(**cfg))`` with LoRA on ``targets``, in eval mode.

    Parameters
    ----------
    cfg : dict
        the config (:func:`llama_config`).
    targets, r
        the LoRA modules and rank; ``lora`` goes to ``LoraConfig`` too (default
        ``lora_alpha=16``, ``lora_dropout=0``).
    seed : int
        ``torch.manual_seed`` before the model is built.
    lm_head_std : float, optional
        redraw the LM head with this std (logits of a pretrained model's scale).
    b_std : float or None
        draw the LoRA ``B`` matrices with this std (``None``: peft's initialisation).
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    if lm_head_std is not None:
        nn.init.normal_(model.lm_head.weight, std=lm_head_std)
    lora = {"lora_alpha": 16, "lora_dropout": 0.0, **lora}
    model = get_peft_model(model, LoraConfig(r=r, target_modules=list(targets), **lora))
    if b_std is not None:
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=b_std)
    return model.eval()


def floor(clf: nn.Module, batches) -> None:
    """The floor of a fit: forward and backward of the cross-entropy over ``batches``."""
    for batch in batches:
        f = clf(batch)
        nn.functional.cross_entropy(f, batch["labels"].to(f.device), reduction="sum").backward()
    clf.zero_grad(set_to_none=True)


class Tokens(torch.utils.data.Dataset):
    """``n`` random sequences of ``T`` token ids in ``[low, vocab)``, labels in ``range(n_labels)``."""

    def __init__(self, n: int, T: int, vocab: int = 1024, n_labels: int = 4, seed: int = 0,
                 low: int = 20):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(low, vocab, (n, T), generator=g)
        self.labels = torch.randint(0, n_labels, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}
