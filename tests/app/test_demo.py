"""``laplace-llm demo --quick``: the reduced demo end to end, and its generated task.

What is asserted of the quick run (seed 0) was checked on seeds 0, 1 and 2: Laplace
(GLM probit) has a lower NLL and ECE than MAP in distribution, and accuracy moves by
less than 2 points (256 test questions: one question is 0.4 points). The quick model
is over-confident: its training NLL is far below its held-out NLL.
"""

import json
import math
import random

import pytest

from laplace_llm.app.cli import main
from laplace_llm.app.demo import DemoConfig
from laplace_llm.app.demo_task import COLOURS, DemoTask, build_tokenizer
from laplace_llm.app.evaluation import METHODS, METRICS, OOD_METRICS
from laplace_llm.data import format_mcqa_prompt


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--seed", "0", "--out", str(out), "--quiet"]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_quick_demo_writes_every_metric_and_the_diagrams(quick_run):
    out, report = quick_run
    for split in ("id", "shift"):
        assert list(report["results"][split]) == ["map", "ts", *METHODS[1:]]
        for values in report["results"][split].values():
            # the id rows also carry the AUROC of telling id from shift questions
            assert set(values) == set(METRICS) | (set(OOD_METRICS) if split == "id" else set())
            assert all(math.isfinite(v) for v in values.values())
        for name in ("reliability", "risk_coverage"):
            png = out / f"{name}_{split}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert report["files"][f"{name}_{split}"] == str(png)
    assert report["config"] == {**report["config"], "seed": 0, "n_train": 128}


def test_quick_demo_laplace_is_better_calibrated_in_distribution(quick_run):
    _, report = quick_run
    map_, la = report["results"]["id"]["map"], report["results"]["id"]["la_probit"]
    assert la["nll"] < map_["nll"]
    assert la["ece"] < map_["ece"]
    assert abs(la["accuracy"] - map_["accuracy"]) < 0.02
    # over-confident fine-tune: train NLL well below held-out NLL
    assert report["train"]["map"]["nll"] < 0.5 * map_["nll"]


def test_quick_demo_reports_aurc_ood_auroc_and_temperature_scaling_in_range(quick_run):
    """AURC lies between its perfect-ranking bound ``e + (1 - e) log(1 - e)`` (``e`` the
    error rate) and 1; OOD AUROCs in [0, 1], and above chance; the Monte-Carlo predictive
    tells the shifted prompts (longer, less certain) apart better than the MAP (quick seed
    0 from the shipped base: MAP 0.644, LA probit 0.634, LA MC 0.669); temperature scaling
    keeps MAP's predictions and lowers its NLL (T = 1.28 there)."""
    _, report = quick_run
    for by_method in report["results"].values():
        for values in by_method.values():
            e = 1 - values["accuracy"]
            assert e + (1 - e) * math.log(1 - e) - 1e-12 <= values["aurc"] <= 1
    for values in report["results"]["id"].values():
        assert all(0 <= values[m] <= 1 for m in OOD_METRICS)
    id_ = report["results"]["id"]
    assert min(v["ood_auroc"] for v in id_.values()) > 0.5
    assert id_["la_mc"]["ood_auroc"] > id_["map"]["ood_auroc"]
    assert report["temperature"] > 1  # an over-confident MAP is cooled
    for split in ("id", "shift"):
        ts, map_ = report["results"][split]["ts"], report["results"][split]["map"]
        assert ts["accuracy"] == map_["accuracy"]
        assert ts["nll"] < map_["nll"]


def test_quick_demo_reports_the_evidence_of_each_checkpoint(quick_run):
    _, report = quick_run
    epochs = [row["epoch"] for row in report["evidence"]]
    assert epochs == sorted({*DemoConfig.quick().checkpoints, DemoConfig.quick().epochs})
    for row in report["evidence"]:
        assert math.isfinite(row["log_marglik"]) and row["log_marglik"] < 0
        assert row["prior_precision"] > 0
    best = max(report["evidence"], key=lambda r: r["log_marglik"])
    assert report["evidence_choice"] == best["epoch"]
    assert report["evidence"][-1]["log_marglik"] == report["log_marglik"]


