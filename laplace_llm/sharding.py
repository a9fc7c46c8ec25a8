"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): what a posterior needs.

Under FSDP2 every parameter is a ``DTensor`` whose ``shape`` is the global shape and
whose local tensor is this rank's shard (``Shard(0)``: a block of rows). A module's
forward all-gathers its parameters first, so the forward hooks of the LoRA modules see
full activations and output gradients, and K-FAC runs unchanged. What differs:

- the posterior mean is the *full* LoRA vector: :func:`full_vector` gathers it (every
  rank calls it; the LoRA weights are small);
- a vector is written back (NN predictive, ``sample_adapters``) as each rank's own
  slice of it (:func:`write_vector`), after a broadcast from rank 0 so that every rank
  writes the same draw: a sharded weight made of two ranks' different draws would be
  no draw at all;
- every rank must run the same forward and backward passes (each all-gathers):
  :func:`batches_to_run` says how many batches to run so that a rank with a shorter
  shard idles through the others' last ones;
- files are written by rank 0 alone (:func:`writes_here`), without a collective, so a
  failure on rank 0 cannot leave the others waiting.

FSDP1 (``FullyShardedDataParallel``: flat parameters) and DeepSpeed ZeRO-3 (partitioned
parameters with ``ds_id``) hide the LoRA weights' shapes and are refused by
:func:`refuse_unsupported_sharding` before any work.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector

from laplace_llm.distributed import collective_step
from laplace_llm.errors import LoRAModelError

__all__ = [
    "is_sharded",
    "sharded_model",
    "refuse_unsupported_sharding",
    "plain_module_type",
    "as_forward_of",
    "full_vector",
    "write_vector",
    "equals_vector",
    "batches_to_run",
    "writes_here",
    "save_adapter",
    "shard_model",
]


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def sharded_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2 ``fully_shard``)."""
    return any(is_sharded(p) for p in model.parameters())


def _fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def plain_module_type(module: nn.Module) -> type:
    """Return the class of ``module`` before ``fully_shard`` (which subclasses it as ``FSDP<cls>``)."""
    cls = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls
    if isinstance(module, FSDPModule):
        return cls.__mro__[cls.__mro__.index(FSDPModule) + 1]
    return cls


def refuse_unsupported_sharding(model: nn.Module) -> None:
    """Refuse FSDP1, DeepSpeed ZeRO-3 and bypassed FSDP2 modules; reshard FSDP2 modules.

    FSDP2 leaves the root's parameters unsharded after a forward pass (its module
    attributes are then plain tensors); resharding makes ``model.parameters()`` the
    sharded DTensors again, so the posterior keeps those.

    Raises
    ------
    LoRAModelError
        an FSDP1 module (``FullyShardedDataParallel``) or a ZeRO-3 parameter in ``model``;
        an outermost FSDP2 module that is neither ``model`` nor the module it routes its
        forward through (:func:`as_forward_of`; ``LLMClassifier.model``): its all-gather
        would never run.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        FullyShardedDataParallel = ()  # noqa: N806
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            raise LoRAModelError(
                f"Module '{name or type(model).__name__}' is wrapped by FSDP1 "
                "(torch.distributed.fsdp.FullyShardedDataParallel), whose flat parameters "
                "hide the LoRA weights' shapes. Shard with FSDP2 instead "
                "(torch.distributed.fsdp.fully_shard on each decoder layer and then on the "
                "model you pass to Laplace; with accelerate `fsdp_version: 2`, with the HF "
                "Trainer `fsdp_config={'version': 2}`), or fit an unsharded model (one "
                "process, or DDP with fit(distributed=True))."
            )
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            raise LoRAModelError(
                f"Parameter '{name}' is partitioned by DeepSpeed ZeRO-3, which hides the "
                "LoRA weights between forward passes; it is not supported. Use FSDP2 "
                "(torch.distributed.fsdp.fully_shard), DeepSpeed ZeRO stage 0-2, or an "
                "unsharded model (one process, or DDP with fit(distributed=True))."
            )
    inner = _fsdp2_modules(model)
    routed = getattr(model, "model", None) if getattr(model, "routes_fsdp_forward", False) else None
    for name, module in _outermost_fsdp2(model):
        if module is not model and module is not routed:
            raise LoRAModelError(
                f"Module '{name}' is sharded with fully_shard but its forward is not what "
                f"the model passed to Laplace ({type(model).__name__}) calls, so its "
                "all-gather would never run (the embeddings would meet sharded weights). "
                "Apply fully_shard to each decoder layer and then to the model you pass to "
                "Laplace, e.g. `fully_shard(LLMClassifier(peft_model, ...))`, or to the "
                "PeftModel that an LLMClassifier wraps."
            )
    for module in inner:
        module.reshard()


