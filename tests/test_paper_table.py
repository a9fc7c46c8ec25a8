"""benchmarks/paper_table.py: its statistics (paired bootstrap, the ECE of a calibrated
predictor), its data rules (leak removal, your own set), TFB's draw, and (slow) the quick run
on the real SmolLM2, from a data folder the repository does not have."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from laplace_llm.tools import metrics

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality" / "paper_table.py"


def load_script(name: str = "paper_table"):
    return importlib.import_module(f"benchmarks.quality.{name}")


def _probs(n, c, seed, sharp=2.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(n, c, generator=gen, dtype=torch.float64), -1)


def _row(probs, labels):
    return {"probs": {"test": probs.tolist()}, "labels": {"test": labels.tolist()}}


def test_resampled_metrics_equal_the_library_metrics_on_the_full_set():
    """The bootstrap's vectorised accuracy, ECE (15 bins) and NLL, on the identity resample,
    are the library's metrics."""
    pt = load_script()
    probs = _probs(300, 4, 0)
    labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1))[:, 0]
    got = pt.resampled(probs.numpy(), labels.numpy(), np.arange(300)[None])
    assert got["accuracy"][0] == pytest.approx(metrics.accuracy(probs, labels), abs=1e-12)
    assert got["ece"][0] == pytest.approx(metrics.ece(probs, labels), abs=1e-12)
    assert got["nll"][0] == pytest.approx(metrics.nll(probs, labels), abs=1e-9)


def test_paired_interval_is_zero_for_a_row_against_itself_and_excludes_zero_for_a_clear_gain():
    """Against itself every resample's difference is 0. A predictor that is right on every
    question against one right on a third of them: Δaccuracy's interval lies near +2/3 and
    excludes 0; two seeds pool into the mean of their differences."""
    pt = load_script()
    n = 300
    labels = np.arange(n) % 3
    good = np.full((n, 3), 0.05)
    good[np.arange(n), labels] = 0.9
    bad = np.full((n, 3), 0.05)
    bad[np.arange(n), 0] = 0.9  # right on the third whose label is 0
    same = pt.paired_interval([_row(good, labels)], [_row(good, labels)], reps=200)
    assert all(v == (0.0, 0.0, 0.0) for v in same.values())
    d = pt.paired_interval([_row(good, labels)], [_row(bad, labels)], reps=500)
    point, lo, hi = d["accuracy"]
    assert point == pytest.approx(2 / 3)
    assert 0.55 < lo < point < hi < 0.78
    assert pt.verdict(d["nll"]) == "win" and pt.verdict(tuple(-v for v in d["nll"])) == "loss"
    pooled = pt.paired_interval([_row(good, labels), _row(good, labels)],
                                [_row(bad, labels), _row(good, labels)], reps=200)
    assert pooled["accuracy"][0] == pytest.approx(1 / 3)


def test_calibrated_ece_is_the_noise_floor_of_a_calibrated_predictor():
    """Labels drawn from the probabilities themselves: the mean ECE shrinks like 1/√n
    (ratio ≈ 2 from n = 250 to 1,000 within sampling error) and a confident predictor that
    is always right has none."""
    pt = load_script()
    small = pt.calibrated_ece(_probs(250, 4, 2).numpy(), draws=300)
    large = pt.calibrated_ece(_probs(1000, 4, 2).numpy(), draws=300)
    assert 1.6 < small / large < 2.5
    assert 0.02 < large < 0.06
    sure = np.zeros((50, 3))
    sure[:, 1] = 1.0
    assert pt.calibrated_ece(sure) == 0.0


