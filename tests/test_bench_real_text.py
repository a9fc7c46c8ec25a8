"""The real-text calibration benchmark runs at its smallest size and writes what it reports."""

import importlib
import json
import math

import pytest

from laplace_llm.tools import metrics


@pytest.mark.slow
def test_quick_run_writes_consistent_results(tmp_path):
    """``--quick`` trains MiniLM on 64 TREC questions and scores every method; the JSON
    summary equals its single run, metrics lie in their ranges, Laplace and temperature
    scaling keep the MAP's ranking (probit with one scalar prior rarely changes the
    argmax; temperature never does), and the table lists every method."""
    module = importlib.import_module("benchmarks.quality.real_text")
    payload = module.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    run = saved["runs"]["64"][0]
    summary = saved["summary"]["64"]
    expected = {"map", "ts", "la_probit", "la_mc", "la_map_evidence", "la_layerwise", "la_val",
                "llla", "lt_kron"}
    assert set(run["methods"]) == expected == set(payload["summary"]["64"])
    for method, values in run["methods"].items():
        for key, value in values.items():
            if math.isnan(value):
                # splits not scored
                assert method in {"la_layerwise", "la_val", "la_map_evidence", "lt_kron"}
                continue
            assert summary[method][key]["mean"] == pytest.approx(value)
            assert summary[method][key]["std"] == 0.0
            if "nll" not in key:
                assert 0.0 <= value <= 1.0, (method, key, value)
    assert run["methods"]["ts"]["agrees_with_map"] == 1.0
    assert run["info"]["temperature"] > 0 and run["info"]["la_prior"] > 0
    # the linearised evidence never charges the prior more than laplace-torch's, so its
    # prior is at least as tight (the same curvature, loaded, not refitted)
    assert run["info"]["la_prior"] >= run["info"]["la_map_evidence_prior"]
    # the TS row is the MAP logits divided by the fitted temperature
    assert run["methods"]["ts"]["test_accuracy"] == run["methods"]["map"]["test_accuracy"]
    table = (tmp_path / "table.md").read_text()
    assert all(module.METHOD_LABELS[m] in table for m in expected)
    assert "**Goal check**" in table and table.count("| 64 | ") == 2 + 1  # probit, MC; seed row
    assert module.render(saved).strip() == table.strip()  # --from-json prints the same
    for png in ("reliability.png", "risk_coverage.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert metrics.aurc([[0.9, 0.1]], [0]) == 0.0  # the metric the table's AURC uses


def _load_script():
    return importlib.import_module("benchmarks.quality.real_text")


def test_goal_table_checks_each_condition():
    """The goal row says "met" only when NLL and ECE are at most TS's with ≤ 1 point of
    accuracy lost (in distribution), and below TS's under shift."""
    module = _load_script()

    def row(acc, nll, ece, s_nll, s_ece):
        values = {"test_accuracy": acc, "test_nll": nll, "test_ece": ece,
                  "shift_nll": s_nll, "shift_ece": s_ece}
        return {k: {"mean": v, "std": 0.0} for k, v in values.items()}

    summary = {500: {
        "map": row(0.90, 0.40, 0.10, 1.0, 0.20),
        "ts": row(0.90, 0.30, 0.05, 0.9, 0.10),
        "la_probit": row(0.895, 0.30, 0.04, 0.8, 0.11),  # in: met (−0.5 pt); shift ECE above
        "la_mc": row(0.885, 0.29, 0.03, 0.8, 0.09),  # in: 1.5 points lost; shift: met
    }}
    lines = module.goal_table(summary).splitlines()
    probit = next(line for line in lines if "| probit |" in line)
    mc = next(line for line in lines if "| MC |" in line)
    assert probit.endswith("| met | 0.800 vs 0.900 | 0.110 vs 0.100 | not met |")
    assert "| -0.5 |" in probit
    assert mc.endswith("| not met | 0.800 vs 0.900 | 0.090 vs 0.100 | met |")
    assert "| -1.5 |" in mc
