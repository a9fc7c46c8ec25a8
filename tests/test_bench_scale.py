"""Inputs at real size: the C and T benchmarks run, count what they claim, and memory
does not grow with the vocabulary.

The scripts' timings are not asserted (CONTRIBUTING: speed lives in benchmarks/); what is
asserted is what they count (backward passes per batch: 1 for the mc Fisher, C for the
ggn and the GLM, k + 1 for ``top_k``, none for the NN predictive) and, in fresh child
processes, that the peak memory of a fit and of the GLM predictive at a vocabulary of
49,152 stays within 10 % of one ``(1, T, V)`` logits tensor of the peak at 1,024: a path
holding per-position vocabulary logits would add at least that tensor (the child that
computes the full logits, as a causal LM's forward does, shows the meter sees it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_script(name, tmp_path, *args):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.perf.{name}", *args,
                           "--out", str(out)], env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["table"] in proc.stdout and name in result["command"]
    return result


def test_bench_classes_counts_backward_passes(tmp_path):
    result = run_script("bench_classes", tmp_path, "--quick", "--no-memory")
    rows = {(r["model"], r["C"], r["method"]): r for r in result["rows"]}
    for (model, C, method), r in rows.items():
        expected = {"floor": 1, "fit mc": 1, "fit ggn": C, "glm": C, "nn": 0}.get(method)
        if method.startswith("glm top_k"):
            expected = r["top_k"] + 1
            assert r["fresh"]["tv_top_k_to_full_glm"] >= 0
        assert r["backwards_per_batch"] == expected, (model, C, method)
        assert r["seconds"] > 0 and r["ratio_to_floor"] > 0
    # --quick: C = 3 and 20 (more than a chunk of 16 probes), the scorer at C = 3
    assert {(m, C) for m, C, _ in rows} == {("choices", 3), ("choices", 20), ("scorer", 3)}
    # k = C - 1 merges one class: top_k is the full GLM there
    assert rows[("choices", 3, "glm top_k=2")]["fresh"]["tv_top_k_to_full_glm"] < 1e-6


def test_bench_seq_len_runs(tmp_path):
    result = run_script("bench_seq_len", tmp_path, "--quick", "--no-memory")
    assert {(r["vocab"], r["T"]) for r in result["rows"]} == {(128, 16), (128, 64),
                                                               (2048, 16), (2048, 64)}
    assert all(r["seconds"] > 0 for r in result["rows"])


def peak_mib(vocab, T, method):
    cmd = [sys.executable, "-m", "benchmarks.perf.bench_seq_len", "--memory-child",
           str(vocab), str(T), method, "--hidden", "64", "--layers", "1", "--n-fit", "1"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    value = json.loads(proc.stdout.strip().splitlines()[-1])
    if value is None:
        pytest.fail("no peak meter here: /proc/self/clear_refs is Linux-only")
    return value / 2**20


@pytest.mark.slow  # measured 44 s: eight child processes, each importing transformers
def test_peak_memory_does_not_grow_with_the_vocabulary():
    T, small, large = 512, 1024, 49152
    logits_mib = T * large * 4 / 2**20  # one (1, T, V) float32 tensor: 96 MiB
    for method in ("fit mc", "fit ggn", "glm"):
        grown = peak_mib(large, T, method) - peak_mib(small, T, method)
        assert grown < 0.1 * logits_mib, (method, grown)
    # the meter would see a path that forms every position's logits
    grown = peak_mib(large, T, "full logits") - peak_mib(small, T, "full logits")
    assert grown > 0.9 * logits_mib, grown
