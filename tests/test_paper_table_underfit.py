"""benchmarks/paper_table_underfit.py (the first comparison, kept to reproduce its rows) on the real SmolLM2 (installed by .ci/run): the quick run writes
every (set, seed, method) row, the rows agree with their own probabilities, a second run
resumes without redoing anything, and the deep ensemble is rendered from the seeds' MAPs."""

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from laplace_llm.tools import metrics

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality" / "paper_table_underfit.py"


def load_script(name: str = "paper_table_underfit"):
    return importlib.import_module(f"benchmarks.quality.{name}")


def test_centred_moments_are_the_moments_of_the_centred_logits():
    pt = load_script()
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2)
    samples = mu + torch.einsum("bij,sbj->sbi", torch.linalg.cholesky(cov),
                                torch.randn(200_000, 3, 4, generator=gen, dtype=torch.float64))
    centred = samples - pt.CENTER * samples.mean(-1, keepdim=True)
    m, c = pt.centred(mu, cov)
    torch.testing.assert_close(m, mu - pt.CENTER * mu.mean(-1, keepdim=True))
    emp = torch.einsum("sbi,sbj->bij", centred - m, centred - m) / len(samples)
    torch.testing.assert_close(c, emp, rtol=0, atol=0.05 * float(cov.abs().max()))
    # softmax ignores the offset: MC of centred and raw moments agree
    torch.testing.assert_close(pt.monte_carlo(m, c + 1e-9 * torch.eye(4), 20_000, 0),
                               pt.monte_carlo(mu, cov, 20_000, 0), rtol=0, atol=0.02)


