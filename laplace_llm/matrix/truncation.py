"""Truncation and sketch helpers of low-rank factors.

A root ``R`` is cut to its leading ``k`` columns (:func:`compress_root`; many roots at once
by :func:`compress_roots_` and :func:`append_many`, their small eigendecompositions batched
where :data:`EIGH_DEVICE` says), or its columns go into a randomised sketch
(:func:`sketch_matrix`) that :func:`finalise_sketches` turns into the rank-``k`` root once.
The data format is in the docstring of :mod:`laplace_llm.matrix`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import OrderedDict

import torch

logger = logging.getLogger(__name__)

__all__ = ["compress_root", "finalise_sketches", "sketch_matrix", "factor_sketch_seed", "factor_dtype", "EIGH_DEVICE", "compress_roots_", "append_many"]


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype of the curvature factors of a model with parameters of ``dtype``.

    float64 for float64 models, float32 otherwise: bf16/fp16 factors would lose the
    evidence's precision, and CPU has no bf16 ``eigh`` kernel.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def compress_root(root: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` root of ``root @ root.T``.

    Parameters
    ----------
    root : torch.Tensor
        ``(d, m)``.
    rank : int
        number of columns to keep at most.

    Returns
    -------
    torch.Tensor
        ``(d, t)`` with ``t = min(rank, d, m)``, columns ``σ_i u_i`` ordered by
        decreasing ``σ_i``: the leading eigenpairs of ``root @ root.T``.
    """
    # Through the m×m Gram matrix: one BLAS matmul and a small eigh, several times
    # faster than QR+SVD of the tall root. Eigenvalues below ~eps·λ_max (float32:
    # 1e-7 of the largest) are lost to rounding; the prior precision dominates those
    # directions of the posterior anyway. The small eigh runs in float64.
    gram = (root.T @ root).double()
    return _leading(root, _robust_eigh(gram)[1], rank)


def _leading(root: torch.Tensor, w: torch.Tensor, rank: int) -> torch.Tensor:
    """Project ``root`` on the leading eigenvectors of its Gram matrix.

    ``w``: the eigenvectors, ascending; the last ``min(rank, d, m)`` are kept, largest first.
    """
    t = min(rank, root.shape[0], w.shape[-1])
    return root @ w[:, -t:].flip(1).to(root.dtype)


#: where :func:`compress_roots_` eigendecomposes the Gram matrices of factors on an
#: accelerator: ``"cpu"`` (copied to the host and back) or ``"same"`` (their device).
#: Measured on an H200 (``benchmarks/gpu_eigh.py``): the GPU runs a batch of 80 × 80
#: eighs (the defaults' size) one matrix at a time, ~1.1 ms each, the host ~0.45 ms
#: each with the copies; the LLaMA-2-7B-shaped fit of ``benchmarks/gpu.py`` (q, v) took
#: 20.0 s with ``"cpu"`` and 37.6 s with ``"same"`` (floor 2.3 s and 1.9 s)
EIGH_DEVICE = "cpu"


def compress_roots_(factors: list) -> None:
    """Truncate each factor's root as :func:`compress_root` does, batching the eighs.

    One ``eigh`` call takes all Gram matrices of equal size on one device; the
    arithmetic per factor is :func:`compress_root`'s. This matters on a GPU, where each
    small ``eigh`` is a kernel launch and a synchronisation, and a fit of a large model
    truncates hundreds of factors many times per batch: with one ``eigh`` per
    truncation on the GPU, the LLaMA-2-7B-shaped fit of ``benchmarks/gpu.py`` (LoRA on
    q and v) took 16.9× its forward + backward floor on an H200. See :data:`EIGH_DEVICE`.
    """
    groups: dict[tuple, list[tuple]] = {}
    for f in factors:
        gram = (f.root.T @ f.root).double()
        groups.setdefault((gram.shape[0], gram.device), []).append((f, gram))
    for (_, device), members in groups.items():
        on_host = EIGH_DEVICE == "cpu" and device.type != "cpu"
        stacked = torch.stack([g for _, g in members])
        if on_host:
            stacked = stacked.cpu()
        try:
            w_b = torch.linalg.eigh(stacked)[1]
        except torch.linalg.LinAlgError:  # one matrix failed: each on its own
            w_b = torch.stack([_robust_eigh(g)[1] for g in stacked])
        if on_host:
            w_b = w_b.to(device, non_blocking=True)
        for (f, _), w in zip(members, w_b):
            f.root = _leading(f.root, w, f.rank)


