"""Kronecker-factored curvature whose large factors are kept in low rank.

Data format
-----------
A curvature (or posterior precision) over a list of parameter *blocks* follows
laplace-torch's ``Kron`` layout: block ``b`` is a list of one or two *factors*.

- two factors ``[G, A]`` for a weight of shape ``(d_out, d_in)``: the block is
  ``G ⊗ A`` acting on the row-major flattened weight, ``G`` of side ``d_out``
  (output-gradient covariance), ``A`` of side ``d_in`` (input covariance);
- one factor ``[G]`` for a bias (or any vector parameter): the block is ``G``.

A factor is either a dense symmetric ``torch.Tensor`` of shape ``(d, d)`` or a
:class:`LowRankFactor` holding a *root* ``R`` of shape ``(d, m)`` with ``F = R Rᵀ``.
A root is what the streaming update, the sum of two fits and (later) the merge
across processes exchange: adding two low-rank factors concatenates their roots and
truncates back to rank ``k``. A ``d × d`` matrix is never formed for a low-rank factor.

After :meth:`LowRankKron.decompose`, every factor is an eigenpair ``(Q, λ)`` with
``Q`` of shape ``(d, k)`` orthonormal columns (``k = d`` for dense factors) and
``λ ≥ 0``, plus a *remainder* ``ρ ≥ 0``, the eigenvalue the factor takes on the
``d − k`` directions outside ``span(Q)``: ``F = Q diag(λ) Qᵀ + ρ (I − Q Qᵀ)``. With
``ρ = 0`` the truncated directions see the prior alone; ``decompose(remainder=True)``
sets ``ρ`` to the mean of the discarded eigenvalues (from the exact trace, see
:meth:`LowRankFactor.remainder`). With ``P = τ (G ⊗ A) + δ I`` and ``ρ = 0``

    P^p = (Q_G ⊗ Q_A) [(τ λ_G ⊗ λ_A + δ)^p − δ^p] (Q_G ⊗ Q_A)ᵀ + δ^p I,

    log det P = Σ_ij log(τ λ_G,i λ_A,j + δ) + (d_G d_A − k_G k_A) log δ;

with remainders, ``G ⊗ A`` has the four eigenspaces kept ⊗ kept, kept ⊗ rest,
rest ⊗ kept and rest ⊗ rest (eigenvalues ``λ_G λ_A``, ``λ_G ρ_A``, ``ρ_G λ_A``,
``ρ_G ρ_A``) and the same formulas hold space by space. :class:`LowRankKronDecomposed`
evaluates them in ``O(d·k·r)`` per block.

*Shared factors.* Blocks whose layers read the same input (the ``lora_A`` of ``q``,
``k`` and ``v`` of one attention layer) have the same input factor ``A``. They may hold
the very same factor object: it is accumulated, stored, eigendecomposed and counted
once. Every operation of :class:`LowRankKron` keeps such sharing (it maps each distinct
factor object once), and :meth:`LowRankKron.to_state` writes a shared factor once and
``{"same_as": [i, j]}`` (block ``i``, factor ``j``, an earlier entry) for the others.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "LowRankFactor",
    "LowRankKron",
    "LowRankKronDecomposed",
    "compress_root",
    "finalise_sketches",
    "sketch_matrix",
    "factor_sketch_seed",
    "factor_dtype",
]


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


def compress_roots_(factors: list[LowRankFactor]) -> None:
    """Truncate each factor's root as :func:`compress_root` does, batching the eighs.

    One ``eigh`` call takes all Gram matrices of equal size on one device; the
    arithmetic per factor is :func:`compress_root`'s. This matters on a GPU, where each
    small ``eigh`` is a kernel launch and a synchronisation, and a fit of a large model
    truncates hundreds of factors many times per batch: with one ``eigh`` per
    truncation on the GPU, the LLaMA-2-7B-shaped fit of ``benchmarks/gpu.py`` (LoRA on
    q and v) took 16.9× its forward + backward floor on an H200. See :data:`EIGH_DEVICE`.
    """
    groups: dict[tuple, list[tuple[LowRankFactor, torch.Tensor]]] = {}
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


def append_many(items: list[tuple[LowRankFactor, torch.Tensor]]) -> None:
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
    Not cached here: a factor keeps its own ``Ω`` while it takes data
    (:meth:`LowRankFactor.omega`) and lets it go once decomposed, so a process that fits
    many models does not accumulate one ``d × s`` matrix per factor it ever saw (at the
    LLaMA-7B shape with q, v: 128 factors of ``4096 × 96`` float32, 192 MiB).
    """
    mixed = (int(seed) * 1_000_003 + int(side) * 7919 + int(columns)) % 2**63
    gen = torch.Generator().manual_seed(mixed)
    omega = torch.randn(side, columns, generator=gen, dtype=torch.float64)
    return omega.to(device=torch.device(device or "cpu"), dtype=dtype)


#: eigenvalues of a sketch's core ``Ωᵀ Y`` up to this multiple of the Frobenius norm of
#: its antisymmetric part are taken as rounding noise (see :func:`finalise_sketches`)
SKETCH_NOISE_FACTOR = 2.0


