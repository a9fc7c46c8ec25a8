"""Printing the low-rank report of a Kronecker posterior.

The report itself (what each number means) is :mod:`laplace_llm.posterior.low_rank`;
``FactorReport``, ``low_rank_report`` and ``SHARES`` keep their old path here.
"""

from __future__ import annotations

from collections.abc import Sequence

from laplace_llm.posterior.low_rank import SHARES, FactorReport, low_rank_report

__all__ = ["FactorReport", "low_rank_report", "format_low_rank_report", "SHARES"]


def format_low_rank_report(report: Sequence[FactorReport], threshold: float | None = None) -> str:
    """Return a plain-text table of ``report``.

    Minimum and mean share kept, then one line per factor (marked ``!`` below
    ``threshold``).
    """
    if not report:
        return "no low-rank factor (every factor side is <= lr_threshold: all exact)"
    shares = [r.share_kept for r in report if r.share_kept is not None]
    lines = []
    if shares:
        lines.append(
            f"trace kept at n_kfac={report[0].n_kfac}: min {min(shares):.3f}, "
            f"mean {sum(shares) / len(shares):.3f} over {len(report)} large factors"
        )

    def rank(r, q):
        if r.exact_trace is None:
            return "?"
        value = r.rank_90 if q == 0.9 else r.rank_99
        return f">{r.n_kfac}" if value is None else str(value)

    lines.append(f"{'':1} {'block':60} {'fac':3} {'side':>5} {'kept':>6} {'r90':>5} {'r99':>5}  leading eigenvalues")
    for r in report:
        low = threshold is not None and r.share_kept is not None and r.share_kept < threshold
        share = "?" if r.share_kept is None else f"{r.share_kept:.3f}"
        eig = ", ".join(f"{v:.3g}" for v in r.leading_eigenvalues)
        lines.append(
            f"{'!' if low else ' '} {r.block[-60:]:60} {r.factor:3} {r.side:5d} {share:>6} "
            f"{rank(r, 0.9):>5} {rank(r, 0.99):>5}  {eig}"
        )
    return "\n".join(lines)
