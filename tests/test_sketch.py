"""Sketched low-rank factors (``accumulation="sketch"``, the default) against exact factors.

The sketch ``Y = F Ω`` is updated by matrix products only and decomposed once
(:func:`laplace_llm.matrix.finalise_sketches`); these tests hold it to the exact factor
(dense ``X Xᵀ`` in float64), to the best rank-k approximation, to Tropp et al.'s error
bound, to one-process fits, and count its decompositions.
"""

import pytest
import torch
from torch.utils.data import DataLoader

from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.matrix import LowRankFactor
from laplace_llm.options import KFACOptions, default_sketch_size
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items
from tests.fixtures.models import tiny_llama_lora

DT = torch.float64


def columns(d, n, spectrum, seed):
    """``(d, n)`` data whose covariance has eigenvalues ∝ ``spectrum²`` in a random basis."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))[0]
    return basis @ (spectrum.unsqueeze(1) * torch.randn(d, n, generator=gen, dtype=DT))


def streamed(cols, rank, batch=100, **kw):
    f = LowRankFactor.zeros(cols.shape[0], rank, dtype=DT, **kw)
    for start in range(0, cols.shape[1], batch):
        f.append_(cols[:, start : start + batch])
    return f.compress_()


def best_rank(F, k):
    lam, Q = torch.linalg.eigh(F)
    return Q[:, -k:] @ torch.diag(lam[-k:]) @ Q[:, -k:].T, lam.flip(0)


def test_sketch_is_exact_when_the_data_rank_is_at_most_the_kept_rank():
    d, k = 200, 12
    spectrum = torch.zeros(d, dtype=DT)
    spectrum[:k] = torch.linspace(3, 1, k, dtype=DT)  # rank exactly k
    cols = columns(d, 1000, spectrum, seed=4)
    f = streamed(cols, k, sketch_size=36)
    assert not f.pending and f.root.shape == (d, k)
    # float64 with the stabilising shift ν = ε‖Y‖: rounding level
    torch.testing.assert_close(f.to_dense(), cols @ cols.T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f.exact_trace, cols.square().sum())


def test_between_kept_rank_and_sketch_size_the_kept_part_is_the_best_rank_k():
    """Data of rank 30 ≤ s = 36: the sketch holds the factor exactly, so its rank-12 part
    is the optimal one (the incremental truncation only approaches it)."""
    d, k = 200, 12
    spectrum = torch.zeros(d, dtype=DT)
    spectrum[:30] = 0.9 ** torch.arange(30, dtype=DT)
    cols = columns(d, 1000, spectrum, seed=5)
    exact = cols @ cols.T
    best, _ = best_rank(exact, k)
    sketched = streamed(cols, k, sketch_size=36).to_dense()
    truncated = streamed(cols, k).to_dense()
    norm = torch.linalg.norm(exact)
    assert torch.linalg.norm(sketched - best) / norm < 1e-9
    assert torch.linalg.norm(truncated - best) / norm > 1e-4  # measured 1.6e-3


@pytest.mark.parametrize("name, amplitude", [
    ("geometric 0.95", lambda i: 0.95 ** i),
    ("eigenvalues 1/i", lambda i: (i + 1) ** -0.5),
    ("eigenvalues 1/i²", lambda i: (i + 1) ** -1.0),
])
def test_sketch_error_is_within_tropp_bound_and_near_the_truncation(name, amplitude):
    """Above the sketch size: Tropp, Yurtsever, Udell & Cevher (2017, Thm 4.1) bound
    E‖F − F̂_k‖_* ≤ (1 + k/(s − k − 1)) ‖F − [F]_k‖_*, 1.2025 at the default s = 96, k = 16.

    Measured (d = 300, 2,000 columns in batches of 100, 8 seeds; nuclear error over the
    best rank-16 one, mean): geometric 0.95ⁱ amplitudes: sketch 1.0005, truncation 1.038;
    eigenvalues ∝ 1/i: sketch 1.084, truncation 1.015; ∝ 1/i²: sketch 1.051, truncation
    1.020. The mean over 8 seeds must stay under the bound; each seed under 1.15.
    """
    d, k, n = 300, 16, 2000
    s = default_sketch_size(k)
    assert s == 96
    bound = 1 + k / (s - k - 1)
    ratios, truncated = [], []
    for seed in range(8):
        cols = columns(d, n, amplitude(torch.arange(d, dtype=DT)), seed)
        exact = cols @ cols.T
        _, lam = best_rank(exact, k)
        best_err = lam[k:].clamp(min=0).sum()
        f = streamed(cols, k, sketch_size=s, sketch_seed=seed)
        ratios.append(float(torch.linalg.matrix_norm(exact - f.to_dense(), "nuc") / best_err))
        t = streamed(cols, k)
        truncated.append(float(torch.linalg.matrix_norm(exact - t.to_dense(), "nuc") / best_err))
    mean = sum(ratios) / len(ratios)
    assert 1.0 - 1e-9 <= min(ratios) and max(ratios) < 1.15
    assert mean < bound
    # never far from the incremental truncation either: within 7% of its error
    assert mean < 1.07 * sum(truncated) / len(truncated)


def test_sum_scale_and_sharded_sketches_equal_one_sketch():
    """Sketches are linear in F: sum of shards, scaling and ``+`` give the one-pass sketch.

    The data has rank 40 ≤ s = 48, so every sum below is held exactly by a sketch."""
    amplitude = torch.zeros(120, dtype=DT)
    amplitude[:40] = 0.9 ** torch.arange(40, dtype=DT)
    cols = columns(120, 600, amplitude, seed=2)
    whole = LowRankFactor.zeros(120, 8, dtype=DT, sketch_size=48, sketch_seed=3)
    whole.append_(cols)
    y_whole = whole.sketch().clone()
    a = LowRankFactor.zeros(120, 8, dtype=DT, sketch_size=48, sketch_seed=3).append_(cols[:, :250])
    b = LowRankFactor.zeros(120, 8, dtype=DT, sketch_size=48, sketch_seed=3).append_(cols[:, 250:])
    torch.testing.assert_close(a.sketch() + b.sketch(), y_whole, rtol=1e-12, atol=1e-9)
    total = a + b
    assert total.pending
    torch.testing.assert_close(total.sketch(), y_whole, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close((whole * 0.25).sketch(), 0.25 * y_whole)
    torch.testing.assert_close(total.to_dense(), whole.to_dense(), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(total.exact_trace, cols.square().sum())
    # a root (e.g. a loaded fit) plus a sketch: the root's part is exact in the sum
    loaded = LowRankFactor(whole.root.clone(), 8)
    mixed = (loaded + a).compress_()
    ref = whole.to_dense() + cols[:, :250] @ cols[:, :250].T
    lam_ref = torch.linalg.eigvalsh(ref).flip(0)[:8]
    lam_mixed = torch.linalg.eigvalsh(mixed.to_dense()).flip(0)[:8]
    torch.testing.assert_close(lam_mixed, lam_ref, rtol=1e-9, atol=0)


def test_an_empty_sketch_decomposes_to_nothing():
    f = LowRankFactor.zeros(50, 4, dtype=DT, sketch_size=16)
    f.append_(torch.zeros(50, 3, dtype=DT))
    assert f.pending and not f.is_empty()
    assert f.root.shape == (50, 0) and f.remainder() == 0


def _fit(n_items, **kw):
    clf = LLMClassifier(tiny_llama_lora(seed=0, dtype=DT), TARGET_IDS)
    la = LoRALaplace(clf, "classification", fisher_type="mc", seed=0, n_kfac=2,
                     lr_threshold=0, **kw)
    la.fit(DataLoader(DictDataset(token_items(n_items, 12, seed=1)), batch_size=4))
    return la


def _count_decompositions(monkeypatch):
    calls = {"n": 0}
    for name in ("eigh", "eigvalsh", "svd", "qr", "cholesky"):
        original = getattr(torch.linalg, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counted)
    return calls


def test_decompositions_of_a_fit_do_not_grow_with_the_tokens(monkeypatch):
    """Sketch: two batched eighs per group of equal factors, at the end of the fit; the
    same count for 8 and for 48 sequences. Truncation: one per 32 columns, growing."""
    calls = _count_decompositions(monkeypatch)
    counts = {}
    for accumulation in ("sketch", "truncate"):
        for n in (8, 48):
            calls["n"] = 0
            _fit(n, accumulation=accumulation)
            counts[accumulation, n] = calls["n"]
    assert counts["sketch", 8] == counts["sketch", 48] > 0
    assert counts["truncate", 48] > counts["truncate", 8]


def test_the_fit_is_deterministic_for_its_sketch_seed_which_the_file_keeps(tmp_path):
    one, two = _fit(12, sketch_seed=5), _fit(12, sketch_seed=5)
    other = _fit(12, sketch_seed=6)
    roots = [[f.root for f in F if isinstance(f, LowRankFactor)] for F in one.H_facs.kfacs]
    assert sum(len(r) for r in roots) > 0
    for F, G, H in zip(one.H_facs.kfacs, two.H_facs.kfacs, other.H_facs.kfacs):
        for f, g, h in zip(F, G, H):
            if isinstance(f, LowRankFactor):
                assert torch.equal(f.root, g.root)
                assert not torch.equal(f.root, h.root)
    one.save(tmp_path / "p.safetensors")
    loaded = LoRALaplace.load(tmp_path / "p.safetensors", one.model)
    assert loaded.options.sketch_seed == 5 and loaded.options.accumulation == "sketch"
    torch.testing.assert_close(loaded.log_marginal_likelihood(), one.log_marginal_likelihood())


def test_fit_without_override_adds_the_new_data_to_the_loaded_fit():
    """``override=False`` after a fit: the sketch of the new data (exact here: every side
    of the tiny model is at most s = 64) is added to the kept rank-3 factors, reweighted
    (A factors are averages over the data: 8/16 each), and cut to rank 3 once. Reference:
    the best rank-3 part of the dense sum, with the new data's factors from a dense fit."""
    clf = LLMClassifier(tiny_llama_lora(seed=0, dtype=DT), TARGET_IDS)
    a, b = token_items(8, 6, seed=1), token_items(8, 6, seed=2)
    kw = dict(fisher_type="ggn", lr_threshold=0)
    la = LoRALaplace(clf, "classification", n_kfac=3, **kw)
    la.fit(DataLoader(DictDataset(a), batch_size=4))
    old = [[f.to_dense().clone() for f in F] for F in la.H_facs.kfacs]
    la.fit(DataLoader(DictDataset(b), batch_size=4), override=False)
    exact_new = LoRALaplace(clf, "classification", **{**kw, "lr_threshold": 10**6})
    exact_new.fit(DataLoader(DictDataset(b), batch_size=4))
    assert la.n_data == 16
    for F, Fo, E in zip(la.H_facs.kfacs, old, exact_new.H_facs.kfacs):
        assert max(f.shape[0] for f in F) <= 64
        for j, (f, o, e) in enumerate(zip(F, Fo, E)):
            w = 0.5 if (len(F) == 2 and j == 1) else 1.0
            expected, _ = best_rank(w * o + w * e, 3)
            torch.testing.assert_close(f.to_dense(), expected, rtol=1e-9, atol=1e-12)


def test_sketch_options_are_checked():
    assert KFACOptions().sketch_columns == 96
    assert KFACOptions(n_kfac=4).sketch_columns == 64
    assert KFACOptions(sketch_size=40).sketch_columns == 40
    assert KFACOptions(accumulation="truncate").sketch_columns is None
    with pytest.raises(ValueError, match="sketch_size=8 is below n_kfac=16"):
        KFACOptions(sketch_size=8)
