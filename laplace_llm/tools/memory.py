"""Posterior bytes of Laplace-LoRA methods from a model's shapes, without building it.

The formulas are those of the code that holds each posterior, so they can be checked
against it at the sizes that run on a laptop and then read off at LLaMA-2-70B shapes:

- ``"lora"``: :class:`laplace_llm.LoRALaplace`, what
  :meth:`~laplace_llm.LoRALaplace.posterior_nbytes` counts. Per LoRA weight block
  ``G ⊗ A`` each factor of side ``s`` is dense (``s²``, plus its eigenpairs ``s² + s``)
  when ``s ≤ lr_threshold``, else a root ``s × k`` plus eigenpairs ``s × k + k`` with
  ``k = min(n_kfac, s)`` (the data are assumed to span ``k`` directions). With
  ``share_input_factors`` the input factor of layers reading one input (``q``/``k``/``v``;
  ``gate``/``up``) counts once.
- ``"kron"``: laplace-torch's ``Laplace(..., "all", "kron")`` on the LoRA parameters:
  every factor dense (``s²``) plus its eigendecomposition (``s² + s``).
- ``"full"``: laplace-torch's ``"full"`` structure: the ``P × P`` curvature ``H`` and
  the posterior scale it caches for predictions (two ``P × P`` matrices).
- ``"diag"``: laplace-torch's ``"diag"``: the ``P`` diagonal.
- ``"bayesian-lora"``: the factors of ``bayesian_lora.calculate_kronecker_factors``
  after ``cholesky_decompose_small_factors``: a side ``≥ lr_threshold`` is a root
  ``s × n_kfac``, a smaller one an ``s × s`` Cholesky factor; no eigenpairs are kept
  (its ``variance`` inverts an ``(r·n_kfac)²`` matrix per block and call).

- :func:`fsdp_rank_bytes`: per-rank memory of a model sharded with FSDP2 over ``world``
  ranks, for a LoRA training step, a ``LoRALaplace`` fit and a GLM predictive; a model
  of the tensors each phase holds (its assumptions are listed there), not a measurement.

Shapes come from a Llama-style transformers config (``hidden_size``,
``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``num_hidden_layers``): Llama, Mistral, Qwen2 and their kin.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LoRALinear",
    "METHODS",
    "PHASES",
    "base_parameter_count",
    "fsdp_rank_bytes",
    "llama_lora_linears",
    "output_gradient_bytes",
    "posterior_bytes",
]

METHODS = ("lora", "kron", "full", "diag", "bayesian-lora")

#: The linear layers of a Llama decoder layer and the input each reads.
_LLAMA_INPUTS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_act",
}


@dataclass(frozen=True)
class LoRALinear:
    """One linear layer carrying a LoRA adapter.

    Attributes
    ----------
    name : str
        e.g. ``"layers.3.q_proj"``.
    d_in, d_out : int
        the base layer's input and output features.
    reads : str
        what the layer reads; layers with equal ``reads`` see the same input tensor.
    """

    name: str
    d_in: int
    d_out: int
    reads: str


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def llama_lora_linears(config: Any, target_modules: Iterable[str]) -> list[LoRALinear]:
    """Return the LoRA-carrying linear layers of a Llama-shaped model.

    Parameters
    ----------
    config : transformers config or dict
        ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
        ``num_hidden_layers``, optionally ``num_key_value_heads`` and ``head_dim``.
    target_modules : iterable of str
        names among ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``,
        ``up_proj``, ``down_proj``.

    Returns
    -------
    list of LoRALinear
        layer by layer, in ``target_modules`` order within a layer.
    """
    targets = list(target_modules)
    unknown = sorted(set(targets) - set(_LLAMA_INPUTS))
    if unknown:
        raise ValueError(f"Unknown Llama modules {unknown}; known: {list(_LLAMA_INPUTS)}.")
    h = int(_get(config, "hidden_size"))
    inter = int(_get(config, "intermediate_size"))
    heads = int(_get(config, "num_attention_heads"))
    kv = int(_get(config, "num_key_value_heads") or heads)
    hd = int(_get(config, "head_dim") or h // heads)
    sides = {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    out = []
    for layer in range(int(_get(config, "num_hidden_layers"))):
        for t in (m for m in _LLAMA_INPUTS if m in targets):
            d_in, d_out = sides[t]
            out.append(LoRALinear(f"layers.{layer}.{t}", d_in, d_out, f"{layer}.{_LLAMA_INPUTS[t]}"))
    return out


def _lora_factor(side: int, n_kfac: int, lr_threshold: int) -> int:
    """Elements of one factor of ``LoRALaplace`` and its eigenpairs."""
    if side <= lr_threshold:
        return side * side + side * side + side
    k = min(n_kfac, side)
    return side * k + side * k + k


def posterior_bytes(
    config: Any,
    target_modules: Sequence[str],
    r: int,
    method: str = "lora",
    n_kfac: int = 16,
    lr_threshold: int = 128,
    share_input_factors: bool = True,
    element_bytes: int = 4,
    layers: Sequence[LoRALinear] | None = None,
) -> int:
    """Bytes of the posterior of ``method`` over LoRA rank ``r`` adapters.

    Parameters
    ----------
    config : transformers config or dict
        Llama-style shapes (see :func:`llama_lora_linears`); ignored when ``layers``
        is given.
    target_modules : sequence of str
        the LoRA-carrying modules, e.g. ``["q_proj", "v_proj"]``.
    r : int
        LoRA rank.
    method : {"lora", "kron", "full", "diag", "bayesian-lora"}
        see the module docstring.
    n_kfac, lr_threshold : int
        rank kept and dense threshold (``"lora"``: dense when ``side ≤ lr_threshold``;
        ``"bayesian-lora"``: low rank when ``side ≥ lr_threshold``, its convention).
    share_input_factors : bool, default True
        ``"lora"`` only: one input factor per group of layers reading the same input.
    element_bytes : int, default 4
        bytes per stored number: 4 for the float32 factors of a float32/bf16/fp16 model
        (``LoRALaplace`` always keeps float32 or float64; laplace-torch keeps the
        model's dtype).
    layers : sequence of LoRALinear, optional
        the layers, instead of deriving them from ``config``.

    Returns
    -------
    int
        bytes.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    layers = list(layers) if layers is not None else llama_lora_linears(config, target_modules)
    P = sum(r * (m.d_in + m.d_out) for m in layers)
    if method == "full":
        return 2 * P * P * element_bytes
    if method == "diag":
        return P * element_bytes
    n = 0
    seen_inputs: set[str] = set()
    for m in layers:
        # lora_A: (r × d_in), factors [G (r), A (d_in)]; lora_B: (d_out × r), [G (d_out), A (r)]
        if method == "lora":
            n += _lora_factor(r, n_kfac, lr_threshold) * 2
            if not (share_input_factors and m.reads in seen_inputs):
                n += _lora_factor(m.d_in, n_kfac, lr_threshold)
            seen_inputs.add(m.reads)
            n += _lora_factor(m.d_out, n_kfac, lr_threshold)
        elif method == "kron":
            n += sum(2 * s * s + s for s in (r, m.d_in, m.d_out, r))
        else:  # bayesian-lora
            n += sum(s * n_kfac if s >= lr_threshold else s * s for s in (r, m.d_in, m.d_out, r))
    return n * element_bytes


def output_gradient_bytes(
    config: Any,
    target_modules: Sequence[str],
    r: int,
    tokens: int,
    n_probes: int = 1,
    element_bytes: int = 4,
    layers: Sequence[LoRALinear] | None = None,
) -> int:
    """Bytes of the output gradients that one batch of ``LoRAKFAC`` holds at once.

    ``fit`` and the Jacobian-free GLM take the gradient of each probe with respect to
    every hooked module's output, up to
    :data:`~laplace_llm.curvature.kfac_probes.PROBE_CHUNK` (16) probes before turning them
    into factor columns or Jacobians, so for a batch of ``tokens`` positions (``B·T``)
    they hold, besides what a plain backward holds, ``min(n_probes, 16) · tokens ·
    Σ (r + d_out)`` numbers (the ``lora_A`` output of side ``r`` and the ``lora_B``
    output of side ``d_out`` of every LoRA layer). ``n_probes`` is ``mc_samples`` for
    the mc Fisher, ``C`` for the ggn and for the GLM predictive (``top_k + 1`` with
    ``top_k``).

    Parameters
    ----------
    config, target_modules, r, layers
        as :func:`posterior_bytes`.
    tokens : int
        positions of one batch, ``B·T``.
    n_probes : int, default 1
    element_bytes : int, default 4
        the adapters' dtype (peft keeps adapters in float32 on a bf16 model).

    Returns
    -------
    int
        bytes.
    """
    from laplace_llm.curvature.kfac_probes import PROBE_CHUNK

    layers = list(layers) if layers is not None else llama_lora_linears(config, target_modules)
    return min(n_probes, PROBE_CHUNK) * tokens * sum(r + m.d_out for m in layers) * element_bytes


#: The phases :func:`fsdp_rank_bytes` models.
PHASES = ("train", "fit", "predict")


def base_parameter_count(config: Any) -> tuple[int, int]:
    """Return the parameters of a Llama-shaped causal LM: ``(per decoder layer, outside them)``.

    Outside the layers: the embeddings, the final norm and, unless
    ``tie_word_embeddings``, the head (``vocab_size``, default 32 000).
    """
    h = int(_get(config, "hidden_size"))
    inter = int(_get(config, "intermediate_size"))
    heads = int(_get(config, "num_attention_heads"))
    kv = int(_get(config, "num_key_value_heads") or heads)
    hd = int(_get(config, "head_dim") or h // heads)
    vocab = int(_get(config, "vocab_size") or 32000)
    layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter + 2 * h
    outside = vocab * h * (1 if _get(config, "tie_word_embeddings", False) else 2) + h
    return layer, outside


def fsdp_rank_bytes(
    config: Any,
    target_modules: Sequence[str],
    r: int,
    world: int,
    tokens: int,
    phase: str = "fit",
    n_probes: int = 1,
    n_kfac: int = 16,
    lr_threshold: int = 128,
    checkpointing: bool = True,
    param_bytes: int = 2,
    adapter_bytes: int = 4,
) -> dict[str, int]:
    """Per-rank bytes of a Llama-shaped LoRA model sharded with FSDP2 over ``world`` ranks.

    A model of the tensors each phase holds at its peak, under these assumptions:

    - ``fully_shard`` on every decoder layer and on the root; base weights in
      ``param_bytes`` (bf16: 2), adapters in ``adapter_bytes`` (peft keeps float32);
      each rank holds ``1/world`` of both (``"shards"``);
    - all-gathered at once: two decoder layers (the running one and the prefetched one)
      and the root's parameters (embeddings, head), which FSDP2 keeps unsharded from
      the forward to the end of the backward (``"gathered"``);
    - activations of a bf16 decoder layer with a fused attention kernel (no ``T²``
      scores): ``34 · tokens · h`` bytes (Korthikanti et al., 2022, without the
      attention-score term). ``"train"`` with ``checkpointing`` keeps each layer's input
      (``2 · tokens · h``) and recomputes one layer; ``"fit"`` and ``"predict"`` run in
      eval mode, where transformers' gradient checkpointing is off, so the graph keeps
      every layer's activations (``"activations"``);
    - ``"train"``: the LoRA gradients and two Adam moments, sharded, and float32 logits
      over the vocabulary for every token (``"optimizer"``, ``"logits"``);
    - ``"fit"`` and ``"predict"``: the posterior (:func:`posterior_bytes`, ``"lora"``),
      replicated on every rank, the gathered posterior mean (``P`` floats) and the
      output gradients of ``n_probes`` probes (:func:`output_gradient_bytes`:
      ``mc_samples`` for an mc fit, ``C`` for the GLM predictive) (``"laplace"``);
      logits only at the last position (:class:`~laplace_llm.LLMClassifier`).

    Not counted: the CUDA context and allocator fragmentation, communication buffers
    beyond the gathered layers, the data.

    Parameters
    ----------
    config, target_modules, r
        as :func:`posterior_bytes` (``config`` also gives ``vocab_size``).
    world : int
        ranks the model is sharded over.
    tokens : int
        positions of one rank's batch, ``B·T``.
    phase : {"train", "fit", "predict"}
    n_probes, n_kfac, lr_threshold
        the probes of a fit or GLM batch and the posterior's options.
    checkpointing : bool, default True
        activation checkpointing in the training step.

    Returns
    -------
    dict
        bytes per component (``"shards"``, ``"gathered"``, ``"activations"``,
        ``"optimizer"``, ``"logits"``, ``"laplace"``) and their ``"total"``.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}; got {phase!r}.")
    h = int(_get(config, "hidden_size"))
    n_layers = int(_get(config, "num_hidden_layers"))
    vocab = int(_get(config, "vocab_size") or 32000)
    layers = llama_lora_linears(config, target_modules)
    P = sum(r * (m.d_in + m.d_out) for m in layers)
    per_layer, outside = base_parameter_count(config)
    n_base = n_layers * per_layer + outside
    out = {
        "shards": n_base * param_bytes // world + P * adapter_bytes // world,
        "gathered": (2 * per_layer + outside) * param_bytes,
        "activations": 0,
        "optimizer": 0,
        "logits": 0,
        "laplace": 0,
    }
    layer_activations = 34 * tokens * h
    if phase == "train":
        out["activations"] = (
            n_layers * 2 * tokens * h + layer_activations if checkpointing
            else n_layers * layer_activations
        )
        out["optimizer"] = 3 * P * adapter_bytes // world
        out["logits"] = tokens * vocab * 4
    else:
        out["activations"] = n_layers * layer_activations
        out["laplace"] = (
            posterior_bytes(config, target_modules, r, n_kfac=n_kfac, lr_threshold=lr_threshold)
            + P * adapter_bytes
            + output_gradient_bytes(config, target_modules, r, tokens, n_probes, adapter_bytes)
        )
    out["total"] = sum(out.values())
    return out
