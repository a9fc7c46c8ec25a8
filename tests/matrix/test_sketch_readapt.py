"""The sketch's test matrix adapted again halfway through the data (``sketch_readapt``, issue 31).

The first adaptation sees one batch. The second, halfway, decomposes the pending sketch
into a root of rank ``t = sketch_adapt``, makes that root's directions the adapted columns
of ``Ω`` and goes on from the root's sketch. It must keep the sketch exact when the data's
rank is at most ``s``, take the leading directions of all the data so far, travel with a
checkpoint, and run in a fit once, before the second half's first batch.
"""

import pytest
import torch
from torch.utils.data import DataLoader

from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.matrix import LowRankFactor, LowRankKron, readapt_sketches
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items
from tests.fixtures.models import tiny_llama_lora

DT = torch.float64


def low_rank_stream(d=300, rank=64, n=400, seed=7):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=DT))[0]
    return basis @ (0.9 ** torch.arange(rank, dtype=DT)[:, None]
                    * torch.randn(rank, n, generator=gen, dtype=DT))


def test_readapting_keeps_the_sketch_exact_and_takes_the_data_so_fars_leading_directions():
    """Rank 64 ≤ s = 96, in float64: streamed 50 columns at a time with a re-adaptation
    after 200 columns, the factor is still exact, and the adapted columns (over √d) are
    an orthonormal basis of the leading 48 eigenvectors of the first 200 columns' factor
    (the Nyström root of an exact sketch is its best rank-48 part). Without the
    re-adaptation they would span the first chunk's directions instead."""
    d = 300
    X = low_rank_stream(d)
    f = LowRankFactor.zeros(d, 64, dtype=DT, sketch_size=96, sketch_adapt=48)
    for start in range(0, 200, 50):
        f.append_(X[:, start:start + 50])
    first = f.adapted.clone()
    f.readapt_()
    assert f.pending and f.adapted.shape == (d, 48)
    assert f.adapted.data_ptr() == f.omega().data_ptr()  # a view of Ω, no second copy
    U = f.adapted / d ** 0.5
    torch.testing.assert_close(U.T @ U, torch.eye(48, dtype=DT), rtol=0, atol=1e-10)
    so_far = X[:, :200] @ X[:, :200].T
    V = torch.linalg.eigh(so_far)[1].flip(1)[:, :48]
    cosines = torch.linalg.svdvals(U.T @ V)  # of the principal angles between the spans
    assert float(cosines.min()) > 1 - 1e-8
    assert float(torch.linalg.svdvals(first.T @ V / d ** 0.5).min()) < 0.99
    for start in range(200, 400, 50):
        f.append_(X[:, start:start + 50])
    exact = X @ X.T
    torch.testing.assert_close(f.to_dense(), exact, rtol=1e-9, atol=1e-9 * float(exact.norm()))


def leading_directions_missing_at_first(d=1024, n=8192, seed=0, missing=16):
    """Rank 512 > s, eigenvalues ``∝ 1/i``; the first 512 columns lack the leading 16 directions."""
    gen = torch.Generator().manual_seed(seed)
    lam = (torch.arange(512, dtype=DT) + 1) ** -1.0
    basis = torch.linalg.qr(torch.randn(d, 512, generator=gen, dtype=DT))[0]
    Z = torch.randn(512, n, generator=gen, dtype=DT)
    Z[:missing, :512] = 0
    return basis @ (lam.sqrt()[:, None] * Z)


@pytest.mark.parametrize("seed", [0, 1])
def test_readapting_finds_the_leading_directions_the_first_batch_lacked(seed):
    """The first of 16 batches of 512 columns lacks the 16 leading directions, so the
    first adaptation aims Ω elsewhere. Re-adapted before the 9th batch, the sketch keeps
    the 16 leading eigenvalues far better: measured largest relative errors 0.18/0.17
    (seeds 0/1) against 0.31/0.27 adapted once and 0.29/0.29 for the truncation
    (deterministic: seeded data and Ω)."""
    X = leading_directions_missing_at_first(seed=seed)
    ev = torch.linalg.eigvalsh(X @ X.T).flip(0)[:16]

    def error(readapt, **kw):
        f = LowRankFactor.zeros(X.shape[0], 16, dtype=DT, **kw)
        for i, start in enumerate(range(0, X.shape[1], 512)):
            if readapt and i == 8:
                f.readapt_()
            f.append_(X[:, start:start + 512])
        lam, _ = f.eigh()
        return float(((lam - ev).abs() / ev).max())

    once = error(False, sketch_size=96, sketch_adapt=48)
    again = error(True, sketch_size=96, sketch_adapt=48)
    truncated = error(False)
    assert again < 0.7 * once
    assert again < 0.7 * truncated


