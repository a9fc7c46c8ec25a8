"""Posterior files: safetensors tensors plus a JSON header, loadable without code.

This module maps a :meth:`LoRALaplace.state_dict <laplace_llm.LoRALaplace.state_dict>`
to a file and back (:func:`write_state`, :func:`read_state`); building the posterior
from the state is :meth:`LoRALaplace.load <laplace_llm.LoRALaplace.load>`.

File format ``laplace-llm-posterior`` version 1 (a safetensors file):

- tensors ``mean``, ``prior_precision``, ``prior_mean`` and, for block ``i`` factor
  ``j``, ``H.i.j.dense`` (``d × d``) or ``H.i.j.root`` (``d × m``, ``F = R Rᵀ``; in a fit checkpoint, ``H.i.j.sketch`` ``d × s``, a pending sketch ``F Ω``, with
  ``H.i.j.sketch_adapted`` ``d × t``, the columns of ``Ω`` taken from the data, if any) with
  ``H.i.j.exact_trace`` (``(1,)``, the untruncated factor's trace; optional); for
  ``hessian_structure`` "diag" / "full" (header ``hessian_structure``, absent = "kron")
  one tensor ``H`` (``(P,)`` / ``(P, P)``);
- string metadata ``laplace_llm`` holding JSON: format name and version, the options
  (:meth:`KFACOptions.to_dict <laplace_llm.options.KFACOptions.to_dict>`),
  ``hessian_structure`` (absent = "kron"), ``lora_modules``, ``likelihood``,
  ``temperature``, ``damping``, ``dict_key_x``/``dict_key_y``, the fitted scalars
  (``loss``, ``n_data``, ``n_outputs``, ``sigma_noise``), the LoRA block names and
  shapes, the rank of each low-rank factor (``ranks``, keyed ``"i.j"``), the factors
  stored once for several blocks (``shared``: ``"i.j"`` to the ``[i', j']`` of the
  stored factor), and a SHA-256 of every tensor's bytes. ``sigma_noise``,
  ``enable_backprop``, ``cls_name``, ``hessian_structure``, ``lora_modules`` and
  ``shared`` are absent from files of earlier releases and then take their defaults
  (laplace-torch's, "kron", every LoRA layer, nothing shared).

safetensors parses only its header and raw buffers, so loading executes nothing; a
truncated file fails its size check and a corrupted one its checksums.

Beside an adapter: a folder given as the path (a peft adapter folder, a Trainer
checkpoint) means the file :data:`POSTERIOR_FILENAME` inside it (:func:`posterior_path`),
so ``la.save(adapter_dir)``, ``LoRALaplace.load(adapter_dir, model)`` and ``laplace-llm
evaluate --adapter DIR`` meet there. Writing goes to a temporary file that replaces the
target only when complete, and :func:`check_overwrite` refuses to replace a file that is
not a posterior of the same LoRA blocks.

The checkpoints of an unfinished fit (``fit(checkpoint=...)``) are files of the same
kind (:func:`write_file`, :func:`read_file`) with format ``laplace-llm-fit-checkpoint``
(:data:`CHECKPOINT_FORMAT`); :mod:`laplace_llm.posterior.checkpoint` defines their
content, and :func:`read_posterior` refuses them by name.
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

from laplace_llm.errors import PosteriorFileError

__all__ = [
    "write_state",
    "read_state",
    "read_posterior",
    "read_file",
    "write_file",
    "CHECKPOINT_FORMAT",
    "PosteriorFileError",
    "FORMAT",
    "VERSION",
    "POSTERIOR_FILENAME",
    "posterior_path",
    "check_overwrite",
]

FORMAT = "laplace-llm-posterior"
VERSION = 1
#: ``format`` of the checkpoints of an unfinished fit (``fit(checkpoint=...)``, see
#: :mod:`laplace_llm.posterior.checkpoint`), which :func:`read_posterior` refuses by name.
CHECKPOINT_FORMAT = "laplace-llm-fit-checkpoint"
#: Name of the posterior file inside an adapter or checkpoint folder.
POSTERIOR_FILENAME = "laplace_posterior.safetensors"
#: State entries stored as tensors; every other entry but ``H`` goes to the JSON header.
_TENSORS = ("mean", "prior_precision", "prior_mean")
#: Header entries that files of earlier releases lack, with the value they then take.
_DEFAULTS = {
    "sigma_noise": 1.0,
    "enable_backprop": False,
    "cls_name": "LoRALaplace",
    "hessian_structure": "kron",
    "lora_modules": None,
}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _plain(value: Any) -> Any:
    """Return the JSON value of a state entry (scalar tensors as numbers)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def write_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a :meth:`LoRALaplace.state_dict <laplace_llm.LoRALaplace.state_dict>` to ``path``.

    Parameters
    ----------
    state : dict
        the state of a fitted posterior.
    path : str or PathLike
    """
    tensors: dict[str, torch.Tensor] = {
        "mean": state["mean"].detach(),
        "prior_precision": state["prior_precision"].detach(),
        "prior_mean": torch.as_tensor(state["prior_mean"]).detach().reshape(-1),
    }
    ranks, shared = {}, {}
    if isinstance(state["H"], torch.Tensor):  # diag (P,) or full (P, P)
        tensors["H"] = state["H"].detach()
    else:  # LowRankKron.to_state()
        for i, F in enumerate(state["H"]):
            for j, f in enumerate(F):
                if "same_as" in f:
                    shared[f"{i}.{j}"] = [int(v) for v in f["same_as"]]
                    continue
                for key, value in f.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"H.{i}.{j}.{key}"] = value
                    else:
                        ranks[f"{i}.{j}"] = value
    header = {"format": FORMAT, "version": VERSION}
    header.update(
        {k: _plain(v) for k, v in state.items() if k not in _TENSORS and k != "H"}
    )
    header["ranks"] = ranks
    header["shared"] = shared
    write_file(tensors, header, path)


def write_file(tensors: dict[str, torch.Tensor], header: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``tensors`` and the JSON ``header`` with each tensor's SHA-256, atomically.

    The file appears complete or not at all: it is written to a temporary file beside
    ``path`` that replaces ``path`` once complete, so an interrupted write leaves the
    previous file intact. :func:`read_file` reads and verifies it.

    Parameters
    ----------
    tensors : dict of str to torch.Tensor
    header : dict
        JSON values; ``format`` and ``version`` name the kind of file.
    path : str or PathLike
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {**header, "sha256": {k: _digest(v) for k, v in tensors.items()}}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"laplace_llm": json.dumps(header)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read the state written by :func:`write_state`, verified; raise PosteriorFileError.

    Tensors are on the CPU; ``H`` is in :meth:`LowRankKron.to_state
    <laplace_llm.matrix.LowRankKron.to_state>` form.
    """
    header, tensors = read_posterior(path)
    state = {**_DEFAULTS, **header}
    for key in ("format", "version", "ranks", "sha256", "shared"):
        state.pop(key, None)
    shared = header.get("shared", {})
    for key in _TENSORS:
        state[key] = tensors[key]
    try:
        if state["hessian_structure"] != "kron":
            state["H"] = tensors["H"]
        else:
            state["H"] = [
                [
                    {"same_as": shared[f"{i}.{j}"]}
                    if f"{i}.{j}" in shared
                    else _factor_state(tensors, header["ranks"], i, j)
                    for j in range(len(shape))
                ]
                for i, shape in enumerate(header["block_shapes"])
            ]
    except KeyError as err:
        raise PosteriorFileError(f"'{path}' is corrupted: it lacks {err}.") from None
    return state


