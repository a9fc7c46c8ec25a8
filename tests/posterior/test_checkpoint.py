"""Resumable fits: ``fit(checkpoint=..., checkpoint_every=...)`` and ``fit(resume_from=...)``.

The reference is the uninterrupted fit of the same model on the same loader, in the same
process. A resumed fit makes the same floating-point operations in the same order (the
checkpoint holds the Kronecker roots before truncation, the dense sums, the summed loss
and the Monte-Carlo generator's state; the tensors are read back bit for bit), so every
comparison here is exact (``torch.equal``, ``==``), no tolerance: factors, loss, data
size, evidence and GLM predictive. The tiny Llama is float64 with low-rank factors of
rank 2 whose roots are truncated in the middle of the fit (``lr_threshold=4``, so the
sides 16 are low rank and truncated whenever a root exceeds 2 + 32 columns), which
is what a checkpoint must not disturb.
"""

import json
import os
import signal
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

import laplace_llm
from laplace_llm import (
    LLMClassifier,
    LoRADiagLaplace,
    LoRAFullLaplace,
    LoRALaplace,
    PosteriorFileError,
)
from laplace_llm.posterior.checkpoint import CHECKPOINT_FILENAME, checkpoint_file, read_checkpoint
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items
from tests.fixtures.models import tiny_llama_lora


