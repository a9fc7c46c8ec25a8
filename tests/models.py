"""Tiny, deterministic models and a tokenizer for tests; nothing is downloaded.

Every builder seeds torch before creating weights, so the same arguments give the same
model bit for bit, and sets every dropout probability to zero and puts the model in eval
mode, so repeated forwards agree. Sizes are chosen to keep a forward pass in the
millisecond range on two CPU cores: hidden size 32, 2 layers, 4 heads, vocabulary 100.

The tokenizer is word level (one token per whitespace- or punctuation-separated word),
built in memory with the ``tokenizers`` library; its vocabulary (:data:`TINY_WORDS`) has
fewer than :data:`TINY_VOCAB` entries, so every tiny model can embed every token.

Typical use::

    model = tiny_llama_lora(seed=0)                       # PeftModel, LoRA on q_proj, v_proj
    tok = tiny_tokenizer(padding_side="left")
    batch = tok(["Question : A B", "A"], padding=True, return_tensors="pt")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

#: Vocabulary size of every tiny model (at least ``len(tiny_tokenizer())``).
TINY_VOCAB = 100
#: Hidden size of every tiny model.
TINY_HIDDEN = 32

_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
_LETTERS = [chr(ord("A") + i) for i in range(26)]
_WORDS = [
    "Question", "Answer", "True", "False", "yes", "no", "the", "a", "is", "of",
    "good", "bad", "Which", "what", "key", "option", "cat", "dog", "red", "blue",
]
_PUNCT = [":", ".", ",", "?", "!"]
_FILLERS = [f"w{i}" for i in range(TINY_VOCAB - 4 - len(_SPECIALS) - 26 - 20 - 5)]
#: Words of the tiny tokenizer, in id order: specials (pad 0, unk 1, bos 2, eos 3),
#: capital letters A–Z (ids 4–29), some words, punctuation, then fillers ``w0``, ``w1``, ….
TINY_WORDS: list[str] = _SPECIALS + _LETTERS + _WORDS + _PUNCT + _FILLERS
assert len(TINY_WORDS) <= TINY_VOCAB


def tiny_tokenizer(
    padding_side: str = "right", add_bos: bool = False, pad_token: str | None = "<pad>"
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over :data:`TINY_WORDS`, built offline.

    Parameters
    ----------
    padding_side : {"right", "left"}
    add_bos : bool
        Prepend ``<s>`` when encoding with special tokens (as Llama tokenizers do), so that
        tests can check that choices are encoded *without* special tokens.
    pad_token : str or None
        ``None`` leaves the tokenizer without a pad token (to test that error).

    Returns
    -------
    PreTrainedTokenizerFast
        ``" A"`` and ``"A"`` both encode to the single id 4; unknown words map to ``<unk>``.
    """
    vocab = {w: i for i, w in enumerate(TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Whitespace splits "Answer:" into "Answer", ":" like a real tokenizer would.
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
    )
    if pad_token is not None:
        tok.pad_token = pad_token
    return tok


def _config(family: str, vocab_size: int, hidden: int, layers: int, **overrides):
    """A tiny transformers config of ``family`` with all dropout off."""
    heads = 4
    common = {"vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if family == "llama":
        cfg = LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=1024,
            **common,
        )
    elif family == "qwen2":
        cfg = Qwen2Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=1024,
            **common,
        )
    elif family == "mistral":
        # A sliding window shorter than the test sequences would change the reference.
        cfg = MistralConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=1024,
            sliding_window=1024, **common,
        )
    elif family == "gpt2":
        cfg = GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
            **common,
        )
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=1024,
            attention_dropout=0.0, hidden_dropout=0.0, classifier_dropout=0.0, **common,
        )
    elif family == "bert":
        cfg = BertConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=1024,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common,
        )
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


#: Families :func:`tiny_causal_lm` knows, with default LoRA target modules for each.
CAUSAL_FAMILIES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
}


