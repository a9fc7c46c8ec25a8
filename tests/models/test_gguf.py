"""The tiny GGUF of tests/fixtures/tiny_gguf.py loads through transformers' GGUF path as what was written.

The file is loaded with ``from_pretrained(folder, gguf_file=name)``, the call that loads the real
SmolLM2 GGUF in benchmarks/paper_table.py; the checks compare values (config, every parameter,
token ids, logits, file bytes), not only shapes.
"""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tests.fixtures.tiny_gguf import MERGES, SPECIAL_TOKENS, _llama_cpp_permute, write_tiny_gguf

PROMPT = "Which is hot?\nA. ice\nB. fire\nAnswer:"
ANSWERS = [" A", " B", " C", " D", " E"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return folder, write_tiny_gguf(folder, seed=0)


@pytest.fixture(scope="module")
def loaded_model(written):
    folder, info = written
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=info["name"]).eval()


@pytest.fixture(scope="module")
def tokenizer(written):
    folder, info = written
    return AutoTokenizer.from_pretrained(folder, gguf_file=info["name"])


def assert_config(config, expected):
    for key, value in expected.items():
        if key == "rope_theta":  # transformers 5 keeps it in rope_parameters
            assert config.rope_parameters["rope_theta"] == value
        else:
            assert getattr(config, key) == value, key


def test_model_is_the_llama_written(written, loaded_model):
    _, info = written
    assert type(loaded_model) is LlamaForCausalLM
    assert loaded_model.config.model_type == "llama"
    assert_config(loaded_model.config, info["config"])
    assert not loaded_model.config.tie_word_embeddings
    params = dict(loaded_model.named_parameters())
    assert set(params) == set(info["state_dict"])
    for name, expected in info["state_dict"].items():
        assert params[name].dtype == torch.float32, name
        # f32 in, f32 out, un-permuted by transformers: bit for bit
        assert torch.equal(params[name].detach(), expected), name


def test_tied_file_loads_with_tied_embeddings(tmp_path):
    info = write_tiny_gguf(tmp_path, seed=3, tied=True)
    reader = gguf.GGUFReader(info["path"])
    assert "output.weight" not in {t.name for t in reader.tensors}
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=info["name"])
    assert model.config.tie_word_embeddings
    assert_config(model.config, info["config"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    state = model.state_dict()
    for name, expected in info["state_dict"].items():
        assert torch.equal(state[name], expected), name


def test_file_stores_q_and_k_permuted_as_llama_cpp_does(written):
    _, info = written
    config, sd = info["config"], info["state_dict"]
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(info["path"]).tensors}
    q = sd["model.layers.1.self_attn.q_proj.weight"].numpy()
    k = sd["model.layers.1.self_attn.k_proj.weight"].numpy()
    v = sd["model.layers.1.self_attn.v_proj.weight"].numpy()
    # numpy orientation on disk is transformers' (out, in); q and k are permuted, v is not
    np.testing.assert_array_equal(
        stored["blk.1.attn_q.weight"], _llama_cpp_permute(q, config["num_attention_heads"]))
    np.testing.assert_array_equal(
        stored["blk.1.attn_k.weight"], _llama_cpp_permute(k, config["num_key_value_heads"]))
    np.testing.assert_array_equal(stored["blk.1.attn_v.weight"], v)
    # so the equality in test_model_is_the_llama_written does check the un-permutation
    assert not np.array_equal(stored["blk.1.attn_q.weight"], q)
    assert not np.array_equal(stored["blk.1.attn_k.weight"], k)


def test_tokenizer_from_gguf(written, tokenizer):
    _, info = written
    ids = info["token_ids"]
    assert tokenizer.get_vocab() == {token: i for i, token in enumerate(info["tokens"])}
    assert len(tokenizer) == info["config"]["vocab_size"]

    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ANSWERS]
    assert encoded == [[ids[text]] for text in ANSWERS]
    assert len({e[0] for e in encoded}) == len(ANSWERS)
    for text in [" yes", " no", "Answer"]:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [ids[text]]

    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert tokenizer.decode(prompt_ids) == PROMPT
    assert prompt_ids[0] != info["bos_token_id"]  # add_bos_token is False, as in SmolLM2's file
    assert ids["Answer"] in prompt_ids
    # an answer after the prompt stays one token, appended to the prompt's ids
    assert tokenizer(PROMPT + " C")["input_ids"] == prompt_ids + [ids[" C"]]

    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == info["bos_token_id"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == info["eos_token_id"]
    assert tokenizer.pad_token_id == info["pad_token_id"]
    chat = "<|im_start|>user\nA?<|im_end|>"
    chat_ids = tokenizer(chat)["input_ids"]
    assert chat_ids[0] == ids["<|im_start|>"] and chat_ids[-1] == ids["<|im_end|>"]
    assert tokenizer.decode(chat_ids) == chat
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)
    assert len(MERGES) == len(info["tokens"]) - len(SPECIAL_TOKENS) - 256


def test_logits_match_llama_built_directly(written, loaded_model, tokenizer):
    _, info = written
    direct = LlamaForCausalLM(LlamaConfig(**info["config"])).eval()
    direct.load_state_dict(info["state_dict"], strict=True)
    batch = tokenizer([PROMPT + " A"], return_tensors="pt")
    with torch.no_grad():
        got = loaded_model(**batch).logits
        want = direct(**batch).logits
    assert got.shape == (1, batch["input_ids"].shape[1], info["config"]["vocab_size"])
    assert want.std() > 0.1  # weights large enough that the comparison means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_same_seed_writes_the_same_bytes(tmp_path):
    first = write_tiny_gguf(tmp_path / "a", seed=7)["path"].read_bytes()
    second = write_tiny_gguf(tmp_path / "b", seed=7)["path"].read_bytes()
    other = write_tiny_gguf(tmp_path / "c", seed=8)["path"].read_bytes()
    assert first == second
    assert len(other) == len(first) and other != first
