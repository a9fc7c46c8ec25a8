"""Timeouts of distributed fits: a rank that hangs or dies ends the others, naming it and the step.

Two gloo processes (CPU), spawned as in ``tests/test_distributed.py``. The process group
is created with a long timeout (20 minutes, ``GROUP_TIMEOUT``) so that only the fit's own
``timeout`` (``TIMEOUT``, 5 s) can end a wait within the tests' bounds. The children are
started with ``join=False`` and watched against a hard deadline (``DEADLINE``): a
regression that hangs fails the test and the children are terminated, never the suite.

Bounds of the elapsed time (measured in the surviving rank from the start of ``fit`` to
the error): at least ``TIMEOUT`` for a hung peer (the wait is the backend's timeout, not
an early failure) and below ``TIMEOUT + MARGIN``, ``MARGIN`` = 20 s: before its
collective the survivor runs its own batches (under a second here, several on a loaded
2-core machine) and afterwards asks the store where the others are (milliseconds); the
group's own timeout, what a regression falls back to, is 1200 s. A dead peer ends the
survivor at once (gloo: "Connection closed by peer"): below ``TIMEOUT``.
"""

import json
import os
import re
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from laplace_llm.distributed import (
    as_timeout,
    collective_step,
    collective_timeout,
    failure_message,
    group_timeout,
)
from laplace_llm.errors import CollectiveTimeoutError
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items

TIMEOUT = 5.0
MARGIN = 20.0
GROUP_TIMEOUT = timedelta(minutes=20)
DEADLINE = 300.0  # seconds for a whole 2-process scenario, imports included (18-24 s measured)
ITEMS = 13  # rank 0 takes 7 examples, rank 1 six
KFAC = dict(fisher_type="ggn", n_kfac=3, lr_threshold=0)  # every factor low-rank, sketched
BLOCK0 = "model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Misbehaving(DictDataset):
    """Examples that hang (sleep an hour) or end the process (``os._exit(1)``) at item ``at``.

    With ``record``, the first item read also notes the process group's timeout then (the
    fit's, while it runs) into ``seen``.
    """

    def __init__(self, items, at=None, how=None, record=False):
        super().__init__(items)
        self.at, self.how, self.record, self.seen = at, how, record, []

    def __getitem__(self, i):
        if self.record and not self.seen:
            self.seen.append(group_timeout().total_seconds())
        if i == self.at:
            if self.how == "hang":
                time.sleep(3600)
            os._exit(1)
        return super().__getitem__(i)


def llama_classifier(sharded=False):
    from laplace_llm import LLMClassifier
    from tests.fixtures.models import tiny_llama_lora

    peft = tiny_llama_lora(seed=0, dtype=torch.float64)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in peft.base_model.model.model.layers:
            fully_shard(layer)
    clf = LLMClassifier(peft, TARGET_IDS)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(clf)
    return clf


def dense(kron):
    from laplace_llm.matrix import LowRankFactor

    return [[f.to_dense() if isinstance(f, LowRankFactor) else f for f in F] for F in kron.kfacs]


def normal_fits(rank, world, out_dir):
    """Kron, diag and full fits with and without a timeout; the group's timeout during and after."""
    from laplace_llm import LoRADiagLaplace, LoRAFullLaplace, LoRALaplace
    from laplace_llm.distributed import shard
    from tests.fixtures.models import lora_mlp
    from tests.posterior.test_base import mlp_loader

    fits = {}
    for name, timeout in (("none", None), ("seconds", TIMEOUT), ("timedelta", timedelta(seconds=7))):
        data = Misbehaving(token_items(ITEMS, 6, seed=1)[rank::world], record=True)
        la = LoRALaplace(llama_classifier(), "classification", **KFAC)
        la.fit(DataLoader(data, batch_size=4), distributed=True, timeout=timeout)
        fit = {"kron": dense(la.H_facs), "kron_loss": torch.as_tensor(la.loss),
               "kron_lml": la.log_marginal_likelihood().detach(),
               "during": torch.tensor(data.seen), "after": torch.tensor(group_timeout().total_seconds())}
        mine = DataLoader(shard(mlp_loader(n=ITEMS).dataset, rank, world), batch_size=4)
        for cls in (LoRADiagLaplace, LoRAFullLaplace):
            other = cls(lora_mlp(seed=0), "classification", fisher_type="ggn")
            other.fit(mine, distributed=True, timeout=timeout)
            fit[cls.__name__] = other.H
            fit[cls.__name__ + "_loss"] = torch.as_tensor(other.loss)
        fit["n_data"] = torch.tensor(la.n_data)
        fits[name] = fit
    torch.save(fits, os.path.join(out_dir, f"fits{rank}.pt"))
    return {}


