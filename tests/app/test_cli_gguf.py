"""``laplace-llm fit`` / ``evaluate`` with ``--gguf-file``: a GGUF causal LM (the tiny Llama
of tests/fixtures/tiny_gguf.py, loaded through the same transformers path as SmolLM2) plus a peft
adapter, end to end, and the same numbers as the Python API on that model."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from laplace_llm.app.cli import main
from laplace_llm.app.evaluation import collect_probs, score
from laplace_llm.data import make_loader, mcqa_choices, read_jsonl
from laplace_llm.models.classifier import LLMClassifier
from laplace_llm.models.pretrained import load_causal_lm
from laplace_llm.posterior.kron import LoRALaplace
from tests.fixtures.tiny_gguf import write_tiny_gguf

CHOICES = ["ice", "fire", "snow", "rain", "sun", "wind"]


@pytest.fixture(scope="module")
def gguf_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_cli")
    info = write_tiny_gguf(root / "model", seed=5)
    model, _ = load_causal_lm(root / "model", gguf_file=info["name"])
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4,
                                                  target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    peft_model.save_pretrained(root / "adapter")
    records = [{"question": f"Which is number {i}?", "choices": CHOICES[i % 3: i % 3 + 4],
                "answer": i % 4} for i in range(10)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, info


def cli(*args):
    return main([str(a) for a in args])


def test_fit_and_evaluate_a_gguf_model(gguf_setup, tmp_path):
    root, info = gguf_setup
    post = tmp_path / "posterior.safetensors"
    common = ["--model", root / "model", "--gguf-file", info["name"],
              "--adapter", root / "adapter", "--data", root / "data.jsonl",
              "--batch-size", 4, "--quiet"]
    assert cli("fit", *common, "--posterior", post, "--fisher-type", "ggn") == 0
    out = tmp_path / "report"
    assert cli("evaluate", *common, "--posterior", post, "--out", out,
               "--mc-samples", 50) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["gguf_file"] == info["name"] and report["n"] == 10

    # the same model, posterior and data through the Python API give the same numbers
    model, tok = load_causal_lm(root / "model", gguf_file=info["name"])
    peft_model = PeftModel.from_pretrained(model, root / "adapter", is_trainable=True)
    clf = LLMClassifier.from_choices(peft_model, tok, mcqa_choices(4), center=True)  # as the CLI
    la = LoRALaplace.load(post, clf)
    loader = make_loader(read_jsonl(root / "data.jsonl", "mcqa"), tok, 4, "mcqa")
    probs, labels = collect_probs(clf, la, loader, methods=["map", "la_probit"])
    for method in ("map", "la_probit"):
        expected = score(probs[method], labels)
        got = report["results"]["data"][method]
        for metric, value in expected.items():
            # float32 model: the CLI and this process round the posterior's float32
            # arithmetic differently (~1e-6 relative seen)
            assert got[metric] == pytest.approx(value, rel=1e-5, abs=1e-8), (method, metric)


def test_missing_gguf_file_is_refused_with_its_name(gguf_setup, capsys):
    root, _ = gguf_setup
    status = cli("fit", "--model", root / "model", "--gguf-file", "absent.gguf",
                 "--adapter", root / "adapter", "--data", root / "data.jsonl",
                 "--posterior", root / "p.safetensors", "--quiet")
    assert status == 2
    assert "--gguf-file absent.gguf: no such file in --model" in capsys.readouterr().err
