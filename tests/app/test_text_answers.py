"""The command line and the words demo for answers that are text.

The CLI's MAP metrics are checked against the Python API on the same model, adapter and
data (relative 1e-6).
"""

import json
import random

import pytest
import torch

from laplace_llm.app.cli import main
from laplace_llm.app.evaluation import score
from laplace_llm.data import read_jsonl
from tests.data.test_candidates import WORDS, text_mcqa
from tests.fixtures.models import write_model_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    write_model_folder(root)
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

    from laplace_llm.app.loading import text_answer_classifier

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


@pytest.mark.slow
def test_quick_words_demo_laplace_lowers_calibration_error(tmp_path):
    """``laplace-llm demo --quick --answers words`` (seed 0, shipped base): phrases of 1-3
    tokens scored by likelihood, laplace-torch's evidence (the default; prior 7.2).
    Measured: probit ECE 0.177 → 0.085 in distribution and 0.147 → 0.129 under shift,
    probit NLL 0.832 → 0.819 in distribution. Not asserted, because they do not hold on
    this quick model: MC's NLL rises (0.848 in distribution, 0.813 → 0.888 under shift)
    and so does probit's under shift (0.838); the README's text-answer section says so."""
    assert main(["demo", "--quick", "--answers", "words", "--out", str(tmp_path),
                 "--quiet"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["config"]["answers"] == "words"
    ident, shift = report["results"]["id"], report["results"]["shift"]
    for split in (ident, shift):
        assert split["la_probit"]["ece"] < split["map"]["ece"]
    assert ident["la_mc"]["ece"] < ident["map"]["ece"]
    assert ident["la_probit"]["nll"] < ident["map"]["nll"]


def test_words_task_answers_are_phrases_of_one_to_three_tokens():
    from laplace_llm.app.demo_task import build_tokenizer
    from laplace_llm.app.demo_words import PHRASES, WordsDemoTask

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