def failing_fit(rank, world, scenario):
    """Rank 1 hangs or dies in its loader; return what the fit raised here and when."""
    from laplace_llm import LoRADiagLaplace, LoRALaplace
    from laplace_llm.distributed import shard
    from tests.fixtures.models import lora_mlp
    from tests.posterior.test_base import mlp_loader

    how = "die" if scenario == "die" else "hang"
    if scenario == "die":  # the diagonal structure, an MLP: item 4 is in rank 1's 2nd batch
        dataset = shard(mlp_loader(n=ITEMS).dataset, rank, world)
        dataset = Misbehaving([dataset[k] for k in range(len(dataset))], at=4 if rank else None,
                              how=how)
        la = LoRADiagLaplace(lora_mlp(seed=0), "classification", fisher_type="ggn")
        batch = 4
    else:  # kron; sharded: batches of 3, item 3 is in rank 1's 2nd batch (index 1)
        sharded = scenario == "sharded"
        batch = 3 if sharded else 4
        items = token_items(ITEMS, 6, seed=1)[rank::world]
        dataset = Misbehaving(items, at=batch if rank else None, how=how)
        la = LoRALaplace(llama_classifier(sharded), "classification", **KFAC)
    result = {"error": None}
    start = time.monotonic()
    try:
        la.fit(DataLoader(dataset, batch_size=batch), distributed=True, timeout=TIMEOUT)
    except Exception as err:
        result = {"error": type(err).__name__, "message": str(err),
                  "cause": repr(err.__cause__), "seconds": time.monotonic() - start}
    return result


def worker(rank, world, port, out_dir, scenario):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    out = Path(out_dir)
    try:
        if scenario == "normal":
            result = normal_fits(rank, world, out_dir)
        else:
            result = failing_fit(rank, world, scenario)
    except Exception as err:  # reported to the test, not lost in the child's stderr
        result = {"error": type(err).__name__, "message": f"outside the fit: {err}"}
    (out / f"result{rank}.json").write_text(json.dumps(result))
    start = time.monotonic()
    dist.destroy_process_group()  # must not wait for the hung rank: nothing is pending
    (out / f"destroyed{rank}.json").write_text(json.dumps(time.monotonic() - start))


def run_ranks(tmp_path: Path, scenario: str, ends: list[int]) -> tuple[list[dict], float]:
    """Start both ranks; wait until the ranks ``ends`` have written their results and exited.

    The others (hung) are terminated. Returns the results of ``ends`` and the seconds the
    whole took. A deadline fails the test instead of hanging it.
    """
    start = time.monotonic()
    ctx = mp.spawn(worker, args=(2, free_port(), str(tmp_path), scenario), nprocs=2, join=False)
    try:
        while True:
            if all((tmp_path / f"destroyed{r}.json").exists()
                   and ctx.processes[r].exitcode is not None for r in ends):
                break
            if any(ctx.processes[r].exitcode not in (None, 0) for r in ends):
                pytest.fail(f"rank(s) {ends} exited with codes "
                            f"{[ctx.processes[r].exitcode for r in ends]} in scenario {scenario}")
            if time.monotonic() - start > DEADLINE:
                pytest.fail(f"scenario {scenario}: rank(s) {ends} did not end within {DEADLINE} s "
                            f"(written: {sorted(p.name for p in tmp_path.iterdir())})")
            time.sleep(0.2)
    finally:
        for p in ctx.processes:
            if p.exitcode is None:
                p.terminate()
                p.join(10)
            if p.exitcode is None:
                p.kill()
                p.join(10)
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in ends]
    for r in ends:
        destroyed = json.loads((tmp_path / f"destroyed{r}.json").read_text())
        assert destroyed < 2.0, f"rank {r}: destroy_process_group took {destroyed:.1f} s"
    return results, time.monotonic() - start