def tiny_causal_lm(
    family: str,
    seed: int = 0,
    *,
    vocab_size: int = TINY_VOCAB,
    hidden: int = TINY_HIDDEN,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> PreTrainedModel:
    """A randomly initialised causal LM of ``family`` (a key of :data:`CAUSAL_FAMILIES`).

    Returns
    -------
    PreTrainedModel
        In eval mode, parameters in ``dtype``, weights a function of ``seed`` only.
    """
    cfg = _config(family, vocab_size, hidden, layers, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype).eval()


def add_lora(
    model: PreTrainedModel,
    *,
    seed: int = 0,
    r: int = 4,
    lora_alpha: float | None = None,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    modules_to_save: Sequence[str] | None = None,
    init_lora_weights: bool = False,
    task_type: str | None = None,
) -> PeftModel:
    """Wrap ``model`` with peft LoRA adapters (dropout 0) and return the ``PeftModel``.

    Parameters
    ----------
    r, lora_alpha : LoRA rank and α (α defaults to ``r``, so the scale γ = α/r is 1).
    init_lora_weights : bool
        ``False`` (the default here, unlike peft's) leaves ``lora_B`` random instead of zero,
        so that the adapters change the outputs and gradients with respect to ``lora_A``
        are non-zero, which curvature tests need. Pass ``True`` for the usual fine-tuning
        start (``lora_B = 0``).
    task_type : str, optional
        peft task type, e.g. ``"SEQ_CLS"``; ``None`` gives a plain ``PeftModel``.
    """
    dtype = next(model.parameters()).dtype
    # GPT-2's Conv1D stores its weight transposed; saying so avoids peft's warning.
    conv1d = {
        type(module).__name__
        for name, module in model.named_modules()
        if name.split(".")[-1] in target_modules
    }
    config = LoraConfig(
        r=r,
        lora_alpha=r if lora_alpha is None else lora_alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        modules_to_save=None if modules_to_save is None else list(modules_to_save),
        init_lora_weights=init_lora_weights,
        task_type=task_type,
        fan_in_fan_out=conv1d == {"Conv1D"},
    )
    torch.manual_seed(seed + 1_000_003)  # adapters independent of the base weights' stream
    peft_model = get_peft_model(model, config)
    return peft_model.to(dtype).eval()


def _causal_lora(family, seed, r, target_modules, dtype, **kwargs) -> PeftModel:
    lora_keys = {"lora_alpha", "modules_to_save", "init_lora_weights"}
    lora_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in lora_keys}
    model = tiny_causal_lm(family, seed, dtype=dtype, **kwargs)
    targets = CAUSAL_FAMILIES[family] if target_modules is None else target_modules
    return add_lora(model, seed=seed, r=r, target_modules=targets, **lora_kwargs)


