"""Where the prior is centred: a prior mean from a state dict of the LoRA weights.

laplace-torch centres the prior at zero. A LoRA fine-tune starts from a random ``A``
(``B`` is zero), so ``‖θ*‖²`` carries the initialisation's norm, which did not come
from the data; a prior centred at the weights the fine-tune started from
(``prior_mean=prior_mean_from(la, initial_state)``) removes it from the evidence. The
prior study (``docs/results/smollm2.md``) measured this choice on three families of
fine-tunes: it lowered or tied the validation NLL of laplace-torch's evidence on every
one of 14 runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["prior_mean_from"]


def _plain(name: str, adapter: str | None) -> str:
    """Drop the peft adapter segment of ``name``.

    ``lora_A.default.weight`` becomes ``lora_A.weight``, as ``get_peft_model_state_dict``
    writes it.
    """
    return name.replace(f".{adapter}.", ".") if adapter else name


def prior_mean_from(la, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Return the weights of ``state`` as a prior mean of ``la``, in its parameter order.

    Parameters
    ----------
    la : LoRALaplace, LoRADiagLaplace or LoRAFullLaplace
        constructed (fitted or not); its blocks say which weights, in which order.
    state : mapping of str to Tensor
        one tensor per block of ``la``, named as ``model.named_parameters()`` names it, or
        as a suffix of that name with or without the adapter name (the keys of
        ``peft.get_peft_model_state_dict`` work). Typically the LoRA weights right after
        ``get_peft_model``, before training:
        ``{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}``.

    Returns
    -------
    Tensor
        ``(la.n_params,)``, in ``la``'s dtype: set it as ``la.prior_mean`` (or pass it as
        ``prior_mean=`` to ``Laplace``) before ``optimize_prior_precision``.

    Raises
    ------
    ValueError
        a block of ``la`` has no tensor in ``state``, more than one, or one of another
        shape.
    """
    dtype = la.mean.dtype  # a tensor once the blocks are selected, fitted or not
    keys = list(state)
    parts, missing = [], []
    for block in la.blocks:
        names = {block.name, _plain(block.name, block.adapter)}
        hits = sorted((k for k in keys if any(n == k or n.endswith("." + k) for n in names)),
                      key=len, reverse=True)
        if not hits:
            missing.append(block.name)
            continue
        if len(hits) > 1 and len(hits[0]) == len(hits[1]):
            raise ValueError(
                f"prior_mean_from: block {block.name!r} matches several entries of the state "
                f"({hits[0]!r}, {hits[1]!r}); pass the state with the model's full parameter "
                "names (model.named_parameters()).")
        value = torch.as_tensor(state[hits[0]])
        if tuple(value.shape) != tuple(block.shape):
            raise ValueError(
                f"prior_mean_from: state entry {hits[0]!r} has shape {tuple(value.shape)}, but "
                f"block {block.name!r} has {tuple(block.shape)}; the state must come from the "
                "same adapter configuration (rank, target modules) as the model.")
        parts.append(value.detach().reshape(-1).to(dtype=dtype, device="cpu"))
    if missing:
        shown = ", ".join(repr(n) for n in missing[:3])
        raise ValueError(
            f"prior_mean_from: {len(missing)} of {len(la.blocks)} blocks have no entry in the "
            f"state ({shown}{', …' if len(missing) > 3 else ''}). Record the LoRA weights "
            "before training: {n: p.detach().clone() for n, p in model.named_parameters() "
            "if p.requires_grad}.")
    vector = torch.cat(parts)
    if vector.numel() != la.n_params:
        raise ValueError(
            f"prior_mean_from: the state gives {vector.numel()} weights, but la has "
            f"{la.n_params} (a sharded posterior takes its own shard's prior mean).")
    return vector.to(la.mean.device)