def test_contrasts_make_the_probit_blind_to_a_common_offset():
    """predictive_agreement's full centring: adding a random common offset to every logit
    (mean shift and its variance along 1) changes laplace-torch's probit, but neither the
    contrasts' probit nor the exact (MC) predictive, which it leaves unchanged."""
    agreement = load_script("predictive_agreement")
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    a = torch.randn(64, 4, 4, generator=gen, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) + 0.1 * torch.eye(4, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    mu_s = mu - 20.0  # a large common offset with a large variance, as summed scores have
    cov_s = cov + 50.0 * torch.outer(ones, ones)
    assert not torch.allclose(agreement.probit(mu, cov), agreement.probit(mu_s, cov_s), atol=0.05)
    torch.testing.assert_close(agreement.probit(*agreement.centre(mu, cov, 1.0)),
                               agreement.probit(*agreement.centre(mu_s, cov_s, 1.0)))
    # the exact predictive ignores the offset (same normal draws, both factorisations
    # exact): Monte Carlo of the raw and the shifted moments agree to sampling error
    torch.testing.assert_close(agreement.monte_carlo(mu, cov, 40_000, 0),
                               agreement.monte_carlo(mu_s, cov_s, 40_000, 0), rtol=0, atol=0.02)


@pytest.mark.slow  # SmolLM2 on 16/8/16 questions, every method: ~3-5 min on 2 cores
def test_quick_run_writes_every_row_resumes_and_renders_a_deep_ensemble(tmp_path):
    pt = load_script()
    out, work = tmp_path / "out", tmp_path / "work"
    pt.main(["--quick", "--out", str(out), "--work", str(work)])
    rows = pt.load_rows(out)["openbookqa"][0]
    assert set(rows) == set(pt.METHODS) - {"deep_ensemble"}
    for row in rows.values():
        probs = torch.tensor(row["probs"]["test"], dtype=torch.float64)  # as written
        labels = torch.tensor(row["labels"]["test"])
        assert len(labels) == 16
        # the stored metrics are those of the stored probabilities
        assert row["test"]["accuracy"] == pytest.approx(metrics.accuracy(probs, labels))
        assert row["test"]["nll"] == pytest.approx(metrics.nll(probs, labels), rel=1e-5)
        assert "shift" in row and 0.0 <= row["ood_auroc"] <= 1.0
        torch.testing.assert_close(probs.sum(-1), torch.ones(16, dtype=probs.dtype),
                                   rtol=0, atol=1e-5)
    # one curvature, three priors: laplace-torch's evidence row uses its own prior
    assert rows["la_map_probit"]["prior"] == rows["la_map_mc"]["prior"]
    assert 0.0 <= rows["la_map_mc"]["mc_agrees_with_probit"] <= 1.0

    # the exported GLM moments are the ones the rows were computed from
    from safetensors import safe_open

    with safe_open(out / "openbookqa" / "seed0" / "glm_moments.safetensors", "pt") as f:
        k = f.metadata()["priors"].split(",").index("map")
        for split in ("test", "shift", "ood"):
            mu, cov = f.get_tensor(f"{split}.mean")[k], f.get_tensor(f"{split}.cov")[k]
            torch.testing.assert_close(
                pt.probit(mu, cov),
                torch.tensor(rows["la_map_probit"]["probs"][split], dtype=torch.float64),
                rtol=0, atol=1e-12)
    agreement = load_script("predictive_agreement")
    agreement.main(["--results", str(out), "--reference-samples", "20000"])
    measured = json.loads((out / "predictive_agreement.json").read_text())
    assert [(r["set"], r["seed"]) for r in measured] == [("openbookqa", 0)]
    # same moments, same 1,000-sample draw as the row: the same agreement
    assert measured[0]["probit_mc"] == rows["la_map_mc"]["mc_agrees_with_probit"]

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    pt.main(["--quick", "--out", str(out), "--work", str(work)])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == stamps

    # a second seed with the same MAP: the deep ensemble equals that MAP
    shutil.copytree(out / "openbookqa" / "seed0", out / "openbookqa" / "seed1")
    for path in (out / "openbookqa" / "seed1").glob("*.json"):
        row = json.loads(path.read_text())
        row["seed"] = 1
        path.write_text(json.dumps(row))
    table = pt.render(out)
    line = next(x for x in table.splitlines() if x.startswith("| Deep ensemble"))
    acc = 100 * rows["map"]["test"]["accuracy"]
    assert f"| 2 members | {acc:.1f} |" in line
    map_probs = np.array(rows["map"]["probs"]["test"])
    assert pt.deep_ensemble(pt.load_rows(out)["openbookqa"])["test"]["nll"] == pytest.approx(
        metrics.nll(torch.tensor(map_probs), torch.tensor(rows["map"]["labels"]["test"])))


def test_goal_check_compares_the_default_with_map_ts_and_the_best_ensemble(tmp_path):
    """goal_table's verdicts from hand-made rows: the means over seeds and the rule (lower
    ECE and NLL than the MAP, accuracy at most 1 point lower) decide "met"; TS and the best
    ensemble (lowest NLL; the deep ensemble scored from the seeds' MAP probabilities) are
    beaten, mixed or lost to by the same pair of numbers."""
    pt = load_script()
    labels = [0, 1, 0, 1]
    probs = {0: [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]],  # 3 of 4 right
             1: [[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]]}  # 2 of 4 right

    def write(seed, method, acc, ece, nll, p=None):
        row = {"set": "arc_easy", "seed": seed, "method": method, "n_test": 4,
               "test": {"accuracy": acc, "ece": ece, "nll": nll, "brier": 0.5, "aurc": 0.3}}
        if p is not None:
            row |= {"probs": {"test": p}, "labels": {"test": labels}}
        path = tmp_path / "arc_easy" / f"seed{seed}" / f"{method}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row))

    for seed in (0, 1):
        write(seed, "map", 0.60 + 0.01 * seed, 0.20, 1.70, probs[seed])
        write(seed, "ts", 0.60 + 0.01 * seed, 0.10 + 0.04 * seed, 1.00)  # mean ECE 0.12
        write(seed, "mc_dropout", 0.60, 0.19, 1.69)
        write(seed, "la_map_mc", 0.61, 0.11, 0.95)  # +0.5 pt; TS: ECE 11 vs 12, NLL 0.95 vs 1
        write(seed, "la_map_probit", 0.58, 0.13, 1.04)  # -2.5 pt: not met
    table = pt.goal_table(tmp_path)
    de = pt.deep_ensemble(pt.load_rows(tmp_path)["arc_easy"])["test"]
    assert de["nll"] < 1.69  # the averaged MAPs are the best ensemble by NLL here
    best = f"{100 * de['ece']:.1f} / {de['nll']:.3f} (Deep ensemble (seeds))"
    rows = {line.split(" | ")[2]: line for line in table.splitlines() if "| test |" in line}
    assert rows["MC"] == ("| ARC-Easy | test | MC | +0.5 | 11.0 vs 20.0 | 0.950 vs 1.700 | met "
                          f"| 12.0 / 1.000 | beats | {best} | mixed |")
    assert rows["probit"] == ("| ARC-Easy | test | probit | -2.5 | 13.0 vs 20.0 | 1.040 vs "
                              f"1.700 | not met | 12.0 / 1.000 | loses | {best} | mixed |")


@pytest.mark.parametrize("variant", ["text", "text_mean", "letters"])
def test_committed_tables_are_what_the_committed_rows_render(variant):
    """Each committed ``table.md`` of the first comparison is printed by the script from
    the committed JSON rows: a row changed without re-rendering fails here."""
    pt = load_script()
    out = SCRIPT.parents[1] / "results" / "paper_table" / variant
    answers = "letters" if variant == "letters" else "text"
    reduction = "mean" if variant == "text_mean" else "sum"
    rendered = pt.full_table(out, answers, reduction)
    committed = (out / "table.md").read_text().split("\n", 1)[1]
    assert committed.strip() == rendered.strip()