def finalise_sketches(factors: list[LowRankFactor]) -> None:
    """Decompose the pending sketches of ``factors`` into rank-``k`` roots, in place.

    The stabilised Nyström approximation from a sketch ``Y = F Ω`` (Tropp, Yurtsever,
    Udell & Cevher, 2017, Alg. 3, with an eigendecomposition where they take a Cholesky
    factor, for rank-deficient ``Ωᵀ Y``): with a shift ``ν``, ``Y_ν = Y + ν Ω``,
    ``B = Ωᵀ Y_ν = V diag(b) Vᵀ``, ``Z = Y_ν V b^{-1/2}`` (so ``F̂_ν = Z Zᵀ``), and the
    leading ``k`` eigenpairs of ``Z Zᵀ`` (from the ``s × s`` Gram ``Zᵀ Z``) less the
    shift: ``λ = max(σ² − ν, 0)``. Two ``s × s`` eigendecompositions per factor, batched
    over factors of equal ``s`` on one device, in float64.

    *Precision.* Each kept eigenvalue carries an error of about ``(d/s)·ν`` (the shifted
    ``F + νI`` has full rank, which ``s`` columns cannot hold), so ``ν`` is the precision
    of the decomposition, ``ν = ε₆₄ ‖Y‖_F``, not that of ``Y``: with ``ν = ε₃₂ ‖Y‖_F`` a
    float32 factor of side 8,192 lost 61 % of its 16th eigenvalue at ``λ₁/λ₁₆ = 10⁴``.
    The rounding error ``E`` of a float32 ``Y`` instead enters through ``B``: on the
    directions of ``B`` that hold no data it leaves eigenvalues of the size of ``ΩᵀE``,
    which ``b^{-1/2}`` would blow up into spurious columns. ``ΩᵀFΩ`` is symmetric, so the
    antisymmetric part of ``Ωᵀ Y`` is rounding alone and measures it: directions with
    ``b ≤`` :data:`SKETCH_NOISE_FACTOR` ``· ‖(B − Bᵀ)/2‖_F`` are dropped (measured on
    streams of 16-column chunks at sides 512–8,192: the largest noise eigenvalue was at
    most 0.19 of that norm, also after 2,048 chunks). ``F̂ = F`` when ``rank F ≤ s``, up
    to float64 rounding for float64 factors; for float32 factors the 16 leading
    eigenvalues came within 4e-4 relative (``λ₁/λ₁₆ ≤ 10⁴``, sides 512–8,192,
    ``tests/test_sketch.py``), and data of rank below ``k`` gives that many columns.
    """
    groups: dict[tuple, list[LowRankFactor]] = {}
    for f in factors:
        if f._sketch is not None:
            groups.setdefault((f.sketch_size, f.side, f.device), []).append(f)
    for (_, _, device), members in groups.items():
        on_host = EIGH_DEVICE == "cpu" and device.type != "cpu"
        Y = torch.stack([f._sketch for f in members]).double()
        Om = torch.stack([f.omega() for f in members]).double()
        nu = torch.finfo(Y.dtype).eps * torch.linalg.matrix_norm(Y)  # (n,) Frobenius norms
        Yn = Y + nu[:, None, None] * Om
        B = Om.transpose(1, 2) @ Yn
        # Ωᵀ F Ω is symmetric: the antisymmetric part is the rounding error of Y
        noise = SKETCH_NOISE_FACTOR * torch.linalg.matrix_norm(0.5 * (B - B.transpose(1, 2)))
        B = 0.5 * (B + B.transpose(1, 2))
        b, V = _batched_eigh(B, on_host)
        # b ≥ 0 up to rounding; directions with b at the rounding level carry no data
        floor = b.amax(-1).clamp(min=torch.finfo(b.dtype).tiny) * 1e-12
        keep = b > torch.maximum(floor, noise)[:, None]
        inv_sqrt = torch.where(keep, b.clamp(min=torch.finfo(b.dtype).tiny).rsqrt(),
                               torch.zeros_like(b))
        Z = Yn @ (V * inv_sqrt[:, None, :])
        g, W = _batched_eigh(Z.transpose(1, 2) @ Z, on_host)  # ascending
        for i, f in enumerate(members):
            t = min(f.rank, f.side, int(keep[i].sum()))
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


