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

Gradients are taken with respect to the hooked modules' outputs only, so no
parameter ``.grad`` is touched and no weight gradient is computed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from laplace.curvature import CurvatureInterface
from torch import nn

from laplace_llm.discovery import KronBlock, find_blocks
from laplace_llm.errors import NonFiniteError
from laplace_llm.matrix import LowRankFactor, LowRankKron, factor_dtype
from laplace_llm.options import KFACOptions, expose_options

__all__ = ["LoRAKFAC", "ModuleRecorder", "NonFiniteError"]


class ModuleRecorder:
    """Forward hooks that keep each watched module's inputs and outputs.

    ``calls[module_name]`` is a list of ``(input, output)`` per call, inputs
    detached, outputs attached to the graph so that gradients can be taken
    with respect to them.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles = []

    def __enter__(self) -> ModuleRecorder:
        """Register the forward hooks."""
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.calls.setdefault(name, []).append((inputs[0].detach(), output))

        return hook

    def __exit__(self, *exc) -> None:
        """Remove the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def outputs(self) -> list[torch.Tensor]:
        """Return every recorded output, module by module, call by call."""
        return [out for calls in self.calls.values() for _, out in calls]


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
    likelihood : {"classification"}
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
        if likelihood != "classification":
            raise ValueError(
                "LoRA K-FAC fits the classification (and reward-modelling) likelihood of "
                f"selected logits; got likelihood={likelihood!r}."
            )
        self.options = options if options is not None else KFACOptions(**kfac_options)
        self.generator = generator
        self.blocks = blocks if blocks is not None else find_blocks(model)
        self.modules = {b.module_name: b.module for b in self.blocks}

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
        )

    # ------------------------------------------------------------------- probes
    def probes(self, f: torch.Tensor, y: torch.Tensor | None) -> list[tuple[torch.Tensor, float]]:
        """Output cotangents ``v (B, C)`` and weights whose ``Σ w JᵀvvᵀJ`` is the Fisher."""
        p = torch.softmax(f.detach().to(self.factor_dtype()), dim=-1)
        if self.fisher_type == "ggn":
            sp = p.sqrt()
            S = torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)
            return [(S[:, :, c].to(f.dtype), 1.0) for c in range(f.shape[-1])]
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

    def output_gradients(
        self, f: torch.Tensor, outputs: list[torch.Tensor], probes: list[torch.Tensor]
    ) -> list[list[torch.Tensor]]:
        """``grads[i][j]``: gradient of ``⟨f, probes[i]⟩`` w.r.t. ``outputs[j]``."""
        grads = []
        for i, v in enumerate(probes):
            g = torch.autograd.grad(
                f, outputs, grad_outputs=v, retain_graph=i < len(probes) - 1, allow_unused=True
            )
            grads.append([torch.zeros_like(o) if gi is None else gi for gi, o in zip(g, outputs)])
        return grads

    # ------------------------------------------------------------------ capture
    @contextlib.contextmanager
    def recording(self) -> Iterator[ModuleRecorder]:
        """Record the inputs and outputs of the blocks' modules while in this context."""
        with ModuleRecorder(self.modules) as rec:
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
        with torch.enable_grad(), self.recording() as rec:
            f = self.model(x)
            if f.ndim != 2:
                raise ValueError(f"The model must return logits (batch, C); got {tuple(f.shape)}.")
            loss = self.lossfunc(f.to(self.factor_dtype()), y)
            probes = self.probes(f, y)
            outputs = rec.outputs()
            grads = self.output_gradients(f, outputs, [v for v, _ in probes])
        weights = [w for _, w in probes]
        mask = sequence_mask(x)
        kron = self.empty_kron() if into is None else into
        bad = ~torch.isfinite(f.detach()).all()
        per_module = _per_module_calls(rec, grads)
        dtype = self.factor_dtype()
        classes = self._input_classes(per_module)
        if self.share_input_factors:
            kron.share_(self._same_input_groups(classes))
        self._check_shared(kron, classes)
        a_done: set[int] = set()  # input factors already given this batch (shared ones)
        for b, F in zip(self.blocks, kron.kfacs):
            add_a = b.kind == "weight" and id(F[1]) not in a_done
            if add_a and per_module.get(b.module_name):
                a_done.add(id(F[1]))
            for a, gs in per_module.get(b.module_name, []):
                g_cols = torch.cat(
                    [self._g_columns(g, mask, dtype) * math.sqrt(w) for g, w in zip(gs, weights)],
                    dim=0,
                )
                bad |= ~torch.isfinite(g_cols).all()
                _accumulate(F[0], g_cols)
                if add_a:
                    a_cols = self._a_columns(a, mask, N, dtype)
                    bad |= ~torch.isfinite(a_cols).all()
                    _accumulate(F[1], a_cols)
        if bool(bad):
            raise NonFiniteError(
                "NaN or Inf in the logits or in the LoRA layers' activations/gradients of this "
                "batch. Check the inputs and the model's dtype (fp16 overflows easily; use "
                "bf16 or float32) and that the fine-tuned weights are finite."
            )
        return self.factor * loss.detach(), kron

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
            inputs = [a for a, _ in calls]
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

    def _a_columns(self, a, mask, N, dtype) -> torch.Tensor:
        """Input columns ``(n_cols, d_in)`` whose outer products sum to ``A``."""
        a, m = as_positions(a.to(dtype), mask)
        T = m.sum(1).clamp(min=1)
        if self.kfac_approx == "reduce":
            return (a * m.unsqueeze(-1)).sum(1) / (T * math.sqrt(N)).unsqueeze(-1)
        w = (m / (T * N).sqrt().unsqueeze(-1)).unsqueeze(-1)
        return (a * w)[m.bool()]

    def _g_columns(self, g, mask, dtype) -> torch.Tensor:
        """Output-gradient columns ``(n_cols, d_out)`` of one probe."""
        g, m = as_positions(g.to(dtype), mask)
        if self.kfac_approx == "reduce":
            return (g * m.unsqueeze(-1)).sum(1)
        return g[m.bool()]

    # --------------------------------------------------------------- predictive
    def glm_moments(
        self, x: Any, precision, joint: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """GLM mean and covariance of the logits without a parameter-long Jacobian.

        One forward and ``C`` backward passes give, per block, the activations ``a``
        and the output gradients ``g^{(c)}`` of every logit; the block Jacobian of
        logit ``c`` of example ``n`` is ``J = Σ_t g_t aᵀ`` (``d_out × d_in``, one LoRA
        side being ``r``), contracted at once with the block's ``P⁻¹``.

        Parameters
        ----------
        x : batch (dict or tensor) of ``B`` inputs.
        precision : LowRankKronDecomposed
            posterior precision ``P`` over the blocks.
        joint : bool
            ``(B·C, B·C)`` covariance across the batch instead of ``(B, C, C)``.

        Returns
        -------
        (f_mu, f_var) : ``(B, C)`` and ``(B, C, C)`` (or ``(B·C, B·C)``), or ``None``
            when a hooked module saw another batch size than the logits (the caller
            then falls back to explicit Jacobians).
        """
        dtype = precision.deltas.dtype
        with torch.enable_grad(), self.recording() as rec:
            f = self.model(x)
            B, C = f.shape
            eye = torch.eye(C, device=f.device, dtype=f.dtype)
            outputs = rec.outputs()
            grads = self.output_gradients(f, outputs, [eye[c].expand(B, C) for c in range(C)])
        if any(a.shape[0] != B for calls in rec.calls.values() for a, _ in calls):
            return None
        mask = sequence_mask(x)
        per_module = _per_module_calls(rec, grads)
        if joint:
            f_var = torch.zeros(B * C, B * C, device=f.device, dtype=dtype)
        else:
            f_var = torch.zeros(B, C, C, device=f.device, dtype=dtype)
        for b, pb in zip(self.blocks, precision._blocks()):
            J = None
            for a, gs in per_module.get(b.module_name, []):
                a, m = as_positions(a.to(dtype), mask)
                g = torch.stack([as_positions(gc.to(dtype), mask)[0] for gc in gs], 1)
                g = g * m[:, None, :, None]  # (B, C, T, d_out), padding dropped
                Jc = torch.einsum("bctd,bte->bcde", g, a) if b.kind == "weight" else g.sum(2)
                J = Jc if J is None else J + Jc
            if J is None:  # the module did not act on this batch: zero Jacobian
                continue
            J = J.reshape(B * C, *b.shape)
            PJ = pb.apply(J, -1).reshape(B * C, -1).to(f_var.device)
            J = J.reshape(B * C, -1).to(f_var.device)
            if joint:
                f_var += J @ PJ.T
            else:
                f_var += torch.einsum("bcp,bdp->bcd", J.reshape(B, C, -1), PJ.reshape(B, C, -1))
        return f.detach().to(dtype), f_var

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


def _per_module_calls(rec: ModuleRecorder, grads: list[list[torch.Tensor]]):
    """Group the recorded inputs and probe gradients by module.

    Returns ``{module: [(input, [gradient of each probe]), ...]}``; ``grads`` follow
    ``rec.outputs()``, i.e. module by module, call by call.
    """
    j = 0
    per_module: dict[str, list[tuple[torch.Tensor, list[torch.Tensor]]]] = {}
    for name, calls in rec.calls.items():
        for a, _ in calls:
            per_module.setdefault(name, []).append((a, [g[j] for g in grads]))
            j += 1
    return per_module


def _tensor_identity(t: torch.Tensor) -> tuple:
    """Return what makes two live tensors views of the same values."""
    return (t.device, t.dtype, t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _same_inputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether two modules' inputs, call by call, are the same tensors or equal ones."""
    if len(a) != len(b):
        return False
    return all(
        _tensor_identity(x) == _tensor_identity(y)
        or (x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
            and torch.equal(x, y))
        for x, y in zip(a, b)
    )


def _parent_layer(block: KronBlock) -> str:
    """Name of the module holding the block's layer (``…layers.3.self_attn`` for q_proj)."""
    layer = block.module_name
    if block.role in ("lora_A", "lora_B"):
        layer = layer.rsplit("." + block.role, 1)[0]
    return layer.rpartition(".")[0]


def _accumulate(F, cols: torch.Tensor) -> None:
    """Add ``colsᵀ cols`` (``cols``: ``(n, d)``) to a dense or low-rank factor in place."""
    if cols.shape[0] == 0:
        return
    if isinstance(F, LowRankFactor):
        F.append_(cols.T)
    else:
        F.addmm_(cols.T, cols)
