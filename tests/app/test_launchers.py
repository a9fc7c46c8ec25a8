"""``laplace-llm fit`` under ``torchrun`` and ``accelerate launch``: 2 CPU processes (gloo).

Each process fits its share of the JSONL records (``rank::2``), the curvature is summed
across processes, and rank 0 writes the posterior once; it must equal the
single-process fit. The model is float32, so factors summed in another order differ by
float32 rounding (measured: 1.4e-6 of a factor's largest entry); the bounds below are
1e-5. ``--n-kfac 64`` exceeds every factor side (32) while ``--lr-threshold 8`` keeps
the hidden-size factors low-rank, so the gathered roots are truncated exactly.

``accelerate launch``'s own CPU multi-process mode (``--cpu``) needs ``mpirun``; its
``--multi_gpu`` mode starts processes through ``torch.distributed.run`` and works on a
machine without GPUs, which is what runs here.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from laplace_llm.app.cli import main
from laplace_llm.data import make_loader, read_jsonl
from laplace_llm.models.classifier import LLMClassifier
from laplace_llm.posterior.kron import LoRALaplace
from laplace_llm.serialization import POSTERIOR_FILENAME, read_state
from tests.app.test_cli import mcqa_records, write_jsonl
from tests.fixtures.models import write_model_folder
from tests.test_distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# laplace-torch's evidence (the default): this tiny model's linearised evidence is flat
# towards large δ, so where its marglik stops moves with the float rounding of the summed
# factors (1.7e-4 relative here) and says nothing about the distributed fit
FIT = ["--batch-size", "4", "--fisher-type", "ggn", "--n-kfac", "64", "--lr-threshold", "8",
       "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    write_model_folder(root)
    write_jsonl(root / "data.jsonl", mcqa_records(11))  # odd: shards of 6 and 5
    return root


def launch(launcher: list[str], folders: Path, adapter: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "laplace_llm.app.cli", "fit", "--model", str(folders / "model"),
           "--adapter", str(adapter), "--data", str(folders / "data.jsonl"), *extra, *FIT]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("wrote ") == 1 and "by 2 processes" in proc.stdout


def dense(f, H):
    """A factor of a state's ``H`` as a matrix; a shared factor (``same_as``, see
    ``share_input_factors``) is the one it points to."""
    if "same_as" in f:
        i, j = f["same_as"]
        f = H[i][j]
    return f["dense"] if "dense" in f else f["root"] @ f["root"].T


def assert_same_posterior(path: Path, single_path: Path, folders: Path) -> None:
    a, b = read_state(single_path), read_state(path)
    assert b["n_data"] == a["n_data"] == 11
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    torch.testing.assert_close(b["mean"], a["mean"], rtol=0, atol=0)
    # one prior per block (the default): each depends on one block's float32 factors,
    # which agree to 1e-5 of their scale below; measured 1.4e-5 relative at most
    torch.testing.assert_close(b["prior_precision"], a["prior_precision"], rtol=5e-5, atol=0)
    for Fa, Fb in zip(a["H"], b["H"], strict=True):
        for fa, fb in zip(Fa, Fb, strict=True):
            scale = dense(fa, a["H"]).abs().max()
            torch.testing.assert_close(dense(fb, b["H"]) / scale, dense(fa, a["H"]) / scale,
                                       rtol=0, atol=1e-5)
    # and the loaded posteriors predict alike
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(folders / "model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders / "model"),
                                      folders / "adapter", is_trainable=True).eval()
    clf = LLMClassifier.from_choices(model, tok, [" A", " B", " C", " D"], center=True)
    batch = next(iter(make_loader(read_jsonl(folders / "data.jsonl", "mcqa"), tok, 11, "mcqa")))
    single, multi = LoRALaplace.load(single_path, clf), LoRALaplace.load(path, clf)
    torch.testing.assert_close(multi(batch), single(batch), rtol=0, atol=1e-5)


@pytest.mark.slow  # two launches of two processes importing torch + transformers: ~40 s
def test_torchrun_and_accelerate_launch_fit_equals_one_process(folders, tmp_path):
    single = tmp_path / "single.safetensors"
    args = ["fit", "--model", folders / "model", "--adapter", folders / "adapter",
            "--data", folders / "data.jsonl", "--posterior", single, *FIT]
    assert main([str(a) for a in args]) == 0

    # --timeout: the process group and the fit's collectives take it (tests/test_timeouts.py)
    launch([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"], folders,
           folders / "adapter", "--posterior", str(tmp_path / "torchrun.safetensors"),
           "--timeout", "120")
    assert_same_posterior(tmp_path / "torchrun.safetensors", single, folders)

    accelerate = shutil.which("accelerate", path=str(BIN)) or shutil.which("accelerate")
    assert accelerate, "accelerate is a dependency of the hf extra (pip install -e '.[hf]')"
    # without --posterior: written beside the adapter, where LoRALaplace.load(folder) looks
    adapter = tmp_path / "adapter_copy"
    shutil.copytree(folders / "adapter", adapter)
    launch([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())], folders, adapter)
    assert (adapter / POSTERIOR_FILENAME).is_file()
    assert_same_posterior(adapter / POSTERIOR_FILENAME, single, folders)


@pytest.mark.slow  # one launch of two processes importing torch + transformers: ~25 s
def test_accelerate_launch_with_an_fsdp2_config_shards_and_equals_one_process(folders, tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2`: the CLI shards the model with
    fully_shard (each LlamaDecoderLayer, then the classifier), every process fits its
    share, rank 0 writes; the posterior equals the unsharded one-process fit (same bounds
    as above: float32) and its mean is the unsharded LoRA vector bit for bit."""
    single = tmp_path / "single.safetensors"
    args = ["fit", "--model", folders / "model", "--adapter", folders / "adapter",
            "--data", folders / "data.jsonl", "--posterior", single, *FIT]
    assert main([str(a) for a in args]) == 0
    accelerate = shutil.which("accelerate", path=str(BIN)) or shutil.which("accelerate")
    assert accelerate
    sharded = tmp_path / "fsdp.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [accelerate, "launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "--use_fsdp", "--fsdp_version", "2",
           "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
           "-m", "laplace_llm.app.cli", "fit", "--model", str(folders / "model"),
           "--adapter", str(folders / "adapter"), "--data", str(folders / "data.jsonl"),
           "--posterior", str(sharded), *FIT]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("wrote ") == 1 and "by 2 processes (FSDP2-sharded model)" in proc.stdout
    assert_same_posterior(sharded, single, folders)


def test_accelerate_fsdp1_config_is_refused_naming_fsdp2(folders, tmp_path, monkeypatch, capsys):
    """The environment `accelerate launch --use_fsdp` sets for FSDP1: refused before loading."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    args = ["fit", "--model", folders / "model", "--adapter", folders / "adapter",
            "--data", folders / "data.jsonl", "--posterior", tmp_path / "p.safetensors", *FIT]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "FSDP1" in err and "fsdp_version: 2" in err
    assert not (tmp_path / "p.safetensors").exists()
