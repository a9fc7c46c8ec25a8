"""``laplace-llm fit`` / ``evaluate`` on model folders written with ``save_pretrained``.

The CLI is run in-process through :func:`laplace_llm.app.cli.main` (its return value is the
exit status); one test runs the installed console script to check the entry point.
"""

import json
import random
import re
import subprocess
import sys

import pytest

from laplace_llm.app.cli import build_parser, main
from laplace_llm.app.evaluation import METHODS, METRICS, OOD_METRICS, collect_probs, score
from laplace_llm.data import make_loader, read_jsonl
from laplace_llm.models.classifier import LLMClassifier
from laplace_llm.posterior.kron import LoRALaplace
from laplace_llm.tools import metrics
from laplace_llm.tools.baselines import TemperatureScaling
from tests.fixtures.models import (
    add_lora,
    tiny_causal_lm,
    tiny_seqcls,
    tiny_tokenizer,
    write_model_folder,
)

WORDS = ["cat", "dog", "red", "blue", "good", "bad", "yes", "no"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def mcqa_records(n, seed=0):
    rng = random.Random(seed)
    return [
        {"question": f"Which is {rng.choice(WORDS)} ?", "choices": rng.sample(WORDS, 4),
         "answer": rng.randrange(4)}
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """A tiny Llama folder (weights + tokenizer), its LoRA adapter, another adapter of the
    same shapes, and MCQA data."""
    root = tmp_path_factory.mktemp("causal")
    write_model_folder(root)
    add_lora(tiny_causal_lm("llama", seed=0), seed=1, r=4).save_pretrained(root / "other")
    write_jsonl(root / "data.jsonl", mcqa_records(14))
    return root


def cli(*args):
    return main([str(a) for a in args])


def test_fit_then_evaluate_round_trip(causal, tmp_path, capsys):
    post = tmp_path / "sub" / "posterior.safetensors"
    common = ["--model", causal / "model", "--adapter", causal / "adapter",
              "--data", causal / "data.jsonl", "--batch-size", 4, "--quiet"]
    assert cli("fit", *common, "--posterior", post, "--fisher-type", "ggn") == 0
    assert post.is_file()
    assert "wrote" in capsys.readouterr().out

    out = tmp_path / "report"
    assert cli("evaluate", *common, "--posterior", post, "--out", out, "--mc-samples", 50) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert (out / "reliability.png").stat().st_size > 1000
    results = report["results"]["data"]
    assert set(results) == {"map", "la_probit", "la_mc"}
    for values in results.values():
        assert set(values) == set(METRICS)
    assert report["n"] == 14

    # The same numbers through the Python API: the CLI's model, data and posterior.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(causal / "model")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(causal / "model"), causal / "adapter",
        is_trainable=True,
    ).eval()
    clf = LLMClassifier.from_choices(model, tok, [" A", " B", " C", " D"], center=True)
    la = LoRALaplace.load(post, clf)
    assert la.fisher_type == "ggn"
    loader = make_loader(read_jsonl(causal / "data.jsonl", "mcqa"), tok, 4, "mcqa")
    probs, labels = collect_probs(clf, la, loader, ("map", "la_probit"))
    for method in ("map", "la_probit"):
        expected = score(probs[method], labels)
        for metric, value in expected.items():
            assert results[method][metric] == pytest.approx(value, rel=1e-6, abs=1e-9)
    # the marginal likelihood tuned a prior precision away from its start
    assert report["prior_precision"] != [1.0]


def test_prior_optimization_none_keeps_the_given_prior(causal, tmp_path):
    post = tmp_path / "p.safetensors"
    assert cli("fit", "--model", causal / "model", "--adapter", causal / "adapter",
               "--data", causal / "data.jsonl", "--prior-optimization", "none",
               "--prior-precision", 3.5, "--n-kfac", 4, "--lr-threshold", 0,
               "--kfac-approx", "reduce", "--posterior", post, "--quiet") == 0
    from safetensors import safe_open

    with safe_open(str(post), "pt") as fh:
        prior = fh.get_tensor("prior_precision")
        header = json.loads(fh.metadata()["laplace_llm"])
    assert prior.tolist() == [3.5]
    assert header["options"]["n_kfac"] == 4 and header["options"]["kfac_approx"] == "reduce"


def test_reward_model_round_trip(tmp_path, capsys):
    base = tiny_seqcls("bert", num_labels=1, seed=0)
    base.save_pretrained(tmp_path / "rm")
    tiny_tokenizer(padding_side="right").save_pretrained(tmp_path / "rm")
    add_lora(base, seed=0, r=4, target_modules=("query", "value"),
             modules_to_save=["classifier"], task_type="SEQ_CLS").save_pretrained(tmp_path / "ad")
    rng = random.Random(0)
    data = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": rng.choice(WORDS), "chosen": " ".join(rng.sample(WORDS, 2)),
         "rejected": rng.choice(WORDS)} for _ in range(10)
    ])
    common = ["--model", tmp_path / "rm", "--adapter", tmp_path / "ad", "--data", data,
              "--kind", "preference", "--quiet"]
    assert cli("fit", *common, "--posterior", tmp_path / "rm.post") == 0
    assert cli("evaluate", *common, "--posterior", tmp_path / "rm.post",
               "--out", tmp_path / "out", "--mc-samples", 50) == 0
    results = json.loads((tmp_path / "out" / "metrics.json").read_text())["results"]["data"]
    # pairs are scored as two-way Bradley-Terry predictions: Brier of two classes ≤ 2
    assert 0 <= results["la_probit"]["brier"] <= 2
    assert "preference pairs" in capsys.readouterr().out