def test_demo_prints_the_table(tmp_path, capsys, monkeypatch):
    """The CLI layer prints what run_demo returns (run_demo itself is stubbed here)."""
    import laplace_llm.app.demo as demo

    fake = {
        "results": {s: {m: dict.fromkeys(METRICS, 0.5) for m in METHODS} for s in ("id", "shift")},
        "train": {"map": {"nll": 0.1, "accuracy": 0.9}}, "bayes_nll": 0.56,
        "prior_precision": 3.0, "log_marglik": -10.0,
        "evidence": [{"epoch": 3, "log_marglik": -10.0, "prior_precision": 3.0,
                      "heldout_nll_map": 0.9, "heldout_nll_la": 0.8}],
        "evidence_choice": 3, "heldout_choice": 3, "seconds": {"total": 1.0},
        "files": {"metrics": "m.json"},
    }
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: fake)
    assert main(["demo", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "LA (GLM probit)" in text and "LA (GLM MC)" in text and "MAP" in text
    assert "the evidence picks epoch 3" in text


def test_task_gives_the_main_colour_with_probability_p_main():
    task = DemoTask(n_entities=4, n_distractors=8, seed=0, p_main=0.75)
    records = task.questions(4000, seed=1)
    entity = {r["question"].split()[2] for r in records}
    assert entity <= set(task.entities)
    main_share = sum(
        r["answer"] == task.main[r["question"].split()[2]] for r in records
    ) / len(records)
    assert main_share == pytest.approx(0.75, abs=0.03)
    assert all(r["choices"] == COLOURS for r in records)
    assert task.bayes_nll() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_task_texts_are_all_known_words_and_shifted_prompts_are_longer():
    task = DemoTask(n_entities=6, n_distractors=8, seed=0)
    tok = build_tokenizer(task.words)
    rng = random.Random(0)
    texts = [task.pretraining_text(rng) for _ in range(50)]
    plain = [format_mcqa_prompt(r) for r in task.questions(50, seed=2)]
    shifted = [format_mcqa_prompt(r) for r in task.questions(50, seed=2, shifted=True)]
    for text in texts + plain + shifted:
        assert tok.unk_token_id not in tok(text)["input_ids"]
    length = lambda ts: sum(len(tok(t)["input_ids"]) for t in ts) / len(ts)  # noqa: E731
    assert length(shifted) > length(plain) + 5
    # one token per answer letter, as LLMClassifier.from_choices needs
    assert [len(tok.encode(c, add_special_tokens=False)) for c in (" A", " B", " C", " D")] == [1] * 4


def test_quick_demo_reports_last_layer_laplace_beside_full_lora_laplace(tmp_path, capsys):
    """--llla: LoRA on lm_head as well; LLLA (only lm_head's LoRA pair Bayesian) and
    Laplace over all LoRA weights both lower the held-out NLL of MAP. With laplace-torch's
    evidence (the default) LLLA lowers it more on this quick run (seed 0, shipped base:
    NLL 1.109 MAP, 0.890 LLLA probit, 0.938 LA probit; MC 0.839 LLLA, 0.901 LA)."""
    assert main(["demo", "--quick", "--llla", "--seed", "0", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    nll = {m: v["nll"] for m, v in report["results"]["id"].items()}
    assert max(nll["la_probit"], nll["llla_probit"], nll["la_mc"], nll["llla_mc"]) < nll["map"]
    # the lm_head LoRA pair: A is r × hidden, B is vocabulary × r
    cfg = report["config"]
    vocab = len(DemoTask(cfg["n_entities"], cfg["n_distractors"], 0).words)
    assert report["llla"]["n_params"] == cfg["lora_r"] * (cfg["hidden"] + vocab)
    assert "LLLA (probit)" in capsys.readouterr().out
