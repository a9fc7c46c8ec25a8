"""Summing curvature across processes (torch.distributed).

Each process fits K-FAC on its shard of the data with the *global* data set size, so
the factors of the whole data set are the sums of the processes' factors: dense
factors are all-reduced, low-rank factors gather every process's root ``U diag(√λ)``
and truncate once more (exact while the gathered rank is at most ``n_kfac``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from laplace_llm.matrix import LowRankFactor, LowRankKron, compress_root

__all__ = ["all_reduce_kron", "all_reduce_sum"]


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