def _error_cases(root, tmp):
    bad_json = write_jsonl(tmp / "bad.jsonl", [])
    bad_json.write_text("{not json\n")
    missing_key = write_jsonl(tmp / "nokey.jsonl", [{"question": "q", "answer": 0}])
    other_post = tmp / "other.safetensors"
    m, a, d = root / "model", root / "adapter", root / "data.jsonl"
    return {
        "no model folder": ["fit", "--model", tmp / "nope", "--adapter", a, "--data", d,
                            "--posterior", tmp / "p"],
        "adapter as model": ["fit", "--model", a, "--data", d, "--posterior", tmp / "p"],
        "model as adapter": ["fit", "--model", m, "--adapter", m, "--data", d,
                             "--posterior", tmp / "p"],
        "no data file": ["fit", "--model", m, "--adapter", a, "--data", tmp / "none.jsonl",
                         "--posterior", tmp / "p"],
        "invalid json": ["fit", "--model", m, "--adapter", a, "--data", bad_json,
                         "--posterior", tmp / "p"],
        "missing key": ["fit", "--model", m, "--adapter", a, "--data", missing_key,
                        "--posterior", tmp / "p"],
        "no LoRA": ["fit", "--model", m, "--data", d, "--posterior", tmp / "p"],
        "bad choices": ["fit", "--model", m, "--adapter", a, "--data", d, "--choices", " A",
                        " A", "--posterior", tmp / "p"],
        "no posterior": ["evaluate", "--model", m, "--adapter", a, "--data", d,
                         "--posterior", tmp / "none.safetensors", "--out", tmp / "o"],
        "unwritable posterior": ["fit", "--model", m, "--adapter", a, "--data", d,
                                 "--posterior", d / "posterior"],
        "not a posterior": ["evaluate", "--model", m, "--adapter", a, "--data", d,
                            "--posterior", d, "--out", tmp / "o"],
        "other model's posterior": (
            ["fit", "--model", m, "--adapter", root / "other", "--data", d,
             "--posterior", other_post],
            ["evaluate", "--model", m, "--adapter", a, "--data", d,
             "--posterior", other_post, "--out", tmp / "o"],
        ),
    }


