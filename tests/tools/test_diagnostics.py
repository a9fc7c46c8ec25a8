"""Low-rank diagnostics against the dense factors of the same fit (small sizes).

A fit with ``lr_threshold`` above every side keeps every factor dense and exact: its
trace and eigenvalues are the reference. When all of a factor's columns arrive in one
chunk (``≤ n_kfac + max(2·n_kfac, 32)`` columns) the kept root is the best rank-k
truncation, so the kept eigenvalues and ranks equal the dense ones (1e-8 relative,
float64 eigh of a Gram matrix); with many chunks they are bounded by them (Weyl).
"""

import pytest
import torch

from laplace_llm import LoRALaplace
from laplace_llm.matrix import LowRankFactor
from laplace_llm.tools.diagnostics import format_low_rank_report
from tests.fixtures.batches import token_loader
from tests.posterior.test_diag_and_full import llama


def fits(n_kfac, n=3, length=4):
    model = llama()
    loader = token_loader(n=n, length=length, batch_size=4)
    low = LoRALaplace(model, "classification", fisher_type="ggn", n_kfac=n_kfac, lr_threshold=0)
    low.fit(loader)
    exact = LoRALaplace(model, "classification", fisher_type="ggn", lr_threshold=1024)
    exact.fit(loader)
    return low, exact


def dense_reference(exact, report_entry):
    i = [b.name for b in exact.blocks].index(report_entry.block)
    F = exact.H_facs.kfacs[i][0 if report_entry.factor == "G" else 1]
    return torch.linalg.eigvalsh(F).flip(0).clamp(min=0)


def test_trace_shares_and_ranks_equal_the_dense_factors():
    low, exact = fits(n_kfac=3)
    report = low.low_rank_report(n_leading=3)
    # lr_threshold=0: both factors of every block (sides 16 and r=2) are low rank
    assert len(report) == 2 * len(low.blocks)
    n_none = 0
    for r in report:
        lam = dense_reference(exact, r)
        trace = lam.sum().item()
        assert r.exact_trace == pytest.approx(trace, rel=1e-10)
        best = lam[: r.n_kfac].sum().item() / trace
        assert r.share_kept == pytest.approx(best, rel=1e-8)
        torch.testing.assert_close(torch.tensor(r.leading_eigenvalues, dtype=torch.float64),
                                   lam[: len(r.leading_eigenvalues)], rtol=1e-8, atol=1e-12 * trace)
        for q, got in [(0.9, r.rank_90), (0.99, r.rank_99)]:
            need = int(torch.nonzero(lam.cumsum(0) >= q * trace * (1 - 1e-12))[0]) + 1
            assert got == (need if need <= r.n_kfac else None)
            n_none += got is None
    assert n_none > 0  # the case "> n_kfac" occurs
    assert min(r.share_kept for r in report) < 1.0
    text = format_low_rank_report(report, threshold=0.99)
    assert "trace kept at n_kfac=3" in text and ">3" in text and "\n!" in text


def test_streamed_factor_bounds_hold_and_survive_refits():
    """Many chunks: the exact trace is still exact, the kept share at most the best
    rank-k share, each kept eigenvalue at most the exact one; fit(override=False)
    keeps the exact trace of the union."""
    model = llama()
    low = LoRALaplace(model, "classification", fisher_type="ggn", n_kfac=2, lr_threshold=0)
    exact = LoRALaplace(model, "classification", fisher_type="ggn", lr_threshold=1024)
    a, b = token_loader(n=40, length=8, batch_size=8, seed=1), token_loader(n=12, length=8, seed=2)
    for la in (low, exact):
        la.fit(a)
        la.fit(b, override=False)
    for r in low.low_rank_report():
        lam = dense_reference(exact, r)
        assert r.exact_trace == pytest.approx(lam.sum().item(), rel=1e-10)
        assert r.share_kept <= lam[: r.n_kfac].sum().item() / lam.sum().item() + 1e-10
        assert all(x <= y * (1 + 1e-10) for x, y in zip(r.leading_eigenvalues, lam.tolist()))


def test_exact_trace_follows_sums_and_scaling():
    torch.manual_seed(0)
    cols = torch.randn(6, 30, dtype=torch.float64)
    f = LowRankFactor.zeros(6, 2, dtype=torch.float64).append_(cols[:, :20])
    g = LowRankFactor.zeros(6, 2, dtype=torch.float64).append_(cols[:, 20:])
    total = cols.square().sum()
    torch.testing.assert_close((f + g).exact_trace, total)
    torch.testing.assert_close((f * 0.5).exact_trace, 0.5 * cols[:, :20].square().sum())
    assert LowRankFactor(cols, 2).exact_trace is None  # unknown, e.g. read from a file


def test_report_survives_a_posterior_file(tmp_path):
    """The exact traces are saved with the roots, so the report after load is the same."""
    low, _ = fits(n_kfac=3)
    low.save(tmp_path / "p.safetensors")
    back = type(low).load(tmp_path / "p.safetensors", low.model)
    assert back.low_rank_report() == low.low_rank_report()
