"""``laplace-llm fit --checkpoint FILE [--checkpoint-every N] [--resume]``: a killed fit continues.

The killed runs are real processes of the command line: a wrapper around
:func:`laplace_llm.app.cli.main` sends the process SIGTERM (default disposition: the
process ends by the signal once the checkpoint is written) or SIGKILL (nothing runs
after it; the periodic checkpoint is what is left) while batch ``at`` is checked. The
resumed run is the command line again, with ``--resume``; its posterior file equals the
uninterrupted run's bit for bit: every tensor (``torch.equal``) and the whole header
(loss, N, the prior precision marglik tuned, checksums), since the resumed fit makes the
same operations in the same order (Monte-Carlo Fisher, seed 0, low-rank factors).
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from laplace_llm.app.cli import main
from laplace_llm.posterior.checkpoint import read_checkpoint
from laplace_llm.serialization import read_posterior
from tests.app.test_cli import mcqa_records, write_jsonl
from tests.fixtures.models import write_model_folder


@pytest.fixture(autouse=True)
def _python_sigint_handler():
    """Python's own SIGINT handler, as in a terminal: a test run started in the background
    (``cmd &`` in a script, ``nohup``) inherits SIGINT ignored, which the fit rightly
    leaves alone, and these tests are about the handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

ROOT = Path(__file__).resolve().parents[2]
# low-rank factors (sides 32 > 8, rank 4) truncated during the fit; 14 records: 4 batches
OPTIONS = ["--n-kfac", 4, "--lr-threshold", 8, "--batch-size", 4, "--quiet"]

KILLED = """
import os, signal, sys
import laplace_llm.posterior.fitting as base
from laplace_llm.app.cli import main

at, signum = int(sys.argv[1]), getattr(signal, sys.argv[2])
check_batch = base.check_batch

def killing(data, i, *args, **kwargs):
    if i == at:
        os.kill(os.getpid(), signum)
    return check_batch(data, i, *args, **kwargs)

base.check_batch = killing
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_model_folder(root)
    write_jsonl(root / "data.jsonl", mcqa_records(14))
    return root


def fit_args(root, post, *extra):
    return ["fit", "--model", root / "model", "--adapter", root / "adapter", "--data",
            root / "data.jsonl", "--posterior", post, *OPTIONS, *extra]


def cli(*args):
    return main([str(a) for a in args])


def run_killed(at, signum, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", KILLED, str(at), signum, *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(folders, tmp_path_factory):
    post = tmp_path_factory.mktemp("ref") / "posterior.safetensors"
    assert cli(*fit_args(folders, post)) == 0
    return read_posterior(post)


def assert_same_file(path, reference):
    header, tensors = read_posterior(path)
    ref_header, ref_tensors = reference
    assert header == ref_header
    assert set(tensors) == set(ref_tensors)
    for name, t in tensors.items():
        assert torch.equal(t, ref_tensors[name]), name


@pytest.mark.parametrize("signum,at,every,seen", [
    ("SIGTERM", 1, None, 2),  # written on the signal, after batch 1
    ("SIGKILL", 2, 1, 2),     # no handler runs: the periodic checkpoint of 2 batches
])
def test_a_killed_fit_resumes_to_the_uninterrupted_posterior(
        folders, uninterrupted, tmp_path, signum, at, every, seen):
    post, ckpt = tmp_path / "posterior.safetensors", tmp_path / "fit.ckpt"
    extra = ["--checkpoint", ckpt] + ([] if every is None else ["--checkpoint-every", every])
    proc = run_killed(at, signum, fit_args(folders, post, *extra))
    assert proc.returncode == -getattr(signal, signum), proc.stderr[-2000:]
    assert not post.exists()
    assert read_checkpoint(ckpt)[0]["batches_seen"] == seen
    assert cli(*fit_args(folders, post, *extra, "--resume")) == 0
    assert_same_file(post, uninterrupted)
    assert not ckpt.exists()  # removed once the posterior is written


def test_resume_without_a_checkpoint_yet_fits_from_the_start(folders, uninterrupted, tmp_path, capsys):
    post, ckpt = tmp_path / "posterior.safetensors", tmp_path / "fit.ckpt"
    assert cli(*fit_args(folders, post, "--checkpoint", ckpt, "--resume")) == 0
    assert f"--resume: no checkpoint at {ckpt} yet; fitting from the first batch" in capsys.readouterr().err
    assert_same_file(post, uninterrupted)


def test_an_interrupt_names_the_checkpoint_and_a_mismatched_resume_is_a_user_error(
        folders, tmp_path, capsys, monkeypatch):
    """Ctrl-C (SIGINT while batch 1 is checked): exit status 130 and a line naming the
    checkpoint; resuming with another --n-kfac exits 2 naming the option."""
    import laplace_llm.posterior.fitting as base

    post, ckpt = tmp_path / "posterior.safetensors", tmp_path / "fit.ckpt"
    check_batch = base.check_batch

    def interrupting(data, i, *args, **kwargs):
        if i == 1:
            signal.raise_signal(signal.SIGINT)
        return check_batch(data, i, *args, **kwargs)

    monkeypatch.setattr(base, "check_batch", interrupting)
    assert cli(*fit_args(folders, post, "--checkpoint", ckpt)) == 130
    assert f"the fit's checkpoint is in {ckpt}: rerun with --resume" in capsys.readouterr().err
    monkeypatch.setattr(base, "check_batch", check_batch)
    assert read_checkpoint(ckpt)[0]["batches_seen"] == 2

    changed = fit_args(folders, post, "--checkpoint", ckpt, "--resume")
    changed[changed.index("--n-kfac") + 1] = 5
    assert cli(*changed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"laplace-llm fit: error: --checkpoint {ckpt}: ")
    assert "n_kfac=4 in the file, 5 now" in err[0]
    assert ckpt.exists() and not post.exists()


@pytest.mark.parametrize("flags,flag", [(["--resume"], "--resume"),
                                        (["--checkpoint-every", "3"], "--checkpoint-every")])
def test_checkpoint_flags_without_a_checkpoint_are_user_errors(folders, tmp_path, capsys, flags, flag):
    assert cli(*fit_args(folders, tmp_path / "p.safetensors", *flags)) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} needs --checkpoint FILE" in err