# ------------------------------------------------------------ two processes
@pytest.mark.slow  # two processes importing torch+transformers: 18 s measured
def test_a_hung_rank_ends_the_other_within_the_timeout_naming_it_and_the_step(tmp_path):
    (res,), _ = run_ranks(tmp_path, "hang", ends=[0])
    assert res["error"] == "CollectiveTimeoutError", res
    msg = res["message"]
    assert msg.startswith("Rank 0 of 2 failed at the collective step 'all-reduce of the sketch "
                          "of the curvature factor G (output gradients) of block 0 "
                          f"({BLOCK0})' of a distributed fit: it waited longer than its "
                          "timeout, 5 s, for the other ranks."), msg
    assert "Rank 1 of 2 had not reached this step (rank 1's latest step: 'summing the data " \
           "size')" in msg, msg
    assert "raise the timeout: fit(..., timeout=seconds), laplace-llm fit --timeout SECONDS" in msg
    assert "Timed out waiting 5000ms" in msg  # gloo's own words, at the end
    assert TIMEOUT <= res["seconds"] < TIMEOUT + MARGIN, res["seconds"]


@pytest.mark.slow  # two processes importing torch+transformers: 18 s measured
def test_a_dead_rank_ends_the_other_at_once_naming_it(tmp_path):
    (res,), _ = run_ranks(tmp_path, "die", ends=[0])
    assert res["error"] == "CollectiveTimeoutError", res
    msg = res["message"]
    assert msg.startswith("Rank 0 of 2 failed at the collective step 'all-reduce of the "
                          "curvature (48 entries over 4 LoRA blocks)' of a distributed fit: the "
                          "connection to another rank broke"), msg
    assert "Rank 1 of 2 had not reached this step (rank 1's latest step: 'summing the data " \
           "size')" in msg, msg
    assert "read the log of rank 1 for the error that ended it" in msg
    # gloo's words: "Connection closed by peer" or "Connection reset by peer", by timing
    assert re.search(r"\(torch\.distributed: .*Connection (closed|reset) by peer", msg), msg
    assert res["seconds"] < TIMEOUT, res["seconds"]  # no wait for the timeout


@pytest.mark.slow  # two processes importing torch+transformers, FSDP2: 24 s measured
def test_a_hung_rank_of_a_sharded_model_is_named_with_the_batch_of_the_collective_pass(tmp_path):
    (res,), _ = run_ranks(tmp_path, "sharded", ends=[0])
    assert res["error"] == "CollectiveTimeoutError", res
    msg = res["message"]
    assert msg.startswith("Rank 0 of 2 failed at the collective step 'the forward and backward "
                          "pass of batch 1 (FSDP2 gathers the sharded weights with every "
                          "rank)' of a distributed fit: it waited longer than its timeout, "
                          "5 s"), msg
    assert "rank 1's latest step: 'the forward and backward pass of batch 0 " in msg, msg
    assert TIMEOUT <= res["seconds"] < TIMEOUT + MARGIN, res["seconds"]


@pytest.mark.slow  # two processes importing torch+transformers, nine fits: 19 s measured
def test_fits_with_a_timeout_equal_fits_without_bit_for_bit_and_the_group_keeps_its_own(tmp_path):
    run_ranks(tmp_path, "normal", ends=[0, 1])
    for r in range(2):
        fits = torch.load(tmp_path / f"fits{r}.pt", weights_only=True)
        ref = fits["none"]
        assert ref["n_data"].item() == ITEMS
        for name in ("seconds", "timedelta"):
            got = fits[name]
            for F, G in zip(got["kron"], ref["kron"], strict=True):
                for f, g in zip(F, G, strict=True):
                    assert torch.equal(f, g)
            for key in ("kron_loss", "kron_lml", "LoRADiagLaplace", "LoRADiagLaplace_loss",
                        "LoRAFullLaplace", "LoRAFullLaplace_loss"):
                assert torch.equal(got[key], ref[key]), key
        # the fit's timeout while it ran, the group's own before and after
        assert ref["during"].tolist() == [GROUP_TIMEOUT.total_seconds()]
        assert fits["seconds"]["during"].tolist() == [TIMEOUT]
        assert fits["timedelta"]["during"].tolist() == [7.0]
        for name in ("none", "seconds", "timedelta"):
            assert fits[name]["after"].item() == GROUP_TIMEOUT.total_seconds()
    # and both ranks hold the same posterior
    a, b = (torch.load(tmp_path / f"fits{r}.pt", weights_only=True)["seconds"] for r in range(2))
    assert torch.equal(a["LoRAFullLaplace"], b["LoRAFullLaplace"])
    assert torch.equal(a["kron_lml"], b["kron_lml"])