def test_above_s_the_readapted_sketch_goes_on_from_the_leading_t_directions_alone():
    """Data of rank 512 > s = 96: the rank-s root does not hold the data's trace, so the
    sketch goes on from the root's leading t = 48 columns only (the rest of the trace
    stays in the exact trace), sketched with the new Ω; the adapted columns are those
    columns' directions. Keeping all s columns, or the first adaptation's Ω, fails."""
    from laplace_llm.matrix import finalise_sketches
    from laplace_llm.matrix.factor import HELD_SHARE

    X = leading_directions_missing_at_first(d=600, n=1024, seed=3, missing=0).float()
    f = LowRankFactor.zeros(600, 16, sketch_size=96, sketch_adapt=48, sketch_seed=1)
    f.append_(X[:, :512])
    twin = LowRankKron.from_state([[_state(f)]], sketch_adapt=48, sketch_size=96)
    g = twin.kfacs[0][0]
    finalise_sketches([g], ranks=[96])
    assert float(g.root.square().sum()) < HELD_SHARE * float(f.exact_trace)
    R = g.root[:, :48]
    trace = f.exact_trace.clone()
    f.readapt_()
    torch.testing.assert_close(f.adapted / 600 ** 0.5, R / R.norm(dim=0), rtol=0, atol=1e-5)
    expected = R @ (R.T @ f.omega())
    torch.testing.assert_close(f.sketch(), expected, rtol=1e-5, atol=1e-6 * float(expected.norm()))
    assert torch.equal(f.exact_trace, trace)


def tail_beyond(share, d=300, lead=64, rank=200, n=400, seed=11):
    """Data of rank ``rank`` > s whose ``rank − lead`` trailing directions hold ``share`` of its trace."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=DT))[0]
    weights = torch.ones(rank, dtype=DT)
    weights[lead:] = share / (1 - share) * lead / (rank - lead)  # of each direction's variance
    Z = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=DT))[0].T * n ** 0.5
    return basis @ (weights.sqrt()[:, None] * Z)


@pytest.mark.parametrize("share, kept", [(1e-2, 48), (1e-5, 96)])
def test_the_root_goes_on_whole_only_when_it_holds_all_but_a_thousandth_of_the_trace(share, kept):
    """Data of rank 200 > s = 96 whose 136 trailing directions hold ``share`` of the trace.
    With 1 % there, the rank-96 root holds less than :data:`HELD_SHARE` (99.9 %) of the
    exact trace, and the sketch goes on from its leading 48 columns; with 0.001 % it
    holds more, and the whole root goes on. The readapted sketch is that root's sketch
    with the new Ω. A threshold of 90 % keeps the whole root at 1 %, one of 99.9999 %
    only 48 columns at 0.001 %: both fail."""
    from laplace_llm.matrix import finalise_sketches

    X = tail_beyond(share)
    exact = torch.linalg.eigvalsh(X @ X.T)
    assert float(exact[-64:].sum() / exact.sum()) == pytest.approx(1 - share, rel=1e-9)
    f = LowRankFactor.zeros(300, 16, dtype=DT, sketch_size=96, sketch_adapt=48, sketch_seed=2)
    f.append_(X)
    twin = LowRankKron.from_state([[_state(f)]], sketch_adapt=48, sketch_size=96).kfacs[0][0]
    finalise_sketches([twin], ranks=[96])
    R = twin.root[:, :kept]
    assert twin.root.shape[1] == 96
    f.readapt_()
    expected = R @ (R.T @ f.omega())
    torch.testing.assert_close(f.sketch(), expected, rtol=1e-9,
                               atol=1e-12 * float(expected.norm()))


def _state(f):
    from laplace_llm.matrix.factor import _factor_state

    return _factor_state(f)


def test_readapting_leaves_alone_what_has_no_adapted_sketch_and_empties_zero_data():
    """No-ops: a truncated factor, a sketch with an all-Gaussian Ω, a decomposed root. A
    factor whose data so far is zero becomes empty, so that its first nonzero data adapts
    Ω as a first batch does; its exact trace (0) is kept."""
    gen = torch.Generator().manual_seed(3)
    C = torch.randn(80, 30, generator=gen, dtype=DT)
    truncated = LowRankFactor.zeros(80, 4, dtype=DT).append_(C)
    gaussian = LowRankFactor.zeros(80, 4, dtype=DT, sketch_size=12).append_(C)
    decomposed = LowRankFactor.zeros(80, 4, dtype=DT, sketch_size=12, sketch_adapt=6)
    decomposed.append_(C).compress_()
    before = [truncated.root.clone(), gaussian.sketch().clone(), decomposed.root.clone()]
    readapt_sketches([truncated, gaussian, decomposed])
    assert torch.equal(truncated.root, before[0])
    assert gaussian.pending and torch.equal(gaussian.sketch(), before[1])
    assert not decomposed.pending and torch.equal(decomposed.root, before[2])

    zero = LowRankFactor.zeros(80, 4, dtype=DT, sketch_size=12, sketch_adapt=6)
    zero.append_(torch.zeros(80, 10, dtype=DT))
    assert zero.pending
    zero.readapt_()
    assert zero.is_empty() and zero.adapted is None and float(zero.exact_trace) == 0.0
    zero.append_(C)
    assert zero.adapted is not None and zero.adapted.shape == (80, 6)


def test_a_restored_pending_sketch_readapts_as_the_original_does():
    """A checkpoint's pending sketch is restored with the fit's ``sketch_adapt``
    (``LowRankKron.from_state``), so that it adapts again halfway exactly as the
    uninterrupted factor does; restored with 0 it would keep the first batch's Ω."""
    d = 200
    X = torch.cat([low_rank_stream(d, rank=150, n=300, seed=s) for s in (1, 2)], 1)
    kron = LowRankKron.zeros([[d, 4]], 8, 0, dtype=DT, sketch_size=40, sketch_seed=5,
                             names=["w"], sketch_adapt=20)
    kron.kfacs[0][0].append_(X[:, :300])
    state = kron.to_state()
    restored = LowRankKron.from_state(state, sketch_size=40, sketch_seed=5, names=["w"],
                                      sketch_adapt=20)
    stale = LowRankKron.from_state(state, sketch_size=40, sketch_seed=5, names=["w"])
    for k in (kron, restored, stale):
        k.readapt_()
        k.kfacs[0][0].append_(X[:, 300:])
    f, g, h = (k.kfacs[0][0] for k in (kron, restored, stale))
    assert torch.equal(f.sketch(), g.sketch()) and torch.equal(f.omega(), g.omega())
    assert not torch.allclose(f.sketch(), h.sketch())


