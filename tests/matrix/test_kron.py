"""LowRankFactor, LowRankKron and LowRankKronDecomposed against dense matrices."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laplace_llm.matrix import LowRankFactor, LowRankKron, compress_root

DT = torch.float64


def rand_psd_root(d, m, gen, decay=None):
    root = torch.randn(d, m, generator=gen, dtype=DT)
    if decay is not None:
        root = root * decay ** torch.arange(m, dtype=DT)
    return root


def make_kron(gen, sides=((5, 7), (5,), (3, 9)), rank=None, lr_threshold=6):
    """A LowRankKron with random factors; sides above lr_threshold are low rank.

    ``rank=None`` keeps low-rank factors exact (rank ≥ side); otherwise their data
    has rank ``rank`` exactly, so nothing is truncated either.
    """
    kfacs = []
    for block in sides:
        F = []
        for d in block:
            m = d + 2 if rank is None else rank
            root = rand_psd_root(d, m, gen)
            if d > lr_threshold:
                F.append(LowRankFactor(root, rank=d if rank is None else rank))
            else:
                F.append(root @ root.T)
        kfacs.append(F)
    return LowRankKron(kfacs)


def dense_posterior(kron, tau, deltas, damping=False):
    blocks = []
    for F, delta in zip(kron.kfacs, deltas):
        dense = [f.to_dense() if isinstance(f, LowRankFactor) else f for f in F]
        if len(dense) == 1:
            blocks.append(tau * dense[0] + delta * torch.eye(dense[0].shape[0], dtype=DT))
        elif damping:
            s = math.sqrt(delta)
            eyes = [torch.eye(f.shape[0], dtype=DT) for f in dense]
            rt = math.sqrt(tau)
            blocks.append(torch.kron(rt * dense[0] + s * eyes[0], rt * dense[1] + s * eyes[1]))
        else:
            K = torch.kron(dense[0], dense[1])
            blocks.append(tau * K + delta * torch.eye(K.shape[0], dtype=DT))
    return torch.block_diag(*blocks)


def mpow(M, p):
    lam, Q = torch.linalg.eigh(M)
    return Q @ torch.diag(lam**p) @ Q.T


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("exponent", [1, -1, -0.5])
def test_decomposed_power_matches_dense_power(damping, rank, exponent):
    gen = torch.Generator().manual_seed(0)
    kron = make_kron(gen, rank=rank)
    tau, deltas = 0.7, torch.tensor([0.3, 2.0, 1.1], dtype=DT)
    P = (kron.decompose(damping=damping) * tau) + deltas
    dense = dense_posterior(kron, tau, deltas.tolist(), damping)
    W = torch.randn(4, 2, kron.n_params, generator=gen, dtype=DT)
    expected = torch.einsum("pq,bkq->bkp", mpow(dense, exponent), W)
    torch.testing.assert_close(P.bmm(W, exponent=exponent), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(P.to_matrix(exponent), mpow(dense, exponent), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(P.diag(exponent), mpow(dense, exponent).diagonal())
    torch.testing.assert_close(P.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        P.inv_square_form(W), W @ torch.linalg.inv(dense) @ W.transpose(1, 2)
    )


def test_damping_survives_add_and_mul():
    """laplace-torch's KronDecomposed drops damping in + and *; ours keeps it."""
    gen = torch.Generator().manual_seed(1)
    kron = make_kron(gen)
    P = kron.decompose(damping=True) * 2.0 + 0.5
    assert P.damping
    dense = dense_posterior(kron, 2.0, [0.5] * 3, damping=True)
    torch.testing.assert_close(P.logdet(), torch.logdet(dense))


def test_undecomposed_kron_matches_dense():
    gen = torch.Generator().manual_seed(2)
    kron = make_kron(gen)
    dense = kron.to_matrix()
    W = torch.randn(3, kron.n_params, generator=gen, dtype=DT)
    torch.testing.assert_close(kron.bmm(W), W @ dense.T)
    torch.testing.assert_close(kron.diag(), dense.diagonal())
    torch.testing.assert_close(kron.logdet(), torch.logdet(dense))
    torch.testing.assert_close((kron * 3.0).to_matrix(), 3.0 * dense)


def test_sum_of_krons_adds_factors():
    gen = torch.Generator().manual_seed(3)
    k1, k2 = make_kron(gen), make_kron(gen)
    s = k1 + k2
    for F, F1, F2 in zip(s.kfacs, k1.kfacs, k2.kfacs):
        for f, f1, f2 in zip(F, F1, F2):
            dense = [g.to_dense() if isinstance(g, LowRankFactor) else g for g in (f, f1, f2)]
            torch.testing.assert_close(dense[0], dense[1] + dense[2])