# ------------------------------------------------------------ in this process
def test_timeout_takes_seconds_or_a_timedelta_and_refuses_the_rest_naming_the_fix():
    assert as_timeout(None) is None
    assert as_timeout(90) == timedelta(seconds=90)
    assert as_timeout(0.5) == timedelta(milliseconds=500)
    assert as_timeout(timedelta(minutes=2)) == timedelta(seconds=120)
    for bad in (0, -3, timedelta(0), float("nan"), float("inf"), "60", True):
        with pytest.raises(ValueError, match=r"timeout must be .*e\.g\. 600"):
            as_timeout(bad)


def test_fit_refuses_a_bad_timeout_before_any_work():
    from laplace_llm import LoRADiagLaplace
    from tests.fixtures.models import lora_mlp
    from tests.posterior.test_base import mlp_loader

    la = LoRADiagLaplace(lora_mlp(seed=0), "classification", fisher_type="ggn")
    with pytest.raises(ValueError, match=r"timeout must be positive, got -1"):
        la.fit(mlp_loader(), distributed=True, timeout=-1)
    assert not la._is_fitted()


def test_failure_message_names_rank_step_missing_ranks_timeout_and_fix():
    step = "summing the data size"
    hung = failure_message(step, 0, 4, timedelta(seconds=30),
                           "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms "
                           "for recv operation to complete\nmore", count=3,
                           others={1: (3, step), 2: (2, "summing the loss"), 3: (0, None)})
    assert hung == (
        "Rank 0 of 4 failed at the collective step 'summing the data size' of a distributed "
        "fit: it waited longer than its timeout, 30 s, for the other ranks. Ranks 2, 3 of 4 had "
        "not reached this step (rank 2's latest step: 'summing the loss'; rank 3 had entered no "
        "collective step of a fit). Fix: if ranks 2, 3 crashed or hung, read its log; if it is "
        "only slower (a longer shard, a slower device, a slow start), raise the timeout: "
        "fit(..., timeout=seconds), laplace-llm fit --timeout SECONDS, "
        "LaplaceCallback(fit_timeout=seconds). (torch.distributed: "
        "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv "
        "operation to complete)")
    lost = failure_message(step, 2, 3, None, "Connection closed by peer [10.0.0.1]:4242",
                           count=5, others={0: (5, step), 1: (5, step)})
    assert "the connection to another rank broke" in lost
    assert "Every other rank had reached this step, so one of them failed during it" in lost
    assert "read the log of the other ranks for the error that ended it" in lost
    unknown = failure_message(step, 1, 2, timedelta(seconds=5), "Connection reset by peer",
                              count=2, others=None, store_error="Broken pipe")
    assert ("Which ranks had not reached this step is unknown: the process group's store could "
            "not be asked: Broken pipe (under env:// initialisation rank 0 serves it") in unknown


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=123))
    yield
    dist.destroy_process_group()


def test_collective_timeout_applies_then_restores_the_groups_own(one_process_group):
    assert group_timeout() == timedelta(seconds=123)
    with collective_timeout(4.5):
        assert group_timeout() == timedelta(seconds=4.5)
        with collective_timeout(None):  # None: the timeout around it stays
            assert group_timeout() == timedelta(seconds=4.5)
    assert group_timeout() == timedelta(seconds=123)
    with pytest.raises(KeyError), collective_timeout(timedelta(seconds=9)):
        assert group_timeout() == timedelta(seconds=9)
        raise KeyError("restored on errors too")
    assert group_timeout() == timedelta(seconds=123)