def _write_set(folder: Path, n_train=40, n_test=30, n_choices=3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                a, b = int(rng.integers(1, 9)), int(rng.integers(1, 9))
                choices = [str(a + b + k) for k in range(n_choices)]
                order = rng.permutation(n_choices)
                q = f"passage {split} {i}\nQuestion: what is {a} plus {b}?"
                fh.write(json.dumps({"question": q, "choices": [choices[j] for j in order],
                                     "label": int(np.argmin(order))}) + "\n")
    return folder


def test_own_set_splits_remove_test_rows_whose_context_is_in_train(tmp_path):
    """``--data-dir``: validation comes from train; a test row whose passage occurs in the
    train split (BoolQ's leak) is removed; the test questions are the same for every seed."""
    pt = load_script()
    folder = _write_set(tmp_path / "myset")
    lines = (folder / "test.jsonl").read_text().splitlines()
    leak = json.loads(lines[0])
    leak["question"] = "passage train 3\nQuestion: a paraphrase?"
    (folder / "test.jsonl").write_text("\n".join([json.dumps(leak)] + lines[1:]) + "\n")

    class Args:
        data_dir, n_choices, max_chars = str(folder), 3, 450
        n_train, n_val, n_test = 20, 10, 100

    a, b = pt.splits("myset", 0, Args), pt.splits("myset", 1, Args)
    assert len(a["train"]) == 20 and len(a["val"]) == 10 and len(a["test"]) == 29
    assert all("passage train 3" not in r["question"] for r in a["test"])
    assert a["test"] == b["test"] and a["train"] != b["train"]
    assert not {r["question"] for r in a["train"]} & {r["question"] for r in a["val"]}
    Args.n_train = 35
    with pytest.raises(ValueError, match="fewer than --n-train"):
        pt.splits("myset", 0, Args)


def test_tfb_moves_each_weight_update_inside_its_column_space_by_sigma():
    """TFB's draw on a LoRA layer: ``B (A' − A) = σ U ξ`` lies in B's column space, with
    per-entry variance σ² there (mean of (Uᵀ B (A' − A))² over entries ≈ σ² to sampling
    error: 2,048 entries, relative sd ≈ 3 %); σ = 0 and ``restore`` give the MAP back."""
    from peft import LoraConfig, get_peft_model

    pt = load_script()
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(256, 64))
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["0"], lora_alpha=8))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    A0 = layer.lora_A["default"].weight.detach().clone()
    B = layer.lora_B["default"].weight.detach().double()
    tfb = pt.Bayesianizer(model, seed=0)
    assert len(tfb.pairs) == 1
    gen = torch.Generator().manual_seed(0)
    tfb.draw(0.3, gen)
    moved = B @ (layer.lora_A["default"].weight.detach().double() - A0.double())
    U = torch.linalg.svd(B, full_matrices=False)[0]
    torch.testing.assert_close(moved - U @ (U.T @ moved), torch.zeros_like(moved),
                               rtol=0, atol=1e-4)
    assert float((U.T @ moved).square().mean()) == pytest.approx(0.09, rel=0.12)
    tfb.restore()
    assert torch.equal(layer.lora_A["default"].weight, A0)
    tfb.draw(0.0, gen)
    assert torch.equal(layer.lora_A["default"].weight, A0)


@pytest.mark.slow  # SmolLM2 on 16/8/16 questions of a set made here: ~5-8 min on 2 cores
def test_quick_run_on_your_own_set_writes_every_row_resumes_and_renders(tmp_path):
    """``--data-dir DIR --n-choices 3 --quick`` on a set that is not in the repository:
    every row is written, its stored metrics are those of its stored probabilities, the
    Laplace rows of one prior share their moments, a rerun changes nothing, and the table
    carries the intervals and the goal check."""
    pt = load_script()
    folder = _write_set(tmp_path / "sums", n_train=40, n_test=30)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--data-dir", str(folder), "--n-choices", "3", "--quick", "--quiet",
            "--out", str(out), "--work", str(work)]
    pt.main(argv)
    rows = pt.load_rows(out)["sums"][0]
    assert set(rows) == set(pt.METHODS) - {"deep_ensemble"}
    for row in rows.values():
        probs = torch.tensor(row["probs"]["test"], dtype=torch.float64)
        labels = torch.tensor(row["labels"]["test"])
        assert len(labels) == 16
        assert row["test"]["accuracy"] == pytest.approx(metrics.accuracy(probs, labels))
        assert row["test"]["nll"] == pytest.approx(metrics.nll(probs, labels), rel=1e-9)
    assert rows["la_lt_probit"]["mean_prior"] == rows["la_lt_mc"]["mean_prior"]
    recipe = json.loads((out / "sums" / "seed0" / "recipe.json").read_text())
    assert recipe["reduction"] in ("sum", "mean") and recipe["n_choices"] == 3
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    pt.main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == stamps
    table = (out / "table.md").read_text()
    assert "**Goal check**" in table and "**Prior study**" in table
    assert "| TFB (training-free Bayesianization) | 0 |" in table  # its seeds


def test_headline_shows_a_row_some_seeds_lack_over_the_seeds_that_have_it(monkeypatch, tmp_path):
    """TFB on seed 0 only: its cell is seed 0's metrics, marked "(seed 0)", and its ΔNLL
    interval is the paired one over seed 0 alone (not "—", as the table printed before)."""
    pt = load_script()
    labels = torch.arange(40) % 4
    ours = f"la_{pt.DEFAULT_PRIOR}_{pt.PRIMARY}"

    def row(seed, sharp):
        r = _row(_probs(40, 4, seed, sharp), labels)
        p = torch.tensor(r["probs"]["test"])
        r["test"] = {"accuracy": metrics.accuracy(p, labels), "nll": metrics.nll(p, labels),
                     "ece": 0.1}
        r["train_nll"] = 0.05
        return r

    seeds = {s: {"map": row(s, 4.0), "ts_val": row(10 + s, 1.0), "ts_train": row(20 + s, 5.0),
                 ours: row(30 + s, 0.5)} for s in (0, 1)}
    seeds[0]["tfb"] = row(40, 3.0)
    monkeypatch.setattr(pt, "load_rows", lambda out: {"arc_easy": seeds})
    text = pt.headline(tmp_path, ["arc_easy"])
    tfb = seeds[0]["tfb"]["test"]
    cell = f"{100 * tfb['accuracy']:.1f} / 10.0 / {tfb['nll']:.3f} (seed 0)"
    assert f"| {cell} |" in text
    d = pt.paired_interval([seeds[0][ours]], [seeds[0]["tfb"]])["nll"]
    assert text.rstrip().endswith(f"| {pt.fmt_interval(d, 1, 3)} |")
    assert "| ARC-Easy (0, 1; 0.050, 0.050) |" in text
