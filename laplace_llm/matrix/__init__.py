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

Modules: :mod:`~laplace_llm.matrix.truncation` (truncation and sketch helpers),
:mod:`~laplace_llm.matrix.factor` (:class:`LowRankFactor`), :mod:`~laplace_llm.matrix.kron`
(:class:`LowRankKron`) and :mod:`~laplace_llm.matrix.decomposed`
(:class:`LowRankKronDecomposed`); every public name is importable from
:mod:`laplace_llm.matrix`. ``EIGH_DEVICE`` is read where the truncations run: set
``laplace_llm.matrix.truncation.EIGH_DEVICE``.
"""

from laplace_llm.matrix.decomposed import LowRankKronDecomposed
from laplace_llm.matrix.factor import Factor as Factor
from laplace_llm.matrix.factor import LowRankFactor, readapt_sketches
from laplace_llm.matrix.kron import LowRankKron
from laplace_llm.matrix.truncation import EIGH_DEVICE as EIGH_DEVICE
from laplace_llm.matrix.truncation import _robust_eigh as _robust_eigh
from laplace_llm.matrix.truncation import append_many as append_many
from laplace_llm.matrix.truncation import (
    compress_root,
    factor_dtype,
    factor_sketch_seed,
    finalise_sketches,
    sketch_matrix,
)
from laplace_llm.matrix.truncation import compress_roots_ as compress_roots_

__all__ = [
    "LowRankFactor",
    "LowRankKron",
    "LowRankKronDecomposed",
    "compress_root",
    "finalise_sketches",
    "readapt_sketches",
    "sketch_matrix",
    "factor_sketch_seed",
    "factor_dtype",
]