@pytest.fixture(autouse=True)
def _python_sigint_handler():
    """Python's own SIGINT handler, as in a terminal: a test run started in the background
    (``cmd &`` in a script, ``nohup``) inherits SIGINT ignored, which the fit rightly
    leaves alone, and these tests are about the handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

CLASSES = {"kron": LoRALaplace, "diag": LoRADiagLaplace, "full": LoRAFullLaplace}
KRON = dict(n_kfac=2, lr_threshold=4)  # sides 16 low rank, truncated mid-fit
N_ITEMS, BATCH = 15, 4  # 4 batches, the last one of 3


def llama(seed=0):
    peft_model = tiny_llama_lora(seed=seed, dtype=torch.float64, hidden=16, layers=1, r=2,
                                 _attn_implementation="eager")
    return LLMClassifier(peft_model, TARGET_IDS)


def loader(n=N_ITEMS, batch_size=BATCH, seed=0, **kwargs):
    return DataLoader(DictDataset(token_items(n, 6, seed=seed, min_length=2)),
                      batch_size=batch_size, **kwargs)


def laplace(structure, fisher="ggn", seed=None, model=None, **kwargs):
    options = dict(KRON) if structure == "kron" else {}
    options.update(kwargs)
    return CLASSES[structure](model if model is not None else llama(), "classification",
                              fisher_type=fisher, seed=seed, **options)


class Crash(Exception):
    """The process dying mid-fit."""


class Crashing:
    """A loader that raises :class:`Crash` when asked for batch ``at`` (0-based)."""

    def __init__(self, inner, at):
        self.inner, self.at, self.dataset = inner, at, inner.dataset

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.at:
                raise Crash(f"killed before batch {i}")
            yield batch


class Signalling:
    """A loader that sends this process ``signum`` (``times`` times) while yielding batch ``at``."""

    def __init__(self, inner, at, signum, times=1):
        self.inner, self.at, self.signum, self.times = inner, at, signum, times
        self.dataset = inner.dataset

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.at:
                for _ in range(self.times):
                    signal.raise_signal(self.signum)
            yield batch


def crash_and_resume(structure, fisher, seed, tmp_path, at=2, every=1, **kwargs):
    """Fit, crash before batch ``at``, then resume in a new Laplace object (new model copy)."""
    path = tmp_path / "fit.ckpt"
    first = laplace(structure, fisher, seed, **kwargs)
    with pytest.raises(Crash):
        first.fit(Crashing(loader(), at), checkpoint=path, checkpoint_every=every)
    assert not first._is_fitted()  # an interrupted fit keeps nothing in memory
    resumed = laplace(structure, fisher, seed, **kwargs)
    resumed.fit(loader(), checkpoint=path, checkpoint_every=every, resume_from=path)
    return resumed, path


def curvature_tensors(la):
    """Every tensor of the fitted curvature, in order (kron: roots, dense factors, traces)."""
    if isinstance(la, LoRALaplace):
        return [v for row in la.H_facs.to_state() for f in row for k, v in sorted(f.items())
                if isinstance(v, torch.Tensor)]
    return [la.H]


def assert_same_posterior(a, b):
    """Bit for bit: curvature, loss, N, evidence, GLM predictive (probit) and its moments."""
    ta, tb = curvature_tensors(a), curvature_tensors(b)
    assert len(ta) == len(tb) > 0
    for x, y in zip(ta, tb):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert torch.equal(torch.as_tensor(a.loss), torch.as_tensor(b.loss))
    assert a.n_data == b.n_data == N_ITEMS
    assert a.n_outputs == b.n_outputs == len(TARGET_IDS)
    assert torch.equal(a.log_marginal_likelihood(), b.log_marginal_likelihood())
    batch = next(iter(loader(n=3, seed=9)))
    mu_a, var_a = a._glm_predictive_distribution(batch)
    mu_b, var_b = b._glm_predictive_distribution(batch)
    assert torch.equal(mu_a, mu_b) and torch.equal(var_a, var_b)
    assert torch.equal(a(batch, link_approx="probit"), b(batch, link_approx="probit"))


CASES = [(s, f) for s in ("kron", "diag", "full") for f in ("mc", "ggn")]


@pytest.mark.parametrize("structure,fisher", CASES)
@pytest.mark.parametrize("at,every", [(2, 1), (3, 2)])
def test_a_crashed_fit_resumed_equals_the_uninterrupted_fit(structure, fisher, at, every, tmp_path):
    """Crash before batch ``at`` with a checkpoint every ``every`` batches: the file holds
    the last multiple of ``every`` (2 in both cases; with (3, 2) batch 2 is computed again),
    and the resumed fit equals the uninterrupted one bit for bit, the Monte-Carlo labels
    included (same generator state at the end)."""
    seed = 3 if fisher == "mc" else None
    resumed, path = crash_and_resume(structure, fisher, seed, tmp_path, at=at, every=every)
    header, _ = read_checkpoint(path)
    assert header["batches_seen"] == 4  # the resumed fit wrote its own, at every multiple
    ref = laplace(structure, fisher, seed)
    ref.fit(loader())
    assert_same_posterior(resumed, ref)
    if seed is not None:
        assert torch.equal(resumed.backend.generator.get_state(), ref.backend.generator.get_state())
        other = laplace(structure, fisher, seed=4)  # the labels matter: another seed differs
        other.fit(loader())
        assert not torch.equal(curvature_tensors(other)[0], curvature_tensors(ref)[0])


def test_the_checkpoint_holds_the_roots_before_truncation(tmp_path):
    """accumulation="truncate": after 1 batch the shared input factor of the lora_A (side 16) holds the batch's
    ≤ 24 token columns, not n_kfac = 2: the checkpoint keeps them as they are, with the
    chunk that decides the next truncation, and a fit that writes checkpoints equals one
    that does not."""
    path = tmp_path / "fit.ckpt"
    la = laplace("kron", accumulation="truncate")
    with pytest.raises(Crash):
        la.fit(Crashing(loader(), 1), checkpoint=path, checkpoint_every=1)
    header, tensors = read_checkpoint(path)
    assert header["batches_seen"] == 1
    roots = {k: v for k, v in tensors.items() if k.endswith(".root")}
    assert max(r.shape[1] for r in roots.values()) > KRON["n_kfac"]
    chunks = [f["values"]["chunk"] for row in header["layout"] for f in row if "values" in f
              and "chunk" in f["values"]]
    assert chunks and set(chunks) == {32}
    shared = [f for row in header["layout"] for f in row if "same_as" in f]
    assert shared  # q and v read the same input: one factor, stored once
    # the loss of batch 0 alone, as the uninterrupted fit has it after one batch
    one = laplace("kron", accumulation="truncate")
    one.fit(loader(n=BATCH))
    scaled = one.loss  # N differs (4 vs 15) but the loss is a plain sum
    assert torch.equal(tensors["loss"].reshape(()), torch.as_tensor(scaled))

    with_ckpt = laplace("kron", accumulation="truncate")
    without = laplace("kron", accumulation="truncate")
    with_ckpt.fit(loader(), checkpoint=tmp_path / "b.ckpt", checkpoint_every=1)
    without.fit(loader())
    assert_same_posterior(with_ckpt, without)


def test_the_checkpoint_holds_the_pending_sketches(tmp_path):
    """accumulation="sketch" (the default): mid-fit the low-rank factors are sketches
    ``F Ω`` of s = 64 columns, stored undecomposed (decomposing them would change the
    fit), and a fit resumed from them equals the uninterrupted one bit for bit."""
    path = tmp_path / "fit.ckpt"
    la = laplace("kron")
    assert la.options.sketch_columns == 64
    with pytest.raises(Crash):
        la.fit(Crashing(loader(), 2), checkpoint=path, checkpoint_every=1)
    _, tensors = read_checkpoint(path)
    sketches = {k: v for k, v in tensors.items() if k.endswith(".sketch")}
    assert sketches and not any(k.endswith(".root") for k in tensors)
    assert {v.shape[1] for v in sketches.values()} == {64}
    resumed = laplace("kron")
    resumed.fit(loader(), checkpoint=path, resume_from=path)
    ref = laplace("kron")
    ref.fit(loader())
    assert_same_posterior(resumed, ref)


def test_a_finished_checkpoint_resumes_to_the_same_posterior_without_computing(tmp_path):
    """A checkpoint written after the last batch: resuming skips every batch."""
    path = tmp_path / "fit.ckpt"
    ref = laplace("kron")
    ref.fit(loader(), checkpoint=path, checkpoint_every=2)
    assert read_checkpoint(path)[0]["batches_seen"] == 4
    resumed = laplace("kron")
    calls = []
    add = resumed._add_batch
    resumed._add_batch = lambda *a: calls.append(1) or add(*a)
    resumed.fit(loader(), resume_from=path)
    assert calls == []
    assert_same_posterior(resumed, ref)


def test_a_folder_means_its_checkpoint_file(tmp_path):
    la = laplace("diag")
    with pytest.raises(Crash):
        la.fit(Crashing(loader(), 2), checkpoint=tmp_path, checkpoint_every=1)
    assert (tmp_path / CHECKPOINT_FILENAME).is_file()
    assert checkpoint_file(tmp_path) == tmp_path / CHECKPOINT_FILENAME
    resumed = laplace("diag")
    resumed.fit(loader(), resume_from=tmp_path)
    ref = laplace("diag")
    ref.fit(loader())
    assert_same_posterior(resumed, ref)


def test_override_false_resumes_onto_the_posterior_it_adds_to(tmp_path):
    """override=False: the checkpoint holds this call's batches; the resumed call adds
    them to the posterior held, as the uninterrupted call does (A factors reweighted)."""
    first, second = loader(n=8, seed=5), loader()
    path = tmp_path / "fit.ckpt"
    base = laplace("kron")
    base.fit(first)
    with pytest.raises(Crash):
        base.fit(Crashing(second, 2), override=False, checkpoint=path, checkpoint_every=1)
    assert base.n_data == 8  # the interrupted call changed nothing
    base.fit(second, override=False, resume_from=path)
    ref = laplace("kron")
    ref.fit(first)
    ref.fit(second, override=False)
    assert base.n_data == ref.n_data == 8 + N_ITEMS
    for x, y in zip(curvature_tensors(base), curvature_tensors(ref)):
        assert torch.equal(x, y)
    assert torch.equal(base.loss, ref.loss)
    assert torch.equal(base.log_marginal_likelihood(), ref.log_marginal_likelihood())

    fresh = laplace("kron")  # nothing fitted: not the posterior the file added to
    with pytest.raises(PosteriorFileError, match=r"added its data to a fitted posterior \(override=False"):
        fresh.fit(second, override=False, resume_from=path)
    other = laplace("kron")
    other.fit(loader(n=9, seed=5))
    with pytest.raises(PosteriorFileError, match="n_data=8 .*this one has n_data=9"):
        other.fit(second, override=False, resume_from=path)
    with pytest.raises(PosteriorFileError, match="resume it with override=False on that posterior"):
        other.fit(second, override=True, resume_from=path)


def test_an_mc_fit_without_a_seed_resumes_with_a_warning(tmp_path, caplog):
    """Without a seed the labels come from torch's global generator, which is not saved:
    the resumed fit warns; its curvature is another draw (data size and loss are exact,
    the loss does not depend on the labels drawn)."""
    path = tmp_path / "fit.ckpt"
    with pytest.raises(Crash):
        laplace("diag", "mc").fit(Crashing(loader(), 2), checkpoint=path, checkpoint_every=1)
    resumed = laplace("diag", "mc")
    with caplog.at_level("WARNING", logger="laplace_llm.posterior.checkpoint"):
        resumed.fit(loader(), resume_from=path)
    assert "without a seed" in caplog.text and "Pass seed=" in caplog.text
    ref = laplace("diag", "mc")
    ref.fit(loader())
    assert resumed.n_data == ref.n_data and torch.equal(resumed.loss, ref.loss)


# ----------------------------------------------------------------------- signals
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_sigint_writes_the_checkpoint_then_raises_keyboard_interrupt(structure, tmp_path):
    """SIGINT while batch 1 is fetched: batch 1 is accumulated, the checkpoint written
    (2 batches, no periodic writes), then Python's handler raises KeyboardInterrupt; the
    handler is restored and the resumed fit equals the uninterrupted one (mc, seeded)."""
    path = tmp_path / "fit.ckpt"
    before = signal.getsignal(signal.SIGINT)
    la = laplace(structure, "mc", seed=1)
    with pytest.raises(KeyboardInterrupt):
        la.fit(Signalling(loader(), 1, signal.SIGINT), checkpoint=path)
    assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert read_checkpoint(path)[0]["batches_seen"] == 2
    resumed = laplace(structure, "mc", seed=1)
    resumed.fit(loader(), resume_from=path)
    ref = laplace(structure, "mc", seed=1)
    ref.fit(loader())
    assert_same_posterior(resumed, ref)


def test_sigterm_calls_the_previous_python_handler_after_writing(tmp_path):
    """A SIGTERM handler of the application is called once the checkpoint is written;
    if it returns, the fit goes on (as it would have without the checkpoint)."""
    path = tmp_path / "fit.ckpt"

    class Terminated(Exception):
        pass

    seen = []

    def stop(signum, frame):
        seen.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Terminated):
            laplace("kron").fit(Signalling(loader(), 2, signal.SIGTERM), checkpoint=path)
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is stop
        assert read_checkpoint(path)[0]["batches_seen"] == 3

        signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
        goes_on = laplace("kron")
        goes_on.fit(Signalling(loader(), 0, signal.SIGTERM), checkpoint=tmp_path / "b.ckpt")
        assert len(seen) == 2 and read_checkpoint(tmp_path / "b.ckpt")[0]["batches_seen"] == 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    ref = laplace("kron")
    ref.fit(loader())
    assert_same_posterior(goes_on, ref)
    resumed = laplace("kron")
    resumed.fit(loader(), resume_from=path)
    assert_same_posterior(resumed, ref)


def test_a_second_signal_stops_at_once_without_writing(tmp_path):
    """Two SIGINTs while batch 2 is fetched: KeyboardInterrupt at once; the file keeps
    the periodic checkpoint of 2 batches."""
    path = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        laplace("diag").fit(Signalling(loader(), 2, signal.SIGINT, times=2), checkpoint=path,
                            checkpoint_every=1)
    assert read_checkpoint(path)[0]["batches_seen"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_handler_without_a_checkpoint_and_ignored_signals_stay_ignored(tmp_path):
    """Without checkpoint= nothing is installed (SIGINT interrupts at once, nothing is
    written); a signal set to SIG_IGN is left ignored during a fit with a checkpoint."""
    with pytest.raises(KeyboardInterrupt):
        laplace("diag").fit(Signalling(loader(), 1, signal.SIGINT))
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        la = laplace("diag")
        la.fit(Signalling(loader(), 1, signal.SIGTERM), checkpoint=tmp_path / "c.ckpt")
        assert la.n_data == N_ITEMS and not (tmp_path / "c.ckpt").exists()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------ errors
@pytest.fixture
def kron_checkpoint(tmp_path):
    """The checkpoint of a kron ggn fit killed before batch 2 (holds 2 batches)."""
    path = tmp_path / "fit.ckpt"
    with pytest.raises(Crash):
        laplace("kron").fit(Crashing(loader(), 2), checkpoint=path, checkpoint_every=1)
    return path


@pytest.mark.parametrize("case,match", [
    ("weights", "other LoRA weights .*load the adapter"),
    ("structure", "hessian_structure='kron' in the file, 'diag' now"),
    ("options", "other options: n_kfac=2 in the file, 3 now"),
    ("fisher", "other options: fisher_type='ggn' in the file, 'mc' now"),
    ("seed", "seed=None in the file, 7 now"),
    ("blocks", "other LoRA blocks"),
    ("batch_size", "the loader has 3 batches, the interrupted fit's had 4"),
    ("dataset", "N=15 in the file, 16 now.*dataset has 16 examples"),
])
def test_a_checkpoint_of_another_fit_is_refused_naming_the_difference(kron_checkpoint, case, match):
    la = {
        "weights": lambda: laplace("kron", model=llama(seed=1)),
        "structure": lambda: laplace("diag"),
        "options": lambda: laplace("kron", n_kfac=3),
        "fisher": lambda: laplace("kron", "mc"),
        "seed": lambda: laplace("kron", seed=7),
        "blocks": lambda: laplace("kron", lora_modules=["*.q_proj"]),
    }.get(case, lambda: laplace("kron"))()
    data = {"batch_size": loader(batch_size=5), "dataset": loader(n=16)}.get(case, loader())
    with pytest.raises(PosteriorFileError, match=f"Cannot resume from .*{match}.*fit afresh"):
        la.fit(data, resume_from=kron_checkpoint)
    assert not la._is_fitted()


def test_a_loader_in_another_order_is_refused_naming_the_seeded_generator(kron_checkpoint):
    shuffled = loader(shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(PosteriorFileError, match="other batches .*order.*seeded generator"):
        laplace("kron").fit(shuffled, resume_from=kron_checkpoint)


def test_a_seeded_shuffled_loader_resumes(tmp_path):
    """A shuffled loader with a generator seeded anew yields the same order again."""
    def shuffled():
        return loader(shuffle=True, generator=torch.Generator().manual_seed(0))

    path = tmp_path / "fit.ckpt"
    with pytest.raises(Crash):
        laplace("diag").fit(Crashing(shuffled(), 3), checkpoint=path, checkpoint_every=1)
    resumed = laplace("diag")
    resumed.fit(shuffled(), resume_from=path)
    ref = laplace("diag")
    ref.fit(shuffled())
    assert_same_posterior(resumed, ref)


class Short(Crashing):
    """Stops after ``at`` batches but claims the full length."""

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.at:
                return
            yield batch


def test_a_loader_that_ends_early_is_refused(kron_checkpoint):
    with pytest.raises(PosteriorFileError, match="yielded 1 batches, fewer than the 2"):
        laplace("kron").fit(Short(loader(), 1), resume_from=kron_checkpoint)


def test_files_that_are_no_checkpoint_are_refused(kron_checkpoint, tmp_path):
    """A finished posterior as resume_from, a checkpoint given to load or as a posterior
    path, a missing file, and a checkpoint path holding another file."""
    la = laplace("kron")
    la.fit(loader())
    posterior = la.save(tmp_path / "posterior.safetensors")
    with pytest.raises(PosteriorFileError, match="is a finished posterior, not the checkpoint"):
        laplace("kron").fit(loader(), resume_from=posterior)
    with pytest.raises(PosteriorFileError, match="checkpoint of an unfinished fit.*resume_from"):
        laplace_llm.load(kron_checkpoint, llama())
    with pytest.raises(PosteriorFileError, match="Refusing to overwrite .*not one"):
        laplace("kron").fit(loader(), checkpoint=posterior)
    with pytest.raises(FileNotFoundError, match="No fit checkpoint at .*fit without resume_from"):
        laplace("kron").fit(loader(), resume_from=tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="checkpoint_every=5 needs a file to write: pass checkpoint=PATH"):
        laplace("kron").fit(loader(), checkpoint_every=5)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer ≥ 1; got 0"):
        laplace("kron").fit(loader(), checkpoint=tmp_path / "x.ckpt", checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint=PATH: resume_from only reads"):
        laplace("kron").fit(loader(), resume_from=kron_checkpoint, checkpoint_every=1)


def test_a_checkpoint_of_another_process_is_refused(kron_checkpoint, tmp_path):
    """The file's header says rank 1 of 2 (checksums cover the tensors, not the header)."""
    with safe_open(str(kron_checkpoint), "pt") as fh:
        header = json.loads(fh.metadata()["laplace_llm"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    header.update(rank=1, world_size=2)
    edited = tmp_path / "edited.ckpt"
    save_file(tensors, str(edited), metadata={"laplace_llm": json.dumps(header)})
    with pytest.raises(PosteriorFileError, match="written by process 1 of 2, this is process 0 of 1"):
        laplace("kron").fit(loader(), resume_from=edited)


# ------------------------------------------------------------------- distributed
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_fits(rank, world, port, ckpt, out):
    """Per rank: the uninterrupted distributed fit, a fit crashed at a rank's own batch
    (rank 0 before batch 1, rank 1 before batch 2) and the resumed distributed fit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        items = token_items(2 * N_ITEMS, 6, seed=1, min_length=2)[rank::world]
        def shard():
            return DataLoader(DictDataset(items), batch_size=BATCH)
        results = {}
        for structure in ("kron", "diag"):
            seed = 10 + rank
            ref = laplace(structure, "mc", seed)
            ref.fit(shard(), distributed=True)
            path = ckpt / structure
            try:
                laplace(structure, "mc", seed).fit(Crashing(shard(), 1 + rank), distributed=True,
                                                   checkpoint=path, checkpoint_every=1)
            except Crash:
                pass
            seen = read_checkpoint(checkpoint_file(path, distributed=True))[0]["batches_seen"]
            resumed = laplace(structure, "mc", seed)
            resumed.fit(shard(), distributed=True, resume_from=path)
            results[structure] = {
                "seen": seen,
                "equal": all(torch.equal(x, y) for x, y in
                             zip(curvature_tensors(resumed), curvature_tensors(ref))),
                "loss": [float(ref.loss), float(resumed.loss)],
                "n_data": [ref.n_data, resumed.n_data],
                "lml": [ref.log_marginal_likelihood().item(), resumed.log_marginal_likelihood().item()],
            }
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing torch+transformers: 16-18 s measured here
def test_two_processes_resume_their_own_shards(tmp_path):
    """Each rank writes <path>.rank<r> at its own batch and resumes its own shard; the
    resumed distributed fit equals the uninterrupted one bit for bit on every rank."""
    (tmp_path / "ckpt").mkdir()
    mp.spawn(_distributed_fits, args=(2, free_port(), tmp_path / "ckpt", tmp_path),
             nprocs=2, join=True)
    for rank in range(2):
        for structure in ("kron", "diag"):
            got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[structure]
            assert got["seen"] == 1 + rank
            assert (tmp_path / "ckpt" / f"{structure}.rank{rank}").is_file()
            assert got["equal"]
            assert got["loss"][0] == got["loss"][1]
            assert got["n_data"] == [2 * N_ITEMS] * 2
            assert got["lml"][0] == got["lml"][1]


def _sharded_fits(rank, world, port, ckpt, out):
    """FSDP2-sharded model, ranks with 3 and 2 batches: the first fit dies before batch 1
    on both ranks (the forwards are collective, so together); rank 0 wrote no checkpoint
    (every 2 batches) and refits from its first batch, rank 1 resumes after 1 batch and
    makes idle passes until rank 0 is done."""
    from tests.test_sharding import classifier

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        items = token_items(13, 6, seed=1)[rank::world]

        def fit(loader, **kwargs):
            la = LoRALaplace(classifier("classifier"), "classification", fisher_type="ggn", **KRON)
            la.fit(loader, distributed=True, **kwargs)
            return la

        ref = fit(DataLoader(DictDataset(items), batch_size=3))
        path = ckpt / "fsdp"
        try:
            fit(Crashing(DataLoader(DictDataset(items), batch_size=3), 1), checkpoint=path,
                checkpoint_every=2 if rank == 0 else 1)
        except Crash:
            pass
        mine = checkpoint_file(path, distributed=True)
        resumed = fit(DataLoader(DictDataset(items), batch_size=3),
                      resume_from=path if mine.exists() else None)
        torch.save({
            "file": mine.exists(),
            "equal": all(torch.equal(x, y) for x, y in
                         zip(curvature_tensors(resumed), curvature_tensors(ref))),
            "loss": [float(ref.loss), float(resumed.loss)],
            "lml": [ref.log_marginal_likelihood().item(), resumed.log_marginal_likelihood().item()],
        }, out / f"fsdp{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing torch+transformers: 16-18 s measured here
def test_a_sharded_model_resumes_with_idle_passes(tmp_path):
    (tmp_path / "ckpt").mkdir()
    mp.spawn(_sharded_fits, args=(2, free_port(), tmp_path / "ckpt", tmp_path), nprocs=2,
             join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"fsdp{rank}.pt", weights_only=True)
        assert got["file"] == (rank == 1)
        assert got["equal"]
        assert got["loss"][0] == got["loss"][1] and got["lml"][0] == got["lml"][1]


def without_option(path, option, tmp_path):
    """A copy of the checkpoint ``path`` whose header lacks ``option``, as earlier releases wrote it."""
    from laplace_llm.serialization import read_file, write_file

    header, tensors = read_file(path, kind="checkpoint")
    header = {k: v for k, v in header.items() if k != "sha256"}
    header["options"] = {k: v for k, v in header["options"].items() if k != option}
    old = tmp_path / f"without-{option}.ckpt"
    write_file(tensors, header, old)
    return old


def test_a_checkpoint_written_before_sketch_adapt_resumes_with_the_gaussian_omega(
        kron_checkpoint, tmp_path):
    """Checkpoints of earlier releases lack ``sketch_adapt`` (their Ω was all Gaussian):
    resuming one with the new default is refused naming ``sketch_adapt=0``, and with
    ``sketch_adapt=0`` it resumes."""
    old = without_option(kron_checkpoint, "sketch_adapt", tmp_path)
    with pytest.raises(PosteriorFileError, match="sketch_adapt=0 in the file, -1 now"):
        laplace("kron").fit(loader(), resume_from=old)
    resumed = laplace("kron", sketch_adapt=0)
    resumed.fit(loader(), resume_from=old)
    assert resumed.n_data == N_ITEMS


def test_a_checkpoint_written_before_sketch_readapt_resumes_adapting_once(kron_checkpoint,
                                                                         tmp_path):
    """Checkpoints written before ``sketch_readapt`` lack it (their sketches adapted Ω once):
    resuming one with the new default is refused naming ``sketch_readapt=False``, and with
    it the fit resumes and equals an uninterrupted fit adapted once."""
    old = without_option(kron_checkpoint, "sketch_readapt", tmp_path)
    with pytest.raises(PosteriorFileError, match="sketch_readapt=False in the file, True now"):
        laplace("kron").fit(loader(), resume_from=old)
    resumed = laplace("kron", sketch_readapt=False)
    resumed.fit(loader(), resume_from=old)
    ref = laplace("kron", sketch_readapt=False)
    ref.fit(loader())
    assert_same_posterior(resumed, ref)