def _fit(n_batches=5, **kw):
    clf = LLMClassifier(tiny_llama_lora(seed=0, dtype=DT), TARGET_IDS)
    la = LoRALaplace(clf, "classification", seed=0, n_kfac=2, lr_threshold=0, sketch_size=6,
                     **kw)
    la.fit(DataLoader(DictDataset(token_items(4 * n_batches, 12, seed=1)), batch_size=4))
    return la


class _Batches:
    """Index batches of 4 with no length: a loader with this sampler has none either."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter([list(range(i, min(i + 4, self.n))) for i in range(0, self.n, 4)])


def test_the_fit_readapts_once_before_the_second_halfs_first_batch(monkeypatch):
    """With 5 batches the sketches adapt again once, after 2 batches (5 // 2); not with
    ``sketch_readapt=False``, one batch, a loader without a length, or a distributed fit
    (whose Ω stays Gaussian). The re-adapted fit's factors differ from the fit adapted
    once."""
    log = []
    add_batch, readapt = LoRALaplace._add_batch, LowRankKron.readapt_

    def counted_add_batch(self, *a, **k):
        log.append("batch")
        return add_batch(self, *a, **k)

    def counted_readapt(self):
        log.append("readapt")
        return readapt(self)

    monkeypatch.setattr(LoRALaplace, "_add_batch", counted_add_batch)
    monkeypatch.setattr(LowRankKron, "readapt_", counted_readapt)
    twice = _fit()
    assert log == ["batch", "batch", "readapt", "batch", "batch", "batch"]
    log.clear()
    once = _fit(sketch_readapt=False)
    assert log == ["batch"] * 5
    differ = [not torch.allclose(f.to_dense(), g.to_dense(), rtol=1e-3, atol=0)
              for F, G in zip(twice.H_facs.kfacs, once.H_facs.kfacs)
              for f, g in zip(F, G) if isinstance(f, LowRankFactor) and f.side > 6]
    assert differ and all(differ)
    log.clear()
    _fit(n_batches=1)
    assert log == ["batch"]
    log.clear()
    clf = LLMClassifier(tiny_llama_lora(seed=0, dtype=DT), TARGET_IDS)
    la = LoRALaplace(clf, "classification", seed=0, n_kfac=2, lr_threshold=0, sketch_size=6)
    la.fit(DataLoader(DictDataset(token_items(20, 12, seed=1)), batch_sampler=_Batches(20)))
    assert log == ["batch"] * 5
    la.backend.adapt_sketches = False  # what fit(distributed=True) sets
    assert not la.backend.readapt_sketches
