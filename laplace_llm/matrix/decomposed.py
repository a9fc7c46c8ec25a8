"""The eigendecomposed Kronecker posterior precision: :class:`LowRankKronDecomposed`.

Each factor as eigenpairs plus a remainder; powers, log-determinants and products with
the formulas of the docstring of :mod:`laplace_llm.matrix`, in ``O(d·k·r)`` per block.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LowRankKronDecomposed"]


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