@pytest.mark.parametrize("case", [
    "no model folder", "adapter as model", "model as adapter", "no data file",
    "invalid json", "missing key", "no LoRA", "bad choices", "no posterior",
    "not a posterior", "unwritable posterior", "other model's posterior",
])
def test_user_errors_exit_2_with_one_line(causal, tmp_path, capsys, case):
    argv = _error_cases(causal, tmp_path)[case]
    if isinstance(argv, tuple):  # a setup command first
        assert cli(*argv[0], "--quiet") == 0
        capsys.readouterr()
        argv = argv[1]
    assert cli(*argv, "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("laplace-llm ") and ": error: " in err[0]
    assert "Traceback" not in err[0]


def test_other_models_posterior_is_named_in_the_error(causal, tmp_path, capsys):
    post = tmp_path / "other.safetensors"
    assert cli("fit", "--model", causal / "model", "--adapter", causal / "other",
               "--data", causal / "data.jsonl", "--posterior", post, "--quiet") == 0
    capsys.readouterr()
    assert cli("evaluate", "--model", causal / "model", "--adapter", causal / "adapter",
               "--data", causal / "data.jsonl", "--posterior", post, "--quiet") == 2
    assert "fitted on other LoRA weights" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "fit", "evaluate"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
            assert action.option_strings[0] in text


def test_bad_option_value_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "m", "--data", "d", "--posterior", "p", "--n-kfac", "0"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_console_script_is_installed():
    import shutil
    from pathlib import Path

    script = Path(sys.executable).parent / "laplace-llm"
    script = str(script) if script.exists() else shutil.which("laplace-llm")
    # the README's install (pip install -e ".[dev]") provides it; missing is a failure
    assert script is not None, "the laplace-llm console script is not installed"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "evaluate" in proc.stdout


def test_regression_fit_tunes_sigma_with_a_layerwise_prior(tmp_path, capsys):
    """--kind scores on a num_labels=2 regression head: --tune-sigma-noise and a
    layerwise prior reach the posterior file, and the saved posterior's evidence is the
    maximum of laplace-torch's regression recipe run in Python on the same fit."""
    import torch

    from laplace_llm.prior.regression import optimize_prior_and_noise

    base = tiny_seqcls("bert", num_labels=2, seed=0)
    base.save_pretrained(tmp_path / "m")
    tiny_tokenizer(padding_side="right").save_pretrained(tmp_path / "m")
    add_lora(base, seed=0, r=2, target_modules=("query", "value"),
             modules_to_save=["classifier"], task_type="SEQ_CLS").save_pretrained(tmp_path / "ad")
    rng = random.Random(0)
    data = write_jsonl(tmp_path / "scores.jsonl", [
        {"text": " ".join(rng.sample(WORDS, 3)), "target": [rng.gauss(0, 1), rng.gauss(2, 0.5)]}
        for _ in range(12)
    ])
    post = tmp_path / "reg.post"
    common = ["--model", tmp_path / "m", "--adapter", tmp_path / "ad", "--data", data,
              "--kind", "scores", "--quiet"]
    assert cli("fit", *common, "--likelihood", "regression", "--hessian-structure", "diag",
               "--fisher-type", "ggn", "--tune-sigma-noise", "--prior-structure", "layerwise",
               "--posterior", post) == 0
    out = capsys.readouterr().out
    assert "sigma_noise" in out
    args = build_parser().parse_args(["fit", *map(str, common), "--posterior", str(post)])
    from laplace_llm.app.loading import load_classifier

    clf, loader, likelihood = load_classifier(args)
    assert likelihood == "regression"
    saved = LoRALaplace.load(post, clf)
    assert saved.prior_precision.numel() == saved.n_layers > 1
    ref = type(saved)(clf, "regression", fisher_type="ggn")
    ref.fit(loader)
    optimize_prior_and_noise(ref, prior_structure="layerwise")
    torch.testing.assert_close(saved.sigma_noise, ref.sigma_noise)
    torch.testing.assert_close(saved.prior_precision, ref.prior_precision)
    # --likelihood that contradicts --kind, and evaluate on regression: one-line errors
    assert cli("fit", *common, "--likelihood", "classification", "--posterior", post) == 2
    assert cli("evaluate", *common, "--posterior", post, "--out", tmp_path / "o") == 2


def test_fit_structures_module_selection_and_low_rank_warning(causal, tmp_path, capsys):
    m, a, d = causal / "model", causal / "adapter", causal / "data.jsonl"
    common = ["--model", m, "--adapter", a, "--data", d, "--quiet", "--fisher-type", "ggn"]
    # n_kfac 1 keeps a small share of the hidden-size factors: a warning per factor
    assert cli("fit", *common, "--n-kfac", 1, "--lr-threshold", 0, "--min-trace-share", 0.99,
               "--posterior", tmp_path / "k.post") == 0
    captured = capsys.readouterr()
    assert "trace kept at n_kfac=1: min" in captured.out
    assert "prior precision 8 values in [" in captured.out  # the default: one per block
    assert "warning:" in captured.err and "raise --n-kfac" in captured.err
    assert cli("fit", *common, "--hessian-structure", "full", "--lora-modules", "layers.0.*",
               "--prior-structure", "scalar", "--posterior", tmp_path / "f.post") == 0
    assert re.search(r"prior precision [0-9.e+-]+, log marginal", capsys.readouterr().out)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f.post"), "pt") as fh:
        header = json.loads(fh.metadata()["laplace_llm"])
    assert header["hessian_structure"] == "full" and header["lora_modules"] == ["layers.0.*"]
    assert all(".layers.0." in n for n in header["block_names"])
    assert cli("evaluate", "--model", m, "--adapter", a, "--data", d, "--quiet",
               "--posterior", tmp_path / "f.post", "--out", tmp_path / "o", "--mc-samples", 20) == 0
    # full over every LoRA weight with a small limit: one line naming the memory
    assert cli("fit", *common, "--hessian-structure", "full", "--max-params", 10,
               "--posterior", tmp_path / "x.post") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_params=896" in err[0] and "3.1 MiB each" in err[0]


def test_posterior_beside_the_adapter_by_default(causal, tmp_path, capsys):
    """fit --adapter DIR without --posterior writes DIR/laplace_posterior.safetensors, and
    evaluate --adapter DIR finds it: the same report as naming the file."""
    import shutil

    from laplace_llm.serialization import POSTERIOR_FILENAME

    adapter = tmp_path / "adapter"
    shutil.copytree(causal / "adapter", adapter)
    common = ["--model", causal / "model", "--adapter", adapter,
              "--data", causal / "data.jsonl", "--batch-size", 4, "--quiet"]
    assert cli("fit", *common, "--fisher-type", "ggn") == 0
    assert (adapter / POSTERIOR_FILENAME).is_file()
    assert cli("evaluate", *common, "--out", tmp_path / "a", "--mc-samples", 20) == 0
    assert cli("evaluate", *common, "--posterior", adapter / POSTERIOR_FILENAME,
               "--out", tmp_path / "b", "--mc-samples", 20) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["results"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["results"]
    assert a == b
    capsys.readouterr()
    # without --adapter there is nowhere to look
    assert cli("evaluate", "--model", causal / "model", "--data", causal / "data.jsonl",
               "--quiet") == 2
    assert "--posterior is required without --adapter" in capsys.readouterr().err


def test_fit_keeps_another_models_posterior(causal, tmp_path, capsys):
    """A posterior of other LoRA blocks at --posterior is refused before fitting, unchanged."""
    other = tmp_path / "other.safetensors"
    base = tiny_causal_lm("llama", seed=0)
    add_lora(base, seed=0, r=2).save_pretrained(tmp_path / "r2")  # other shapes
    assert cli("fit", "--model", causal / "model", "--adapter", tmp_path / "r2",
               "--data", causal / "data.jsonl", "--posterior", other, "--quiet") == 0
    before = other.read_bytes()
    capsys.readouterr()
    assert cli("fit", "--model", causal / "model", "--adapter", causal / "adapter",
               "--data", causal / "data.jsonl", "--posterior", other, "--quiet") == 2
    assert "posterior of another model" in capsys.readouterr().err
    assert other.read_bytes() == before


def test_an_incomplete_launcher_environment_is_a_user_error(causal, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert cli("fit", "--model", causal / "model", "--adapter", causal / "adapter",
               "--data", causal / "data.jsonl", "--posterior", tmp_path / "p", "--quiet") == 2
    assert "torchrun or accelerate launch" in capsys.readouterr().err
    assert cli("fit", "--model", causal / "model", "--adapter", causal / "adapter",
               "--data", causal / "data.jsonl", "--posterior", tmp_path / "p",
               "--hessian-structure", "diag", "--quiet") == 2
    assert "fits in one process only" in capsys.readouterr().err


# ------------------------------------------------- evaluate: --ood-data, --val-data
@pytest.fixture(scope="module")
def evaluated(causal, tmp_path_factory):
    """A posterior of the tiny Llama, then `evaluate` with OOD and validation files: OOD
    questions (other words, no answers) and labelled validation questions."""
    root = tmp_path_factory.mktemp("eval")
    post = root / "posterior.safetensors"
    common = ["--model", causal / "model", "--adapter", causal / "adapter",
              "--data", causal / "data.jsonl", "--batch-size", 4, "--quiet"]
    assert cli("fit", *common, "--posterior", post, "--fisher-type", "ggn") == 0
    rng = random.Random(7)
    ood = write_jsonl(root / "ood.jsonl", [
        {"question": " ".join(rng.choices(WORDS, k=6)) + " ?", "choices": rng.sample(WORDS, 4)}
        for _ in range(9)
    ])
    val = write_jsonl(root / "val.jsonl", mcqa_records(12, seed=3))
    out = root / "report"
    assert cli("evaluate", *common, "--posterior", post, "--out", out, "--mc-samples", 50,
               "--ood-data", ood, "--val-data", val) == 0
    return {"root": root, "post": post, "common": common, "ood": ood, "val": val, "out": out,
            "report": json.loads((out / "metrics.json").read_text())}


def _python_api(causal, post):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(causal / "model")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(causal / "model"), causal / "adapter",
        is_trainable=True,
    ).eval()
    clf = LLMClassifier.from_choices(model, tok, [" A", " B", " C", " D"], center=True)
    return clf, LoRALaplace.load(post, clf), tok


def test_evaluate_reports_aurc_ood_auroc_and_temperature_scaling(causal, evaluated):
    """The JSON's AURC, OOD AUROC and temperature-scaling row equal `metrics.aurc` /
    `metrics.ood_auroc` / `TemperatureScaling` recomputed through the Python API on the
    same model, posterior and files (MC with the CLI's seed, so exactly the same draws)."""
    report = evaluated["report"]
    results = report["results"]["data"]
    assert list(results) == ["map", "ts", "la_probit", "la_mc"]
    for values in results.values():
        assert set(values) == set(METRICS) | set(OOD_METRICS)
    assert report["n_ood"] == 9 and report["ood_data"] == str(evaluated["ood"])

    clf, la, tok = _python_api(causal, evaluated["post"])
    loader = make_loader(read_jsonl(causal / "data.jsonl", "mcqa"), tok, 4, "mcqa")
    val_loader = make_loader(read_jsonl(evaluated["val"], "mcqa"), tok, 4, "mcqa")
    ood_loader = make_loader(read_jsonl(evaluated["ood"], "mcqa", labelled=False), tok, 4, "mcqa")
    ts = TemperatureScaling(clf)
    assert report["temperature"] == pytest.approx(ts.fit(val_loader), rel=1e-9)
    methods = ("map", "ts", *METHODS[1:])
    probs, labels = collect_probs(clf, la, loader, methods, mc_samples=50, seed=0, ts=ts)
    ood_probs, _ = collect_probs(clf, la, ood_loader, methods, mc_samples=50, seed=0, ts=ts)
    for m in methods:
        assert results[m]["aurc"] == pytest.approx(metrics.aurc(probs[m], labels), abs=1e-12)
        assert results[m]["ood_auroc"] == pytest.approx(
            metrics.ood_auroc(probs[m], ood_probs[m], "max_prob"), abs=1e-12)
        assert results[m]["ood_auroc_entropy"] == pytest.approx(
            metrics.ood_auroc(probs[m], ood_probs[m], "entropy"), abs=1e-12)
        assert 0 <= results[m]["aurc"] <= 1 and 0 <= results[m]["ood_auroc"] <= 1
    # temperature scaling keeps each input's predicted class (MAP's accuracy) but not the
    # order of confidences across inputs, so its AURC may differ from MAP's
    assert results["ts"]["accuracy"] == results["map"]["accuracy"]
    assert results["ts"]["nll"] != results["map"]["nll"]


def test_evaluate_writes_the_risk_coverage_plot_and_prints_the_new_columns(
        causal, evaluated, capsys):
    out = evaluated["out"]
    for name in ("reliability.png", "risk_coverage.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert evaluated["report"]["files"]["risk_coverage"] == str(out / "risk_coverage.png")
    # without --ood-data the table has AURC but no OOD columns; without --val-data no ts row
    assert cli("evaluate", *evaluated["common"], "--posterior", evaluated["post"],
               "--out", evaluated["root"] / "plain", "--mc-samples", 20) == 0
    text = capsys.readouterr().out
    assert "aurc" in text and "ood_auroc" not in text.split("\n")[1]
    assert "Temperature scaling" not in text
    plain = json.loads((evaluated["root"] / "plain" / "metrics.json").read_text())
    assert list(plain["results"]["data"]) == list(METHODS)
    assert plain["results"]["data"]["map"]["aurc"] == evaluated["report"]["results"]["data"]["map"]["aurc"]


@pytest.mark.parametrize("case", [
    "missing ood file", "empty ood file", "missing val file", "val without labels",
    "ood with more choices",
])
def test_evaluate_bad_ood_or_val_data_exits_2_with_one_line(evaluated, tmp_path, capsys, case):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    unlabelled = write_jsonl(tmp_path / "unlabelled.jsonl",
                             [{"question": "cat ?", "choices": WORDS[:4]}])
    wide = write_jsonl(tmp_path / "wide.jsonl", [{"question": "cat ?", "choices": WORDS[:6]}])
    option, path, expected = {
        "missing ood file": ("--ood-data", tmp_path / "none.jsonl", "no such file"),
        "empty ood file": ("--ood-data", empty, "the file is empty"),
        "missing val file": ("--val-data", tmp_path / "none.jsonl", "no such file"),
        "val without labels": ("--val-data", unlabelled, "missing key(s) ['answer']"),
        "ood with more choices": ("--ood-data", wide, "has 6 choices"),
    }[case]
    assert cli("evaluate", *evaluated["common"], "--posterior", evaluated["post"],
               "--out", tmp_path / "o", option, path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"laplace-llm evaluate: error: {option}") and expected in err[0]