def _factor_state(
    tensors: dict[str, torch.Tensor], ranks: dict[str, int], i: int, j: int
) -> dict[str, torch.Tensor | int]:
    """Factor ``j`` of block ``i`` in :meth:`LowRankKron.to_state` form; KeyError if absent."""
    prefix = f"H.{i}.{j}."
    state: dict[str, torch.Tensor | int] = {
        k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
    }
    if "root" in state or "sketch" in state:
        state["rank"] = ranks[f"{i}.{j}"]
    elif "dense" not in state:
        raise KeyError(prefix + "dense")
    return state


def read_posterior(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header and tensors of a posterior file, verified; raises PosteriorFileError."""
    header, tensors = read_file(path)
    if header.get("format") == CHECKPOINT_FORMAT:
        raise PosteriorFileError(
            f"'{path}' is the checkpoint of an unfinished fit (fit(checkpoint=...)), not a "
            "posterior: finish the fit with `la.fit(train_loader, resume_from=path)` and "
            "save that posterior with `la.save(...)`."
        )
    if header.get("format") != FORMAT:
        raise PosteriorFileError(f"'{path}' is not a {FORMAT} file.")
    if header.get("version") != VERSION:
        raise PosteriorFileError(
            f"'{path}' has posterior format version {header.get('version')}; this laplace-llm "
            f"reads version {VERSION}. Refit and save with this version."
        )
    return header, tensors


def read_file(
    path: str | os.PathLike, kind: str = "posterior", fix: str = "write it again with `la.save(path)`"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header and tensors of a file written by :func:`write_file`, checksums verified.

    Parameters
    ----------
    path : str or PathLike
    kind : str, default "posterior"
        what the messages call the file.
    fix : str
        what the messages of an unreadable file suggest.

    Raises
    ------
    FileNotFoundError
        no file at ``path``.
    PosteriorFileError
        not a safetensors file with a laplace-llm header, or damaged (truncated,
        checksum mismatch). The format is the caller's to check.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {kind} file at '{path}'.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise PosteriorFileError(
            f"'{path}' is not a readable laplace-llm {kind} (safetensors) file: {err}. "
            f"It may be truncated, or a file of another kind (laplace-llm files are never "
            f"pickles); {fix}."
        ) from None
    if "laplace_llm" not in meta:
        raise PosteriorFileError(
            f"'{path}' is a safetensors file but not a laplace-llm {kind} (no "
            f"'laplace_llm' header); {fix}."
        )
    try:
        header = json.loads(meta["laplace_llm"])
    except json.JSONDecodeError:
        raise PosteriorFileError(f"'{path}' has a corrupted laplace-llm header.") from None
    sums = header.get("sha256", {})
    if set(sums) != set(tensors):
        raise PosteriorFileError(f"'{path}' is corrupted: its tensors do not match its header.")
    for name, t in tensors.items():
        if _digest(t) != sums[name]:
            raise PosteriorFileError(
                f"'{path}' is corrupted: checksum mismatch in tensor '{name}'."
            )
    return header, tensors


def posterior_path(path: str | os.PathLike) -> Path:
    """Return the posterior file that ``path`` names.

    Parameters
    ----------
    path : str or PathLike
        a posterior file, or a folder (a peft adapter folder, a ``Trainer`` checkpoint),
        which means the file :data:`POSTERIOR_FILENAME` inside it.

    Returns
    -------
    Path
    """
    path = Path(path)
    return path / POSTERIOR_FILENAME if path.is_dir() else path


def check_overwrite(path: str | os.PathLike, block_names: list[str], block_shapes: list) -> None:
    """Refuse to replace ``path`` unless it is absent or a posterior of the same LoRA blocks.

    Parameters
    ----------
    path : str or PathLike
        the file about to be written.
    block_names : list of str
        names of the LoRA blocks of the posterior about to be written.
    block_shapes : list
        their shapes, ``[[out, in], ...]``.

    Raises
    ------
    PosteriorFileError
        ``path`` exists and is not a readable laplace-llm posterior (e.g. an adapter's
        weights), or it is the posterior of a model with other LoRA blocks.
    """
    path = Path(path)
    if path.is_dir():
        raise PosteriorFileError(f"'{path}' is a folder; pass the folder itself to `la.save`.")
    if not path.exists():
        return
    try:
        header, _ = read_posterior(path)
    except PosteriorFileError as err:
        raise PosteriorFileError(
            f"Refusing to overwrite '{path}': it exists and is not a readable laplace-llm "
            f"posterior ({err}). Write the posterior elsewhere (a folder means its "
            f"'{POSTERIOR_FILENAME}'), or delete that file first."
        ) from None
    theirs = header.get("block_names")
    their_shapes = [list(s) for s in header.get("block_shapes", [])]
    if theirs != list(block_names) or their_shapes != [list(s) for s in block_shapes]:
        n = len(theirs or [])
        raise PosteriorFileError(
            f"Refusing to overwrite '{path}': it holds the posterior of another model ({n} "
            f"LoRA blocks, first {(theirs or [None])[0]!r}; this posterior has "
            f"{len(block_names)}, first {block_names[0] if block_names else None!r}). Save this "
            "posterior beside its own adapter, or delete the old file if it is obsolete."
        )
