"""A tiny Llama written as a GGUF file at test time, loadable the way the real SmolLM2 GGUF is.

``benchmarks/paper_table.py`` loads SmolLM2-135M-Instruct from a GGUF file through
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` and
``AutoTokenizer.from_pretrained(folder, gguf_file=name)``. :func:`write_tiny_gguf` writes a
file of the same kind (architecture ``llama``, a ``gpt2`` byte-level BPE tokenizer, pre-tokenizer
``smollm``, ChatML special tokens), only tiny and in float32, so tests can exercise that loading
path without a download. Nothing is random beyond ``seed``: the same arguments give the same bytes.

Layout of the vocabulary (ids in this order):

* 0-2: ``<|endoftext|>``, ``<|im_start|>`` (bos), ``<|im_end|>`` (eos and pad), marked CONTROL;
* 3-258: the 256 byte-level symbols, byte 0 to byte 255 (GPT-2's ``bytes_to_unicode`` spelling);
* then one token per merge in :data:`MERGES`, so that ``" A"`` .. ``" E"``, ``" yes"``, ``" no"``
  and ``"Answer"`` are each a single token.

llama.cpp stores ``attn_q`` and ``attn_k`` with the rows of each head interleaved for its rotary
layout, and transformers undoes that on load. The file is written with llama.cpp's permutation,
so the weights transformers loads equal the ones returned here.

Typical use::

    info = write_tiny_gguf(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=info["name"])
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=info["name"])
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

#: Special tokens, in id order (0, 1, 2), as SmolLM2 numbers them.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Merges, best first, in byte-level spelling ("Ġ" is the space).
MERGES = [
    "Ġ A", "Ġ B", "Ġ C", "Ġ D", "Ġ E",
    "Ġ y", "e s", "Ġy es",
    "Ġ n", "Ġn o",
    "A n", "s w", "e r", "An sw", "Answ er",
]
#: A ChatML template like SmolLM2's, without its default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_symbols() -> list[str]:
    """GPT-2's byte-level spelling of bytes 0..255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return [spelling[byte] for byte in range(256)]


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head reordered from HF's half-split rotary layout to llama.cpp's interleaved one.

    The inverse of transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(
    folder: str | Path,
    name: str = "tiny.gguf",
    seed: int = 0,
    *,
    tied: bool = False,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    scale: float = 0.2,
) -> dict:
    """Write a tiny float32 Llama with a byte-level BPE tokenizer as a GGUF file.

    Parameters
    ----------
    folder : str or Path
        Folder to write into (created if missing); pass it as ``pretrained_model_name_or_path``.
    name : str, default "tiny.gguf"
        File name inside ``folder``; pass it as ``gguf_file``.
    seed : int, default 0
        Seed of the weights (numpy ``default_rng``). The same arguments write the same bytes.
    tied : bool, default False
        Whether the output projection is the token embedding. As in llama.cpp, a tied model has
        no ``output.weight`` tensor, and transformers then sets ``tie_word_embeddings=True``.
    hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size : int
        Shape of the model; ``hidden_size`` must be divisible by ``2 * num_heads``.
    scale : float, default 0.2
        Standard deviation of the matrices; RMSNorm weights are ``1 + scale * noise``.

    Returns
    -------
    dict
        ``path`` (Path of the file), ``name``, ``config`` (keyword arguments of a
        ``transformers.LlamaConfig`` matching what the file states, ``rms_norm_eps`` already
        rounded to float32 as stored), ``state_dict`` (float32 tensors under transformers'
        parameter names and in its ``(out, in)`` orientation, q/k un-permuted, including
        ``lm_head.weight`` equal to the embedding when ``tied``), ``tokens`` (the vocabulary as
        stored), ``merges``, ``token_ids`` (the id of each of ``" A"`` .. ``" E"``, ``" yes"``,
        ``" no"``, ``"Answer"`` and of each special token) and ``bos_token_id``,
        ``eos_token_id``, ``pad_token_id``.
    """
    head_dim = hidden_size // num_heads
    if head_dim * num_heads != hidden_size or head_dim % 2:
        raise ValueError("hidden_size must be divisible by 2 * num_heads")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name

    symbols = byte_symbols()
    tokens = [*SPECIAL_TOKENS, *symbols, *(merge.replace(" ", "") for merge in MERGES)]
    if len(set(tokens)) != len(tokens):
        raise AssertionError("a merge repeats a token")
    ids = {token: index for index, token in enumerate(tokens)}
    space = symbols[ord(" ")]
    token_ids = {text: ids[text.replace(" ", space)]
                 for text in [" A", " B", " C", " D", " E", " yes", " no", "Answer"]}
    token_ids.update({token: ids[token] for token in SPECIAL_TOKENS})
    bos, eos, pad = ids["<|im_start|>"], ids["<|im_end|>"], ids["<|im_end|>"]
    vocab = len(tokens)

    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (scale * rng.standard_normal((rows, cols))).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + scale * rng.standard_normal(hidden_size)).astype(np.float32)

    kv = num_kv_heads * head_dim
    hf: dict[str, np.ndarray] = {}  # transformers name -> array
    gguf_tensors: list[tuple[str, np.ndarray]] = []  # in the order written

    def put(hf_name: str, gguf_name: str, value: np.ndarray, stored: np.ndarray | None = None):
        hf[hf_name] = value
        gguf_tensors.append((gguf_name, value if stored is None else stored))

    put("model.embed_tokens.weight", "token_embd.weight", matrix(vocab, hidden_size))
    for layer in range(num_layers):
        pre, blk = f"model.layers.{layer}.", f"blk.{layer}."
        q, k = matrix(hidden_size, hidden_size), matrix(kv, hidden_size)
        put(pre + "input_layernorm.weight", blk + "attn_norm.weight", norm())
        put(pre + "self_attn.q_proj.weight", blk + "attn_q.weight", q,
            _llama_cpp_permute(q, num_heads))
        put(pre + "self_attn.k_proj.weight", blk + "attn_k.weight", k,
            _llama_cpp_permute(k, num_kv_heads))
        put(pre + "self_attn.v_proj.weight", blk + "attn_v.weight", matrix(kv, hidden_size))
        put(pre + "self_attn.o_proj.weight", blk + "attn_output.weight",
            matrix(hidden_size, hidden_size))
        put(pre + "post_attention_layernorm.weight", blk + "ffn_norm.weight", norm())
        put(pre + "mlp.gate_proj.weight", blk + "ffn_gate.weight",
            matrix(intermediate_size, hidden_size))
        put(pre + "mlp.up_proj.weight", blk + "ffn_up.weight",
            matrix(intermediate_size, hidden_size))
        put(pre + "mlp.down_proj.weight", blk + "ffn_down.weight",
            matrix(hidden_size, intermediate_size))
    put("model.norm.weight", "output_norm.weight", norm())
    if tied:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    else:
        put("lm_head.weight", "output.weight", matrix(vocab, hidden_size))

    rms_norm_eps = 1e-5
    rope_theta = 10000.0
    context = 256
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(num_layers)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden_size)
    writer.add_feed_forward_length(intermediate_size)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(head_dim)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(False)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if token in SPECIAL_TOKENS
                            else gguf.TokenType.NORMAL for token in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(ids["<|endoftext|>"])
    writer.add_pad_token_id(pad)
    writer.add_chat_template(CHAT_TEMPLATE)
    for gguf_name, value in gguf_tensors:
        writer.add_tensor(gguf_name, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    config = {
        "vocab_size": vocab,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": context,
        # stored as float32, and read back as that value
        "rms_norm_eps": float(np.float32(rms_norm_eps)),
        "rope_theta": rope_theta,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    return {
        "path": path,
        "name": name,
        "config": config,
        "state_dict": {key: torch.from_numpy(value.copy()) for key, value in hf.items()},
        "tokens": tokens,
        "merges": list(MERGES),
        "token_ids": token_ids,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
