"""Posterior files: safetensors tensors plus a JSON header, loadable without code.

File format ``laplace-llm-posterior`` version 1 (a safetensors file):

- tensors ``mean``, ``prior_precision``, ``prior_mean`` and, for block ``i`` factor
  ``j``, ``H.i.j.dense`` (``d × d``) or ``H.i.j.root`` (``d × m``, ``F = R Rᵀ``) with
  ``H.i.j.exact_trace`` (``(1,)``, the untruncated factor's trace; optional); for
  ``hessian_structure`` "diag" / "full" (header ``hessian_structure``, absent = "kron")
  one tensor ``H`` (``(P,)`` / ``(P, P)``);
- string metadata ``laplace_llm`` holding JSON: format name and version, the options
  (``n_kfac``, ``lr_threshold``, ``fisher_type``, ``kfac_approx``, ``likelihood``,
  ``temperature``, ``damping``, ``dict_key_x``/``dict_key_y``, ``lora_modules``,
  ``sigma_noise``; the last two absent from files written before them), the fitted scalars
  (``loss``, ``n_data``, ``n_outputs``), the LoRA block names and shapes, the rank
  of each low-rank factor, and a SHA-256 of every tensor's bytes.

safetensors parses only its header and raw buffers, so loading executes nothing; a
truncated file fails its size check and a corrupted one its checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from laplace_llm.lora_laplace import LoRALaplace
from laplace_llm.matrix import LowRankFactor, LowRankKron

__all__ = ["save_posterior", "load_posterior", "PosteriorFileError", "FORMAT", "VERSION"]

FORMAT = "laplace-llm-posterior"
VERSION = 1
_OPTIONS = ("n_kfac", "lr_threshold", "fisher_type", "kfac_approx", "mc_samples", "max_params")


class PosteriorFileError(ValueError):
    """A posterior file that cannot be used: not ours, damaged, or for another model."""


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def save_posterior(la: LoRALaplace, path: str | os.PathLike) -> None:
    """Write a fitted :class:`LoRALaplace` to ``path`` (safetensors).

    Parameters
    ----------
    la : LoRALaplace
        fitted (``la.fit`` called).
    path : str or PathLike
    """
    la._check_H_init()
    tensors: dict[str, torch.Tensor] = {
        "mean": la.mean.detach(),
        "prior_precision": la.prior_precision.detach(),
        "prior_mean": la.prior_mean.detach().reshape(-1),
    }
    ranks = {}
    structure = la._key[1]
    if structure != "kron":  # LoRADiagLaplace / LoRAFullLaplace: H is one tensor
        tensors["H"] = la.H.detach()
    for i, F in enumerate(la.H_facs.kfacs if structure == "kron" else []):
        for j, f in enumerate(F):
            if isinstance(f, LowRankFactor):
                tensors[f"H.{i}.{j}.root"] = f.root
                if f.exact_trace is not None:  # for la.low_rank_report() after loading
                    tensors[f"H.{i}.{j}.exact_trace"] = f.exact_trace.reshape(1)
                ranks[f"{i}.{j}"] = f.rank
            else:
                tensors[f"H.{i}.{j}.dense"] = f
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    loss = la.loss.item() if isinstance(la.loss, torch.Tensor) else float(la.loss)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "hessian_structure": structure,
        "options": {k: getattr(la, k) for k in _OPTIONS if hasattr(la, k)},
        "likelihood": str(la.likelihood),
        "temperature": float(la.temperature),
        "damping": bool(getattr(la, "damping", False)),
        "dict_key_x": la.dict_key_x,
        "dict_key_y": la.dict_key_y,
        "loss": loss,
        "n_data": int(la.n_data),
        "n_outputs": int(la.n_outputs),
        "lora_modules": la.lora_modules,
        "sigma_noise": float(la.sigma_noise),
        "block_names": [b.name for b in la.blocks],
        "block_shapes": [list(b.shape) for b in la.blocks],
        "ranks": ranks,
        "sha256": {k: _digest(v) for k, v in tensors.items()},
    }
    save_file(tensors, str(path), metadata={"laplace_llm": json.dumps(header)})


def read_posterior(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header and tensors of a posterior file, verified; raises PosteriorFileError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No posterior file at '{path}'.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise PosteriorFileError(
            f"'{path}' is not a readable laplace-llm posterior (safetensors) file: {err}. "
            "It may be truncated, or a file of another kind (posterior files are never "
            "pickles); write it again with `la.save(path)`."
        ) from None
    if "laplace_llm" not in meta:
        raise PosteriorFileError(
            f"'{path}' is a safetensors file but not a laplace-llm posterior (no "
            "'laplace_llm' header); write posteriors with `la.save(path)`."
        )
    try:
        header = json.loads(meta["laplace_llm"])
    except json.JSONDecodeError:
        raise PosteriorFileError(f"'{path}' has a corrupted laplace-llm header.") from None
    if header.get("format") != FORMAT:
        raise PosteriorFileError(f"'{path}' is not a {FORMAT} file.")
    if header.get("version") != VERSION:
        raise PosteriorFileError(
            f"'{path}' has posterior format version {header.get('version')}; this laplace-llm "
            f"reads version {VERSION}. Refit and save with this version."
        )
    sums = header.get("sha256", {})
    if set(sums) != set(tensors):
        raise PosteriorFileError(f"'{path}' is corrupted: its tensors do not match its header.")
    for name, t in tensors.items():
        if _digest(t) != sums[name]:
            raise PosteriorFileError(
                f"'{path}' is corrupted: checksum mismatch in tensor '{name}'."
            )
    return header, tensors


def load_posterior(
    path: str | os.PathLike,
    model: torch.nn.Module,
    check_weights: bool = True,
    **kwargs: Any,
) -> LoRALaplace:
    """Rebuild a :class:`LoRALaplace` from ``path`` for ``model``.

    Parameters
    ----------
    path : str or PathLike
    model : nn.Module
        the model (with the adapter) the posterior was fitted on.
    check_weights : bool, default True
        refuse the file if the model's LoRA weights differ from the fitted ones.
    **kwargs
        further :class:`LoRALaplace` arguments (e.g. ``jacobian_free``).

    Raises
    ------
    PosteriorFileError
        damaged file, other format or version, or a model with other LoRA blocks or
        weights.
    """
    header, tensors = read_posterior(path)
    from laplace_llm.discovery import find_blocks
    from laplace_llm.module_selection import select_blocks

    blocks = select_blocks(find_blocks(model), header.get("lora_modules"))
    names = [b.name for b in blocks]
    shapes = [list(b.shape) for b in blocks]
    if names != header["block_names"] or shapes != header["block_shapes"]:
        raise PosteriorFileError(
            f"'{path}' was fitted on another model: it has {len(header['block_names'])} LoRA "
            f"blocks ({header['block_names'][:2]}…, shapes {header['block_shapes'][:2]}…), the "
            f"model has {len(names)} ({names[:2]}…, shapes {shapes[:2]}…). Load it with the "
            "model and adapter it was fitted on."
        )
    options = dict(header["options"])
    options["lora_modules"] = header.get("lora_modules")
    options.update(kwargs)
    structure = header.get("hessian_structure", "kron")
    if structure != "kron":
        from laplace_llm.structures import LoRADiagLaplace, LoRAFullLaplace

        cls = {"diag": LoRADiagLaplace, "full": LoRAFullLaplace}[structure]
    else:
        cls = LoRALaplace
        options.setdefault("damping", header["damping"])
    la = cls(
        model,
        header["likelihood"],
        temperature=header["temperature"],
        sigma_noise=header.get("sigma_noise", 1.0),
        dict_key_x=header["dict_key_x"],
        dict_key_y=header["dict_key_y"],
        **options,
    )
    if check_weights:
        current = torch.nn.utils.parameters_to_vector(la.params).detach().to(la._dtype).cpu()
        if current.shape != tensors["mean"].shape or not torch.equal(current, tensors["mean"]):
            raise PosteriorFileError(
                f"'{path}' was fitted on other LoRA weights than the model has now (same "
                "blocks, different values): load the adapter it was fitted on, or pass "
                "check_weights=False if you changed the weights on purpose."
            )
    kfacs = []
    for i, block_shape in enumerate(header["block_shapes"] if structure == "kron" else []):
        F = []
        for j in range(len(block_shape)):
            device = blocks[i].module.weight.device
            if f"H.{i}.{j}.root" in tensors:
                trace = tensors.get(f"H.{i}.{j}.exact_trace")
                F.append(LowRankFactor(
                    tensors[f"H.{i}.{j}.root"].to(device), header["ranks"][f"{i}.{j}"],
                    exact_trace=None if trace is None else trace.to(device).reshape(()),
                ))
            else:
                F.append(tensors[f"H.{i}.{j}.dense"].to(device))
        kfacs.append(F)
    if structure == "kron":
        la.H_facs = LowRankKron(kfacs)
        la.H = la.H_facs.decompose(damping=la.damping)
    else:
        la.H = tensors["H"].to(device=la._device, dtype=la._dtype)
    la.mean = tensors["mean"].to(la._device)
    la.loss = torch.tensor(header["loss"], dtype=la._dtype)
    la.n_data = header["n_data"]
    la.n_outputs = header["n_outputs"]
    la.prior_mean = tensors["prior_mean"].to(la._device)
    la.prior_precision = tensors["prior_precision"].to(la._device)
    la.model.output_size = la.n_outputs
    return la
