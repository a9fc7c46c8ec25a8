"""Data helpers for answers that are text.

Values are checked against the naive scorer (C full forwards, tests/fixtures/naive_candidates.py)
and against each question scored alone without padding, in float64 to 1e-12 (both are
the same arithmetic up to summation order: measured ~1e-15). The command line and the
words demo over text answers are tested in tests/app/test_text_answers.py.
"""

import random

import pytest
import torch

from laplace_llm import CandidateScorer
from laplace_llm.data import (
    CandidateDataset,
    collate_candidates,
    label_indices,
    make_candidate_loader,
)
from tests.fixtures.models import tiny_llama_lora, tiny_tokenizer
from tests.fixtures.naive_candidates import NaiveScorer

WORDS = ["cat", "dog", "red", "blue", "good", "bad", "yes", "no", "the", "a"]


def text_mcqa(n, seed=0):
    """Questions with 2 to 4 answers of 1 to 3 words each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, 4)
        choices = [" ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(k)]
        out.append({"question": f"Which is {rng.choice(WORDS)} ?", "choices": choices,
                    "answer": rng.randrange(k)})
    return out


def test_candidate_batches_score_like_each_question_alone():
    tok = tiny_tokenizer(padding_side="left")
    model = tiny_llama_lora(seed=0, dtype=torch.float64)
    records = text_mcqa(6, seed=1)
    loader = make_candidate_loader(records, tok, batch_size=6)
    assert loader.dataset.n_candidates == 4
    batch = next(iter(loader))
    assert batch["candidate_mask"].sum(-1).tolist() == [len(r["choices"]) for r in records]
    sc = CandidateScorer(model, n_candidates=4)
    with torch.no_grad():
        scores = sc(batch)
        torch.testing.assert_close(scores, NaiveScorer(model)(batch), rtol=0, atol=1e-12)
        for b, r in enumerate(records):
            alone = collate_candidates([loader.dataset[b]], tok)
            one = CandidateScorer(model, n_candidates=len(r["choices"]))(alone)[0]
            torch.testing.assert_close(scores[b, : len(r["choices"])], one, rtol=0, atol=1e-12)
    # the candidate tokens are the choices after a space, the prompt has no letters
    first = loader.dataset[0]
    assert tok.decode(first["encoded"]["input_ids"]).endswith("Answer :")
    assert first["candidates"][0] == tok.encode(" " + records[0]["choices"][0], add_special_tokens=False)


def test_candidate_counts_must_agree_or_be_padded():
    tok = tiny_tokenizer()
    data = CandidateDataset(text_mcqa(5, seed=2), tok)
    items = [data[i] for i in range(5)]
    assert len({len(it["candidates"]) for it in items}) > 1
    with pytest.raises(ValueError, match="pass n_candidates"):
        collate_candidates(items, tok)
    with pytest.raises(ValueError, match="more than n_candidates=2"):
        collate_candidates(items, tok, n_candidates=2)
    with pytest.raises(ValueError, match="encodes to no token"):
        CandidateDataset([{"question": "a", "choices": ["cat", ""], "answer": 0}], tok)


def test_string_labels_name_choices():
    records = [{"text": "a", "label": "very bad"}, {"text": "b", "label": 0},
               {"text": "c", "label": " good "}]
    assert [r["label"] for r in label_indices(records, [" very bad", " good"])] == [0, 0, 1]
    with pytest.raises(ValueError, match="record 0: label 'very bad' is none of the choices"):
        label_indices(records, [" bad", " good"])


def test_text_answers_example_runs_and_laplace_lowers_the_nll(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "text_answers.py"
    spec = importlib.util.spec_from_file_location("example_text_answers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(quick=True)
    assert out["nll_laplace"] < out["nll_map"]
    assert len(out["sampled_answers"]) == 4 and out["answer_loglik_std"] > 0
    assert "answer_loglik" in capsys.readouterr().out
