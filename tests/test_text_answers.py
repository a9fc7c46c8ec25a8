"""Data helpers and the command line for answers that are text.

Values are checked against the naive scorer (C full forwards, tests/naive_candidates.py)
and against each question scored alone without padding, in float64 to 1e-12 (both are
the same arithmetic up to summation order: measured ~1e-15).
"""

import json
import random

import pytest
import torch

from laplace_llm import CandidateScorer
from laplace_llm.cli import main
from laplace_llm.data import (
    CandidateDataset,
    collate_candidates,
    label_indices,
    make_candidate_loader,
    read_jsonl,
)
from laplace_llm.evaluation import score
from tests.models import add_lora, tiny_causal_lm, tiny_llama_lora, tiny_tokenizer
from tests.naive_candidates import NaiveScorer

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


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    base = tiny_causal_lm("llama", seed=0)
    base.save_pretrained(root / "model")
    tiny_tokenizer(padding_side="left").save_pretrained(root / "model")
    add_lora(base, seed=0, r=4).save_pretrained(root / "adapter")
    (root / "mcqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text_mcqa(12, 3)))
    rng = random.Random(4)
    labels = ["very bad", "bad", "good"]
    texts = [{"text": " ".join(rng.sample(WORDS, 4)), "label": rng.choice(labels)}
             for _ in range(10)]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    return root


def api_map_metrics(root, loader_records, kind):
    """MAP metrics the Python API gives for the CLI's model, adapter and data."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from laplace_llm.candidates import text_answer_classifier

    tok = AutoTokenizer.from_pretrained(root / "model")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(root / "model"), root / "adapter", is_trainable=True
    ).eval()
    choices = [" very bad", " bad", " good"] if kind == "text" else None
    clf, loader = text_answer_classifier(model, tok, loader_records, kind, choices, 4)
    probs, labels = [], []
    with torch.no_grad():
        for batch in loader:
            probs.append(clf(batch).softmax(-1))
            labels.append(batch["labels"])
    return score(torch.cat(probs), torch.cat(labels))


@pytest.mark.parametrize("kind", ["mcqa", "text"])
def test_cli_fits_and_evaluates_text_answers(folders, tmp_path, kind):
    post = tmp_path / "posterior.safetensors"
    common = ["--model", folders / "model", "--adapter", folders / "adapter",
              "--data", folders / f"{kind}.jsonl", "--kind", kind, "--batch-size", 4, "--quiet"]
    common += (["--answer-format", "text"] if kind == "mcqa"
               else ["--choices", " very bad", " bad", " good"])
    common = [str(a) for a in common]
    assert main(["fit", *common, "--posterior", str(post), "--fisher-type", "ggn"]) == 0
    assert main(["evaluate", *common, "--posterior", str(post), "--out", str(tmp_path),
                 "--mc-samples", "20"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    records = read_jsonl(folders / f"{kind}.jsonl", kind)
    assert report["n"] == len(records)
    want = api_map_metrics(folders, records, kind)
    for key in ("accuracy", "nll"):
        assert report["results"]["data"]["map"][key] == pytest.approx(want[key], rel=1e-6)
    la = report["results"]["data"]["la_probit"]
    assert 0 <= la["ece"] <= 1 and la["nll"] > 0


def test_cli_reports_a_bad_label_string(folders, tmp_path, capsys):
    args = ["fit", "--model", folders / "model", "--adapter", folders / "adapter",
            "--data", folders / "text.jsonl", "--kind", "text", "--choices", " bad", " good",
            "--posterior", tmp_path / "p.safetensors", "--quiet"]
    assert main([str(a) for a in args]) == 2
    assert "label 'very bad' is none of the choices" in capsys.readouterr().err


def test_text_answers_example_runs_and_laplace_lowers_the_nll(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "text_answers.py"
    spec = importlib.util.spec_from_file_location("example_text_answers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(quick=True)
    assert out["nll_laplace"] < out["nll_map"]
    assert len(out["sampled_answers"]) == 4 and out["answer_loglik_std"] > 0
    assert "answer_loglik" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_words_demo_laplace_lowers_calibration_error(tmp_path):
    """``laplace-llm demo --quick --answers words`` (seed 0): phrases of 1-3 tokens scored
    by likelihood. Measured: ECE 0.161 → 0.094 (probit) / 0.139 (MC) in distribution,
    MC NLL 0.768 → 0.759; under shift NLL 1.81 → 1.34 / 1.10. The probit NLL in
    distribution is slightly worse (0.789): see the README on probit with text answers."""
    assert main(["demo", "--quick", "--answers", "words", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["config"]["answers"] == "words"
    ident, shift = report["results"]["id"], report["results"]["shift"]
    for split in (ident, shift):
        assert split["la_probit"]["ece"] < split["map"]["ece"]
        assert split["la_mc"]["ece"] < split["map"]["ece"]
        assert split["la_mc"]["nll"] < split["map"]["nll"]
    assert shift["la_probit"]["nll"] < shift["map"]["nll"]


def test_words_task_answers_are_phrases_of_one_to_three_tokens():
    from laplace_llm.demo import build_tokenizer
    from laplace_llm.demo_words import PHRASES, WordsDemoTask

    task = WordsDemoTask(6, 4, seed=0)
    tok = build_tokenizer(task.words)
    assert [len(tok.encode(" " + p, add_special_tokens=False)) for p in PHRASES] == [1, 2, 3, 1]
    assert tok.unk_token_id not in tok.encode(task.pretraining_text(random.Random(1)))
    record = task.question(random.Random(2))
    assert record["choices"] == PHRASES
    text = task.text_records([record])[0]["text"]
    assert text.endswith("is which ?\nAnswer:") and " A." not in text
    fact = task.fact(random.Random(3), "e1")
    assert fact.removeprefix("e1 is ").removesuffix(" .") in PHRASES
