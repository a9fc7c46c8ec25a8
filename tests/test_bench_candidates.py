"""benchmarks/perf/bench_candidates.py runs and its comparison is valid (same scores).

The timings themselves are not asserted (CONTRIBUTING: speed lives in benchmarks/); the
script exits 1 when the scorer and the naive model disagree by more than 1e-3 (float32),
and the logit counts it prints are the formulas of its docstring, checked here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, *extra):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.perf.bench_candidates", "--quick",
         "--out", str(out), *extra],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                             "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_quick_benchmark_scores_agree_and_counts_logits(tmp_path):
    result = run(tmp_path, "--no-memory")
    scorer, naive = result["rows"]
    # --quick: prompt 12, C 3, L 3, batch 2, vocabulary 500
    assert scorer["logit_values"] == 2 * (1 + 3 * 2) * 500
    assert naive["logit_values"] == 2 * 3 * (12 + 3) * 500
    assert all(row[k] > 0 for row in (scorer, naive) for k in ("score_s", "fit_s", "glm_s"))
    assert "max |score difference|" in result["table"]


@pytest.mark.slow
def test_quick_benchmark_measures_memory_in_child_processes(tmp_path):
    result = run(tmp_path)
    for row in result["rows"]:
        assert row["peak_mib"] >= 0 and row["peak_mib_2v"] >= 0
