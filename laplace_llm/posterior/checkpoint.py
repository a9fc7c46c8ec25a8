"""Resumable fits: the checkpoint of an unfinished ``fit`` and the signals that write it.

``la.fit(train_loader, checkpoint=PATH, checkpoint_every=N)`` writes the curvature
accumulated so far to ``PATH`` every ``N`` batches, and when the process receives SIGTERM
or SIGINT; ``la.fit(train_loader, resume_from=PATH)`` continues such a fit and ends with
the posterior of the uninterrupted one (:meth:`LoRALaplaceBase.fit
<laplace_llm.posterior.base.LoRALaplaceBase.fit>`). :class:`FitCheckpoint` is the part of
one ``fit`` call that writes, reads and checks these files; the structures supply the
curvature's state (``_partial_state`` / ``_from_partial_state``).

Resuming is exact. The file holds the curvature as it is between two batches, never
finalised: the Kronecker factors' roots with the columns not yet truncated
(:meth:`LowRankKron.to_state <laplace_llm.matrix.LowRankKron.to_state>` plus each
low-rank factor's ``chunk``), the dense diag/full sums, the summed loss, and the state of
the generator of the Monte-Carlo labels (``fisher_type="mc"`` with a ``seed``), so the
resumed fit makes the same arithmetic in the same order as the uninterrupted one. The
batches already seen are read from the loader again and skipped (no forward pass); a
running SHA-256 over their contents refuses a loader that yields other batches, e.g. a
shuffled ``DataLoader`` without a seeded ``generator``.

File format ``laplace-llm-fit-checkpoint`` version 1: a safetensors file written
atomically with the checksums of :func:`laplace_llm.serialization.write_file` (no pickle):

- tensors ``loss`` (``(1,)``, the summed loss of the batches seen), the curvature: ``H``
  (diag ``(P,)``, full ``(P, P)``) or, for kron, ``H.i.j.<name>`` for every tensor of
  factor ``j`` of block ``i`` in its state; ``generator_state`` (uint8) when the fit
  has a seed;
- JSON header ``laplace_llm``: ``format``, ``version``; what the resumed fit must match
  (:data:`IDENTITY`): ``hessian_structure``, ``likelihood``, ``block_names``,
  ``block_shapes``, ``lora_modules``, ``options``, ``seed``, ``dict_key_x``,
  ``dict_key_y``, ``weights_sha256`` (of this process's LoRA weights), ``n_data``
  (``N``, summed over processes), ``dataset_size`` and ``n_batches`` (this process's
  loader), ``rank``, ``world_size``, ``adds_to`` (``None``, or the ``n_data`` and
  ``loss`` of the posterior an ``override=False`` fit adds to); and the progress:
  ``batches_seen``, ``batches_sha256``, ``n_outputs``, ``generator_device``, and
  ``layout`` (per block, per factor: the names of its tensors and its other values, or
  ``same_as`` for a factor shared with an earlier one).

Under ``fit(distributed=True)`` every process writes and resumes its own file, ``PATH``
with the suffix ``.rank<r>`` (:func:`checkpoint_file`); the sum over processes happens
once, at the end, as in an uninterrupted fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from laplace_llm import serialization
from laplace_llm.digests import batch_digest, weights_digest
from laplace_llm.errors import PosteriorFileError
from laplace_llm.options import check_int
from laplace_llm.signals import SignalWatch

__all__ = [
    "FitCheckpoint",
    "CHECKPOINT_FILENAME",
    "FORMAT",
    "VERSION",
    "IDENTITY",
    "checkpoint_file",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT = serialization.CHECKPOINT_FORMAT
VERSION = 1
#: Name of the checkpoint file inside a folder given as the path.
CHECKPOINT_FILENAME = "laplace_fit_checkpoint.safetensors"
#: Header entries a resumed fit must match.
IDENTITY = (
    "hessian_structure", "likelihood", "block_names", "block_shapes", "lora_modules",
    "options", "seed", "dict_key_x", "dict_key_y", "weights_sha256", "n_data",
    "dataset_size", "n_batches", "rank", "world_size", "adds_to",
)
#: the signals that make a fit with a checkpoint write it and stop
_START = hashlib.sha256(b"laplace-llm batches").hexdigest()


def checkpoint_file(path: str | os.PathLike, distributed: bool = False) -> Path:
    """Return this process's checkpoint file of ``path``.

    Parameters
    ----------
    path : str or PathLike
        a file, or a folder, which means its :data:`CHECKPOINT_FILENAME`.
    distributed : bool, default False
        ``fit(distributed=True)``: in a ``torch.distributed`` group of several processes
        the file of rank ``r`` is ``<file>.rank<r>``.

    Returns
    -------
    Path
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILENAME
    if distributed:
        from laplace_llm.distributed import process_rank

        rank, world = process_rank()
        if world > 1:
            path = path.with_name(f"{path.name}.rank{rank}")
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header and tensors of a fit checkpoint, verified.

    Raises
    ------
    FileNotFoundError
        no file at ``path``.
    PosteriorFileError
        damaged, or not a fit checkpoint (a finished posterior, another file).
    """
    fix = "resume from the checkpoint that fit(checkpoint=...) wrote, or fit afresh"
    header, tensors = serialization.read_file(path, kind="fit checkpoint", fix=fix)
    fmt = header.get("format")
    if fmt == serialization.FORMAT:
        raise PosteriorFileError(
            f"'{path}' is a finished posterior, not the checkpoint of an unfinished fit: "
            "load it with `laplace_llm.load(path, model)`; to add data to it, load it and "
            "call `la.fit(loader, override=False)`. resume_from takes the file that "
            "fit(checkpoint=...) writes."
        )
    if fmt != FORMAT:
        raise PosteriorFileError(f"'{path}' is not a {FORMAT} file; {fix}.")
    if header.get("version") != VERSION:
        raise PosteriorFileError(
            f"'{path}' is a fit checkpoint of format version {header.get('version')}; this "
            f"laplace-llm resumes version {VERSION}. Finish that fit with the release that "
            "started it, or fit afresh."
        )
    return header, tensors


class FitCheckpoint:
    """The checkpoints of one ``fit`` call: where, how often, and the resumed state.

    Built by ``fit`` (:meth:`start`); the fit loop calls :meth:`see` for every batch the
    loader yields, :meth:`after_batch` after each one it accumulates, and runs inside
    :meth:`signals`.

    Parameters
    ----------
    identity : dict
        the header entries :data:`IDENTITY` of this fit (JSON values).
    path : Path, optional
        this process's checkpoint file; ``None``: resume only, write nothing.
    every : int, optional
        write every ``every`` batches (counted from the loader's first batch); ``None``:
        only on a signal.
    resume_from : Path, optional
        this process's file to resume.

    Attributes
    ----------
    start_batch : int
        the batches the resumed file has seen (0 without one): the loop skips them.
    resumed : dict or None
        the resumed state: ``H`` (the structure's partial state), ``loss``,
        ``n_outputs``, ``generator_state``.
    """

    def __init__(
        self,
        identity: dict[str, Any],
        path: Path | None = None,
        every: int | None = None,
        resume_from: Path | None = None,
    ):
        self.identity = json.loads(json.dumps(identity))  # the values a file gives back
        self.path = path
        self.every = every
        self.resume_from = resume_from
        self.start_batch = 0
        self.resumed: dict[str, Any] | None = None
        self._chain = _START
        self._expected_chain: str | None = None
        self._written = -1
        self._watch: SignalWatch | None = None
        if resume_from is not None:
            self._resume(resume_from)
        if path is not None:
            self._check_target(path)

    # ------------------------------------------------------------------ start
    @classmethod
    def start(
        cls,
        la: Any,
        train_loader: Any,
        N: int,
        override: bool,
        distributed: bool,
        checkpoint: str | os.PathLike | None,
        checkpoint_every: int | None,
        resume_from: str | os.PathLike | None,
    ) -> FitCheckpoint | None:
        """Return the checkpointing of ``la.fit(...)``'s arguments, ``None`` without any.

        Raises
        ------
        ValueError
            ``checkpoint_every`` without ``checkpoint``, or not a positive integer.
        FileNotFoundError, PosteriorFileError
            ``resume_from`` missing, unreadable, or the checkpoint of another fit.
        """
        if checkpoint is None and resume_from is None:
            if checkpoint_every is not None:
                raise ValueError(
                    f"checkpoint_every={checkpoint_every!r} needs a file to write: pass "
                    "checkpoint=PATH too (e.g. fit(loader, checkpoint='fit.ckpt', "
                    "checkpoint_every=100))."
                )
            return None
        every = None if checkpoint_every is None else check_int(
            "checkpoint_every", checkpoint_every, 1)
        if checkpoint is None and every is not None:
            raise ValueError(
                "checkpoint_every needs checkpoint=PATH: resume_from only reads. Pass the "
                "same path as checkpoint to keep checkpointing the resumed fit."
            )
        path = None if checkpoint is None else checkpoint_file(checkpoint, distributed)
        source = None if resume_from is None else checkpoint_file(resume_from, distributed)
        return cls(fit_identity(la, train_loader, N, override, distributed), path, every, source)

    def _resume(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(
                f"No fit checkpoint at '{path}' to resume (resume_from). Pass the path "
                "given as checkpoint= to the interrupted fit (under fit(distributed=True) "
                "each process reads its own '<path>.rank<r>'), or fit without resume_from."
            )
        header, tensors = read_checkpoint(path)
        problems = _differences(header, self.identity)
        if problems:
            raise PosteriorFileError(
                f"Cannot resume from '{path}': " + "; ".join(problems) + ". Resume with the "
                "model, adapter, data, loader and Laplace arguments of the interrupted fit, "
                "or fit afresh without resume_from (and delete the file)."
            )
        self.start_batch = int(header["batches_seen"])
        self._expected_chain = header["batches_sha256"]
        self._written = self.start_batch if path == self.path else -1
        state = tensors.get("generator_state")
        self.resumed = {
            "H": _decode_curvature(header, tensors),
            "loss": tensors["loss"].clone().reshape(()),
            "n_outputs": int(header["n_outputs"]),
            "generator_state": None if state is None else state.clone(),
            "generator_device": header.get("generator_device"),
        }
        logger.info("resuming the fit of '%s' after its %d batches (read again, not computed)",
                    path, self.start_batch)
        if self.identity["seed"] is None and self.identity["options"].get("fisher_type") == "mc":
            logger.warning(
                "Resuming an mc-Fisher fit without a seed: its Monte-Carlo labels came from "
                "torch's global generator, which the checkpoint does not hold, so the rest "
                "of the fit draws other ones than the uninterrupted fit would have (an "
                "equally valid estimate, not the same posterior). Pass seed= to fit "
                "exactly resumable.")

    def _check_target(self, path: Path) -> None:
        """Refuse to replace a file that is not a fit checkpoint; create missing folders."""
        if path.is_dir():
            raise PosteriorFileError(f"The checkpoint path '{path}' is a folder holding a "
                                     f"folder '{CHECKPOINT_FILENAME}'; choose another path.")
        if path.exists():
            try:
                read_checkpoint(path)
            except PosteriorFileError as err:
                raise PosteriorFileError(
                    f"Refusing to overwrite '{path}' with a fit checkpoint: it exists and is "
                    f"not one ({err}). Choose another checkpoint path, or delete that file."
                ) from None
            if path != self.resume_from:
                logger.warning(
                    "'%s' holds the checkpoint of an earlier fit, which this fit replaces "
                    "from its first checkpoint on; pass resume_from='%s' to continue it "
                    "instead.", path, path)
        path.parent.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ loop
    def see(self, i: int, data: Any) -> None:
        """Add batch ``i`` (0-based, as the loader yields it) to the running digest.

        Raises
        ------
        PosteriorFileError
            at the last batch the resumed file has seen, if the loader yielded other
            batches than the interrupted fit did.
        """
        self._chain = hashlib.sha256((self._chain + batch_digest(data)).encode()).hexdigest()
        if i + 1 == self.start_batch and self._chain != self._expected_chain:
            raise PosteriorFileError(
                f"The train loader yields other batches than the fit that wrote "
                f"'{self.resume_from}' saw (its first {self.start_batch} batches differ in "
                "content or order). Resume with the same data in the same order and batch "
                "size: a shuffled DataLoader needs a seeded generator, "
                "DataLoader(..., shuffle=True, generator=torch.Generator().manual_seed(0)), "
                "created anew for the resumed fit; or fit afresh without resume_from."
            )

    def check_length(self, n_seen: int) -> None:
        """Refuse a loader that ended before the batches the resumed file has seen."""
        if n_seen < self.start_batch:
            raise PosteriorFileError(
                f"The train loader yielded {n_seen} batches, fewer than the "
                f"{self.start_batch} that '{self.resume_from}' has seen: resume with the "
                "interrupted fit's loader, or fit afresh without resume_from."
            )

    def after_batch(self, k: int, state: Callable[[], tuple]) -> None:
        """After ``k`` batches: write if due or signalled, then pass on a signal.

        Parameters
        ----------
        k : int
            batches accumulated so far (skipped ones included).
        state : callable
            returns ``(H_state, loss, n_outputs, generator)``: the structure's partial
            state of the curvature, the summed loss, the number of outputs and the
            Monte-Carlo generator (or ``None``).
        """
        pending = self._watch is not None and self._watch.pending is not None
        due = self.every is not None and k % self.every == 0
        if self.path is not None and (due or pending) and k != self._written:
            self._write(k, *state(), signalled=pending)
        if pending:
            self._watch.deliver(self.path if self._written == k else None)

    def _write(self, k: int, H_state: Any, loss: Any, n_outputs: int,
               generator: torch.Generator | None, signalled: bool) -> None:
        tensors = {"loss": torch.as_tensor(loss).detach().reshape(1)}
        header: dict[str, Any] = {"format": FORMAT, "version": VERSION, **self.identity}
        header.update(
            batches_seen=k, batches_sha256=self._chain, n_outputs=int(n_outputs),
            generator_device=None if generator is None else generator.device.type,
        )
        header["layout"] = _encode_curvature(H_state, tensors)
        if generator is not None:
            tensors["generator_state"] = generator.get_state()
        try:
            serialization.write_file(tensors, header, self.path)
        except OSError as err:  # hours of fitting are not lost to a full disk
            logger.error("Could not write the fit checkpoint '%s' after %d batches: %s. The "
                         "fit goes on; the previous checkpoint, if any, is kept.",
                         self.path, k, err.strerror or err)
            return
        self._written = k
        log = logger.warning if signalled else logger.info
        log("wrote the fit checkpoint '%s' after %d batches; continue with "
            "fit(train_loader, resume_from=...)", self.path, k)

    def restore_generator(self, generator: torch.Generator | None) -> None:
        """Give ``generator`` (the Monte-Carlo labels') the resumed state, if the file has one.

        Raises
        ------
        PosteriorFileError
            the file was written with a generator on another kind of device.
        """
        state = None if self.resumed is None else self.resumed["generator_state"]
        if state is None or generator is None:
            return
        device = self.resumed["generator_device"]
        if generator.device.type != device:
            raise PosteriorFileError(
                f"'{self.resume_from}' was written by a fit on a {device} device, this one "
                f"runs on {generator.device.type}: the random generators of the two kinds "
                "differ, so the Monte-Carlo labels would too. Resume on the same kind of "
                "device, or fit afresh."
            )
        generator.set_state(state)

    def signals(self) -> SignalWatch:
        """Context of the fit loop: SIGINT and SIGTERM write the checkpoint, then act as before.

        Installed only with a checkpoint path, in the main thread, for signals whose
        handler is not ``SIG_IGN``; the previous handlers are restored on exit. A first
        signal lets the current batch finish, writes the checkpoint and then does what
        the previous handler does (Python's SIGINT handler raises ``KeyboardInterrupt``;
        the default SIGTERM action ends the process); a second one does so at once,
        without writing.
        """
        self._watch = SignalWatch(enabled=self.path is not None)
        return self._watch


# --------------------------------------------------------------------- identity
def fit_identity(la: Any, train_loader: Any, N: int, override: bool, distributed: bool) -> dict:
    """Return the header entries :data:`IDENTITY` of ``la.fit(train_loader, ...)``."""
    from laplace_llm.distributed import process_rank

    rank, world = process_rank() if distributed else (0, 1)
    try:
        n_batches = len(train_loader)
    except TypeError:
        n_batches = None
    adds_to = None
    if not override and la._is_fitted():
        adds_to = {"n_data": int(la.n_data), "loss": float(torch.as_tensor(la.loss).item())}
    return {
        **la._file_identity(),
        "likelihood": la.likelihood,
        "seed": la.seed,
        "weights_sha256": weights_digest(la.params),
        "n_data": int(N),
        "dataset_size": len(train_loader.dataset),
        "n_batches": n_batches,
        "rank": rank,
        "world_size": world,
        "adds_to": adds_to,
    }


#: options that checkpoints of earlier releases lack, with the value those releases used
#: (``sketch_adapt``: their sketches' ``Ω`` was all Gaussian; ``sketch_readapt``: it was
#: adapted once at most), so that a resumed fit is told which value reproduces the
#: interrupted one
LEGACY_OPTIONS = {"sketch_adapt": 0, "sketch_readapt": False}


def _differences(header: Mapping[str, Any], identity: Mapping[str, Any]) -> list[str]:
    """Name every entry of :data:`IDENTITY` in which the file differs from this fit."""
    problems = []
    for key in IDENTITY:
        theirs, mine = header.get(key), identity.get(key)
        if key == "options" and isinstance(theirs, Mapping) and isinstance(mine, Mapping):
            theirs = {**{k: v for k, v in LEGACY_OPTIONS.items() if k in mine}, **theirs}
        if theirs == mine:
            continue
        if key == "options":
            diff = sorted(k for k in set(theirs or {}) | set(mine or {})
                          if (theirs or {}).get(k) != (mine or {}).get(k))
            problems.append("other options: " + ", ".join(
                f"{k}={(theirs or {}).get(k)!r} in the file, {(mine or {}).get(k)!r} now"
                for k in diff))
        elif key in ("block_names", "block_shapes"):
            if "other LoRA blocks" not in " ".join(problems):
                problems.append(
                    f"it was written for other LoRA blocks ({len(header.get('block_names') or [])} "
                    f"blocks, first {(header.get('block_names') or [None])[0]!r}; the model has "
                    f"{len(identity['block_names'])}, first {identity['block_names'][0]!r}): "
                    "use the model, adapter and lora_modules it was written with")
        elif key == "weights_sha256":
            problems.append("it was written at other LoRA weights (same blocks, other values): "
                            "load the adapter the interrupted fit used")
        elif key == "adds_to":
            problems.append(_adds_to_problem(theirs, mine))
        elif key in ("rank", "world_size"):
            if "process" not in " ".join(problems):
                problems.append(
                    f"it was written by process {header.get('rank')} of "
                    f"{header.get('world_size')}, this is process {identity['rank']} of "
                    f"{identity['world_size']}: resume with as many processes, each with the "
                    "shard it had")
        elif key == "n_data":
            problems.append(f"the data set size differs: N={theirs} in the file, {mine} now")
        elif key == "dataset_size":
            problems.append(f"the loader's dataset has {mine} examples, the interrupted "
                            f"fit's had {theirs}")
        elif key == "n_batches":
            problems.append(f"the loader has {mine} batches, the interrupted fit's had "
                            f"{theirs} (another batch size or sampler?)")
        else:
            problems.append(f"{key}={theirs!r} in the file, {mine!r} now")
    return problems


def _adds_to_problem(theirs: Any, mine: Any) -> str:
    if theirs is None:
        return ("the interrupted fit replaced the posterior (override=True, or nothing fitted "
                "yet) but this call adds to the fitted one (override=False): resume with "
                "override=True")
    if mine is None:
        return ("the interrupted fit added its data to a fitted posterior (override=False, "
                f"n_data={theirs['n_data']}); resume it with override=False on that posterior "
                "(e.g. laplace_llm.load it again)")
    return (f"the interrupted fit added its data to a posterior with n_data={theirs['n_data']} "
            f"and loss={theirs['loss']!r}; this one has n_data={mine['n_data']}, "
            f"loss={mine['loss']!r}: resume on the posterior the interrupted fit started from")


# --------------------------------------------------------------------- curvature
def _encode_curvature(H_state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Put the curvature's tensors into ``tensors``; return the layout for the header."""
    if isinstance(H_state, torch.Tensor):
        tensors["H"] = H_state.detach()
        return None
    layout = []
    for i, F in enumerate(H_state):
        row = []
        for j, f in enumerate(F):
            if "same_as" in f:
                row.append({"same_as": [int(v) for v in f["same_as"]]})
                continue
            names, values = [], {}
            for name, value in f.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"H.{i}.{j}.{name}"] = value.detach()
                    names.append(name)
                else:
                    values[name] = value
            row.append({"tensors": names, "values": values})
        layout.append(row)
    return layout


def _decode_curvature(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    """Return the structure's partial state of the curvature from a file (fresh CPU tensors)."""
    layout = header.get("layout")
    try:
        if layout is None:
            return tensors["H"].clone()
        return [
            [
                dict(f) if "same_as" in f else {
                    **{name: tensors[f"H.{i}.{j}.{name}"].clone() for name in f["tensors"]},
                    **f["values"],
                }
                for j, f in enumerate(row)
            ]
            for i, row in enumerate(layout)
        ]
    except KeyError as err:
        raise PosteriorFileError(f"The fit checkpoint is corrupted: it lacks {err}.") from None