def test_streaming_factor_is_exact_below_its_rank():
    gen = torch.Generator().manual_seed(4)
    d, k = 200, 12
    basis = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=DT))[0]
    cols = basis @ torch.randn(k, 1000, generator=gen, dtype=DT)  # rank k data
    f = LowRankFactor.zeros(d, k, dtype=DT)
    f.chunk = 32  # many truncations
    for start in range(0, 1000, 50):
        f.append_(cols[:, start : start + 50])
    f.compress_()
    assert f.root.shape[1] == k
    torch.testing.assert_close(f.to_dense(), cols @ cols.T, rtol=1e-10, atol=1e-8)


def test_streaming_factor_above_its_rank_is_close_to_best_truncation():
    """Above rank k the streaming factor loses what each truncation dropped.

    Data: 2000 columns in 300 dimensions with a spectrum decaying as 0.8^i, streamed
    in batches of 100 (truncated every 32 columns, the default chunk at rank 16). Measured
    (seed 5, relative Frobenius norms of the exact factor): the best rank-16 approximation
    is 8.0e-4 away from the exact factor, and the streaming rank-16 factor is 1.2e-4 away
    from that best approximation, i.e. the streaming adds 15% to the unavoidable
    truncation error (8% with the former 64-column chunk, at twice the update time);
    we assert under 20%.
    """
    gen = torch.Generator().manual_seed(5)
    d, k, n = 300, 16, 2000
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))[0]
    spectrum = (0.8 ** torch.arange(d, dtype=DT)).unsqueeze(1)
    cols = basis @ (spectrum * torch.randn(d, n, generator=gen, dtype=DT))
    exact = cols @ cols.T
    lam, Q = torch.linalg.eigh(exact)
    best = Q[:, -k:] @ torch.diag(lam[-k:]) @ Q[:, -k:].T
    f = LowRankFactor.zeros(d, k, dtype=DT)
    for start in range(0, n, 100):
        f.append_(cols[:, start : start + 100])
    f.compress_()
    err_stream = torch.linalg.norm(f.to_dense() - best) / torch.linalg.norm(exact)
    err_best = torch.linalg.norm(exact - best) / torch.linalg.norm(exact)
    assert err_stream < 0.2 * err_best
    assert 5e-4 < err_best < 1e-3  # the data really is above rank k
    # the stream never holds more than rank + chunk columns
    assert f.root.shape == (d, k)


def test_compress_root_keeps_leading_eigenpairs():
    gen = torch.Generator().manual_seed(6)
    root = torch.randn(30, 50, generator=gen, dtype=DT)
    small = compress_root(root, 5)
    lam = torch.linalg.eigvalsh(root @ root.T)
    torch.testing.assert_close(small.square().sum(0), lam.flip(0)[:5])


def test_decomposed_rejects_wrong_delta_length():
    gen = torch.Generator().manual_seed(7)
    P = make_kron(gen).decompose()
    with pytest.raises(ValueError, match="one entry per block"):
        P + torch.ones(2, dtype=DT)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d_g=st.integers(1, 9),
    d_a=st.integers(1, 9),
    rank=st.integers(1, 4),
    delta=st.floats(1e-3, 1e3),
    tau=st.floats(1e-2, 1e2),
    damping=st.booleans(),
)
def test_low_rank_kron_identities(seed, d_g, d_a, rank, delta, tau, damping):
    """P·P⁻¹ = I on random vectors, logdet as dense, P symmetric positive definite."""
    gen = torch.Generator().manual_seed(seed)
    G = LowRankFactor(rand_psd_root(d_g, rank, gen), rank=rank)
    A = rand_psd_root(d_a, rank, gen)
    kron = LowRankKron([[G, A @ A.T]])
    P = kron.decompose(damping=damping) * tau + delta
    v = torch.randn(3, d_g * d_a, generator=gen, dtype=DT)
    back = P.bmm(P.bmm(v, exponent=-1), exponent=1)
    torch.testing.assert_close(back, v, rtol=1e-8, atol=1e-8 * v.abs().max().item())
    dense = P.to_matrix()
    torch.testing.assert_close(dense, dense.T)
    assert torch.linalg.eigvalsh(dense).min() > 0
    torch.testing.assert_close(P.logdet(), torch.logdet(dense), rtol=1e-9, atol=1e-9)


