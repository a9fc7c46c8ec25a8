"""How much of each large Kronecker factor the rank-``n_kfac`` posterior keeps.

A large factor ``F`` (side ``d > lr_threshold``) is kept as ``R Rᵀ`` with at most
``k = n_kfac`` columns (:class:`laplace_llm.matrix.LowRankFactor`); during ``fit`` the factor
also adds up its *exact* trace ``tr F = Σ ‖c‖²`` over every column ``c`` appended, a
scalar. For each such factor the report gives

- ``share_kept = tr(R Rᵀ) / tr F``: the fraction of the exact trace kept;
- ``leading_eigenvalues``: the largest eigenvalues ``λ̂_1 ≥ λ̂_2 ≥ …`` of ``R Rᵀ``;
- ``rank_90`` / ``rank_99``: the smallest ``j ≤ k`` with ``Σ_{i≤j} λ̂_i ≥ q · tr F``
  for ``q = 0.9 / 0.99``, or ``None`` ("> n_kfac") when the kept eigenvalues hold less
  than that share.

The streaming truncation only ever drops positive semi-definite parts, so
``R Rᵀ ⪯ F`` and ``λ̂_i ≤ λ_i`` (Weyl): ``share_kept`` is at most the share of the
best rank-``k`` truncation, and ``rank_q`` is an upper bound on the rank the exact
factor needs for share ``q``; both are exact when the factor is (data rank ≤ ``k``,
or all columns seen in one chunk). Dense factors (side ``≤ lr_threshold``) are exact
and not reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from laplace_llm.matrix import LowRankFactor, LowRankKron
from laplace_llm.models.discovery import KronBlock

__all__ = ["FactorReport", "low_rank_report", "SHARES"]


#: Trace shares whose rank is reported.
SHARES = (0.9, 0.99)


@dataclass(frozen=True)
class FactorReport:
    """Low-rank diagnostics of one large factor (see the module docstring).

    Attributes
    ----------
    block : str
        parameter name of the block.
    factor : {"G", "A"}
        output-gradient (``d_out``) or input (``d_in``) side.
    side : int
    n_kfac : int
    kept_rank : int
        columns of the kept root (``≤ n_kfac``).
    trace_kept : float
    exact_trace : float or None
        ``None`` when unknown (a posterior read from a file).
    share_kept : float or None
    leading_eigenvalues : tuple of float
    rank_90, rank_99 : int or None
    """

    block: str
    factor: str
    side: int
    n_kfac: int
    kept_rank: int
    trace_kept: float
    exact_trace: float | None
    share_kept: float | None
    leading_eigenvalues: tuple[float, ...]
    rank_90: int | None
    rank_99: int | None


def _rank_for(share: float, lam: torch.Tensor, exact_trace: float) -> int | None:
    if exact_trace <= 0:
        return 0
    cum = torch.cumsum(lam, 0)
    hit = torch.nonzero(cum >= share * exact_trace * (1 - 1e-12))
    return int(hit[0]) + 1 if hit.numel() else None


def low_rank_report(
    kron: LowRankKron, blocks: Sequence[KronBlock], n_leading: int = 5
) -> list[FactorReport]:
    """One :class:`FactorReport` per low-rank factor of ``kron``.

    Parameters
    ----------
    kron : LowRankKron
        fitted curvature (``la.H_facs``).
    blocks : sequence of KronBlock
        the blocks of ``kron``, in order (``la.blocks``).
    n_leading : int, default 5
        eigenvalues listed per factor.
    """
    out = []
    for block, F in zip(blocks, kron.kfacs):
        for name, f in zip(("G", "A"), F):
            if not isinstance(f, LowRankFactor):
                continue
            lam, _ = f.eigh()
            lam = lam.double()
            kept = float(lam.sum())
            exact = None if f.exact_trace is None else float(f.exact_trace)
            if exact is None:
                share = r90 = r99 = None
            else:
                share = kept / exact if exact > 0 else 1.0
                r90, r99 = (_rank_for(q, lam, exact) for q in SHARES)
            out.append(
                FactorReport(
                    block=block.name,
                    factor=name,
                    side=f.side,
                    n_kfac=f.rank,
                    kept_rank=int(lam.numel()),
                    trace_kept=kept,
                    exact_trace=exact,
                    share_kept=share,
                    leading_eigenvalues=tuple(float(v) for v in lam[:n_leading]),
                    rank_90=r90,
                    rank_99=r99,
                )
            )
    return out