def test_collective_step_names_a_failed_collective_and_passes_other_errors(one_process_group):
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_process_group_store(dist.group.WORLD)
    before = store.add("laplace_llm/steps/0", 0)
    with collective_step("gathering the mean"):
        t = torch.ones(2)
        dist.all_reduce(t)
    assert t.tolist() == [1.0, 1.0]
    with pytest.raises(CollectiveTimeoutError) as info, collective_step("summing the loss"):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:1")
    assert str(info.value).startswith(
        "Rank 0 of 1 failed at the collective step 'summing the loss' of a distributed fit: "
        "the connection to another rank broke")
    assert "Connection closed by peer" in repr(info.value.__cause__)
    for other in (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
                  FloatingPointError("NaN in batch 3")):
        with pytest.raises(type(other), match=re.escape(str(other))), collective_step("x"):
            raise other
    # each step entered is counted, the latest named, in the group's store
    assert store.add("laplace_llm/steps/0", 0) == before + 4
    assert store.get("laplace_llm/step/0").decode() == f"{before + 4} x"


def test_cli_timeout_reaches_the_process_group_and_is_checked(monkeypatch, capsys):
    from laplace_llm.app import cli
    from laplace_llm.app.commands import fit as fit_command
    from laplace_llm.app.loading import UserError

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr("laplace_llm.distributed.process_rank", lambda group=None: (1, 2))
    assert fit_command.launcher_group(90.0) == (1, 2, True)
    assert fit_command.launcher_group() == (1, 2, True)
    assert calls == [(("gloo",), {"timeout": timedelta(seconds=90)}), (("gloo",), {})]

    def refuse(*a, **k):
        raise RuntimeError("Timed out after 91 seconds waiting for clients. 1/2 clients joined.")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    with pytest.raises(UserError, match=r"process 1 of 2 could not join the process group "
                       r"within 90 s: Timed out after 91 seconds waiting for clients\. 1/2 "
                       r"clients joined\. Check that every process started"):
        fit_command.launcher_group(90.0)
    args = cli.build_parser().parse_args(["fit", "--model", "m", "--data", "d", "--timeout", "600"])
    assert args.timeout == 600.0
    for bad in ("0", "-5", "ten", "inf"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["fit", "--model", "m", "--data", "d", "--timeout", bad])
        assert "expected a positive number of seconds" in capsys.readouterr().err


def test_callback_checks_fit_timeout_and_passes_it_to_the_fit(monkeypatch):
    from torch import nn

    from laplace_llm import callback as cb

    with pytest.raises(ValueError, match=r"fit_timeout must be positive, got 0"):
        cb.LaplaceCallback(lambda m: m, fit_timeout=0)
    seen = {}

    class FakeLaplace:
        _device = torch.device("cpu")

        def __init__(self, *args, **kwargs):
            pass

        def fit(self, loader, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(cb, "LoRALaplace", FakeLaplace)
    callback = cb.LaplaceCallback(lambda m: m, fit_timeout=45, prior_optimization="none")
    callback.fit(nn.Linear(2, 2), DataLoader(DictDataset(token_items(3, 4)), batch_size=2), 2)
    assert seen == {"distributed": False, "timeout": timedelta(seconds=45)}


def test_cli_fit_passes_timeout_and_reports_a_collective_failure_in_one_line(tmp_path, monkeypatch,
                                                                            capsys):
    from laplace_llm import LoRALaplace
    from laplace_llm.app.cli import main
    from tests.app.test_cli import mcqa_records, write_jsonl
    from tests.fixtures.models import write_model_folder

    write_model_folder(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", mcqa_records(5))
    capsys.readouterr()  # the progress bars of writing the model
    seen = {}
    failure = ("Rank 0 of 2 failed at the collective step 'summing the data size' of a "
               "distributed fit: it waited longer than its timeout, 30 s, for the other ranks.")

    def fit(self, loader, **kwargs):
        seen.update(kwargs)
        raise CollectiveTimeoutError(failure)

    monkeypatch.setattr(LoRALaplace, "fit", fit)
    code = main(["fit", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"),
                 "--data", str(tmp_path / "data.jsonl"), "--quiet", "--timeout", "30",
                 "--checkpoint", str(tmp_path / "fit.ckpt"), "--checkpoint-every", "5"])
    assert code == 2
    assert seen["timeout"] == 30.0 and seen["distributed"] is False
    err = capsys.readouterr().err
    assert err == (f"laplace-llm fit: error: {failure} Rerun with --resume to continue from the "
                   f"checkpoints written every 5 batches ({tmp_path / 'fit.ckpt'}[.rank<r>]).\n")
