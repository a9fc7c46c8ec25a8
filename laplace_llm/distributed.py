"""Fitting across processes (torch.distributed): who does what, and summing curvature.

Every process takes the examples ``rank, rank + world, …`` (:func:`shard`) and its own
Monte-Carlo labels (:func:`process_seed`); :func:`process_rank` says where it stands. The
command line's ``fit`` under a launcher and the Trainer callback both use these.

Each process fits K-FAC on its shard of the data with the *global* data set size, so
the factors of the whole data set are the sums of the processes' factors: dense
factors are all-reduced, low-rank factors gather every process's root ``U diag(√λ)``
and truncate once more (exact while the gathered rank is at most ``n_kfac``).

Timeouts. A rank that hangs or dies would leave the others waiting in a collective for
the process group's timeout (30 minutes for gloo, 10 for nccl, set at
``init_process_group``) and end them with an error that names neither the rank nor the
step. ``fit(distributed=True, timeout=...)`` applies its own timeout to the group while
it runs (:func:`collective_timeout`: ``torch.distributed.set_timeout``, restored
afterwards), so a collective that waits longer fails inside the backend itself, leaving
no operation pending that would block the process's exit; and it runs each collective
step inside :func:`collective_step`, which records in the group's store (the key-value
store every process group has: ``torchrun``'s agent, or rank 0 under ``env://``) which
step each rank reached, one small write per step, and turns a failure into a
:class:`~laplace_llm.errors.CollectiveTimeoutError` naming this rank, the step, the
ranks that had not reached it (with the last step each did reach), the timeout and the
fix. What gloo does, measured on torch 2.14 (2 CPU processes): a peer that died makes
the next collective fail at once ("Connection closed by peer"); a peer that hangs makes
it fail after the group's timeout ("Timed out waiting ... for recv"); and
``work.wait(timeout)`` stops waiting but leaves the operation pending, which then blocks
``destroy_process_group`` and the process's exit until the group's own timeout, hence
``set_timeout`` rather than ``wait(timeout)`` here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from laplace_llm.errors import CollectiveTimeoutError

__all__ = [
    "process_rank",
    "shard",
    "process_seed",
    "all_reduce_sum",
    "as_timeout",
    "collective_timeout",
    "collective_step",
    "group_timeout",
    "failure_message",
]

logger = logging.getLogger(__name__)


def process_rank(group=None) -> tuple[int, int]:
    """Return the rank and world size of this process in ``group``.

    ``(0, 1)`` when no ``torch.distributed`` group is initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    """Return the examples ``rank, rank + world, …`` of ``dataset`` (all of it when ``world`` is 1).

    The shards of the ``world`` processes are disjoint and cover the dataset, in order,
    so ``fit(distributed=True)`` sums to the fit of the whole.
    """
    if world <= 1:
        return dataset
    if callable(getattr(dataset, "shard", None)):  # a stream (laplace_llm.data.JsonlStream)
        return dataset.shard(rank, world)
    return Subset(dataset, range(rank, len(dataset), world))


def process_seed(seed: int | None, rank: int) -> int | None:
    """Return the seed of this process's Monte-Carlo labels: ``seed + rank`` (independent draws)."""
    return None if seed is None else seed + rank


def as_timeout(timeout: float | timedelta | None, name: str = "timeout") -> timedelta | None:
    """Return ``timeout`` as a ``timedelta``; ``None`` (the process group's own) stays ``None``.

    Parameters
    ----------
    timeout : float, int, timedelta or None
        seconds, or a ``datetime.timedelta``.
    name : str, default "timeout"
        the argument's name in the error.

    Raises
    ------
    ValueError
        not a positive finite number of seconds or a positive ``timedelta``.
    """
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        value = timeout
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool) \
            and math.isfinite(timeout):
        value = timedelta(seconds=float(timeout))
    else:
        raise ValueError(
            f"{name} must be a number of seconds or a datetime.timedelta, got {timeout!r}; "
            "e.g. 600 (ten minutes), or None for the process group's own timeout."
        )
    if value <= timedelta(0):
        raise ValueError(
            f"{name} must be positive, got {timeout!r}: it is how long a rank waits for the "
            "others at a collective step; e.g. 600 seconds, or None for the process group's own."
        )
    return value


def _seconds(t: timedelta | None) -> str:
    return "the process group's own timeout" if t is None else f"{t.total_seconds():g} s"


def _group(group):
    return dist.group.WORLD if group is None else group


def _backends(pg) -> list:
    """Return the backends of ``pg`` (one per device type: gloo for CPU, nccl for CUDA), or []."""
    try:
        return [pg._get_backend(torch.device(d)) for d in pg._device_types]
    except Exception:  # private API of another torch: the timeout is not read back
        return []


