"""The accumulation of K-FAC factors: a batch's columns streamed into the factors.

:meth:`KFACAccumulation.kron` runs one batch: the inputs and, per probe chunk, the
output gradients become columns (``expand`` or ``reduce``, by call layout where the
model gives one) that the low-rank factors take through a queue of
:data:`QUEUE_BYTES` and the dense ones add at once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from laplace_llm import sharding
from laplace_llm.curvature.kfac_hooks import (
    _has_layouts,
    _layout_positions,
    _per_module_calls,
    as_positions,
    sequence_mask,
)
from laplace_llm.curvature.kfac_probes import _chunks
from laplace_llm.errors import NonFiniteError
from laplace_llm.matrix import LowRankFactor, LowRankKron, append_many

__all__ = ["KFACAccumulation", "QUEUE_BYTES"]


class KFACAccumulation:
    """The accumulation of :class:`~laplace_llm.curvature.kfac.LoRAKFAC` (a base of it, never used alone)."""

    def kron(
        self, x: Any, y: torch.Tensor, N: int, into: LowRankKron | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, LowRankKron]:
        """Loss and K-FAC of one batch, normalised for a data set of ``N`` examples.

        ``into``: a curvature to add this batch to in place (saves one truncation of
        every low-rank factor per batch against building the batch's own and adding).

        Returns
        -------
        loss : torch.Tensor
            summed cross-entropy of the batch (scalar).
        kron : LowRankKron
        """
        dtype = self.factor_dtype()
        mask = sequence_mask(x)
        mask_full = mask is None or bool(mask.all())
        kron = self.empty_kron() if into is None else into
        low_rank = _ColumnQueue()  # low-rank factors' columns, truncated together
        checks: list[torch.Tensor] = []  # finiteness of what each factor took in
        with torch.enable_grad(), self.recording() as rec:
            f = self.model(x)
            if f.ndim != 2:
                raise ValueError(f"The model must return logits (batch, C); got {tuple(f.shape)}.")
            loss = self.lossfunc(f.to(self.factor_dtype()), y)
            probes = self.probes(f, y)
            per_module = _per_module_calls(rec, None)
            classes = self._input_classes(per_module)
            if self.share_input_factors:
                kron.share_(self._same_input_groups(classes))
            self._check_shared(kron, classes)
            # output gradients go into the G factors inside the backward, module by module,
            # so that no layer's gradient outlives its step of the backward; calls with
            # layouts (a scorer's cached prompt) need every call at once
            streamed = self.stream_output_gradients and not any(
                _has_layouts(c) for c in per_module.values()
            ) and not (sharding.sharded_model(self.model) if self.sharded is None
                       else self.sharded)
            if streamed:
                self._stream_output_gradients(f, rec, probes, kron, mask, mask_full, dtype,
                                              low_rank, checks)
            outputs = rec.outputs()
        # the logits are finite: probes() refused them otherwise
        bad = torch.zeros((), dtype=torch.bool, device=f.device)
        a_done: set[int] = set()  # input factors already given this batch (shared ones)
        if streamed:
            self._add_columns(kron, per_module, mask, mask_full, N, [], dtype, f.shape[0],
                              low_rank, a_done, True, checks, with_outputs=False)
        else:
            # the probes' output gradients, PROBE_CHUNK at a time: the memory they take
            # does not grow with the number of probes (C of the ggn Fisher)
            for start, chunk in _chunks(probes):
                with torch.enable_grad():
                    grads = self.output_gradients(
                        f, outputs, [v for v, _ in chunk],
                        keep_graph=start + len(chunk) < len(probes),
                    )
                per_chunk = _per_module_calls(rec, grads)
                del grads
                self._add_columns(kron, per_chunk, mask, mask_full, N, [w for _, w in chunk],
                                  dtype, f.shape[0], low_rank, a_done, start == 0, checks)
                del per_chunk
        for F in kron.unique_factors():
            if isinstance(F, LowRankFactor) and F.sketch_size and F.exact_trace is not None:
                checks.append(F.exact_trace.reshape(1))  # non-finite iff a column was
        if checks:
            bad |= ~torch.isfinite(torch.cat([c.reshape(-1) for c in checks])).all()
        low_rank.flush()
        if bool(bad):
            raise NonFiniteError(
                "NaN or Inf in the logits or in the LoRA layers' activations/gradients of this "
                "batch. Check the inputs and the model's dtype (fp16 overflows easily; use "
                "bf16 or float32) and that the fine-tuned weights are finite."
            )
        return self.factor * loss.detach(), kron

    def _add_columns(self, kron, per_module, mask, mask_full, N, weights, dtype, n_examples,
                     low_rank, a_done: set[int], with_inputs: bool, checks: list,
                     with_outputs: bool = True) -> None:
        """Add one chunk of probes' output-gradient columns (and the inputs') to ``kron``.

        ``with_inputs``: also the input factors (the first chunk of a batch); ``a_done``
        collects the input factors given, so that a shared one is given once.
        ``with_outputs=False``: the inputs only (the output gradients were added in the
        backward). ``checks`` collects what tells whether the columns were finite.
        """
        for b, F in zip(self.blocks, kron.kfacs):
            calls = per_module.get(b.module_name, [])
            add_a = with_inputs and b.kind == "weight" and id(F[1]) not in a_done
            if add_a and calls:
                a_done.add(id(F[1]))
            if not with_outputs:
                if add_a:
                    for a, _, _ in calls:
                        a_cols, a_scale = self._a_columns(a, mask, N, dtype, mask_full)
                        _accumulate(F[1], a_cols, low_rank, a_scale, checks)
                continue
            if _has_layouts(calls):  # columns of A come ready: T_n needs every call
                columns = [(g, 1.0, a, 1.0)
                           for g, a in self._layout_columns(calls, N, weights, dtype, n_examples)]
            else:
                columns = (
                    (*self._g_columns_of_probes(gs, weights, mask, mask_full, dtype),
                     *(self._a_columns(a, mask, N, dtype, mask_full) if add_a else (None, 1.0)))
                    for a, gs, _ in calls
                )
            for g_cols, g_scale, a_cols, a_scale in columns:
                _accumulate(F[0], g_cols, low_rank, g_scale, checks)
                if add_a:
                    _accumulate(F[1], a_cols, low_rank, a_scale, checks)

    def _stream_output_gradients(self, f, rec, probes, kron, mask, mask_full, dtype, low_rank,
                                 checks) -> None:
        """Add every probe's output-gradient columns to the G factors during its backward.

        A hook on each recorded output turns its gradient into columns and adds them to
        the G factor of each block of that module as soon as autograd computes it, so a
        layer's gradient lives only for its step of the backward (peak memory: one
        layer's, not the whole batch's). The backward asks for the gradients of the LoRA
        weights themselves (small, returned and dropped; no ``.grad`` is touched), which
        puts every recorded output on its path.
        """
        g_factors: dict[str, list] = {}
        for b, F in zip(self.blocks, kron.kfacs):
            g_factors.setdefault(b.module_name, []).append(F[0])
        outputs = [(out, name) for name, calls in rec.calls.items() for _, out, _ in calls
                   if out.requires_grad]
        params = [p for p in self.params if p.requires_grad]

        def hook_for(name, weight):
            def hook(g):
                cols = self._g_columns(g, mask, dtype, mask_full)
                for F0 in g_factors.get(name, ()):
                    _accumulate(F0, cols, low_rank, weight, checks)

            return hook

        for i, (v, weight) in enumerate(probes):
            handles = [out.register_hook(hook_for(name, weight)) for out, name in outputs]
            try:
                torch.autograd.grad(f, params, grad_outputs=v, retain_graph=i < len(probes) - 1,
                                    allow_unused=True)
            finally:
                for h in handles:
                    h.remove()

    def _a_columns(self, a, mask, N, dtype, mask_full=False) -> tuple[torch.Tensor, float]:
        """Input columns ``(n_cols, d_in)`` and a scale ``c``: ``A += c Σ colsᵀ cols``.

        Without padding (``mask_full``) every sequence has the same ``T``, so the
        ``1/(T N)`` weight is the scale and the columns are ``a`` itself (a view).
        """
        if self.kfac_approx != "reduce" and (mask_full or mask is None):  # no mask to build
            cols = a.to(dtype).reshape(-1, a.shape[-1])
            return cols, 1.0 / (cols.shape[0] // max(a.shape[0], 1) * N)  # T positions each
        a, m = as_positions(a.to(dtype), mask)
        T = m.sum(1).clamp(min=1)
        if self.kfac_approx == "reduce":
            return (a * m.unsqueeze(-1)).sum(1) / (T * math.sqrt(N)).unsqueeze(-1), 1.0
        if mask_full or mask is None or tuple(mask.shape) != tuple(a.shape[:2]):
            return a.reshape(-1, a.shape[-1]), 1.0 / (a.shape[1] * N)
        w = (m / (T * N).sqrt().unsqueeze(-1)).unsqueeze(-1)
        return (a * w)[m.bool()], 1.0

    def _g_columns(self, g, mask, dtype, mask_full=False) -> torch.Tensor:
        """Output-gradient columns ``(n_cols, d_out)`` of one probe."""
        g = g.to(dtype)
        if self.kfac_approx != "reduce" and (mask_full or mask is None):  # no mask to build
            return g.reshape(-1, g.shape[-1])
        g, m = as_positions(g, mask)
        if self.kfac_approx == "reduce":
            return (g * m.unsqueeze(-1)).sum(1)
        if mask_full or mask is None or tuple(mask.shape) != tuple(g.shape[:2]):
            return g.reshape(-1, g.shape[-1])
        return g[m.bool()]

    def _g_columns_of_probes(self, gs, weights, mask, mask_full, dtype):
        """Return every probe's output-gradient columns and their scale.

        The scale is the probes' weight when they share one; else it is folded into the
        columns.
        """
        cols = [self._g_columns(g, mask, dtype, mask_full) for g in gs]
        if len(set(weights)) == 1:
            return (cols[0] if len(cols) == 1 else torch.cat(cols, 0)), float(weights[0])
        return torch.cat([c * math.sqrt(w) for c, w in zip(cols, weights)], 0), 1.0

    def _layout_columns(self, calls, N, weights, dtype, n_examples):
        """``(G columns, A columns)`` of one module's calls that carry layouts.

        An example's positions are the real positions of its rows in every call;
        ``T_n`` counts them (see the module docstring). ``expand`` yields one pair per
        call, ``reduce`` one pair for the batch (per-example sums need every call).
        """
        parts = [_layout_positions(a, gs, layout, dtype) for a, gs, layout in calls]
        device = parts[0][0].device
        T = torch.zeros(n_examples, device=device, dtype=dtype)
        for _, _, m, example in parts:
            T.index_add_(0, example, m.sum(1))
        scale = (T.clamp(min=1) * N).sqrt()
        if self.kfac_approx == "expand":
            out = []
            for a, gs, m, example in parts:
                keep = m.bool()
                g_cols = torch.cat([g[keep] * math.sqrt(w) for g, w in zip(gs, weights)], 0)
                a_cols = (a * (m / scale[example].unsqueeze(-1)).unsqueeze(-1))[keep]
                out.append((g_cols, a_cols))
            return out
        keep = T > 0
        a_sum = torch.zeros(n_examples, parts[0][0].shape[-1], device=device, dtype=dtype)
        g_sums = [
            torch.zeros(n_examples, parts[0][1][0].shape[-1], device=device, dtype=dtype)
            for _ in weights
        ]
        for a, gs, m, example in parts:
            a_sum.index_add_(0, example, (a * m.unsqueeze(-1)).sum(1))
            for g_sum, g in zip(g_sums, gs):
                g_sum.index_add_(0, example, (g * m.unsqueeze(-1)).sum(1))
        a_cols = (a_sum / (T.clamp(min=1) * math.sqrt(N)).unsqueeze(-1))[keep]
        g_cols = torch.cat([g_sum[keep] * math.sqrt(w) for g_sum, w in zip(g_sums, weights)], 0)
        return [(g_cols, a_cols)]


#: columns queued for low-rank factors before they are appended together (bytes): the
#: truncations of the queued factors share their eigh calls (:func:`append_many`), while
#: the queue bounds the extra memory (a 7B model's batch of 1,024 positions gives
#: 16 MiB of float32 columns per factor of side 4,096)
QUEUE_BYTES = 256 * 2**20


class _ColumnQueue:
    """Low-rank factors' columns waiting for :func:`append_many`.

    Appended once they hold :data:`QUEUE_BYTES`, and at :meth:`flush`.
    """

    def __init__(self) -> None:
        self.items: list[tuple[LowRankFactor, torch.Tensor]] = []
        self.nbytes = 0

    def add(self, F: LowRankFactor, columns: torch.Tensor) -> None:
        self.items.append((F, columns))
        self.nbytes += columns.numel() * columns.element_size()
        if self.nbytes >= QUEUE_BYTES:
            self.flush()

    def flush(self) -> None:
        append_many(self.items)
        self.items, self.nbytes = [], 0


def _accumulate(F, cols: torch.Tensor, low_rank: _ColumnQueue, scale: float = 1.0,
                checks: list | None = None) -> None:
    """Add ``scale · colsᵀ cols`` (``cols``: ``(n, d)``) to a dense or low-rank factor.

    Dense: in place, now. Sketched: two matrix products, now. Truncated: ``colsᵀ`` is
    queued on ``low_rank``, which the caller flushes. ``checks`` collects what tells
    whether the columns were finite: the small dense factor itself, or the columns of a
    truncated factor (a sketched factor's exact trace, checked by the caller, covers its
    columns: it is non-finite iff one of them is).
    """
    if cols.shape[0] == 0:
        return
    if isinstance(F, LowRankFactor):
        if F.sketch_size:  # two matrix products now, no decomposition
            if cols.device.type == "cpu":  # (on a GPU the row count would cost a sync)
                # rows that are exactly zero add nothing: e.g. the output gradients of a
                # last layer's query at every position but the one the logits are read at
                live = torch.linalg.vector_norm(cols, dim=1) != 0  # NaN rows stay
                if not bool(live.all()):
                    cols = cols[live]
            F.append_(cols.T, scale=scale)
            if F.exact_trace is None and checks is not None:
                checks.append(torch.isfinite(cols).all().reshape(1).float())
            return
        if scale != 1.0:
            cols = cols * math.sqrt(scale)
        if checks is not None:
            checks.append(cols.sum().reshape(1))  # non-finite iff a column is (or overflow)
        low_rank.add(F, cols.T)
    else:
        F.addmm_(cols.T, cols, alpha=scale)
        if checks is not None:
            checks.append(F.diagonal().sum().reshape(1))
