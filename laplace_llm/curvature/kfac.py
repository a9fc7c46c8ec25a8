"""K-FAC for LoRA blocks from activations and output gradients caught by hooks.

Sequence format: a hooked module sees an input ``a`` of shape ``(B, T, d_in)`` (or
``(B, d_in)``, read as ``T = 1``) and, per backward *probe*, an output gradient
``g`` of shape ``(B, T, d_out)``. Positions where the batch's ``attention_mask`` is
0 are dropped; ``T_n`` is the number of real positions of sequence ``n``.

With ``N`` the data set size, the factors of a weight block ``G ⊗ A`` are

- ``expand``: ``A = Σ_n (1/(N T_n)) Σ_t a aᵀ``, ``G = Σ_probes w Σ_{n,t} g gᵀ``;
- ``reduce``: ``A = (1/N) Σ_n ā āᵀ`` with ``ā`` the mean of ``a`` over real
  positions, ``G = Σ_probes w Σ_n ḡ ḡᵀ`` with ``ḡ`` the sum of ``g`` over positions;

and a bias block is ``G`` alone. This is curvlinops' ``KFACLinearOperator``
(``loss_reduction="sum"``) as laplace-torch rescales it, extended to padding. A
probe is one vector ``v`` of output-logit cotangents; ``g = Jᵀ v``:

- ``ggn``: the C columns of ``S`` with ``S Sᵀ = diag(p) − p pᵀ``, weight 1;
- ``mc``: ``p − onehot(ŷ)``, ``ŷ ~ Cat(p)``, weight ``1/mc_samples``;
- ``ef``: ``p − onehot(y)`` with the observed label, weight 1.

For ``likelihood="regression"`` (outputs ``(B, k)``, Gaussian noise; laplace-torch's
``MSELoss(reduction="sum")`` with factor ½, so the curvature is ``JᵀJ`` before the
``1/σ²`` that the Laplace class applies):

- ``ggn``: the k identity columns, weight 1;
- ``mc``: ``ε ~ N(0, I_k)``, weight ``1/mc_samples`` (``E[εεᵀ] = I``);
- ``ef``: the residual ``f − y``, weight 2 (laplace-torch's ``½ (2r)(2r)ᵀ``).

Gradients are taken with respect to the hooked modules' outputs only, so no
parameter ``.grad`` is touched and no weight gradient is computed.

Call layouts. A model whose modules act on an example in several calls (a prompt call
of batch ``B`` and a continuation call of batch ``B·C`` reusing its key/value cache, as
:class:`laplace_llm.models.candidates.CandidateScorer` runs them) exposes an attribute
``call_layout``: ``None``, or the :class:`CallLayout` of the calls running now, read by
the hooks at each call. A layout gives each call's real-position mask ``(R, T)`` and the
example each of its ``R`` rows belongs to; an example's positions are then the real
positions of all its rows in all calls: ``T_n`` counts them, ``reduce`` averages ``a`` and
sums ``g`` over them, and the GLM Jacobian sums ``g aᵀ`` over them. Without a layout,
each call's rows are sequences of their own, masked by the batch's ``attention_mask``
when the shapes match.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from laplace.curvature import CurvatureInterface
from torch import nn

from laplace_llm import sharding
from laplace_llm.curvature.top_k import expand_covariance, rest_weights, top_classes
from laplace_llm.errors import NonFiniteError
from laplace_llm.matrix import LowRankFactor, LowRankKron, append_many, factor_dtype
from laplace_llm.models.call_layout import CallLayout
from laplace_llm.models.discovery import KronBlock, find_blocks
from laplace_llm.options import KFACOptions, expose_options

__all__ = ["LoRAKFAC", "CallLayout", "ModuleRecorder", "NonFiniteError"]


class ModuleRecorder:
    """Forward hooks that keep each watched module's inputs and outputs.

    ``calls[module_name]`` is a list of ``(input, output, layout)`` per call, inputs
    detached, outputs attached to the graph so that gradients can be taken
    with respect to them; ``layout`` is what ``layout()`` returned during the call
    (a :class:`CallLayout` or ``None``).
    """

    def __init__(self, modules: dict[str, nn.Module], layout=None):
        self.modules = modules
        self.layout = layout
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, Any]]] = {}
        self._handles = []

    def __enter__(self) -> ModuleRecorder:
        """Register the forward hooks."""
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, inputs, output):
            layout = self.layout() if self.layout is not None else None
            self.calls.setdefault(name, []).append((inputs[0].detach(), output, layout))

        return hook

    def __exit__(self, *exc) -> None:
        """Remove the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def outputs(self) -> list[torch.Tensor]:
        """Return every recorded output, module by module, call by call."""
        return [out for calls in self.calls.values() for _, out, _ in calls]