def group_timeout(group=None) -> timedelta | None:
    """Return the timeout of ``group``'s collectives (``None`` when torch does not say)."""
    for backend in _backends(_group(group)):
        with contextlib.suppress(Exception):
            return backend.options._timeout
    return None


def _set_group_timeout(pg, timeout: timedelta) -> None:
    setter = getattr(dist, "set_timeout", None)  # public from torch 2.8; before, private
    if setter is None:
        from torch.distributed import distributed_c10d

        setter = distributed_c10d._set_pg_timeout
    setter(timeout, pg)


@contextlib.contextmanager
def collective_timeout(timeout: float | timedelta | None, group=None) -> Iterator[None]:
    """Within the block, a collective of ``group`` that waits longer than ``timeout`` fails.

    Sets the group's timeout (``torch.distributed.set_timeout``: every backend of the
    group, so also FSDP2's all-gathers) and restores each backend's previous one
    afterwards. The expiry is the backend's own: the operation fails and nothing stays
    pending (``work.wait(timeout)`` would leave it pending, blocking the process's exit).
    With nccl, the timeout is the watchdog's, which ends the process on expiry.

    Parameters
    ----------
    timeout : float, timedelta or None
        seconds or a ``timedelta``; ``None``: the group keeps its own.
    group : ProcessGroup, optional
        default the default group; nothing happens without an initialised group.
    """
    timeout = as_timeout(timeout)
    if timeout is None or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    pg = _group(group)
    before = []
    for backend in _backends(pg):
        with contextlib.suppress(Exception):
            before.append((backend, backend.options._timeout))
    _set_group_timeout(pg, timeout)
    try:
        yield
    finally:
        if not before:
            logger.warning("the process group keeps the timeout %s set for the fit: its "
                           "previous timeout could not be read to restore it", timeout)
        for backend, old in before:
            try:
                backend.set_timeout(old)
            except Exception:  # a torch whose backends lack set_timeout: one value for all
                _set_group_timeout(pg, old)


#: per rank: how many collective steps it has entered, and the latest ("<count> <step>")
_COUNT_KEY = "laplace_llm/steps/{}"
_STEP_KEY = "laplace_llm/step/{}"


