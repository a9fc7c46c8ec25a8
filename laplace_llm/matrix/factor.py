"""One Kronecker factor: :class:`LowRankFactor` (a root ``R``, ``F = R Rᵀ``) or a dense tensor.

The ``_factor_*`` helpers treat both kinds alike; the data format is in the docstring of
:mod:`laplace_llm.matrix`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from laplace_llm.matrix.truncation import (
    _robust_eigh,
    compress_root,
    factor_sketch_seed,
    finalise_sketches,
    sketch_matrix,
)

__all__ = ["LowRankFactor", "Factor", "readapt_sketches"]


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
    sketch_size : int, optional
        take data in through a sketch of that many columns (:meth:`append_`); ``None``:
        incremental truncation.
    sketch_seed : int, default 0
        seed of the sketch's Gaussian test matrix ``Ω`` (:func:`sketch_matrix`).
    sketch_adapt : int, default 0
        columns of ``Ω`` taken from the data (see :meth:`adapt_omega_`): the first
        columns appended to an empty factor are sketched with the Gaussian ``Ω``, and
        the leading ``sketch_adapt`` eigenvectors of that first chunk replace as many
        of ``Ω``'s columns before any data is kept. 0: ``Ω`` stays Gaussian.
    """

    def __init__(
        self,
        root: torch.Tensor,
        rank: int,
        chunk: int | None = None,
        exact_trace: torch.Tensor | None = None,
        sketch_size: int | None = None,
        sketch_seed: int = 0,
        sketch_adapt: int = 0,
    ):
        self._root = root
        self.rank = int(rank)
        self.chunk = int(chunk) if chunk is not None else max(2 * self.rank, 32)
        self.exact_trace = exact_trace
        self.sketch_size = None if not sketch_size else max(int(sketch_size), self.rank)
        self.sketch_seed = int(sketch_seed)
        self.sketch_adapt = int(sketch_adapt) if self.sketch_size else 0
        if self.sketch_adapt < 0 or (self.sketch_size and self.sketch_adapt >= self.sketch_size):
            raise ValueError(f"sketch_adapt must be in [0, sketch_size = {self.sketch_size}) "
                             f"(some of Ω's columns stay Gaussian); got {sketch_adapt}.")
        self._sketch: torch.Tensor | None = None  # pending Y = F Ω, (d, s)
        self._omega: tuple | None = None  # (key, Ω) while the factor takes data
        self._adapted: torch.Tensor | None = None  # (d, t) columns of Ω taken from data

    @classmethod
    def zeros(
        cls,
        side: int,
        rank: int,
        device=None,
        dtype=torch.float32,
        sketch_size: int | None = None,
        sketch_seed: int = 0,
        sketch_adapt: int = 0,
    ) -> LowRankFactor:
        """Return an empty factor of side ``side`` (a root with no columns, exact trace 0).

        ``sketch_size``: take data in through a sketch of that many columns (see
        :meth:`append_`); ``None``: incremental truncation. ``sketch_adapt``: see the class.
        """
        return cls(
            torch.zeros(side, 0, device=device, dtype=dtype),
            rank,
            exact_trace=torch.zeros((), device=device, dtype=dtype),
            sketch_size=sketch_size,
            sketch_seed=sketch_seed,
            sketch_adapt=sketch_adapt,
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

        Drawn once and kept until the sketch is decomposed (then drawn again if needed);
        its first columns are the adapted ones while the factor has them
        (:meth:`adapt_omega_`).
        """
        key = (self.side, self.sketch_size, self.sketch_seed, self.device, self.dtype)
        if self._omega is None or self._omega[0] != key:
            omega = sketch_matrix(*key)
            if self._adapted is not None:
                omega = omega.clone()  # the drawn matrix is shared through a cache
                omega[:, : self._adapted.shape[1]] = self._adapted.to(omega)
            self._omega = (key, omega)
        return self._omega[1]

    def adapt_omega_(self, columns: torch.Tensor) -> LowRankFactor:
        """Replace ``sketch_adapt`` columns of ``Ω`` by leading directions of ``columns``.

        A Gaussian ``Ω`` sees every direction alike, so above its size ``s`` the sketch
        of a slowly decaying spectrum loses much of the leading eigenvalues (issue 31:
        log-evidence errors 1.33–1.45× the incremental truncation's at ``s = 96``). The
        first chunk of data ``C`` already shows where the leading directions lie: its
        sketch with the Gaussian ``Ω``, ``Y₁ = C Cᵀ Ω``, is a randomised range finder of
        ``C Cᵀ`` (Halko, Martinsson & Tropp, 2011), and its ``t = sketch_adapt`` leading
        left singular vectors ``U`` approximate the chunk's leading eigenvectors (those
        of ``Y₁ Y₁ᵀ``, whose eigenvalues are ``λ²``-weighted). ``Ω = [√d·U,
        Ω_gauss[:, t:]]`` then sketches all the data, the first chunk included. The
        Nyström approximation with a test matrix close to the leading subspace is close
        to the best rank-``k`` part (one step of subspace iteration), and the Gaussian
        columns keep ``F̂ = F`` whenever ``rank F ≤ s`` (``Ωᵀ F Ω`` keeps the rank of
        ``F`` for a generic ``Ω`` of that form). Directions of ``Y₁`` at its rounding
        level (or beyond the rank of a chunk of rank below ``t``) are not taken: those
        columns stay Gaussian. Costs one ``s × s`` Gram and its ``eigh`` (float64) and
        the ``t`` adapted columns' two products, once per factor, whatever the number of
        tokens: the Gaussian columns' products are the first chunk's own. (Taking ``U``
        from the ``s − t`` Gaussian columns that stay, a ``t × t`` ``eigh`` and no extra
        products, was less accurate on issue 31's synthetic spectra.)

        Only an empty factor adapts (a sketch already taken needs its ``Ω``); a no-op
        when ``sketch_adapt`` is 0 or ``Ω`` was adapted already. Factors whose sketches
        are summed across processes must share ``Ω``, so a distributed fit keeps the
        Gaussian one.
        """
        self._adapt(columns)
        return self

    def _adapt(self, columns: torch.Tensor) -> torch.Tensor | None:
        """Adapt ``Ω`` to ``columns`` (see :meth:`adapt_omega_`); return their sketch with it.

        ``C (Cᵀ Ω)`` for the adapted ``Ω``: its Gaussian columns are those of the
        Gaussian sketch ``Y₁``, so only the ``t`` adapted columns cost new products.
        ``None`` when nothing was adapted.
        """
        if not self.sketch_adapt or self._adapted is not None or not self.is_empty():
            return None
        columns = columns.to(dtype=self.dtype, device=self.device)
        probe = columns @ (columns.T @ self.omega())  # C Cᵀ Ω_gauss
        U = _orthonormal_range(probe)[:, : self.sketch_adapt]
        t = U.shape[1]
        if not t:
            return None
        self._set_adapted(U)
        return torch.cat([columns @ (columns.T @ self._adapted), probe[:, t:]], dim=1)

    def _set_adapted(self, U: torch.Tensor) -> None:
        """Make the unit columns ``U`` ``(d, t)``, times ``√d``, the first ``t`` columns of ``Ω``."""
        self._adapted = U * math.sqrt(self.side)  # the norm of a Gaussian column
        self._omega = None
        # keep the adapted columns as a view of Ω, not as a second copy of them
        self._adapted = self.omega()[:, : U.shape[1]]

    def readapt_(self) -> LowRankFactor:
        """Adapt ``Ω`` again, to the leading directions of all the data taken so far.

        See :func:`readapt_sketches`, which does this for many factors together; a
        no-op without a pending sketch or with ``sketch_adapt`` 0.
        """
        readapt_sketches([self])
        return self

    @property
    def adapted(self) -> torch.Tensor | None:
        """``(d, t)`` columns of ``Ω`` taken from the data (:meth:`adapt_omega_`), or ``None``."""
        return self._adapted

    def _same_omega(self, other: LowRankFactor) -> bool:
        if (self.sketch_size, self.sketch_seed) != (other.sketch_size, other.sketch_seed):
            return False
        a, b = self._adapted, other._adapted
        return (a is None and b is None) or (
            a is not None and b is not None and (a is b or torch.equal(a, b.to(a))))

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
                # not vector_norm(columns)²: in float32 that lost 5.6e-4 relative of the
                # trace of 8,192 × 512 columns (sum: 7e-8), and the remainder with it
                self.exact_trace = self.exact_trace + scale * columns.square().sum()
            if self._sketch is None:
                first = self._adapt(columns)
                if first is not None:  # the columns' sketch with the adapted Ω
                    self.set_sketch_(first if scale == 1.0 else first.mul_(scale))
                    return self
                if self._root.shape[1] == 0:  # the first data: its sketch is the factor's
                    self.set_sketch_(columns @ (columns.T @ self.omega()))
                    if scale != 1.0:
                        self._sketch.mul_(scale)
                    return self
                self.set_sketch_(self.sketch())  # a decomposed root's data, with this Ω
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
        """Return a factor with ``src``'s sketch settings and ``Ω`` (adapted columns included)."""
        src = sketch_from if sketch_from is not None else self
        out = LowRankFactor(root, rank, self.chunk, trace, src.sketch_size, src.sketch_seed,
                            src.sketch_adapt)
        out._adapted = src._adapted
        return out

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
        if self._sketch is not None and self._same_omega(like):
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


#: a pending sketch holds its data exactly when its Nyström root of rank ``s`` keeps at
#: least this share of the exact trace (see :func:`readapt_sketches`): data of rank above
#: ``s`` with a heavier tail than ``1 − HELD_SHARE`` of the trace does not pass, float32
#: rounding (about ``s·ε₃₂`` of the largest eigenvalue) does
HELD_SHARE = 1.0 - 1e-3


def readapt_sketches(factors: Sequence[LowRankFactor]) -> None:
    """Adapt each pending sketch's ``Ω`` again, to the leading directions of its data so far.

    The first adaptation (:meth:`LowRankFactor.adapt_omega_`) sees one batch. Where the
    leading directions of the whole data differ from that batch's (eigenvalues close
    together above a long tail: issue 31's wide Llama, whose first batch is a quarter of
    its tokens), a second one, halfway through the data, sees half of it. Each factor's
    pending sketch is decomposed (:func:`finalise_sketches`, batched, rank ``s``); the
    leading ``t = sketch_adapt`` directions of that root, times ``√d``, become the
    adapted columns of ``Ω``; and the root, sketched with the new ``Ω``, becomes the
    factor's pending data, to which later data is added as before.

    Which root goes on: if it holds the data so far exactly (its trace is at least
    :data:`HELD_SHARE` of the exact trace: data of rank at most ``s``), all of it, and the
    sketch stays exact for data of rank at most ``s`` (its ``t`` directions lie in the
    adapted columns, the others in the span the Gaussian columns see). Otherwise (rank
    above ``s``) only its leading ``t`` columns: the rest of the data so far, whose trace
    stays in the exact trace and so in the isotropic remainder, would take up the
    Gaussian columns that the second half's data needs (an exploratory comparison on
    issue 31's wide Llama, not kept as a benchmark, favoured ``t`` over ``s`` there).

    Measured against the exact factors (BENCHMARKS.md, sections 5 and 8:
    ``benchmarks/quality/sketch_accuracy.py``, and the wide Llama over 24 draws of weights
    and data, ``benchmarks/quality/sketch_seeds.py``). It costs one decomposition per
    factor more, whatever the number of tokens.

    Factors without a pending sketch or with ``sketch_adapt`` 0 are left as they are; a
    factor whose data so far is zero becomes empty, so that its first nonzero data
    adapts ``Ω`` as a first batch does.
    """
    todo = [f for f in factors if f.sketch_adapt and f._sketch is not None]
    if not todo:
        return
    finalise_sketches(todo, ranks=[f.sketch_size for f in todo])
    for f in todo:  # each root: columns σ u, σ decreasing and > 0
        root = f._root
        t = min(f.sketch_adapt, root.shape[1])
        if not t:  # no data so far: the factor is empty, and its next data adapts Ω
            continue
        trace = f.exact_trace
        if trace is not None and float(root.square().sum()) < HELD_SHARE * float(trace):
            root = root[:, :t]
        f._set_adapted(root[:, :t] / root[:, :t].norm(dim=0))
        f.set_sketch_(root @ (root.T @ f.omega()))


def _orthonormal_range(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal ``(d, t')`` basis of the well-resolved span of ``Y`` ``(d, t)``, ``t' ≤ t``.

    The left singular vectors of ``Y`` from its float64 Gram ``Yᵀ Y = W diag(σ²) Wᵀ``,
    ``U = Y W σ⁻¹``, for the directions with ``σ > t·ε·σ₁`` (``ε`` of ``Y``'s dtype,
    whose rounding leaves singular values up to about ``√t·ε·σ₁``) and ``σ² > t·ε₆₄·σ₁²``
    (the Gram's own rounding): below those a direction is noise. Decreasing ``σ``.
    """
    Yd = Y.double()
    g, W = _robust_eigh(Yd.T @ Yd)
    g, W = g.flip(0), W.flip(1)
    if not g.numel() or not bool(g[0] > 0):
        return Y[:, :0]
    t = Y.shape[1]
    level = max((t * torch.finfo(Y.dtype).eps) ** 2, t * torch.finfo(torch.float64).eps)
    keep = g > level * g[0]
    return (Yd @ (W[:, keep] * g[keep].rsqrt())).to(Y.dtype)


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
        if f.adapted is not None:  # the columns of Ω taken from the data
            state["sketch_adapted"] = f.adapted
    else:
        state = {"root": f.root, "rank": f.rank}
    if f.exact_trace is not None:  # for low_rank_report() after loading
        state["exact_trace"] = f.exact_trace.reshape(1)
    return state


def _factor_from_state(f: dict[str, torch.Tensor | int], device, sketch_size=None,
                       sketch_seed: int = 0, legacy_seed: int | None = None,
                       sketch_adapt: int = 0) -> Factor:
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
                            sketch_size=sketch.shape[1], sketch_seed=sketch_seed,
                            sketch_adapt=min(sketch_adapt, sketch.shape[1] - 1))
        if "sketch_adapted" in f:
            out._adapted = f["sketch_adapted"].to(device=device, dtype=sketch.dtype)
        return out.set_sketch_(sketch)
    return LowRankFactor(f["root"].to(device), f["rank"], exact_trace=trace,
                         sketch_size=sketch_size, sketch_seed=sketch_seed,
                         sketch_adapt=sketch_adapt if sketch_size else 0)


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
