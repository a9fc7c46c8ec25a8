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

Modules. This module holds :class:`LoRAKFAC` (options, factors, laplace-torch's
interface); its parts are bases beside it: :mod:`~laplace_llm.curvature.kfac_hooks`
(hooks and call layouts), :mod:`~laplace_llm.curvature.kfac_probes` (output-gradient
probes), :mod:`~laplace_llm.curvature.kfac_shared` (shared input factors),
:mod:`~laplace_llm.curvature.kfac_accumulation` (columns into factors) and
:mod:`~laplace_llm.curvature.kfac_glm` (the Jacobian-free GLM).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from laplace.curvature import CurvatureInterface
from torch import nn

from laplace_llm.curvature.kfac_accumulation import KFACAccumulation
from laplace_llm.curvature.kfac_glm import KFACGLM
from laplace_llm.curvature.kfac_hooks import ModuleRecorder
from laplace_llm.curvature.kfac_probes import KFACProbes
from laplace_llm.curvature.kfac_shared import KFACSharedInputs
from laplace_llm.errors import NonFiniteError
from laplace_llm.matrix import LowRankKron, factor_dtype
from laplace_llm.models.call_layout import CallLayout
from laplace_llm.models.discovery import KronBlock, find_blocks
from laplace_llm.options import KFACOptions, expose_options

__all__ = ["LoRAKFAC", "CallLayout", "ModuleRecorder", "NonFiniteError"]


@expose_options
class LoRAKFAC(KFACProbes, KFACSharedInputs, KFACAccumulation, KFACGLM, CurvatureInterface):
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
    #: whether the model is FSDP2-sharded, set by the fit for its batches (checking every
    #: parameter costs about 0.25 ms a batch on a 2-layer model); ``None``: check anew
    sharded: bool | None = None

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
        #: whether sketched factors adapt their test matrix to the first data
        #: (``options.sketch_adapt``); a distributed fit turns it off, because sketches
        #: summed across processes must share ``Ω``
        self.adapt_sketches = True

    @property
    def readapt_sketches(self) -> bool:
        """Whether the fit adapts the sketches' ``Ω`` again halfway (``options.sketch_readapt``).

        Only where they adapted it first (:attr:`adapt_sketches`, off in a distributed fit).
        """
        return bool(self.adapt_sketches and self.options.sketch_readapt
                    and self.options.sketch_adapt_columns)

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
            sketch_adapt=self.options.sketch_adapt_columns if self.adapt_sketches else 0,
        )

    # ------------------------------------------------------------------- probes
    # ------------------------------------------------------------------ capture
    @contextlib.contextmanager
    def recording(self) -> Iterator[ModuleRecorder]:
        """Record the blocks' modules' inputs, outputs and call layouts while in this context."""
        model = self.model
        with ModuleRecorder(self.modules, lambda: getattr(model, "call_layout", None)) as rec:
            yield rec

    # --------------------------------------------------------------- predictive
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