def test_robust_eigh_falls_back_when_lapack_fails(monkeypatch):
    from laplace_llm import matrix

    calls = {"n": 0}
    real = torch.linalg.eigh

    def failing(M):
        calls["n"] += 1
        raise torch.linalg.LinAlgError("did not converge")

    gen = torch.Generator().manual_seed(8)
    R = torch.randn(6, 3, generator=gen, dtype=DT)
    M = R @ R.T
    monkeypatch.setattr(torch.linalg, "eigh", failing)
    lam, Q = matrix._robust_eigh(M)
    monkeypatch.setattr(torch.linalg, "eigh", real)
    assert calls["n"] == 2  # plain, then jittered, then the SVD fallback
    torch.testing.assert_close(Q @ torch.diag(lam) @ Q.T, M)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(M))


# ------------------------------------------------------------- truncated remainder
def _truncated_kron(gen, sides=((8, 9), (10,), (4, 11)), rank=3, lr_threshold=6):
    """Low-rank factors of data rank 7 > ``rank`` (so truncation discards trace), with
    their exact traces known, and the reference ``Q Λ Qᵀ + ρ (I − Q Qᵀ)`` of each."""
    kfacs, refs = [], []
    for block in sides:
        F, R = [], []
        for d in block:
            root = rand_psd_root(d, 7, gen)
            if d > lr_threshold:
                f = LowRankFactor.zeros(d, rank, dtype=DT).append_(root)
                lam, Q = f.eigh()
                exact = root @ root.T
                rho = (torch.trace(exact) - lam.sum()) / (d - lam.numel())
                R.append(Q @ torch.diag(lam) @ Q.T + rho * (torch.eye(d, dtype=DT) - Q @ Q.T))
                F.append(f)
            else:
                F.append(root @ root.T)
                R.append(root @ root.T)
        kfacs.append(F)
        refs.append(R)
    return LowRankKron(kfacs), refs


def _dense_from_factors(refs, tau, deltas, damping):
    blocks = []
    for R, delta in zip(refs, deltas):
        if len(R) == 1:
            blocks.append(tau * R[0] + delta * torch.eye(R[0].shape[0], dtype=DT))
        elif damping:
            s, rt = math.sqrt(delta), math.sqrt(tau)
            blocks.append(torch.kron(rt * R[0] + s * torch.eye(R[0].shape[0], dtype=DT),
                                     rt * R[1] + s * torch.eye(R[1].shape[0], dtype=DT)))
        else:
            K = torch.kron(R[0], R[1])
            blocks.append(tau * K + delta * torch.eye(K.shape[0], dtype=DT))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("damping", [False, True])