def sequence_mask(x: Any, dict_key_mask: str = "attention_mask") -> torch.Tensor | None:
    """Attention mask of a batch as ``(B, T)`` (pairs ``(B, 2, T)`` flattened)."""
    if not isinstance(x, Mapping) or x.get(dict_key_mask) is None:
        return None
    mask = x[dict_key_mask]
    return mask.reshape(-1, mask.shape[-1])


def as_positions(t: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` as ``(B, T, d)`` and its 0/1 mask ``(B, T)`` of real positions.

    The batch mask applies when ``t`` has the batch's sequence shape; modules that
    see one position per sequence (a head after pooling, ``lm_head`` on the last
    token) have ``T = 1`` and every position real.
    """
    if t.ndim == 2:
        t = t.unsqueeze(1)
    else:
        t = t.reshape(t.shape[0], -1, t.shape[-1])
    if mask is not None and tuple(mask.shape) == tuple(t.shape[:2]):
        m = mask.to(device=t.device, dtype=t.dtype)
    else:
        m = torch.ones(t.shape[:2], device=t.device, dtype=t.dtype)
    return t, m


@expose_options
class LoRAKFAC(CurvatureInterface):
    """Curvature backend over LoRA blocks with low-rank large factors.

    Parameters
    ----------
    model : nn.Module
        returns logits ``(B, C)`` for a batch (e.g. :class:`laplace_llm.LLMClassifier`).
    likelihood : {"classification", "regression"}
        reward modelling reaches the backend as classification.
    last_layer, subnetwork_indices, dict_key_x, dict_key_y
        as laplace-torch's ``CurvatureInterface``.
    options : KFACOptions, optional
        the K-FAC options; default ``KFACOptions(**kfac_options)``.
    generator : torch.Generator, optional
        source of the sampled labels of ``fisher_type="mc"``.
    blocks : list of KronBlock, optional
        the model's blocks, if already found.
    **kfac_options
        fields of :class:`~laplace_llm.options.KFACOptions` (``n_kfac``, ``fisher_type``,
        ...), when ``options`` is not given; each is also an attribute.
    """

    #: add output gradients to the G factors inside the backward (see
    #: :meth:`_stream_output_gradients`); ``False`` gathers every layer's first (the path
    #: of calls with layouts and of sharded models; for benchmarks and tests)
    stream_output_gradients: bool = True

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        options: KFACOptions | None = None,
        generator: torch.Generator | None = None,
        blocks: list[KronBlock] | None = None,
        **kfac_options,
    ):
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        if likelihood not in ("classification", "regression"):
            raise ValueError(
                "LoRA curvature fits the classification (and reward-modelling) likelihood "
                f"of selected logits or a Gaussian regression; got likelihood={likelihood!r}."
            )
        self.options = options if options is not None else KFACOptions(**kfac_options)
        self.generator = generator
        self.blocks = blocks if blocks is not None else find_blocks(model)
        self.modules = {b.module_name: b.module for b in self.blocks}
        # a module selection (lora_modules) leaves the other trainable weights out of
        # the posterior, also of the torch.func Jacobians
        self.params_dict = {b.name: self.params_dict[b.name] for b in self.blocks}
        self.params = list(self.params_dict.values())

    # ------------------------------------------------------------------ factors
    def factor_dtype(self) -> torch.dtype:
        """float64 for float64 models, float32 otherwise (also for bf16/fp16)."""
        return factor_dtype(self.blocks[0].module.weight.dtype)

    def empty_kron(self) -> LowRankKron:
        """Zero curvature of the blocks, each on its module's device (no ``d × d`` roots)."""
        return LowRankKron.zeros(
            [b.shape for b in self.blocks],
            self.n_kfac,
            self.lr_threshold,
            device=[b.module.weight.device for b in self.blocks],
            dtype=self.factor_dtype(),
            sketch_size=self.options.sketch_columns,
            sketch_seed=self.options.sketch_seed,
            names=[b.name for b in self.blocks],
        )

    # ------------------------------------------------------------------- probes
    def probes(self, f: torch.Tensor, y: torch.Tensor | None) -> list[tuple[torch.Tensor, float]]:
        """Output cotangents ``v (B, C)`` and weights whose ``Σ w JᵀvvᵀJ`` is the Fisher."""
        self._check_outputs(f)
        if self.likelihood == "regression":
            return self._regression_probes(f, y)
        p = torch.softmax(f.detach().to(self.factor_dtype()), dim=-1)
        if self.fisher_type == "ggn":
            return _GGNProbes(p, f.dtype)
        if self.fisher_type == "ef":
            labels = [y]
            weight = 1.0
        else:
            labels = [
                torch.multinomial(p, 1, generator=self.generator).squeeze(-1)
                for _ in range(self.mc_samples)
            ]
            weight = 1.0 / self.mc_samples
        C = f.shape[-1]
        return [
            ((p - nn.functional.one_hot(lab.to(p.device), C).to(p.dtype)).to(f.dtype), weight)
            for lab in labels
        ]

    def _check_outputs(self, f: torch.Tensor) -> None:
        """Refuse non-finite model outputs before they reach a sampler or a softmax.

        Raises
        ------
        NonFiniteError
            naming the LoRA modules whose weights are not finite, if any.
        """
        if bool(torch.isfinite(f.detach()).all()):
            return
        bad = []
        for b in self.blocks:
            w = b.module.weight.detach()
            w = w.to_local() if hasattr(w, "to_local") else w  # a sharded (DTensor) weight
            if not bool(torch.isfinite(w).all()):
                bad.append(b.module_name)
        where = (f"the LoRA weights of {bad[:3]}{' …' if len(bad) > 3 else ''} are not finite"
                 if bad else "every LoRA weight is finite, so the inputs or the base model "
                 "produce them")
        raise NonFiniteError(
            f"NaN or Inf in the model's outputs of this batch: {where}. Check that the "
            "fine-tuned weights are finite, the inputs, and the model's dtype (fp16 "
            "overflows easily; use bf16 or float32)."
        )

    def _regression_probes(self, f, y) -> list[tuple[torch.Tensor, float]]:
        B, k = f.shape
        if self.fisher_type == "ggn":
            eye = torch.eye(k, device=f.device, dtype=f.dtype)
            return [(eye[c].expand(B, k), 1.0) for c in range(k)]
        if self.fisher_type == "ef":
            r = f.detach().to(self.factor_dtype()) - y.to(device=f.device, dtype=self.factor_dtype())
            return [(r.to(f.dtype), 2.0)]
        dtype = self.factor_dtype()
        return [
            (torch.randn(f.shape, generator=self.generator, device=f.device, dtype=dtype).to(f.dtype),
             1.0 / self.mc_samples)
            for _ in range(self.mc_samples)
        ]

    def output_gradients(
        self,
        f: torch.Tensor,
        outputs: list[torch.Tensor],
        probes: list[torch.Tensor],
        keep_graph: bool = False,
    ) -> list[list[torch.Tensor]]:
        """``grads[i][j]``: gradient of ``⟨f, probes[i]⟩`` w.r.t. ``outputs[j]``.

        ``keep_graph``: keep the graph after the last probe too (more probes follow).
        """
        grads = []
        for i, v in enumerate(probes):
            g = torch.autograd.grad(
                f, outputs, grad_outputs=v, retain_graph=keep_graph or i < len(probes) - 1,
                allow_unused=True,
            )
            grads.append([torch.zeros_like(o) if gi is None else gi for gi, o in zip(g, outputs)])
        return grads

    # ------------------------------------------------------------------ capture
    @contextlib.contextmanager
    def recording(self) -> Iterator[ModuleRecorder]:
        """Record the blocks' modules' inputs, outputs and call layouts while in this context."""
        model = self.model
        with ModuleRecorder(self.modules, lambda: getattr(model, "call_layout", None)) as rec:
            yield rec

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
            ) and not sharding.sharded_model(self.model)
            if streamed:
                self._stream_output_gradients(f, rec, probes, kron, mask, mask_full, dtype,
                                              low_rank, checks)
            outputs = rec.outputs()
        bad = ~torch.isfinite(f.detach()).all()
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

    def _input_classes(self, per_module) -> dict[int, int]:
        """Weight blocks (by index) mapped to the first block that read the same inputs.

        Same inputs: in every call of the batch, the same tensor (storage, offset, shape,
        strides) or an equal one. Equality is tested among sibling layers only (one
        attention or MLP module), which is where it occurs: peft casts a bf16 input to
        float32 adapters once per adapter, so q/k/v then read equal copies.
        """
        classes: dict[int, int] = {}
        reps: dict[str, list[tuple[int, list[torch.Tensor]]]] = {}
        for i, b in enumerate(self.blocks):
            calls = per_module.get(b.module_name)
            if b.kind != "weight" or not calls:
                continue
            inputs = [(a, layout) for a, _, layout in calls]
            siblings = reps.setdefault(_parent_layer(b), [])
            for j, theirs in siblings:
                if _same_inputs(inputs, theirs):
                    classes[i] = j
                    break
            else:
                siblings.append((i, inputs))
                classes[i] = i
        return classes

    def _same_input_groups(self, classes: dict[int, int]) -> list[list[int]]:
        """Return the groups (two or more block indices) of weight blocks reading the same inputs."""
        groups: dict[int, list[int]] = {}
        for i, j in classes.items():
            groups.setdefault(j, []).append(i)
        return [g for g in groups.values() if len(g) > 1]

    def _check_shared(self, kron: LowRankKron, classes: dict[int, int]) -> None:
        """Refuse a batch in which blocks sharing an input factor read different inputs."""
        owner: dict[int, int] = {}
        for i, F in enumerate(kron.kfacs):
            if i not in classes:
                continue
            if owner.setdefault(id(F[1]), classes[i]) != classes[i]:
                raise ValueError(
                    f"Block '{self.blocks[i].name}' shares its input factor with another "
                    "block, but the two layers read different inputs in this batch. Fit "
                    "with share_input_factors=False."
                )

    def _a_columns(self, a, mask, N, dtype, mask_full=False) -> tuple[torch.Tensor, float]:
        """Input columns ``(n_cols, d_in)`` and a scale ``c``: ``A += c Σ colsᵀ cols``.

        Without padding (``mask_full``) every sequence has the same ``T``, so the
        ``1/(T N)`` weight is the scale and the columns are ``a`` itself (a view).
        """
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
        g, m = as_positions(g.to(dtype), mask)
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

    # --------------------------------------------------------------- predictive
    def glm_moments(
        self, x: Any, precision, joint: bool = False, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | list | None:
        """GLM mean and covariance of the logits without a parameter-long Jacobian.

        One forward and ``C`` backward passes give, per block, the activations ``a``
        and the output gradients ``g^{(c)}`` of every logit; the block Jacobian of
        logit ``c`` of example ``n`` is ``J = Σ_t g_t aᵀ`` (``d_out × d_in``, one LoRA
        side being ``r``), contracted at once with the block's ``P⁻¹``. The backward
        passes run :data:`PROBE_CHUNK` at a time, so the output gradients held at once
        do not grow with ``C``; the Jacobians kept are ``B × C`` times a block's weights.

        Parameters
        ----------
        x : batch (dict or tensor) of ``B`` inputs.
        precision : LowRankKronDecomposed or a sequence of them
            posterior precision ``P`` over the blocks. A sequence (e.g. one per prior
            precision of a grid) contracts the same Jacobians with each, so ``K``
            precisions cost one forward and ``C`` backward passes, not ``K`` of each.
        joint : bool
            ``(B·C, B·C)`` covariance across the batch instead of ``(B, C, C)``.
        top_k : int, optional
            the exact covariance of each example's ``k`` logits of highest MAP value (its
            ``k`` most probable classes) and of the rest's log-sum-exp, from ``k + 1``
            backward passes instead of ``C``; every other class moves with the rest (see
            :mod:`laplace_llm.curvature.top_k`). ``None`` or ``k ≥ C``: all classes.

        Returns
        -------
        (f_mu, f_var) : ``(B, C)`` and ``(B, C, C)`` (or ``(B·C, B·C)``), or ``None``
            when a hooked module without a call layout saw another batch size than
            the logits (the caller then falls back to explicit Jacobians). Calls with a
            layout add each row's Jacobian to its example's. For a sequence of
            precisions, a list of such pairs in the same order.
        """
        several = isinstance(precision, (list, tuple))
        precisions = list(precision) if several else [precision]
        if not precisions:
            raise ValueError("glm_moments needs at least one posterior precision.")
        dtype = precisions[0].deltas.dtype
        with torch.enable_grad(), self.recording() as rec:
            f = self.model(x)
            B, C = f.shape
            outputs = rec.outputs()
        if any(
            a.shape[0] != B and layout is None
            for calls in rec.calls.values()
            for a, _, layout in calls
        ):
            return None
        classes = top_classes(f, top_k)
        if classes is None:
            eye = torch.eye(C, device=f.device, dtype=f.dtype)
            probes = [eye[c].expand(B, C) for c in range(C)]
        else:  # probe j: each example's j-th most probable logit; the last: the rest's
            probes = [
                nn.functional.one_hot(classes[:, j], C).to(f.dtype) for j in range(classes.shape[1])
            ]
            probes.append(rest_weights(f, classes).to(f.dtype))
        K = len(probes)
        mask = sequence_mask(x)
        shape = (B * K, B * K) if joint else (B, K, K)
        f_vars = [torch.zeros(shape, device=f.device, dtype=dtype) for _ in precisions]
        per_block = list(zip(*(p._blocks() for p in precisions)))
        # per block, the Jacobians (B, S, *shape) of the chunks of probes so far; a
        # block's are contracted (and freed) in the last chunk, so that with one chunk
        # (C ≤ PROBE_CHUNK) one block's Jacobian exists at a time
        jacobians: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        for start, chunk in _chunks(probes):
            last = start + len(chunk) >= K
            with torch.enable_grad():
                grads = self.output_gradients(f, outputs, chunk, keep_graph=not last)
            per_module = _per_module_calls(rec, grads)
            del grads
            for i, b in enumerate(self.blocks):
                J = self._block_jacobian(b, per_module.get(b.module_name, []), mask, dtype, B)
                if J is not None:
                    jacobians[i].append(J)
                if last and jacobians[i]:  # else the module did not act: zero Jacobian
                    J = torch.cat(jacobians[i], 1).reshape(B * K, *b.shape)
                    jacobians[i] = []
                    _add_covariance(f_vars, J, per_block[i], B, K, joint, f.device)
            del per_module
        if classes is not None:
            f_vars = [expand_covariance(v, classes, C, joint) for v in f_vars]
        f = f.detach().to(dtype)
        if several:
            return [(f, f_var) for f_var in f_vars]
        return f, f_vars[0]

    def _block_jacobian(self, b: KronBlock, calls, mask, dtype, B: int) -> torch.Tensor | None:
        """Jacobian ``(B, S, *b.shape)`` of ``S`` probes' logits for one block, or ``None``.

        ``calls``: the module's ``(input, [gradient of each probe], layout)``; ``None``
        when the module did not act on the batch.
        """
        J = None
        for a, gs, layout in calls:
            if layout is None:
                a, m = as_positions(a.to(dtype), mask)
                g = torch.stack([as_positions(gc.to(dtype), mask)[0] for gc in gs], 1)
            else:
                a, g, m, example = _layout_positions(a, gs, layout, dtype)
                g = torch.stack(g, 1)
            g = g * m[:, None, :, None]  # (rows, S, T, d_out), padding dropped
            Jc = torch.einsum("bctd,bte->bcde", g, a) if b.kind == "weight" else g.sum(2)
            if layout is not None:  # rows to their examples (B·S rows → B)
                Jc = torch.zeros(B, *Jc.shape[1:], device=Jc.device, dtype=Jc.dtype).index_add_(
                    0, example, Jc
                )
            J = Jc if J is None else J + Jc
        return J

    # ----------------------------------------------------------- laplace-torch
    def full(self, x, y, **kwargs):
        """Refuse: only Kronecker factors are computed."""
        raise ValueError(
            "LoRAKFAC computes Kronecker factors only; use hessian_structure='kron' with "
            "subset_of_weights='lora'."
        )

    def diag(self, x, y, **kwargs):
        """Refuse: only Kronecker factors are computed."""
        raise ValueError(
            "LoRAKFAC computes Kronecker factors only; use hessian_structure='kron' with "
            "subset_of_weights='lora'."
        )


def _add_covariance(f_vars, J, precisions, B: int, K: int, joint: bool, device) -> None:
    """Add one block's ``J P⁻¹ Jᵀ`` to each covariance of ``f_vars``, in place.

    ``J``: ``(B·K, *block shape)``; ``precisions``: the block's part of each posterior
    precision, in the order of ``f_vars``.
    """
    J_flat = J.reshape(B * K, -1).to(device)
    for pb, f_var in zip(precisions, f_vars):
        PJ = pb.apply(J, -1).reshape(B * K, -1).to(device)
        if joint:
            f_var += J_flat @ PJ.T
        else:
            f_var += torch.einsum("bcp,bdp->bcd", J_flat.reshape(B, K, -1), PJ.reshape(B, K, -1))


def _per_module_calls(rec: ModuleRecorder, grads: list[list[torch.Tensor]] | None):
    """Group the recorded inputs, probe gradients and call layouts by module.

    Returns ``{module: [(input, [gradient of each probe], layout), ...]}``; ``grads``
    follow ``rec.outputs()``, i.e. module by module, call by call.
    """
    j = 0
    per_module: dict[str, list[tuple[torch.Tensor, list[torch.Tensor], Any]]] = {}
    for name, calls in rec.calls.items():
        for a, _, layout in calls:
            gs = [] if grads is None else [g[j] for g in grads]
            per_module.setdefault(name, []).append((a, gs, layout))
            j += 1
    return per_module


def _tensor_identity(t: torch.Tensor) -> tuple:
    """Return what makes two live tensors views of the same values."""
    return (t.device, t.dtype, t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    return _tensor_identity(x) == _tensor_identity(y) or (
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
    )


def _same_inputs(a: list, b: list) -> bool:
    """Whether two modules' ``(input, layout)`` calls are the same tensors or equal ones."""
    if len(a) != len(b):
        return False
    for (x, lx), (y, ly) in zip(a, b):
        if not _same_tensor(x, y):
            return False
        if (lx is None) != (ly is None):
            return False
        if lx is not None and lx is not ly and not (
            _same_tensor(lx.mask, ly.mask) and _same_tensor(lx.example, ly.example)
        ):
            return False
    return True


def _parent_layer(block: KronBlock) -> str:
    """Name of the module holding the block's layer (``…layers.3.self_attn`` for q_proj)."""
    layer = block.module_name
    if block.role in ("lora_A", "lora_B"):
        layer = layer.rsplit("." + block.role, 1)[0]
    return layer.rpartition(".")[0]


def _has_layouts(calls) -> bool:
    """Whether a module's calls carry layouts; all of them or none must."""
    flags = {layout is not None for _, _, layout in calls}
    if len(flags) > 1:
        raise ValueError(
            "Some calls of a LoRA module carried a call_layout and others did not: a model "
            "that sets `call_layout` must set it around every call of its LoRA modules."
        )
    return flags == {True}


def _layout_positions(a, gs, layout: CallLayout, dtype):
    """Return the positions of one call with a layout.

    That is ``a (R, T, d_in)``, ``[g (R, T, d_out)]``, mask ``(R, T)`` and example ``(R,)``.
    """
    a = a.to(dtype)
    a = a.unsqueeze(1) if a.ndim == 2 else a.reshape(a.shape[0], -1, a.shape[-1])
    if tuple(layout.mask.shape) != tuple(a.shape[:2]) or layout.example.shape != a.shape[:1]:
        raise ValueError(
            f"A call_layout of mask {tuple(layout.mask.shape)} and {layout.example.shape[0]} "
            f"rows does not fit a module call on {tuple(a.shape[:2])} positions; the model "
            "must describe exactly the calls it runs."
        )
    gs = [g.to(dtype).reshape(a.shape[0], a.shape[1], g.shape[-1]) for g in gs]
    m = layout.mask.to(device=a.device, dtype=dtype)
    return a, gs, m, layout.example.to(a.device)


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


class _GGNProbes(Sequence):
    """The C ggn probes, the columns of ``S = diag(√p) − p √pᵀ``, made when read.

    Column ``c`` is ``S[:, :, c]``, computed as ``diag(√p)[:, c] − p √p_c`` with the
    same floating-point operations as the dense ``S``, but ``S`` itself (``B × C × C``:
    32 MiB at ``B = 8``, ``C = 1,000``) is never formed: a chunk of probes takes
    ``B × C`` per probe. Items are ``(v (B, C), 1.0)``; slices give lists.
    """

    def __init__(self, p: torch.Tensor, dtype: torch.dtype):
        self.p, self.sp, self.dtype = p, p.sqrt(), dtype

    def __len__(self) -> int:
        return self.p.shape[-1]

    def _column(self, c: int) -> tuple[torch.Tensor, float]:
        sp_c = self.sp[:, c : c + 1]
        v = -(self.p * sp_c)
        v[:, c] += sp_c[:, 0]
        return v.to(self.dtype), 1.0

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._column(c) for c in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._column(index)


#: probes (backward passes) whose output gradients are held at once, in ``fit`` and in
#: the GLM predictive: a ggn fit or a GLM over C classes runs C backward passes, whose
#: gradients of every LoRA module's output (``B × T × d_out`` each) are turned into
#: factor columns or Jacobians chunk by chunk, so that their memory stays that of 16
#: probes at any C (at C ≤ 16 there is one chunk, as before)
PROBE_CHUNK = 16


def _chunks(items: list) -> Iterator[tuple[int, list]]:
    """``(start, items[start:start + PROBE_CHUNK])`` for each chunk of ``items``."""
    for start in range(0, len(items), PROBE_CHUNK):
        yield start, items[start : start + PROBE_CHUNK]


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