def append_many(items: list[tuple]) -> None:
    """``f.append_(columns)`` for every ``(f, columns)``, truncating in lock step.

    Each factor goes through exactly the chunks and truncations its own ``append_``
    would (a factor listed twice takes its column blocks in order); the truncations due
    at the same step are done together by :func:`compress_roots_`.
    """
    queues: dict[int, list] = {}
    for f, columns in items:
        queues.setdefault(id(f), []).append(f._append_steps(columns))
    active = [itertools.chain.from_iterable(q) for q in queues.values()]
    while active:
        due, still = [], []
        for steps in active:
            f = next(steps, None)
            if f is not None:
                due.append(f)
                still.append(steps)
        if due:
            compress_roots_(due)
        active = still


def factor_sketch_seed(seed: int, name: str) -> int:
    """Seed of the test matrix ``Ω`` of one factor, from the fit's ``seed`` and its ``name``.

    Each factor gets its own ``Ω``, so that the sketch errors of different layers are
    independent (with one ``Ω`` per side, those of the factors of equal side were
    correlated: over 8 similar factors and 24 seeds the summed log-det error had sd 4.9,
    against 1.7 with one ``Ω`` per factor). The seed is a hash of ``seed`` and ``name``
    (e.g. ``"model.layers.0.q_proj.lora_A.weight.1"``), not Python's salted ``hash``, so
    every process of a distributed fit derives the same ``Ω`` for the same factor.

    Returns
    -------
    int
        in ``[0, 2⁶²)``.
    """
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def sketch_matrix(side: int, columns: int, seed: int, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """Return the sketch's Gaussian test matrix ``Ω`` ``(side, columns)``, the same everywhere.

    Drawn on the CPU in float64 from ``seed`` (and the shape), then cast and moved, so
    every process and device of a fit has the same ``Ω``: sketches of data shards add up
    to the sketch of the whole data. A fit gives each factor its own ``seed``
    (:func:`factor_sketch_seed`); fits written before that used the fit's seed for all.
    A factor keeps its own ``Ω`` while it takes data (:meth:`LowRankFactor.omega`) and
    lets it go once decomposed. Host matrices are also kept in a small cache of at most
    :data:`OMEGA_CACHE_BYTES` (least recently used first out), so that repeated fits of
    a small model do not draw them again (at hidden 512, drawing took 9 ms of a 0.8 s
    fit), while a process that fits many models does not keep one ``d × s`` matrix per
    factor it ever saw (at the LLaMA-7B shape with q, v: 128 factors of ``4096 × 96``
    float32, 192 MiB).
    """
    device = torch.device(device or "cpu")
    key = (int(side), int(columns), int(seed), dtype)
    if device.type == "cpu" and key in _OMEGA_CACHE:
        _OMEGA_CACHE.move_to_end(key)
        return _OMEGA_CACHE[key]
    mixed = (int(seed) * 1_000_003 + int(side) * 7919 + int(columns)) % 2**63
    gen = torch.Generator().manual_seed(mixed)
    omega = torch.randn(side, columns, generator=gen, dtype=torch.float64)
    omega = omega.to(device=device, dtype=dtype)
    nbytes = omega.numel() * omega.element_size()
    if device.type == "cpu" and nbytes <= OMEGA_CACHE_BYTES:
        _OMEGA_CACHE[key] = omega
        while sum(o.numel() * o.element_size() for o in _OMEGA_CACHE.values()) > OMEGA_CACHE_BYTES:
            _OMEGA_CACHE.popitem(last=False)
    return omega


#: bytes of host test matrices ``Ω`` that :func:`sketch_matrix` keeps for reuse
OMEGA_CACHE_BYTES = 32 * 2**20
_OMEGA_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()


#: eigenvalues of a sketch's core ``Ωᵀ Y`` up to this multiple of the Frobenius norm of
#: its antisymmetric part are taken as rounding noise (see :func:`finalise_sketches`)
SKETCH_NOISE_FACTOR = 2.0


def finalise_sketches(factors: list, ranks: list[int] | None = None) -> None:
    """Decompose the pending sketches of ``factors`` into rank-``k`` roots, in place.

    ``k`` is each factor's ``rank``, or ``ranks[i]`` for ``factors[i]`` where given (a
    re-adaptation keeps more columns than the rank, see
    :meth:`~laplace_llm.matrix.LowRankFactor.readapt_`).

    The stabilised Nyström approximation from a sketch ``Y = F Ω`` (Tropp, Yurtsever,
    Udell & Cevher, 2017, Alg. 3): with a shift ``ν``, ``Y_ν = Y + ν Ω``, the core
    ``B = Ωᵀ Y_ν``, ``Z = Y_ν B^{-1/2}`` (so ``F̂_ν = Z Zᵀ``), and the leading ``k``
    eigenpairs of ``Z Zᵀ`` (from the ``s × s`` Gram ``Zᵀ Z``) less the shift:
    ``λ = max(σ² − ν, 0)``. ``B^{-1/2}`` is their Cholesky factor's inverse ``L⁻ᵀ`` when
    every direction of ``B`` holds data (:func:`_cholesky_core`), else ``V b^{-1/2}`` from
    ``B = V diag(b) Vᵀ`` with the directions at the rounding level dropped (below). So
    one or two ``s × s`` eigendecompositions per factor, batched over factors of equal
    ``s`` on one device, in float64.

    *Precision.* Each kept eigenvalue carries an error of about ``(d/s)·ν`` (the shifted
    ``F + νI`` has full rank, which ``s`` columns cannot hold), so ``ν`` is the precision
    of the decomposition, ``ν = ε₆₄ ‖Y‖_F``, not that of ``Y``: with ``ν = ε₃₂ ‖Y‖_F`` a
    float32 factor of side 8,192 and rank 64 lost 61–64 % of its 16th eigenvalue at
    ``λ₁/λ₁₆ = 10⁴`` (issue 31).
    The rounding error ``E`` of a float32 ``Y`` instead enters through ``B``: on the
    directions of ``B`` that hold no data it leaves eigenvalues of the size of ``ΩᵀE``,
    which ``b^{-1/2}`` would blow up into spurious columns. ``ΩᵀFΩ`` is symmetric, so the
    antisymmetric part of ``Ωᵀ Y`` is rounding alone and measures it: directions with
    ``b ≤`` :data:`SKETCH_NOISE_FACTOR` ``· ‖(B − Bᵀ)/2‖_F`` are dropped (measured on
    streams of 16-column chunks at sides 512–8,192: the largest noise eigenvalue was at
    most 0.19 of that norm, also after 2,048 chunks). ``F̂ = F`` when ``rank F ≤ s``, up
    to float64 rounding for float64 factors; for float32 factors of rank 64 the 16
    leading eigenvalues came within 5e-6–1.2e-4 relative (``λ₁/λ₁₆ ≤ 10⁴``, sides
    1,024–8,192, ``tests/matrix/test_truncation.py`` and BENCHMARKS.md section 8; 4e-4
    after 2,048 chunks of 16 columns), and data of rank below ``k`` gives that many
    columns.
    """
    groups: dict[tuple, list] = {}
    keep_rank = {}
    for i, f in enumerate(factors):
        if f._sketch is not None:
            groups.setdefault((f.sketch_size, f.side, f.device), []).append(f)
            keep_rank[id(f)] = f.rank if ranks is None else int(ranks[i])
    for (_, _, device), members in groups.items():
        on_host = EIGH_DEVICE == "cpu" and device.type != "cpu"
        Y = torch.stack([f._sketch for f in members]).double()
        Om = torch.stack([f.omega() for f in members]).double()
        nu = torch.finfo(Y.dtype).eps * torch.linalg.matrix_norm(Y)  # (n,) Frobenius norms
        Yn = Y.addcmul_(Om, nu[:, None, None])  # Y + ν Ω, in place: Y is a fresh copy
        B = Om.transpose(1, 2) @ Yn
        # Ωᵀ F Ω is symmetric: the antisymmetric part is the rounding error of Y
        noise = SKETCH_NOISE_FACTOR * torch.linalg.matrix_norm(0.5 * (B - B.transpose(1, 2)))
        B = 0.5 * (B + B.transpose(1, 2))
        keep, Z = _cholesky_core(B, Yn, noise)
        drop = ~keep.all(-1)  # factors with a direction of B at the rounding level
        if bool(drop.any()):
            b, V = _batched_eigh(B[drop], on_host)
            # b ≥ 0 up to rounding; directions with b at the rounding level carry no data
            floor = b.amax(-1).clamp(min=torch.finfo(b.dtype).tiny) * 1e-12
            keep[drop] = b > torch.maximum(floor, noise[drop])[:, None]
            inv_sqrt = torch.where(keep[drop], b.clamp(min=torch.finfo(b.dtype).tiny).rsqrt(),
                                   torch.zeros_like(b))
            Z[drop] = Yn[drop] @ (V * inv_sqrt[:, None, :])
        g, W = _batched_eigh(Z.transpose(1, 2) @ Z, on_host)  # ascending
        for i, f in enumerate(members):
            t = min(keep_rank[id(f)], f.side, int(keep[i].sum()))
            sig2 = g[i, -t:].flip(0) if t else g[i, :0]
            lam = (sig2 - nu[i]).clamp(min=0.0)
            w = W[i, :, -t:].flip(1) if t else W[i, :, :0]
            # columns σ u with u = Z w / σ: root = Z w · sqrt(λ)/σ
            scale = torch.where(sig2 > 0, (lam / sig2.clamp(min=torch.finfo(g.dtype).tiny)).sqrt(),
                                torch.zeros_like(sig2))
            root = (Z[i] @ w) * scale
            nz = lam > 0
            f._root = root[:, nz].to(f.dtype)
            f._sketch = None
            f._omega = None
            f._adapted = None  # the root holds the data; further data may use any Ω


def _cholesky_core(B: torch.Tensor, Yn: torch.Tensor, noise: torch.Tensor):
    """``(keep, Z)``: ``Z = Yn L⁻ᵀ`` (``B = L Lᵀ``) for the cores where no direction drops.

    :func:`finalise_sketches` drops the directions of a core ``B`` whose eigenvalue is at
    most ``max(10⁻¹² b_max, noise)``. Where ``B`` less that level (``10⁻¹² ‖B‖_F ≥
    10⁻¹² b_max``) is positive definite, none would be dropped, and ``Z = Yn L⁻ᵀ`` gives
    the same ``F̂ = Z Zᵀ = Yn B⁻¹ Ynᵀ`` as ``Yn V b^{-1/2}`` (Tropp et al.'s Alg. 3
    itself) at a fraction of an ``eigh``'s cost. ``keep`` ``(n, s)`` is all true for
    those cores and all false for the others, whose ``Z`` is left for the caller.
    """
    level = torch.maximum(1e-12 * torch.linalg.matrix_norm(B), noise)
    eye = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device)
    _, shifted = torch.linalg.cholesky_ex(B - level[:, None, None] * eye)
    L, info = torch.linalg.cholesky_ex(B)
    ok = (shifted == 0) & (info == 0)
    L = torch.where(ok[:, None, None], L, eye)  # the others' factors are not used
    # Z = Yn L⁻ᵀ as a matrix product with the small triangular inverse (a triangular
    # solve with d right-hand sides costs several times that product)
    L_inv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    Z = Yn @ L_inv.transpose(1, 2)
    keep = ok[:, None].expand(B.shape[:2]).clone()
    return keep, Z


def _batched_eigh(M: torch.Tensor, on_host: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of a stack of symmetric matrices (on the host if ``on_host``), robust."""
    device = M.device
    if on_host:
        M = M.cpu()
    try:
        lam, w = torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        pairs = [_robust_eigh(m) for m in M]
        lam, w = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    if on_host:
        lam, w = lam.to(device, non_blocking=True), w.to(device, non_blocking=True)
    return lam, w


def _robust_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecompose ``M``, surviving LAPACK's rare non-convergence.

    On (near-)degenerate input ``eigh`` may not converge: retry with a jitter of 1e-12 of
    the trace on the diagonal (removed from the eigenvalues afterwards), then fall back to
    the SVD of the symmetric matrix.
    """
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        logger.info("eigh did not converge on a %d×%d matrix; retrying with jitter", *M.shape)
    jitter = 1e-12 * M.diagonal().abs().sum().clamp(min=torch.finfo(M.dtype).tiny)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    try:
        lam, w = torch.linalg.eigh(M + jitter * eye)
        return lam - jitter, w
    except torch.linalg.LinAlgError:
        u, sv, _ = torch.linalg.svd(M)  # PSD: singular pairs are eigenpairs
        return sv.flip(0), u.flip(1)