@pytest.mark.parametrize("exponent", [1, -1, -0.5])
def test_isotropic_remainder_matches_dense(damping, exponent):
    """With remainders every operation equals the dense posterior built from
    ``Q Λ Qᵀ + ρ (I − Q Qᵀ)`` per factor: one-factor blocks, one low-rank factor and
    both factors low rank (all four eigenspaces), with and without damping."""
    gen = torch.Generator().manual_seed(3)
    kron, refs = _truncated_kron(gen)
    tau, deltas = 0.6, torch.tensor([0.4, 1.7, 0.9], dtype=DT)
    P = (kron.decompose(damping=damping, remainder=True) * tau) + deltas
    dense = _dense_from_factors(refs, tau, deltas.tolist(), damping)
    W = torch.randn(3, 2, kron.n_params, generator=gen, dtype=DT)
    expected = torch.einsum("pq,bkq->bkp", mpow(dense, exponent), W)
    torch.testing.assert_close(P.bmm(W, exponent=exponent), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(P.diag(exponent), mpow(dense, exponent).diagonal())
    torch.testing.assert_close(P.logdet(), torch.logdet(dense), rtol=1e-10, atol=1e-10)


def test_remainder_is_the_mean_discarded_eigenvalue():
    """Truncating all data at once keeps the exact top-k, so ρ is the mean of the exact
    factor's eigenvalues k+1..d; an exact factor (k = d) has none."""
    gen = torch.Generator().manual_seed(4)
    root = rand_psd_root(12, 9, gen)
    f = LowRankFactor.zeros(12, 4, dtype=DT)
    f.append_(root)
    exact = torch.linalg.eigvalsh(root @ root.T).flip(0)
    torch.testing.assert_close(f.remainder(), exact[4:].mean(), rtol=1e-10, atol=1e-12)
    full = LowRankFactor.zeros(12, 12, dtype=DT).append_(root)
    assert full.remainder().item() == 0.0
    assert LowRankFactor(root, 4).remainder().item() == 0.0  # exact trace unknown


def test_low_rank_logdet_approaches_exact_monotonically_with_remainder():
    """As the rank grows the log-determinant with the isotropic remainder falls to the
    exact one (Jensen: the mean of the discarded eigenvalues overstates their log-sum,
    less so with each eigenvalue moved into the kept part), and without it rises to it."""
    gen = torch.Generator().manual_seed(5)
    G = rand_psd_root(4, 6, gen)
    root = rand_psd_root(20, 20, gen, decay=0.85)
    delta, tau = torch.tensor(0.5, dtype=DT), 3.0
    exact = LowRankKron([[G @ G.T, root @ root.T]]).decompose()
    exact_ld = (exact * tau + delta).logdet()
    with_rest, without = [], []
    for k in range(1, 21):
        kron = LowRankKron([[G @ G.T, LowRankFactor.zeros(20, k, dtype=DT).append_(root)]])
        with_rest.append(((kron.decompose(remainder=True) * tau) + delta).logdet().item())
        without.append(((kron.decompose() * tau) + delta).logdet().item())
    diffs_rest = [a - b for a, b in zip(with_rest, with_rest[1:])]
    diffs_prior = [b - a for a, b in zip(without, without[1:])]
    assert min(diffs_rest) >= -1e-9 and min(diffs_prior) >= -1e-9
    assert with_rest[-1] == pytest.approx(exact_ld.item(), rel=1e-10)
    assert without[-1] == pytest.approx(exact_ld.item(), rel=1e-10)
    # and the remainder is the closer approximation at every truncated rank
    assert all(abs(a - exact_ld.item()) < abs(b - exact_ld.item())
               for a, b in zip(with_rest[:-1], without[:-1]))


# ------------------------------------------------- truncating many factors together
def _factor_set(gen):
    """Factors of two sides and ranks, one listed twice, and their column blocks."""
    spec = [(40, 4, 8), (40, 4, 8), (25, 3, 5), (40, 6, 8)]  # side, rank, chunk
    factors = [LowRankFactor.zeros(d, k, dtype=DT) for d, k, _ in spec]
    for f, (_, _, c) in zip(factors, spec):
        f.chunk = c  # several truncations per block of columns
    items = []
    for f, n in zip(factors, (37, 20, 44, 9)):
        items.append((f, rand_psd_root(f.side, n, gen)))
    items.append((factors[0], rand_psd_root(40, 23, gen)))  # factor 0 again, after
    return factors, items


def _copies(factors, items):
    twins = {id(f): LowRankFactor(f.root.clone(), f.rank, f.chunk, f.exact_trace.clone())
             for f in factors}
    return [twins[id(f)] for f in factors], [(twins[id(f)], c) for f, c in items]


def test_append_many_equals_each_factor_appended_on_its_own():
    from laplace_llm.matrix import append_many

    gen = torch.Generator().manual_seed(21)
    factors, items = _factor_set(gen)
    for f, cols in items[:4]:  # start from roots that already hold columns
        f.append_(cols[:, :3])
    ref, ref_items = _copies(factors, items)
    append_many(items)
    for f, cols in ref_items:
        f.append_(cols)
    for f, g in zip(factors, ref):
        assert f.root.shape == g.root.shape
        # float64 LAPACK: the batched eigh runs the same routine per matrix
        torch.testing.assert_close(f.to_dense(), g.to_dense(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f.exact_trace, g.exact_trace, rtol=1e-14, atol=0)
    assert factors[0].root.shape[1] <= factors[0].rank + factors[0].chunk


def test_append_many_survives_a_failing_batched_eigh(monkeypatch):
    from laplace_llm.matrix import append_many

    gen = torch.Generator().manual_seed(22)
    factors, items = _factor_set(gen)
    ref, ref_items = _copies(factors, items)
    for f, cols in ref_items:
        f.append_(cols)
    real = torch.linalg.eigh
    batched = {"n": 0}

    def fails_when_batched(M):
        if M.ndim == 3:
            batched["n"] += 1
            raise torch.linalg.LinAlgError("did not converge")
        return real(M)

    monkeypatch.setattr(torch.linalg, "eigh", fails_when_batched)
    append_many(items)
    assert batched["n"] > 0  # the batched path was taken, and fell back per matrix
    for f, g in zip(factors, ref):
        torch.testing.assert_close(f.to_dense(), g.to_dense(), rtol=1e-12, atol=1e-12)
