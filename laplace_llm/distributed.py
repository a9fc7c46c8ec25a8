"""Fitting across processes (torch.distributed): who does what, and summing curvature.

Every process takes the examples ``rank, rank + world, …`` (:func:`shard`) and its own
Monte-Carlo labels (:func:`process_seed`); :func:`process_rank` says where it stands. The
command line's ``fit`` under a launcher and the Trainer callback both use these.

Each process fits K-FAC on its shard of the data with the *global* data set size, so
the factors of the whole data set are the sums of the processes' factors: dense
factors are all-reduced, low-rank factors gather every process's root ``U diag(√λ)``
and truncate once more (exact while the gathered rank is at most ``n_kfac``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from laplace_llm.matrix import LowRankFactor, LowRankKron, compress_root

__all__ = ["process_rank", "shard", "process_seed", "all_reduce_kron", "all_reduce_sum"]


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


def all_reduce_sum(value: float | int | torch.Tensor, device=None, group=None) -> torch.Tensor:
    """Sum of a scalar over the processes of ``group``."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_kron(kron: LowRankKron, group=None) -> LowRankKron:
    """Replace every factor by its sum over the processes of ``group``, in place.

    Parameters
    ----------
    kron : LowRankKron
        this process's curvature, normalised with the global data set size.
    group : ProcessGroup, optional

    Returns
    -------
    LowRankKron
        ``kron``, now holding the sum.
    """
    world = dist.get_world_size(group)
    done: dict[int, object] = {}  # a shared factor is reduced once (in place: not twice!)
    for F in kron.kfacs:
        for j, f in enumerate(F):
            if id(f) in done:
                F[j] = done[id(f)]
                continue
            if not isinstance(f, LowRankFactor):
                dist.all_reduce(f, op=dist.ReduceOp.SUM, group=group)
                done[id(f)] = f
                continue
            if f.sketch_size:  # the sketches of the shards add up to the whole data's
                sketch = f.sketch().clone()
                dist.all_reduce(sketch, op=dist.ReduceOp.SUM, group=group)
                trace = f.exact_trace
                if trace is not None:
                    trace = trace.clone()
                    dist.all_reduce(trace, op=dist.ReduceOp.SUM, group=group)
                F[j] = LowRankFactor(sketch[:, :0], f.rank, f.chunk, trace, f.sketch_size,
                                     f.sketch_seed).set_sketch_(sketch)
                done[id(f)] = F[j]
                continue
            f.compress_()
            width = torch.tensor([f.root.shape[1]], device=f.device)
            widths = [torch.zeros_like(width) for _ in range(world)]
            dist.all_gather(widths, width, group=group)
            m = int(max(w.item() for w in widths))
            # all_gather needs equal shapes: zero columns add nothing to R Rᵀ
            padded = torch.zeros(f.side, m, device=f.device, dtype=f.dtype)
            padded[:, : f.root.shape[1]] = f.root
            roots = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(roots, padded, group=group)
            trace = f.exact_trace
            if trace is not None:  # the exact traces add up (low-rank diagnostics)
                trace = trace.clone()
                dist.all_reduce(trace, op=dist.ReduceOp.SUM, group=group)
            F[j] = LowRankFactor(compress_root(torch.cat(roots, 1), f.rank), f.rank, f.chunk, trace)
            done[id(f)] = F[j]
    return kron