class LowRankFactor:
    """A symmetric PSD factor ``F = R Rᵀ`` of side ``d`` kept at rank ``≤ rank``.

    Columns are appended in chunks; whenever the root grows past
    ``rank + chunk`` columns it is truncated back to ``rank`` (incremental SVD), so
    memory stays ``O(d·(rank + chunk))`` and the cost per appended column is
    ``O(d·(rank + chunk)²/chunk)``. Below its rank the factor is exact.

    Parameters
    ----------
    root : torch.Tensor
        ``(d, m)`` initial root (``m`` may be 0).
    rank : int
        rank ``k`` kept (``n_kfac``); ``rank ≥ d`` keeps the factor exact.
    chunk : int, optional
        columns gathered before a truncation; default ``max(2·rank, 32)``. The cost
        per column is ``O(d·(rank + chunk)²/chunk + (rank + chunk)³/chunk)`` plus a
        fixed cost per truncation (one small ``eigh``), smallest near ``chunk ≈ 2·rank``:
        measured on a 2-core CPU at d = 512, rank 16, streaming 8 × 256 columns took
        31 ms with 32-column chunks, 61 ms with 64 and 45 ms with 16 (at d = 1024, 64
        columns took a quarter of the time of 128).
    exact_trace : torch.Tensor, optional
        trace of the exact (untruncated) factor: a scalar kept up to date by
        ``append_``, ``+`` and ``*`` (the sum of squared norms of every column ever
        appended), so that the share of the trace the rank-``k`` root keeps can be
        reported (:mod:`laplace_llm.tools.diagnostics`). ``None``: unknown (a root built by
        hand, or read from a file written without traces); :meth:`zeros` starts it at 0.
    """

    def __init__(
        self,
        root: torch.Tensor,
        rank: int,
        chunk: int | None = None,
        exact_trace: torch.Tensor | None = None,
        sketch_size: int | None = None,
        sketch_seed: int = 0,
    ):
        self._root = root
        self.rank = int(rank)
        self.chunk = int(chunk) if chunk is not None else max(2 * self.rank, 32)
        self.exact_trace = exact_trace
        self.sketch_size = None if not sketch_size else max(int(sketch_size), self.rank)
        self.sketch_seed = int(sketch_seed)
        self._sketch: torch.Tensor | None = None  # pending Y = F Ω, (d, s)
        self._omega: tuple | None = None  # (key, Ω) while the factor takes data

    @classmethod
    def zeros(
        cls,
        side: int,
        rank: int,
        device=None,
        dtype=torch.float32,
        sketch_size: int | None = None,
        sketch_seed: int = 0,
    ) -> LowRankFactor:
        """Return an empty factor of side ``side`` (a root with no columns, exact trace 0).

        ``sketch_size``: take data in through a sketch of that many columns (see
        :meth:`append_`); ``None``: incremental truncation.
        """
        return cls(
            torch.zeros(side, 0, device=device, dtype=dtype),
            rank,
            exact_trace=torch.zeros((), device=device, dtype=dtype),
            sketch_size=sketch_size,
            sketch_seed=sketch_seed,
        )

    @property
    def root(self) -> torch.Tensor:
        """``(d, m)`` root with ``F = R Rᵀ``; a pending sketch is decomposed first (once)."""
        if self._sketch is not None:
            finalise_sketches([self])
        return self._root

    @root.setter
    def root(self, value: torch.Tensor) -> None:
        self._sketch = None
        self._root = value

    @property
    def pending(self) -> bool:
        """Whether data sits in a sketch that has not been decomposed yet."""
        return self._sketch is not None

    @property
    def side(self) -> int:
        """Side ``d`` of the factor."""
        return self._root.shape[0]

    @property
    def shape(self) -> torch.Size:
        """Shape ``(d, d)`` of the factor."""
        return torch.Size((self.side, self.side))

    @property
    def device(self) -> torch.device:
        """Device of the root."""
        return self._root.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the root."""
        return self._root.dtype

    def is_empty(self) -> bool:
        """Whether no data has been added (without decomposing a pending sketch)."""
        return self._sketch is None and self._root.shape[1] == 0

    def _limit(self) -> int:
        return min(self.rank, self.side)

    def omega(self) -> torch.Tensor:
        """Return the sketch's test matrix ``Ω`` ``(d, s)`` (see :func:`sketch_matrix`).

        Drawn once and kept until the sketch is decomposed (then drawn again if needed).
        """
        key = (self.side, self.sketch_size, self.sketch_seed, self.device, self.dtype)
        if self._omega is None or self._omega[0] != key:
            self._omega = (key, sketch_matrix(*key))
        return self._omega[1]

    def sketch(self) -> torch.Tensor:
        """``F Ω`` ``(d, s)``: the pending sketch, or that of the root (not stored)."""
        if self._sketch is not None:
            return self._sketch
        if self._root.shape[1] == 0:
            return torch.zeros(self.side, self.sketch_size, device=self.device, dtype=self.dtype)
        return self._root @ (self._root.T @ self.omega())

    def set_sketch_(self, sketch: torch.Tensor) -> LowRankFactor:
        """Make ``sketch`` (``F Ω``, ``(d, s)``) the factor's pending data, in place."""
        self._root = self._root[:, :0]
        self._sketch = sketch
        return self

    def append_(self, columns: torch.Tensor, scale: float = 1.0) -> LowRankFactor:
        """Add ``scale · columns @ columns.T`` in place; ``columns`` is ``(d, c)``.

        With a sketch: ``Y += scale · columns (columnsᵀ Ω)``, two matrix products, no
        decomposition (that waits until the root is read). Else incremental truncation.
        """
        if self.sketch_size:
            columns = columns.to(dtype=self.dtype, device=self.device)
            if self.exact_trace is not None:
                self.exact_trace = self.exact_trace + scale * columns.square().sum()
            if self._sketch is None:
                self.set_sketch_(self.sketch().clone())
            self._sketch.addmm_(columns, columns.T @ self.omega(), alpha=scale)
            return self
        if scale != 1.0:
            columns = columns * math.sqrt(scale)
        for _ in self._append_steps(columns):
            self._root = compress_root(self._root, self.rank)
        return self

    def _append_steps(self, columns: torch.Tensor) -> Iterator[LowRankFactor]:
        """Append ``columns`` chunk by chunk, yielding whenever the root must be truncated.

        The caller truncates ``self.root`` (to ``compress_root(self.root, self.rank)``)
        before resuming; :meth:`append_` does it at once, :func:`append_many` for many
        factors together. A sketched factor takes the columns at once and never yields.
        """
        if self.sketch_size:
            self.append_(columns)
            return
        columns = columns.to(dtype=self.dtype, device=self.device)
        if self.exact_trace is not None:
            self.exact_trace = self.exact_trace + columns.square().sum()
        step = self.chunk
        for start in range(0, columns.shape[1], step):
            self._root = torch.cat([self._root, columns[:, start : start + step]], dim=1)
            if self._root.shape[1] > self._limit() + self.chunk:
                yield self

    def compress_(self) -> LowRankFactor:
        """Truncate the root to at most ``rank`` columns now (a pending sketch: decompose it)."""
        if self._sketch is not None:
            finalise_sketches([self])
        elif self._root.shape[1] > self._limit():
            self._root = compress_root(self._root, self.rank)
        return self

    def _like(self, root: torch.Tensor, rank: int, trace, sketch_from=None) -> LowRankFactor:
        src = sketch_from if sketch_from is not None else self
        return LowRankFactor(root, rank, self.chunk, trace, src.sketch_size, src.sketch_seed)

    def __add__(self, other: LowRankFactor) -> LowRankFactor:
        """Return the sum with another factor of the same side, truncated to the larger rank.

        If either takes data through a sketch, the sum is a pending sketch (with the
        sketch settings of ``other`` when it has them, else those of ``self``).
        """
        if not isinstance(other, LowRankFactor) or other.side != self.side:
            raise ValueError("Can only add a LowRankFactor of the same side.")
        known = self.exact_trace is not None and other.exact_trace is not None
        trace = self.exact_trace + other.exact_trace if known else None
        rank = max(self.rank, other.rank)
        src = other if other.sketch_size else self
        if src.sketch_size:
            out = self._like(self._root[:, :0], rank, trace, sketch_from=src)
            a = self._resketch(out)
            b = other._resketch(out)
            return out.set_sketch_(a + b)
        out = self._like(self.root.clone(), rank, None)
        out.append_(other.root)
        out.exact_trace = trace
        return out

    def _resketch(self, like: LowRankFactor) -> torch.Tensor:
        """``F Ω`` with the test matrix of ``like`` (a pending sketch is reused if its Ω is)."""
        if self._sketch is not None and (self.sketch_size, self.sketch_seed) == (
            like.sketch_size, like.sketch_seed
        ):
            return self._sketch
        root = self.root
        if root.shape[1] == 0:
            return torch.zeros(self.side, like.sketch_size, device=self.device, dtype=self.dtype)
        return root @ (root.T @ like.omega())

    def __mul__(self, scalar: float) -> LowRankFactor:
        """Return the factor scaled by ``scalar ≥ 0`` (the root by its square root)."""
        trace = None if self.exact_trace is None else self.exact_trace * float(scalar)
        if self._sketch is not None:  # linear in F: scale the sketch itself
            out = self._like(self._root[:, :0], self.rank, trace)
            return out.set_sketch_(self._sketch * float(scalar))
        return self._like(self._root * math.sqrt(float(scalar)), self.rank, trace)

    __rmul__ = __mul__

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Leading eigenpairs ``(λ (t,), Q (d, t))``, ``λ`` decreasing and ``≥ 0``."""
        root = compress_root(self.root, self.rank) if self.root.shape[1] else self.root
        lam = root.square().sum(0)
        norms = lam.sqrt()
        keep = norms > 0
        return lam[keep], root[:, keep] / norms[keep]

    def add_isotropic_(self, basis: torch.Tensor, rho: torch.Tensor | float) -> LowRankFactor:
        """Add ``ρ (I − B Bᵀ)`` to the factor on the span of its kept columns, in place.

        ``B`` (``(d, k')``, orthonormal columns) and ``ρ`` are a factor's kept basis and
        isotropic remainder (:meth:`remainder`), the part of it that its root does not
        hold. The root's column space is kept and the Rayleigh–Ritz eigenpairs of
        ``R Rᵀ + ρ (I − B Bᵀ)`` on it replace the root: with ``R = U diag(√λ)``, the
        eigenpairs of ``diag(λ) + ρ (I − (UᵀB)(UᵀB)ᵀ)`` (``k × k``), rotated back by ``U``.
        By Cauchy's interlacing theorem each kept eigenvalue lies between that of
        ``R Rᵀ`` and that of the full sum, both ``≤ ρ`` apart; a direction orthogonal to
        ``B`` takes exactly ``λ + ρ``. The exact trace is unchanged (it already holds the
        remainder), so :meth:`remainder` of the result keeps the total trace.
        """
        rho = float(rho)
        if rho <= 0 or self.root.shape[1] == 0:
            return self
        lam, U = self.eigh()
        C = (U.T @ basis.to(U)).double()
        M = torch.diag(lam.double()) + rho * (torch.eye(lam.numel(), dtype=torch.float64,
                                                        device=U.device) - C @ C.T)
        mu, W = _robust_eigh(0.5 * (M + M.T))
        mu, W = mu.flip(0).clamp(min=0.0), W.flip(1)
        self.root = (U @ W.to(U.dtype)) * mu.sqrt().to(U.dtype)
        return self

    def remainder(self, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Mean eigenvalue of the part of the exact factor that the root discarded.

        ``ρ = (tr F_exact − Σ λ_kept) / (d − k)``, the trace the truncation threw away
        spread evenly over the ``d − k`` directions outside the kept columns. This is
        the maximum-likelihood noise level of probabilistic PCA (Tipping & Bishop,
        1999): ``Q diag(λ) Qᵀ + ρ (I − Q Qᵀ)`` is the closest "rank ``k`` plus
        isotropic" matrix to the exact factor that keeps its trace. Zero when the
        factor is exact (``k = d``) or its exact trace is unknown.

        Parameters
        ----------
        kept : torch.Tensor, optional
            ``(k,)`` the kept eigenvalues (from :meth:`eigh`; computed if omitted).

        Returns
        -------
        torch.Tensor
            scalar ``ρ ≥ 0``.
        """
        if kept is None:
            kept = self.eigh()[0]
        n_rest = self.side - kept.numel()
        zero = torch.zeros((), device=self.device, dtype=self.dtype)
        if self.exact_trace is None or n_rest <= 0:
            return zero
        return torch.clamp((self.exact_trace.to(kept.dtype) - kept.sum()) / n_rest, min=0.0)

    def to_dense(self) -> torch.Tensor:
        """``(d, d)`` matrix; for tests and small sides only."""
        return self.root @ self.root.T

    def diag(self) -> torch.Tensor:
        """Return the diagonal ``(d,)``."""
        return self.root.square().sum(1)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``F @ x`` for ``x`` of shape ``(..., d, n)``."""
        return self.root @ (self.root.T @ x)

    def nbytes(self) -> int:
        """Return the bytes held by the root (and a pending sketch)."""
        n = self._root.numel() * self._root.element_size()
        if self._sketch is not None:
            n += self._sketch.numel() * self._sketch.element_size()
        return n


Factor = torch.Tensor | LowRankFactor


def _factor_dense(f: Factor) -> torch.Tensor:
    return f.to_dense() if isinstance(f, LowRankFactor) else f


def _factor_matmul(f: Factor, x: torch.Tensor) -> torch.Tensor:
    return f.matmul(x) if isinstance(f, LowRankFactor) else f @ x


def _factor_state(f: Factor) -> dict[str, torch.Tensor | int]:
    if not isinstance(f, LowRankFactor):
        return {"dense": f}
    # a pending sketch is stored as it is (a checkpoint mid-fit): decomposing it here
    # would change the fit that resumes from it
    if f.pending:
        # the Ω it was taken with, for the fit that resumes from it (files without it
        # were written when every factor used the fit's seed)
        state = {"sketch": f._sketch, "rank": f.rank,
                 "sketch_seed": torch.tensor([f.sketch_seed], dtype=torch.int64)}
    else:
        state = {"root": f.root, "rank": f.rank}
    if f.exact_trace is not None:  # for low_rank_report() after loading
        state["exact_trace"] = f.exact_trace.reshape(1)
    return state


def _factor_from_state(f: dict[str, torch.Tensor | int], device, sketch_size=None,
                       sketch_seed: int = 0, legacy_seed: int | None = None) -> Factor:
    if "root" not in f and "sketch" not in f:
        return f["dense"].to(device)
    trace = f.get("exact_trace")
    trace = None if trace is None else trace.to(device).reshape(())
    if "sketch" in f:
        sketch = f["sketch"].to(device)
        if "sketch_seed" in f:
            sketch_seed = int(f["sketch_seed"].reshape(()))
        elif legacy_seed is not None:
            sketch_seed = legacy_seed
        out = LowRankFactor(sketch[:, :0], f["rank"], exact_trace=trace,
                            sketch_size=sketch.shape[1], sketch_seed=sketch_seed)
        return out.set_sketch_(sketch)
    return LowRankFactor(f["root"].to(device), f["rank"], exact_trace=trace,
                         sketch_size=sketch_size, sketch_seed=sketch_seed)


def _factor_scale(f: Factor, c: float) -> Factor:
    return f * c


def _factor_eigh(f: Factor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(f, LowRankFactor):
        return f.eigh()
    lam, q = _robust_eigh(f)
    # curvature factors are PSD; rounding can make tiny eigenvalues negative
    return lam.clamp(min=0.0), q


def _is_empty(f: Factor) -> bool:
    if isinstance(f, LowRankFactor):
        return f.is_empty()
    return not bool(f.any())


def _seed_of(seed: int, names: Sequence[str] | None, i: int, j: int) -> int:
    """Sketch seed of factor ``j`` of block ``i`` (see :meth:`LowRankKron.zeros`)."""
    return seed if names is None else factor_sketch_seed(seed, f"{names[i]}.{j}")


def _block_numel(block: Sequence[Factor]) -> int:
    n = 1
    for f in block:
        n *= f.shape[0]
    return n


class LowRankKron:
    """K-FAC curvature over a list of blocks with dense or low-rank factors.

    Plays the role of laplace-torch's ``Kron`` for :class:`laplace_llm.LoRALaplace`:
    it is what ``fit`` accumulates and what ``state_dict`` stores.

    Parameters
    ----------
    kfacs : list of list of (torch.Tensor or LowRankFactor)
        one entry per parameter block, in the order of the Laplace object's
        ``params``; see the module docstring for the layout.
    """

    def __init__(self, kfacs: list[list[Factor]]):
        self.kfacs = kfacs

    @classmethod
    def zeros(
        cls,
        sides: Sequence[Sequence[int]],
        rank: int,
        lr_threshold: int,
        device=None,
        dtype=torch.float32,
        sketch_size: int | None = None,
        sketch_seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> LowRankKron:
        """Empty curvature, without a ``d × d`` allocation for large factors.

        Parameters
        ----------
        sides : sequence of sequence of int
            per block, the side of each factor.
        rank : int
            rank kept by the low-rank factors (``n_kfac``).
        lr_threshold : int
            factors of side ``≤ lr_threshold`` are dense zeros, the others empty roots.
        device : torch.device or sequence of torch.device, optional
            one device for all blocks, or one per block.
        dtype : torch.dtype, default float32
        sketch_size, sketch_seed : optional
            low-rank factors take data through a sketch of ``sketch_size`` columns
            (:meth:`LowRankFactor.append_`); ``None``: incremental truncation.
        names : sequence of str, optional
            one name per block (the parameter's): factor ``j`` of block ``name`` then
            sketches with its own ``Ω``, seeded by :func:`factor_sketch_seed` of
            ``sketch_seed`` and ``f"{name}.{j}"``. ``None``: every factor uses
            ``sketch_seed`` (one ``Ω`` per side).
        """
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * len(sides)
        kfacs = []
        for i, (block_sides, device) in enumerate(zip(sides, devices)):
            kfacs.append(
                [
                    torch.zeros(d, d, device=device, dtype=dtype)
                    if d <= lr_threshold
                    else LowRankFactor.zeros(d, rank, device=device, dtype=dtype,
                                             sketch_size=sketch_size,
                                             sketch_seed=_seed_of(sketch_seed, names, i, j))
                    for j, d in enumerate(block_sides)
                ]
            )
        return cls(kfacs)

    def map_factors(self, fn) -> LowRankKron:
        """Return a new curvature with ``fn(factor, n_factors_of_block)`` per factor.

        Each distinct factor object is mapped once, so shared factors stay shared.
        """
        memo: dict[int, Factor] = {}
        out = []
        for F in self.kfacs:
            row = []
            for f in F:
                key = id(f)
                if key not in memo:
                    memo[key] = fn(f, len(F))
                row.append(memo[key])
            out.append(row)
        return LowRankKron(out)

    def unique_factors(self) -> list[Factor]:
        """Every distinct factor object once, in block order."""
        seen: dict[int, Factor] = {}
        for F in self.kfacs:
            for f in F:
                seen.setdefault(id(f), f)
        return list(seen.values())

    def share_(self, groups: Sequence[Sequence[int]], j: int = 1) -> LowRankKron:
        """Make factor ``j`` of the blocks of each group one object, in place.

        Only empty factors are linked (nothing accumulated yet): a group whose factors
        already hold different objects with data is left as it is, which stays correct,
        merely not shared.

        Parameters
        ----------
        groups : sequence of sequence of int
            block indices whose factor ``j`` is the same matrix (e.g. the input factor
            of layers that read the same input).
        j : int, default 1
            which factor (1: the input side ``A`` of ``G ⊗ A``).
        """
        for group in groups:
            first = self.kfacs[group[0]][j]
            others = [b for b in group[1:] if self.kfacs[b][j] is not first]
            if others and all(_is_empty(self.kfacs[b][j]) for b in [group[0], *others]):
                for b in others:
                    self.kfacs[b][j] = first
        return self

    def to_state(self) -> list[list[dict[str, torch.Tensor | int]]]:
        """Plain representation: per block, per factor ``{"dense": F}``, ``{"root": R, "rank": k}``.

        or ``{"same_as": [i, j]}`` for a factor shared with factor ``j`` of an earlier block
        ``i``. A low-rank factor whose exact trace is known also holds ``"exact_trace"`` (a
        ``(1,)`` tensor, see :class:`LowRankFactor`). Holds tensors and ints only, so
        ``torch.load(weights_only=True)`` reads it and :mod:`laplace_llm.serialization`
        maps it to named tensors.
        """
        first: dict[int, list[int]] = {}
        state = []
        for i, F in enumerate(self.kfacs):
            row = []
            for j, f in enumerate(F):
                if id(f) in first:
                    row.append({"same_as": list(first[id(f)])})
                    continue
                first[id(f)] = [i, j]
                row.append(_factor_state(f))
            state.append(row)
        return state

    @classmethod
    def from_state(cls, state: list[list[dict[str, torch.Tensor | int]]], devices=None,
                   sketch_size: int | None = None, sketch_seed: int = 0,
                   names: Sequence[str] | None = None) -> LowRankKron:
        """Inverse of :meth:`to_state`; ``devices`` (one per block) moves the factors.

        ``sketch_size``/``sketch_seed``/``names``: how the low-rank factors take in
        further data (``None``: incremental truncation; ``names`` as in :meth:`zeros`). A
        stored pending sketch keeps its own size and seed (one stored without a seed, by
        a version that used one ``Ω`` per side, takes ``sketch_seed`` itself).
        """
        devices = [None] * len(state) if devices is None else devices
        kfacs: list[list[Factor]] = []
        for i, (F, device) in enumerate(zip(state, devices)):
            row: list[Factor] = []
            for j, f in enumerate(F):
                if "same_as" in f:
                    si, sj = (int(v) for v in f["same_as"])
                    if (si, sj) >= (i, j) or "same_as" in state[si][sj]:
                        raise ValueError(
                            f"Factor {i}.{j} refers to {si}.{sj}, which is not an earlier "
                            "stored factor."
                        )
                    row.append(kfacs[si][sj] if si < i else row[sj])
                else:
                    row.append(_factor_from_state(f, device, sketch_size,
                                                  _seed_of(sketch_seed, names, i, j),
                                                  legacy_seed=sketch_seed))
            kfacs.append(row)
        return cls(kfacs)

    def __len__(self) -> int:
        """Return the number of blocks."""
        return len(self.kfacs)

    def __add__(self, other: LowRankKron) -> LowRankKron:
        """Return the blockwise sum (low-rank factors truncated)."""
        if not isinstance(other, LowRankKron) or len(other) != len(self):
            raise ValueError("Can only add a LowRankKron with the same blocks.")
        memo: dict[tuple[int, int], Factor] = {}
        out = []
        for F, G in zip(self.kfacs, other.kfacs):
            row = []
            for f, g in zip(F, G):
                key = (id(f), id(g))
                if key not in memo:
                    memo[key] = f + g
                row.append(memo[key])
            out.append(row)
        return LowRankKron(out)

    def __mul__(self, scalar: float | torch.Tensor) -> LowRankKron:
        """Return the curvature scaled by ``scalar``."""
        # spread the scalar over the factors so that each block is scaled once
        scalar = float(scalar)
        return self.map_factors(lambda f, n: _factor_scale(f, scalar ** (1 / n)))

    __radd__ = __add__
    __rmul__ = __mul__

    @property
    def n_params(self) -> int:
        """Number of parameters over all blocks."""
        return sum(_block_numel(F) for F in self.kfacs)

    def compress_(self) -> LowRankKron:
        """Truncate every low-rank factor to its rank now (in place).

        Pending sketches are decomposed together (:func:`finalise_sketches`).
        """
        finalise_sketches([f for f in self.unique_factors() if isinstance(f, LowRankFactor)])
        for f in self.unique_factors():
            if isinstance(f, LowRankFactor):
                f.compress_()
        return self

    def decompose(self, damping: bool = False, remainder: bool = False) -> LowRankKronDecomposed:
        """Eigendecompose every factor (low-rank ones in ``O(d·k²)``).

        Parameters
        ----------
        damping : bool, default False
            See :class:`LowRankKronDecomposed`.
        remainder : bool, default False
            Give each low-rank factor the mean of its discarded eigenvalues on the
            complement of its kept columns (:meth:`LowRankFactor.remainder`), instead of
            zero. Dense factors are exact and have no complement.
        """
        eigvecs, eigvals, sides, rests = [], [], [], []
        memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for F in self.kfacs:
            for f in F:
                if id(f) not in memo:  # a shared factor is decomposed once
                    memo[id(f)] = _factor_eigh(f)
            ls, qs = zip(*(memo[id(f)] for f in F))
            eigvals.append(list(ls))
            eigvecs.append(list(qs))
            sides.append([f.shape[0] for f in F])
            rests.append(
                [
                    f.remainder(lam)
                    if remainder and isinstance(f, LowRankFactor)
                    else torch.zeros((), device=lam.device, dtype=lam.dtype)
                    for f, lam in zip(F, ls)
                ]
            )
        return LowRankKronDecomposed(
            eigvecs, eigvals, sides, damping=damping, remainders=rests
        )

    def bmm(self, W: torch.Tensor, exponent: float = 1) -> torch.Tensor:
        """``H @ W`` for ``W`` of shape ``(P,)``, ``(B, P)`` or ``(B, K, P)``."""
        if exponent != 1:
            raise ValueError("Only exponent 1 before decompose(); decompose for others.")
        return _apply_blocks(W, self.n_params, self.kfacs, _kron_apply)

    def logdet(self) -> torch.Tensor:
        """``log det H`` (``-inf`` where a low-rank factor is rank deficient)."""
        return self.decompose().logdet()

    def diag(self) -> torch.Tensor:
        """Return the diagonal ``(P,)`` of the curvature."""
        diags = []
        for F in self.kfacs:
            ds = [f.diag() if isinstance(f, LowRankFactor) else f.diagonal() for f in F]
            diags.append(ds[0] if len(ds) == 1 else torch.outer(ds[0], ds[1]).flatten())
        return torch.cat(diags)

    def to_matrix(self) -> torch.Tensor:
        """Dense block-diagonal matrix; for tests on small models only."""
        blocks = []
        for F in self.kfacs:
            dense = [_factor_dense(f) for f in F]
            blocks.append(dense[0] if len(dense) == 1 else torch.kron(dense[0], dense[1]))
        return torch.block_diag(*blocks)

    def nbytes(self) -> int:
        """Return the bytes held by the factors (a shared factor counted once)."""
        return sum(
            f.nbytes() if isinstance(f, LowRankFactor) else f.numel() * f.element_size()
            for f in self.unique_factors()
        )


def _kron_apply(F: list[Factor], W: torch.Tensor) -> torch.Tensor:
    # W: (n, d_G) or (n, d_G, d_A); the block acts as G W Aᵀ on each row-major weight
    if len(F) == 1:
        return _factor_matmul(F[0], W.T).T
    G, A = F
    GW = _factor_matmul(G, W)
    return _factor_matmul(A, GW.transpose(1, 2)).transpose(1, 2)


def _apply_blocks(W: torch.Tensor, n_params: int, blocks, fn) -> torch.Tensor:
    """Apply ``fn(block, W_block)`` block by block to ``W (…, P)``."""
    shape = W.shape
    if shape[-1] != n_params:
        raise ValueError(f"Expected {n_params} parameters in the last axis, got {shape[-1]}.")
    W2 = W.reshape(-1, n_params)
    out, start = [], 0
    for block in blocks:
        sides = [f.shape[0] for f in block] if not isinstance(block, _DecomposedBlock) else block.sides
        p = math.prod(sides)
        Wb = W2[:, start : start + p]
        if len(sides) == 2:
            Wb = Wb.reshape(-1, sides[0], sides[1])
        out.append(fn(block, Wb).reshape(-1, p))
        start += p
    return torch.cat(out, dim=1).reshape(shape)


class _DecomposedBlock:
    """One block's eigenpairs, remainders ``ρ``, prior ``δ``, scale ``τ`` and damping.

    Each factor ``F`` is ``Q diag(λ) Qᵀ + ρ (I − Q Qᵀ)``: ``λ`` on the kept columns,
    ``ρ ≥ 0`` on their complement (``ρ = 0`` for an exact factor, or when the
    truncated part falls back to the prior). For a two-factor block the posterior
    precision ``P = τ G ⊗ A + δ`` then has four eigenspaces, kept ⊗ kept (``τλ_Gλ_A``),
    kept ⊗ rest (``τλ_Gρ_A``), rest ⊗ kept (``τρ_Gλ_A``) and rest ⊗ rest (``τρ_Gρ_A``),
    each shifted by ``δ``, which :meth:`apply`, :meth:`logdet` and :meth:`diag` use.
    """

    __slots__ = ("qs", "ls", "rs", "sides", "tau", "delta", "damping")

    def __init__(self, qs, ls, rs, sides, tau, delta, damping):
        self.qs, self.ls, self.rs, self.sides = qs, ls, rs, sides
        self.tau, self.delta, self.damping = tau, delta, damping

    def _damped(self) -> bool:
        return self.damping and len(self.ls) == 2

    def _rests(self) -> list[int]:
        """Dimension of each factor's complement ``d − k``."""
        return [d - lam.numel() for d, lam in zip(self.sides, self.ls)]

    def eigenspaces(self, exponent: float):
        """``P^p`` on the eigenspaces of a block without damping.

        Returns
        -------
        one factor: ``(a, s)`` with ``a = (τλ + δ)^p`` on the kept columns ``(k,)`` and
        ``s = (τρ + δ)^p`` on the rest; two factors: ``(S, a, b, s)`` with ``S (k_G, k_A)``
        on kept ⊗ kept, ``a (k_G,)`` on kept ⊗ rest, ``b (k_A,)`` on rest ⊗ kept and ``s``
        on rest ⊗ rest.
        """
        t, d = self.tau, self.delta
        if len(self.ls) == 1:
            return torch.pow(t * self.ls[0] + d, exponent), torch.pow(t * self.rs[0] + d, exponent)
        (lG, lA), (rG, rA) = self.ls, self.rs
        S = torch.pow(t * torch.outer(lG, lA) + d, exponent)
        a = torch.pow(t * lG * rA + d, exponent)
        b = torch.pow(t * rG * lA + d, exponent)
        s = torch.pow(t * rG * rA + d, exponent)
        return S, a, b, s

    def damped_factors(self, exponent: float):
        """Per factor ``(D, c)`` with ``(√τ F + √δ)^p = c I + Q diag(D) Qᵀ``."""
        sd = torch.sqrt(self.delta)
        rt = torch.sqrt(self.tau)
        out = []
        for lam, rho in zip(self.ls, self.rs):
            c = torch.pow(rt * rho + sd, exponent)
            out.append((torch.pow(rt * lam + sd, exponent) - c, c))
        return out

    def apply(self, W: torch.Tensor, exponent: float) -> torch.Tensor:
        """``P_b^p W``; ``W`` is ``(n, d)`` for one factor or ``(n, d_G, d_A)``."""
        if len(self.ls) == 1:
            Q = self.qs[0]
            a, s = self.eigenspaces(exponent)
            return s * W + ((W @ Q) * (a - s)) @ Q.T
        QG, QA = self.qs
        if self._damped():
            (DG, cG), (DA, cA) = self.damped_factors(exponent)
            Y = cG * W + QG @ (DG.unsqueeze(-1) * (QG.T @ W))
            return cA * Y + ((Y @ QA) * DA) @ QA.T
        S, a, b, s = self.eigenspaces(exponent)
        GW = QG.T @ W  # (n, k_G, d_A)
        WA = W @ QA  # (n, d_G, k_A)
        core = GW @ QA
        inner = S - a.unsqueeze(-1) - b + s
        return (
            s * W
            + QG @ ((a - s).unsqueeze(-1) * GW)
            + (WA * (b - s)) @ QA.T
            + QG @ (core * inner) @ QA.T
        )

    def logdet(self) -> torch.Tensor:
        """``log det P_b`` (a complement of dimension 0 adds nothing, also when δ = 0)."""
        def term(n: int, x: torch.Tensor) -> torch.Tensor | float:
            # n · log x, with 0 · log 0 = 0 for an exact factor without prior
            return n * torch.log(x).sum() if n else 0.0

        if len(self.ls) == 1:
            a, s = self.eigenspaces(1)
            return torch.log(a).sum() + term(self._rests()[0], s)
        (dG, dA), (nG, nA) = self.sides, self._rests()
        if self._damped():
            (DG, cG), (DA, cA) = self.damped_factors(1)
            # det(X ⊗ Y) = det(X)^{d_Y} det(Y)^{d_X}
            return dA * (torch.log(DG + cG).sum() + term(nG, cG)) + dG * (
                torch.log(DA + cA).sum() + term(nA, cA)
            )
        S, a, b, s = self.eigenspaces(1)
        return torch.log(S).sum() + term(nA, a) + term(nG, b) + term(nG * nA, s)

    def curvature_part(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``p − δ`` on the eigenspace of factor eigenvalues ``x`` (and ``y``).

        Without forming ``p``: ``τx`` (one factor), ``τxy``, or ``τxy + √(τδ)(x + y)``
        with damping.
        """
        if y is None:
            return self.tau * x
        if self._damped():
            return self.tau * x * y + torch.sqrt(self.tau * self.delta) * (x + y)
        return self.tau * x * y

    def evidence_terms(self, W: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``log det(P_b/δ)`` and, for ``W = θ* − μ₀`` of this block, the linearised scatter.

        Both are sums over the eigenspaces of ``P_b``, with ``c = p − δ`` the curvature
        part of an eigenvalue ``p`` (:meth:`curvature_part`) and ``w`` the projection of
        ``W`` on the eigenspace: ``Σ log1p(c/δ)`` (with multiplicities) and
        ``Σ δ·c/(c+δ)·‖w‖²``. No term is a difference of two large numbers, so float32
        keeps its relative precision where ``δ ≫ c``, unlike ``log det P − log det δ`` and
        ``dᵀδd − (δd)ᵀP⁻¹(δd)``. The projections on a factor's complement are residual
        vectors (``w − Q Qᵀ w``), not differences of squared norms.

        Parameters
        ----------
        W : torch.Tensor or None
            ``(d,)`` for one factor, ``(d_G, d_A)`` for two; ``None``: the log-det only.
        """
        d = self.delta
        spaces = []  # (c, multiplicity, squared projection or None)
        if len(self.ls) == 1:
            (Q,), (lam,), (rho,), (n,) = self.qs, self.ls, self.rs, self._rests()
            coef = None if W is None else Q.T @ W
            spaces.append((self.curvature_part(lam), 1, None if W is None else coef.square()))
            if n:
                rest = None if W is None else (W - Q @ coef).square().sum()
                spaces.append((self.curvature_part(rho), n, rest))
        else:
            (QG, QA), (lG, lA), (rG, rA) = self.qs, self.ls, self.rs
            nG, nA = self._rests()
            C = GD = DA = None
            if W is not None:
                GD = QG.T @ W  # (k_G, d_A)
                DA = W @ QA  # (d_G, k_A)
                C = GD @ QA  # (k_G, k_A)
            spaces.append((self.curvature_part(lG.unsqueeze(-1), lA), 1,
                           None if W is None else C.square()))
            if nA:
                kr = None if W is None else (GD - C @ QA.T).square().sum(-1)
                spaces.append((self.curvature_part(lG, rA), nA, kr))
            if nG:
                R2 = None if W is None else DA - QG @ C
                spaces.append((self.curvature_part(rG, lA), nG,
                               None if W is None else R2.square().sum(0)))
                if nA:
                    rr = None if W is None else (W - QG @ GD - R2 @ QA.T).square().sum()
                    spaces.append((self.curvature_part(rG, rA), nG * nA, rr))
        logdet = sum(m * torch.log1p(c / d).sum() for c, m, _ in spaces)
        if W is None:
            return logdet, None
        scatter = sum((d * c / (c + d) * w).sum() for c, _, w in spaces)
        return logdet, scatter

    def diag(self, exponent: float) -> torch.Tensor:
        """Diagonal of ``P_b^p``, flattened as the block's parameters."""
        if len(self.ls) == 1:
            a, s = self.eigenspaces(exponent)
            return s + self.qs[0].square() @ (a - s)
        QG2, QA2 = self.qs[0].square(), self.qs[1].square()
        if self._damped():
            (DG, cG), (DA, cA) = self.damped_factors(exponent)
            return torch.outer(cG + QG2 @ DG, cA + QA2 @ DA).flatten()
        S, a, b, s = self.eigenspaces(exponent)
        inner = S - a.unsqueeze(-1) - b + s
        out = s + (QG2 @ (a - s)).unsqueeze(-1) + QA2 @ (b - s) + QG2 @ inner @ QA2.T
        return out.flatten()

    def to_matrix(self, exponent: float) -> torch.Tensor:
        """Dense ``P_b^p``; for tests on small blocks only."""
        p = math.prod(self.sides)
        eye = torch.eye(p, dtype=self.qs[0].dtype, device=self.qs[0].device)
        W = eye if len(self.sides) == 1 else eye.reshape(p, *self.sides)
        return self.apply(W, exponent).reshape(p, p).T


class LowRankKronDecomposed:
    """Decomposed :class:`LowRankKron` with scale ``τ`` and prior ``δ`` per block.

    Counterpart of laplace-torch's ``KronDecomposed``: ``H * τ`` and ``H + δ``
    return new objects (keeping ``damping``), and ``bmm``, ``logdet``,
    ``inv_square_form``, ``diag`` and ``to_matrix`` evaluate the formulas of the
    module docstring. Multiplication by ``τ`` scales the curvature part only;
    ``δ`` is never scaled.

    Parameters
    ----------
    eigenvectors : list of list of torch.Tensor
        per block, per factor ``Q`` of shape ``(d, k)``.
    eigenvalues : list of list of torch.Tensor
        per block, per factor ``λ`` of shape ``(k,)``.
    sides : list of list of int
        per block, per factor side ``d``.
    deltas : torch.Tensor, optional
        ``(n_blocks,)`` prior precision per block (default zeros).
    tau : torch.Tensor or float, default 1
    damping : bool, default False
        ``P = (√τ G + √δ) ⊗ (√τ A + √δ)`` instead of ``τ G ⊗ A + δ`` for two-factor
        blocks, as laplace-torch's ``damping=True``.
    remainders : list of list of torch.Tensor, optional
        per block, per factor the scalar ``ρ ≥ 0`` that the factor takes on the
        complement of its kept columns (default 0: the prior alone acts there).
    """

    def __init__(
        self,
        eigenvectors,
        eigenvalues,
        sides,
        deltas=None,
        tau=1.0,
        damping=False,
        remainders=None,
    ):
        self.eigenvectors = eigenvectors
        self.eigenvalues = eigenvalues
        self.sides = sides
        ref = eigenvectors[0][0]
        if deltas is None:
            deltas = torch.zeros(len(eigenvalues), device=ref.device, dtype=ref.dtype)
        self.deltas = self._expand_deltas(deltas)
        self.tau = torch.as_tensor(tau, device=ref.device, dtype=ref.dtype)
        self.damping = damping
        if remainders is None:
            zero = torch.zeros((), device=ref.device, dtype=ref.dtype)
            remainders = [[zero] * len(ls) for ls in eigenvalues]
        self.remainders = remainders

    def _expand_deltas(self, deltas) -> torch.Tensor:
        ref = self.eigenvectors[0][0]
        deltas = torch.as_tensor(deltas, device=ref.device)
        if deltas.ndim == 0 or (deltas.ndim == 1 and len(deltas) == 1):
            return deltas.reshape(1).to(ref.dtype).expand(len(self))
        if deltas.ndim == 1 and len(deltas) == len(self):
            return deltas.to(ref.dtype)
        raise ValueError(
            f"Prior precision must be a scalar or have one entry per block ({len(self)}), "
            f"got shape {tuple(deltas.shape)}."
        )

    def __len__(self) -> int:
        """Return the number of blocks."""
        return len(self.eigenvalues)

    @property
    def n_params(self) -> int:
        """Number of parameters over all blocks."""
        return sum(math.prod(s) for s in self.sides)

    def _blocks(self) -> list[_DecomposedBlock]:
        return [
            _DecomposedBlock(qs, ls, rs, sides, self.tau, delta, self.damping)
            for qs, ls, rs, sides, delta in zip(
                self.eigenvectors, self.eigenvalues, self.remainders, self.sides, self.deltas
            )
        ]

    def __add__(self, deltas: torch.Tensor | float) -> LowRankKronDecomposed:
        """Return the precision with ``deltas`` added to the prior of every block."""
        return LowRankKronDecomposed(
            self.eigenvectors,
            self.eigenvalues,
            self.sides,
            self.deltas + self._expand_deltas(deltas),
            self.tau,
            self.damping,
            self.remainders,
        )

    def __mul__(self, scalar: torch.Tensor | float) -> LowRankKronDecomposed:
        """Return the precision with the curvature part scaled by ``scalar``."""
        return LowRankKronDecomposed(
            self.eigenvectors,
            self.eigenvalues,
            self.sides,
            self.deltas,
            self.tau * scalar,
            self.damping,
            self.remainders,
        )

    __radd__ = __add__
    __rmul__ = __mul__

    def detach(self) -> LowRankKronDecomposed:
        """Detach the prior and the scale from the autograd graph (in place)."""
        self.deltas = self.deltas.detach()
        self.tau = self.tau.detach()
        return self

    def nbytes(self) -> int:
        """Return the bytes of the eigenpairs (those of a shared factor counted once)."""
        seen: dict[int, torch.Tensor] = {}
        for qs, ls in zip(self.eigenvectors, self.eigenvalues):
            for t in (*qs, *ls):
                seen.setdefault(id(t), t)
        return sum(t.numel() * t.element_size() for t in seen.values())

    def logdet(self) -> torch.Tensor:
        """``log det P`` summed over blocks."""
        return sum(b.logdet() for b in self._blocks())

    def evidence_terms(self, W: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per block ``log det(P_b/δ_b)`` and the linearised scatter of ``W``, each ``(n_blocks,)``.

        ``W``: ``θ* − μ₀`` of shape ``(P,)``, or ``None`` for the log-dets alone (the
        second value is then ``None``). See :meth:`_DecomposedBlock.evidence_terms`; a
        block with prior ``δ = 0`` has no finite ratio.
        """
        blocks = self._blocks()
        if W is None:
            return torch.stack([b.evidence_terms(None)[0] for b in blocks]), None
        if W.shape != (self.n_params,):
            raise ValueError(f"Expected a vector of {self.n_params} parameters, got {tuple(W.shape)}.")
        logdets, scatters, start = [], [], 0
        for b in blocks:
            p = math.prod(b.sides)
            Wb = W[start : start + p]
            logdet, scatter = b.evidence_terms(Wb if len(b.sides) == 1 else Wb.reshape(b.sides))
            logdets.append(logdet)
            scatters.append(scatter)
            start += p
        return torch.stack(logdets), torch.stack(scatters)

    def bmm(self, W: torch.Tensor, exponent: float = -1) -> torch.Tensor:
        """``P^exponent @ W`` for ``W`` of shape ``(P,)``, ``(B, P)`` or ``(B, K, P)``."""
        return _apply_blocks(W, self.n_params, self._blocks(), lambda b, x: b.apply(x, exponent))

    def inv_square_form(self, W: torch.Tensor) -> torch.Tensor:
        """``W P⁻¹ Wᵀ`` for ``W`` of shape ``(B, K, P)``, giving ``(B, K, K)``."""
        return torch.bmm(W, self.bmm(W, exponent=-1).transpose(1, 2))

    def diag(self, exponent: float = 1) -> torch.Tensor:
        """Return the diagonal ``(P,)`` of ``P^exponent``."""
        return torch.cat([b.diag(exponent) for b in self._blocks()])

    def to_matrix(self, exponent: float = 1) -> torch.Tensor:
        """Dense ``P^exponent``; for tests on small models only."""
        return torch.block_diag(*[b.to_matrix(exponent) for b in self._blocks()])