def _outermost_fsdp2(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the FSDP2 modules of ``model`` without an FSDP2 ancestor, with their names."""
    ids = {id(m) for m in _fsdp2_modules(model)}
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if id(module) in ids and not any(
            not outer or name.startswith(outer + ".") for outer, _ in found
        ):
            found.append((name, module))
    return found


#: the name of the method :func:`as_forward_of` registers on an FSDP2 module
_ROUTED = "_laplace_llm_routed_forward"


def as_forward_of(module: nn.Module, fn, *args):
    """Return ``fn(*args)``, run as a forward of ``module`` if it is an FSDP2 module.

    A wrapper that calls parts of a sharded model (``LLMClassifier`` calls the backbone
    and the head, not the ``PeftModel``) routes its computation through this, so that
    FSDP2's pre-forward (all-gather, the root's lazy initialisation) and post-forward
    (reshard, backward hooks) run around it, as around ``module(...)``. Uses the public
    ``register_fsdp_forward_method``, once per module.
    """
    try:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    except ImportError:
        return fn(*args)
    if not isinstance(module, FSDPModule):
        return fn(*args)
    if _ROUTED not in module.__dict__:
        module.__dict__[_ROUTED] = types.MethodType(lambda self, f, *a: f(*a), module)
        register_fsdp_forward_method(module, _ROUTED)
    return getattr(module, _ROUTED)(fn, *args)


def full_vector(params: Iterable[torch.Tensor],
                step: str = "gathering the sharded LoRA weights") -> torch.Tensor:
    """Return the parameters as one flat plain tensor, sharded ones gathered (a collective).

    Parameters
    ----------
    params : iterable of Tensor or DTensor
        in order; every rank passes the same list.
    step : str, default "gathering the sharded LoRA weights"
        what the gather is, as a :class:`~laplace_llm.errors.CollectiveTimeoutError`
        names it (:func:`~laplace_llm.distributed.collective_step`).

    Returns
    -------
    torch.Tensor
        ``(P,)``, ``P`` the global number of weights: ``parameters_to_vector(params)``
        (in the autograd graph) when none is sharded, else gathered and detached.
    """
    params = list(params)
    if not any(is_sharded(p) for p in params):
        return parameters_to_vector(params)
    parts = []
    with collective_step(step):
        for p in params:
            t = p.detach()
            if is_sharded(t):
                t = t.full_tensor()
            parts.append(t.reshape(-1))
    return torch.cat(parts)


def _local_part(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Return the slice of the full value ``full`` (``p.shape``) that ``p``'s local shard holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def _reshard(model: nn.Module | None) -> None:
    # unsharded parameters (the FSDP2 root's, after a forward) would hide a write into
    # the shards until the next all-gather, which an unsharded root skips
    if model is not None:
        for module in _fsdp2_modules(model):
            module.reshard()


@torch.no_grad()
def write_vector(params: list[torch.Tensor], vector: torch.Tensor, model: nn.Module | None = None) -> None:
    """Copy the flat ``vector`` ``(P,)`` into ``params``; each sharded one takes its own slice.

    With sharded parameters this is a collective: ``vector`` is broadcast from rank 0
    first, so every rank holds the same weights (ranks may have drawn different
    samples); ``model``'s FSDP2 modules are resharded so that the next forward
    all-gathers the new values.
    """
    sharded = any(is_sharded(p) for p in params)
    if sharded:
        _reshard(model)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            vector = vector.detach().clone().contiguous()
            with collective_step("broadcasting rank 0's weights to write into the shards"):
                dist.broadcast(vector, src=0)
    start = 0
    for p in params:
        n = p.numel()
        value = vector[start : start + n].view(p.shape)
        if is_sharded(p):
            p.to_local().copy_(_local_part(value, p))
        else:
            p.data.copy_(value)
        start += n


@torch.no_grad()
def equals_vector(params: list[torch.Tensor], vector: torch.Tensor) -> bool:
    """Whether ``params`` hold ``vector`` bit for bit; sharded ones compare their own slice.

    No collective: each rank answers for its shards.
    """
    vector = vector.detach()
    if sum(p.numel() for p in params) != vector.numel():
        return False
    start = 0
    for p in params:
        n = p.numel()
        value = vector[start : start + n].view(p.shape)
        mine = p.to_local() if is_sharded(p) else p
        part = _local_part(value, p) if is_sharded(p) else value
        if not torch.equal(mine.detach().to(part.dtype), part.to(mine.device)):
            return False
        start += n
    return True


def batches_to_run(model: nn.Module, loader, skip: int = 0) -> int | None:
    """Return the most batches any rank's ``loader`` yields, for a sharded ``model``.

    A collective. ``None`` for an unsharded model (each rank runs its own batches) or without a
    process group. A sharded model's forward and backward passes all-gather, so every
    rank must run as many as the rank with the most batches. ``skip``: the batches this
    rank does not run (a resumed fit's), so the count is ``len(loader) - skip``.
    """
    if not (dist.is_available() and dist.is_initialized()) or not sharded_model(model):
        return None
    try:
        n = len(loader)
    except TypeError:
        raise ValueError(
            "Fitting an FSDP-sharded model needs a train loader with a length (every rank "
            "must run as many forward passes as the others): use a map-style dataset."
        ) from None
    p = next(p for p in model.parameters() if is_sharded(p))
    count = torch.tensor([n - skip], device=p.device)
    with collective_step("counting every rank's batches (a sharded model's passes are "
                         "collective: every rank runs as many as the busiest)"):
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def writes_here(model: nn.Module) -> bool:
    """Whether this process writes files for ``model``: always, except on ranks ≠ 0 of a sharded model."""
    if not sharded_model(model):
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save_adapter(peft_model: nn.Module, path: str | Path) -> None:
    """``peft_model.save_pretrained(path)``; a sharded model's LoRA weights gathered first.

    Sharded: every rank gathers the adapter's tensors (collectives, in state-dict order),
    rank 0 writes.
    """
    if not sharded_model(peft_model):
        peft_model.save_pretrained(path)
        return
    state = {}
    for name, t in peft_model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            state[name] = t.full_tensor() if is_sharded(t) else t
    if writes_here(peft_model):
        peft_model.save_pretrained(path, state_dict=state)


def shard_model(model: nn.Module, layer_classes: Iterable[str] | None = None) -> nn.Module:
    """Shard ``model`` with FSDP2 over the initialised process group, in place.

    ``fully_shard`` on every module whose class name is in ``layer_classes`` (default:
    the ``_no_split_modules`` of the transformers models inside, e.g. ``LlamaDecoderLayer``),
    then on ``model`` as the root, the module Laplace calls.

    Raises
    ------
    ValueError
        no module of those classes.
    """
    from torch.distributed.fsdp import fully_shard

    names = {n.strip() for n in (layer_classes or ()) if n and n.strip()}
    if not names:
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"No decoder layer to shard: no module of the classes {sorted(names)} in "
            f"{type(model).__name__}; name the layer class (e.g. LlamaDecoderLayer)."
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model
