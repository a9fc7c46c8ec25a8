"""``laplace-llm fit``: fit a LoRA Laplace posterior on a model and adapter and write it.

Under a launcher (``torchrun``, ``accelerate launch``) each process fits its shard
(:func:`launcher_group`); ``--checkpoint``/``--resume`` make the fit resumable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from laplace_llm import options as kfac_options
from laplace_llm.app.loading import (
    UserError,
    check_paths,
    first_line,
    load_classifier,
    lora_error,
)

logger = logging.getLogger(__name__)

__all__ = ["cmd_fit", "launcher_group", "checkpoint_written"]


def launcher_group(timeout: float | None = None) -> tuple[int, int, bool]:
    """Join the process group of ``torchrun`` / ``accelerate launch``, if launched by one.

    Launchers set ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without
    an initialised group one is created (gloo: the CLI fits on the CPU), whose timeout
    is ``timeout`` seconds (``None``: torch's default, 30 minutes).

    Returns
    -------
    rank, world : int
        ``(0, 1)`` outside a launcher.
    created : bool
        whether this call initialised the group (and should destroy it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    from laplace_llm.distributed import process_rank

    created = False
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start several "
                            "processes with torchrun or accelerate launch, or unset WORLD_SIZE")
        kwargs = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
        try:
            dist.init_process_group("gloo", **kwargs)
        except (RuntimeError, ValueError) as err:  # e.g. DistStoreError: a rank never came
            wait = "the process group's timeout" if timeout is None else f"{timeout:g} s"
            raise UserError(
                f"process {os.environ.get('RANK')} of {world} could not join the process group "
                f"within {wait}: {first_line(err).rstrip('.')}. Check that every process started (read "
                "their logs) and that MASTER_ADDR:MASTER_PORT is reachable; raise --timeout "
                "if some start slowly") from None
        created = True
    return *process_rank(), created


def cmd_fit(args: argparse.Namespace) -> int:
    """Run ``laplace-llm fit`` with the parsed ``args``; return the exit status."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and args.hessian_structure != "kron":
        # diag/full fits have no sum across processes
        raise UserError(f"--hessian-structure {args.hessian_structure} fits in one process "
                        "only; run it without torchrun/accelerate launch, or use kron")
    accelerate_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if accelerate_fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("accelerate's FSDP config asks for FSDP1 (fsdp_version 1), whose flat "
                        "parameters hide the LoRA shapes: set fsdp_version: 2 (FSDP2), or "
                        "launch without --use_fsdp (every process holds the whole model)")
    args.fsdp = bool(getattr(args, "fsdp", False) or accelerate_fsdp)
    rank, world, created = launcher_group(args.timeout)
    if rank:  # one voice: the other processes report only warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return _fit(args, rank, world)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _fit(args: argparse.Namespace, rank: int, world: int) -> int:
    from laplace import Laplace
    from torch.utils.data import DataLoader

    import laplace_llm  # noqa: F401  (registers subset_of_weights="lora")
    from laplace_llm.distributed import process_seed, shard
    from laplace_llm.errors import CollectiveTimeoutError, LoRAModelError, PosteriorFileError
    from laplace_llm.serialization import check_overwrite

    check_paths(args, posterior_must_exist=False)
    checkpoint, resume_from = _checkpoint_arguments(args, world)
    if not args.prior_precision > 0:
        raise UserError(f"--prior-precision must be > 0, got {args.prior_precision}")
    if not args.sigma_noise > 0:
        raise UserError(f"--sigma-noise must be > 0, got {args.sigma_noise}")
    main_process = rank == 0
    quiet = args.quiet or not main_process
    clf, loader, likelihood = load_classifier(args)
    if args.fsdp and world > 1:
        from laplace_llm.sharding import shard_model

        layer_classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",")
        try:
            clf = shard_model(clf, layer_classes)
        except ValueError as err:
            raise UserError(f"--fsdp: {first_line(err)}") from None
    if args.likelihood is not None and args.likelihood != likelihood:
        raise UserError(
            f"--likelihood {args.likelihood} does not fit --kind {args.kind}, which gives "
            f"{likelihood!r} (regression needs --kind scores)"
        )
    if (args.tune_sigma_noise or args.sigma_noise != 1.0) and likelihood != "regression":
        raise UserError("--sigma-noise and --tune-sigma-noise are for regression (--kind scores)")
    structure = args.hessian_structure
    n_records = len(loader.dataset)
    if world > 1:
        if n_records < world:
            raise UserError(f"--data has {n_records} records for {world} processes; each "
                            "process needs at least one")
        # fit(distributed=True) sums the shards
        loader = DataLoader(shard(loader.dataset, rank, world),
                            batch_size=args.batch_size, collate_fn=loader.collate_fn)
    # diag and full use the K-FAC options' fisher_type and mc_samples only
    kwargs: dict[str, Any] = dict(
        prior_precision=args.prior_precision, options=kfac_options.from_arguments(args),
        seed=process_seed(args.seed, rank),
        lora_modules=args.lora_modules,
    )
    if likelihood == "regression":
        kwargs["sigma_noise"] = args.sigma_noise
    if structure == "full":
        kwargs["max_params"] = args.max_params
    started = time.perf_counter()
    try:
        la = Laplace(clf, likelihood, subset_of_weights="lora", hessian_structure=structure,
                     **kwargs)
    except LoRAModelError as err:
        raise lora_error(err, args) from None
    except ValueError as err:  # e.g. --max-params exceeded
        raise UserError(first_line(err)) from None
    posterior = Path(args.posterior)
    try:  # before fitting, on every process: a refusal leaves nobody waiting
        check_overwrite(posterior, [b.name for b in la.blocks], [list(b.shape) for b in la.blocks])
    except PosteriorFileError as err:
        raise UserError(f"--posterior: {err}") from None
    if main_process:
        logger.info("fitting %s over %d LoRA weights on %d records of %s%s", type(la).__name__,
                    la.n_params, n_records, args.data,
                    f" in {world} processes" if world > 1 else "")
    try:
        la.fit(loader, progress_bar=not quiet, distributed=world > 1, checkpoint=args.checkpoint,
               checkpoint_every=args.checkpoint_every, resume_from=resume_from,
               timeout=args.timeout)
    except PosteriorFileError as err:  # a checkpoint of another fit, or FILE is no checkpoint
        raise UserError(f"--checkpoint {args.checkpoint}: {first_line(err)}") from None
    except CollectiveTimeoutError as err:  # names the step, the missing ranks and the fix
        resume = (f" Rerun with --resume to continue from the checkpoints written every "
                  f"{args.checkpoint_every} batches ({args.checkpoint}[.rank<r>])."
                  if args.checkpoint is not None and args.checkpoint_every else "")
        raise UserError(f"{first_line(err)}{resume}") from None
    if args.tune_sigma_noise:
        from laplace_llm.prior.regression import optimize_prior_and_noise

        optimize_prior_and_noise(la, prior_structure=args.prior_structure or "scalar")
    elif args.prior_optimization == "marglik":
        la.optimize_prior_precision(
            method="marglik", init_prior_prec=args.prior_precision,
            prior_structure=args.prior_structure, progress_bar=not quiet,
        )
    lml = float(la.log_marginal_likelihood().item())
    if not main_process:
        _remove_checkpoint(checkpoint)  # its shard's sum is in rank 0's posterior
        return 0
    try:
        la.save(posterior)
    except OSError as err:
        raise UserError(f"--posterior {posterior}: cannot write it: {err.strerror or err}") from None
    except PosteriorFileError as err:
        raise UserError(f"--posterior: {err}") from None
    _remove_checkpoint(checkpoint)
    print(f"fitted {structure} on {la.n_data} records ({la.n_params} LoRA weights, "
          f"{la.n_layers} blocks) in {time.perf_counter() - started:.1f} s"
          + (f" by {world} processes" if world > 1 else "")
          + (" (FSDP2-sharded model)" if args.fsdp and world > 1 else ""))
    prior = la.prior_precision.detach().reshape(-1)
    prior_text = f"{prior.item():.4g}" if prior.numel() == 1 else (
        f"{prior.numel()} values in [{prior.min().item():.4g}, {prior.max().item():.4g}]")
    print(f"prior precision {prior_text}, log marginal likelihood {lml:.2f}")
    if likelihood == "regression":
        print(f"sigma_noise {float(la.sigma_noise):.4g}")
    if structure == "kron":
        _print_low_rank_summary(la, args.min_trace_share)
    print(f"wrote {posterior}")
    return 0


def _checkpoint_arguments(args: argparse.Namespace, world: int) -> tuple[Path | None, Path | None]:
    """Return this process's checkpoint file and the file to resume (``None`` for none).

    ``--resume`` resumes the ``--checkpoint`` file if it exists; a process without one
    (killed before its first checkpoint) fits its shard from the first batch, which the
    sum over processes allows.
    """
    from laplace_llm.posterior.checkpoint import checkpoint_file

    if args.checkpoint is None:
        for flag, given in (("--checkpoint-every", args.checkpoint_every is not None),
                            ("--resume", args.resume)):
            if given:
                raise UserError(f"{flag} needs --checkpoint FILE (the file to write and "
                                "resume the fit's checkpoint)")
        return None, None
    mine = checkpoint_file(args.checkpoint, distributed=world > 1)
    if not args.resume:
        return mine, None
    if not mine.exists():
        logger.warning("--resume: no checkpoint at %s yet; fitting from the first batch", mine)
        return mine, None
    return mine, Path(args.checkpoint)


def checkpoint_written(path: str) -> bool:
    """Whether a fit checkpoint of ``--checkpoint path`` exists (one process's at least)."""
    from laplace_llm.posterior.checkpoint import checkpoint_file

    mine = checkpoint_file(path)
    return mine.is_file() or any(mine.parent.glob(f"{mine.name}.rank*"))


def _remove_checkpoint(path: Path | None) -> None:
    """Delete this process's fit checkpoint once the fit it holds is complete."""
    if path is not None and path.is_file():
        path.unlink()
        logger.info("removed the fit checkpoint %s (the fit is complete)", path)


def _print_low_rank_summary(la: Any, threshold: float) -> None:
    from laplace_llm.tools.diagnostics import format_low_rank_report

    report = la.low_rank_report()
    print(format_low_rank_report(report, threshold=threshold).splitlines()[0])
    low = [r for r in report if r.share_kept is not None and r.share_kept < threshold]
    for r in low:
        print(f"warning: {r.block} factor {r.factor} (side {r.side}) keeps {r.share_kept:.3f} "
              f"of its trace at --n-kfac {r.n_kfac} (< {threshold}); raise --n-kfac for a "
              "closer posterior", file=sys.stderr)
    if low:
        logger.info("low-rank report:\n%s", format_low_rank_report(report, threshold=threshold))
