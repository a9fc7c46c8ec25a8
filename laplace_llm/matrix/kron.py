"""The Kronecker-factored curvature of a list of blocks: :class:`LowRankKron`.

Its factors accumulate, add, scale and are written as state; :meth:`LowRankKron.decompose`
turns it into :class:`~laplace_llm.matrix.decomposed.LowRankKronDecomposed`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from laplace_llm.matrix.decomposed import LowRankKronDecomposed, _apply_blocks
from laplace_llm.matrix.factor import (
    Factor,
    LowRankFactor,
    _block_numel,
    _factor_dense,
    _factor_eigh,
    _factor_from_state,
    _factor_matmul,
    _factor_scale,
    _factor_state,
    _is_empty,
    _seed_of,
    readapt_sketches,
)
from laplace_llm.matrix.truncation import finalise_sketches

__all__ = ["LowRankKron"]


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
        sketch_adapt: int = 0,
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
        sketch_adapt : int, default 0
            columns of each low-rank factor's ``Ω`` taken from its first data
            (:meth:`LowRankFactor.adapt_omega_`); 0: Gaussian.
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
                                             sketch_seed=_seed_of(sketch_seed, names, i, j),
                                             sketch_adapt=sketch_adapt if sketch_size else 0)
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
                   names: Sequence[str] | None = None, sketch_adapt: int = 0) -> LowRankKron:
        """Inverse of :meth:`to_state`; ``devices`` (one per block) moves the factors.

        ``sketch_size``/``sketch_seed``/``names``/``sketch_adapt``: how the low-rank
        factors take in further data (``None``: incremental truncation; the others as in
        :meth:`zeros`). A stored pending sketch keeps its own size and seed (one stored
        without a seed, by a version that used one ``Ω`` per side, takes ``sketch_seed``
        itself) and its adapted columns of ``Ω``; ``sketch_adapt`` says how many columns
        an empty factor adapts and a pending sketch adapts again
        (:meth:`readapt_`), as in the fit that a checkpoint resumes.
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
                                                  legacy_seed=sketch_seed,
                                                  sketch_adapt=sketch_adapt))
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

    def readapt_(self) -> LowRankKron:
        """Adapt the test matrices of the pending sketches to their data so far (in place).

        The sketched factors' second adaptation, halfway through a fit's data
        (:func:`~laplace_llm.matrix.factor.readapt_sketches`); shared factors once.
        """
        readapt_sketches([f for f in self.unique_factors() if isinstance(f, LowRankFactor)])
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