def tiny_llama_lora(
    seed: int = 0,
    r: int = 4,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> PeftModel:
    """Tiny Llama causal LM with LoRA. ``kwargs`` go to :func:`tiny_causal_lm` (``vocab_size``,
    ``hidden``, ``layers``, config fields) or :func:`add_lora` (``lora_alpha``,
    ``modules_to_save``, ``init_lora_weights``)."""
    return _causal_lora("llama", seed, r, target_modules, dtype, **kwargs)


def tiny_qwen2_lora(
    seed: int = 0,
    r: int = 4,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> PeftModel:
    """Tiny Qwen2 causal LM with LoRA; arguments as :func:`tiny_llama_lora`."""
    return _causal_lora("qwen2", seed, r, target_modules, dtype, **kwargs)


def tiny_mistral_lora(
    seed: int = 0,
    r: int = 4,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> PeftModel:
    """Tiny Mistral causal LM with LoRA; arguments as :func:`tiny_llama_lora`."""
    return _causal_lora("mistral", seed, r, target_modules, dtype, **kwargs)


def tiny_gpt2_lora(
    seed: int = 0,
    r: int = 4,
    target_modules: Sequence[str] = ("c_attn",),
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> PeftModel:
    """Tiny GPT-2 (absolute positions, ``Conv1D`` layers, tied lm_head) with LoRA."""
    return _causal_lora("gpt2", seed, r, target_modules, dtype, **kwargs)


def tiny_gptneox_lora(
    seed: int = 0,
    r: int = 4,
    target_modules: Sequence[str] = ("query_key_value",),
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> PeftModel:
    """Tiny GPT-NeoX (Pythia-style, fused QKV) with LoRA."""
    return _causal_lora("gpt_neox", seed, r, target_modules, dtype, **kwargs)


#: Builder per family, for tests parametrised over families.
CAUSAL_LORA_BUILDERS = {
    "llama": tiny_llama_lora,
    "qwen2": tiny_qwen2_lora,
    "mistral": tiny_mistral_lora,
    "gpt2": tiny_gpt2_lora,
    "gpt_neox": tiny_gptneox_lora,
}


def tiny_seqcls(
    family: str,
    num_labels: int,
    seed: int = 0,
    *,
    vocab_size: int = TINY_VOCAB,
    hidden: int = TINY_HIDDEN,
    layers: int = 2,
) -> PreTrainedModel:
    """Tiny ``AutoModelForSequenceClassification`` of ``family`` ("bert" or a key of
    :data:`CAUSAL_FAMILIES`) with ``num_labels`` outputs (1: a reward head). Decoder
    families pool the last non-pad token, found through ``config.pad_token_id`` (0)."""
    cfg = _config(family, vocab_size, hidden, layers, num_labels=num_labels)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def tiny_bert_seqcls(
    num_labels: int, seed: int = 0, *, vocab_size: int = TINY_VOCAB, layers: int = 2
) -> PreTrainedModel:
    """Tiny BERT encoder with a sequence-classification head of ``num_labels`` outputs."""
    return tiny_seqcls("bert", num_labels, seed, vocab_size=vocab_size, layers=layers)


def tiny_bert_seqcls_lora(
    num_labels: int = 2,
    seed: int = 0,
    r: int = 4,
    target_modules: Sequence[str] = ("query", "value"),
    **kwargs,
) -> PeftModel:
    """Tiny BERT sequence classifier with LoRA on ``query``/``value`` and the
    ``classifier`` head trained in full (peft ``modules_to_save``), peft task ``SEQ_CLS``.
    ``num_labels=1`` gives a reward-model head."""
    model = tiny_bert_seqcls(num_labels, seed)
    kwargs.setdefault("modules_to_save", ["classifier"])
    return add_lora(
        model, seed=seed, r=r, target_modules=target_modules, task_type="SEQ_CLS", **kwargs
    )


class MLP(torch.nn.Module):
    """Two linear layers ``l1``, ``l2``, with a tanh between them unless ``linear``."""

    def __init__(self, d_in: int = 5, hidden: int = 7, d_out: int = 3, linear: bool = False):
        super().__init__()
        self.l1 = torch.nn.Linear(d_in, hidden)
        self.l2 = torch.nn.Linear(hidden, d_out)
        self.linear = linear

    def forward(self, x):
        h = self.l1(x)
        return self.l2(h if self.linear else torch.tanh(h))


def lora_mlp(
    seed: int = 0, d_in: int = 5, hidden: int = 7, d_out: int = 3, r: int = 2, alpha: int = 4,
    target_modules: Sequence[str] = ("l1",), modules_to_save: Sequence[str] | None = ("l2",),
    linear: bool = False,
) -> PeftModel:
    """A float64 peft :class:`MLP` with random LoRA weights (``init_lora_weights=False``).

    By default LoRA r=2 on ``l1`` and ``l2`` trained in full (``modules_to_save``); the
    same arguments give the same weights bit for bit.
    """
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                     modules_to_save=None if modules_to_save is None else list(modules_to_save),
                     init_lora_weights=False)
    return get_peft_model(MLP(d_in, hidden, d_out, linear).double(), cfg)


def write_model_folder(root) -> PeftModel:
    """Write a tiny Llama with its tokenizer to ``root/"model"`` and its LoRA adapter to
    ``root/"adapter"`` (r=4, seed 0), as a user's fine-tune on disk; return the adapted model.

    The command-line tests load these folders as ``--model`` and ``--adapter``.
    """
    from pathlib import Path

    root = Path(root)
    base = tiny_causal_lm("llama", seed=0)
    base.save_pretrained(root / "model")
    tiny_tokenizer(padding_side="left").save_pretrained(root / "model")
    adapted = add_lora(base, seed=0, r=4)
    adapted.save_pretrained(root / "adapter")
    return adapted