def _store(pg):
    """Return the key-value store of ``pg`` (``None`` if this torch does not give it)."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_process_group_store(pg)
    except Exception:
        return None


def _record(store, rank: int, step: str) -> int | None:
    """Count the step this rank enters in the store; return the count (``None``: no store)."""
    if store is None:
        return None
    try:
        count = store.add(_COUNT_KEY.format(rank), 1)
        store.set(_STEP_KEY.format(rank), f"{count} {step}")
        return count
    except Exception as err:  # the collective will tell what is wrong; this is only its witness
        logger.debug("could not record the collective step %r in the store: %s", step, err)
        return None


def _whereabouts(store, rank: int, world: int) -> dict[int, tuple[int, str | None]]:
    """Return per other rank the number of collective steps it entered and its latest one."""
    found = {}
    for r in range(world):
        if r == rank:
            continue
        count, last = store.add(_COUNT_KEY.format(r), 0), None  # add 0: reads, never waits
        if count and store.check([_STEP_KEY.format(r)]):
            n, _, last = store.get(_STEP_KEY.format(r)).decode(errors="replace").partition(" ")
            count = max(count, int(n)) if n.isdigit() else count
        found[r] = (count, last)
    return found


def _is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective (a torch.distributed or backend error)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(s in text for s in ("gloo", "nccl", "timed out", "timeout", "connection",
                                   "broken pipe", "peer"))


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def failure_message(step: str, rank: int, world: int, timeout: timedelta | None, cause: str,
                    count: int | None = None,
                    others: dict[int, tuple[int, str | None]] | None = None,
                    store_error: str | None = None) -> str:
    """Return the message of a :class:`~laplace_llm.errors.CollectiveTimeoutError`.

    Parameters
    ----------
    step : str
        the collective step that failed, e.g. "summing the data size".
    rank, world : int
        this rank and the group's size.
    timeout : timedelta or None
        the group's timeout at the failure (``None``: unknown).
    cause : str
        the backend's error.
    count : int, optional
        how many collective steps this rank had entered, this one included.
    others : dict, optional
        per other rank, the steps it had entered and its latest (:func:`_whereabouts`);
        ``None`` when the store could not be asked.
    store_error : str, optional
        why the store could not be asked.
    """
    text = cause.lower()
    lost = any(s in text for s in ("connection", "broken pipe", "peer", "reset"))
    timed_out = not lost and ("timed out" in text or "timeout" in text)
    if lost:
        what = "the connection to another rank broke (a rank that crashes or is killed closes its connections)"
    elif timed_out:
        what = f"it waited longer than its timeout, {_seconds(timeout)}, for the other ranks"
    else:
        what = "the backend reported an error"
    late: list[int] = []
    if others is not None and count is not None:
        late = sorted(r for r, (n, _) in others.items() if n < count)
        if late:
            lasts = "; ".join(
                f"rank {r}'s latest step: '{others[r][1]}'" if others[r][1] else
                f"rank {r} had entered no collective step of a fit"
                for r in late)
            who = f"{_ranks(late).capitalize()} of {world} had not reached this step ({lasts})"
        else:
            who = ("Every other rank had reached this step, so one of them failed during it "
                   "(crashed, was killed, or lost the network)")
    else:
        why = f": {store_error}" if store_error else ""
        who = ("Which ranks had not reached this step is unknown: the process group's store "
               f"could not be asked{why} (under env:// initialisation rank 0 serves it, so "
               "rank 0 may be the rank that ended)")
    culprits = _ranks(late) if late else "the other ranks"
    if lost:
        fix = (f"read the log of {culprits} for the error that ended it (a kill by the "
               "out-of-memory killer leaves none there: see the system log); fix that and "
               "rerun (a fit with a checkpoint resumes: fit(resume_from=...), "
               "laplace-llm fit --resume)")
    else:
        fix = (f"if {culprits} crashed or hung, read its log; if it is only slower (a longer "
               "shard, a slower device, a slow start), raise the timeout: "
               "fit(..., timeout=seconds), laplace-llm fit --timeout SECONDS, "
               "LaplaceCallback(fit_timeout=seconds)")
    first = cause.strip().splitlines()[0] if cause.strip() else type(cause).__name__
    return (f"Rank {rank} of {world} failed at the collective step '{step}' of a distributed "
            f"fit: {what}. {who}. Fix: {fix}. (torch.distributed: {first})")


@contextlib.contextmanager
def collective_step(step: str, group=None) -> Iterator[None]:
    """Run the block as the collective step ``step`` of every rank of ``group``; name it on failure.

    Records in the group's store that this rank entered ``step`` (two small writes: no
    collective, no barrier), so that a rank whose collective fails can name the ranks
    that had not reached it. A failed collective (a torch.distributed or backend error)
    becomes a :class:`~laplace_llm.errors.CollectiveTimeoutError` naming this rank, the
    step, those ranks with the latest step each reached, the timeout and the fix; other
    errors pass unchanged. Without an initialised group the block just runs.

    Every rank must enter the same steps in the same order (as it must run the same
    collectives): the counts in the store are compared.

    Parameters
    ----------
    step : str
        what the block does, as the error names it: e.g. "summing the data size".
    group : ProcessGroup, optional
        default the default group.

    Raises
    ------
    CollectiveTimeoutError
        a collective in the block failed: a rank did not arrive within the timeout, or
        the connection to one broke.
    """
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    pg = _group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    store = _store(pg)
    count = _record(store, rank, step)
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, CollectiveTimeoutError) or not _is_collective_failure(err):
            raise
        others = None
        store_error = None if store is not None else "this torch gives no store"
        if count is not None:
            try:
                others = _whereabouts(store, rank, world)
            except Exception as store_err:
                store_error = str(store_err).strip().splitlines()[0] if str(store_err).strip() \
                    else type(store_err).__name__
        message = failure_message(step, rank, world, group_timeout(pg), str(err), count, others,
                                  store_error)
        raise CollectiveTimeoutError(message) from err


def all_reduce_sum(value: float | int | torch.Tensor, device=None, group=None, *,
                   timeout: float | timedelta | None = None,
                   step: str = "summing a scalar") -> torch.Tensor:
    """Sum of a scalar over the processes of ``group``.

    Parameters
    ----------
    value : float, int or Tensor
        this process's value.
    device : torch.device, optional
    group : ProcessGroup, optional
    timeout : float or timedelta, optional
        seconds after which a rank that has not arrived fails the sum (see
        :func:`collective_timeout`); default the group's own timeout.
    step : str, default "summing a scalar"
        what the sum is, as a :class:`~laplace_llm.errors.CollectiveTimeoutError` names it.

    Returns
    -------
    torch.Tensor
        the sum, float64.

    Raises
    ------
    CollectiveTimeoutError
        a rank did not arrive within the timeout, or the connection to one broke.
    """
    t = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    with collective_timeout(timeout, group), collective_step(step, group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
