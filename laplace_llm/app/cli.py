"""``laplace-llm``: the demo, and Laplace posteriors for your own fine-tuned model.

Subcommands::

    laplace-llm demo       generated task, over-confident LoRA fine-tune, MAP vs Laplace
    laplace-llm fit        fit a LoRA Laplace posterior on a model + adapter, save it
    laplace-llm evaluate   load a saved posterior, report MAP vs Laplace metrics and plots

User errors (missing files, unreadable data, a posterior of another model, a model without
LoRA weights) end with one line on stderr and exit status 2; ``--help`` documents every
option.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from laplace_llm import options as kfac_options
from laplace_llm.app.loading import (
    UserError,
    check_paths,
    first_line,
    load_classifier,
    load_classifier_and_tokenizer,
    load_extra_loader,
)
from laplace_llm.posterior.full import MAX_FULL_PARAMS

KFAC_DEFAULTS = kfac_options.KFACOptions()

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


# ---------------------------------------------------------------------- parser
_positive_int = kfac_options.int_at_least(1)
_non_negative_int = kfac_options.int_at_least(0)


def _positive_seconds(text: str) -> float:
    """Parse a positive finite number of seconds (``--timeout``)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quiet", action="store_true",
        help="no progress bars and no stage messages; results are still printed",
    )
    p.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N",
        help="torch CPU threads (default: torch's choice; 1 is fastest for tiny models)",
    )


def _add_model_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model", required=True, metavar="DIR",
        help="local Hugging Face model folder (config.json + weights + tokenizer), a causal "
        "LM or a sequence-classification model; nothing is downloaded",
    )
    g.add_argument(
        "--gguf-file", metavar="NAME", default=None,
        help="a GGUF model file inside the --model folder (e.g. SmolLM2's "
        "SmolLM2-135M-Instruct.Q4_1.gguf): its weights are dequantized to float32 and its "
        "tokenizer is read from the same file; needs `pip install gguf`",
    )
    g.add_argument(
        "--adapter", metavar="DIR",
        help="peft LoRA adapter folder (adapter_config.json) fine-tuned on --model; without "
        "it --model itself must contain trainable LoRA layers, which plain HF folders do not",
    )
    g.add_argument(
        "--data", required=True, metavar="FILE.jsonl",
        help="JSON-lines data, one record per line of the --kind format",
    )
    g.add_argument(
        "--kind", choices=("mcqa", "text", "preference", "scores"), default="mcqa",
        help="record format: mcqa {question, choices, answer}; text {text, label}; "
        "preference {prompt, chosen, rejected} (reward models, Bradley-Terry likelihood); "
        "scores {text, target: number or list of k numbers} (regression, e.g. a "
        "num_labels=k regression head). Default: mcqa",
    )
    g.add_argument(
        "--choices", nargs="+", metavar="STR",
        help="causal LMs: the answer strings whose next-token logits are the classes, each "
        "one token, e.g. --choices ' A' ' B' ' C' ' D' (mind the leading space). Default "
        "for --kind mcqa: ' A', ' B', ... as many as the records have options. Not used "
        "with sequence-classification models, whose head gives the classes",
    )
    g.add_argument(
        "--answer-format", choices=("letter", "text"), default="letter",
        help="--kind mcqa with a causal LM: 'letter' lists the choices as A., B., ... in the "
        "prompt and scores the letters; 'text' scores each question's own choices by their "
        "log-likelihood after the prompt (choices of any length, any number per question). "
        "--kind text picks text scoring by itself when a --choices string is several "
        "tokens. Default: letter",
    )
    g.add_argument(
        "--batch-size", type=_positive_int, default=8, metavar="N",
        help="batch size of fitting and prediction (default: 8)",
    )
    g.add_argument(
        "--max-length", type=_positive_int, default=None, metavar="N",
        help="keep only the last N tokens of each sequence (default: no truncation)",
    )
    g.add_argument(
        "--stream", action="store_true",
        help="read the JSONL files line by line while fitting or predicting, instead of "
        "into memory, for data sets too large to hold: one first pass checks every line "
        "and counts the records. Automatic for files over 512 MiB",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the ``laplace-llm`` argument parser (subcommands ``demo``, ``fit``, ``evaluate``)."""
    parser = argparse.ArgumentParser(
        prog="laplace-llm",
        description="Laplace posteriors over the LoRA weights of fine-tuned language models "
        "(a laplace-torch backend): calibrated predictions without retraining.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the self-contained demonstration (CPU, a few minutes)",
        description="Pretrain a small Llama on a generated task, LoRA-fine-tune it until "
        "over-confident on a small multiple-choice split, fit a LoRA Laplace posterior, "
        "tune its prior by the marginal likelihood, and compare MAP with the Laplace "
        "predictive (GLM probit and GLM Monte Carlo) on held-out and on shifted questions. "
        "Also reports the log marginal likelihood of earlier fine-tuning checkpoints beside "
        "their held-out NLL. Writes metrics.json and reliability diagrams to --out.",
    )
    demo.add_argument("--seed", type=_non_negative_int, default=0,
                      help="seed of the task, the model and all training (default: 0)")
    demo.add_argument("--out", default="laplace-llm-out", metavar="DIR",
                      help="output folder (default: laplace-llm-out/)")
    demo.add_argument("--quick", action="store_true",
                      help="reduced sizes (about 20 s): for tests and smoke runs")
    demo.add_argument("--llla", action="store_true",
                      help="also put LoRA on lm_head and report last-layer LoRA Laplace "
                      "(only lm_head's LoRA Bayesian) beside Laplace over all LoRA weights")
    demo.add_argument("--answers", choices=("letters", "words"), default="letters",
                      help="lettered options (A-D, one token each) or colours named by "
                      "phrases of 1 to 3 tokens scored by their likelihood (default: letters)")
    demo.add_argument("--pretrain", choices=("shipped", "train", "save"), default="shipped",
                      help="base weights: the ones shipped for this configuration (the same "
                      "numbers on every CPU), else pretrained here; 'train' always pretrains; "
                      "'save' pretrains and writes them into the package (maintainers)")
    default_evidence = KFAC_DEFAULTS.evidence.value
    demo.add_argument("--evidence", choices=tuple(e.value for e in kfac_options.Evidence),
                      default=default_evidence,
                      help="the evidence marglik maximises (see `fit --help`; default: "
                      f"{default_evidence})")
    _add_common(demo)

    fit = sub.add_parser(
        "fit",
        help="fit a Laplace posterior over the LoRA weights and save it",
        description="Fit a Laplace posterior (Kronecker-factored, diagonal or full) over the "
        "LoRA weights of --model + --adapter on --data (classification, reward modelling "
        "or regression), optionally tune its prior precision (and regression noise) by the "
        "marginal likelihood, and save it to --posterior (safetensors). Kron fits print "
        "how much of each large factor's trace --n-kfac keeps.",
    )
    _add_model_data(fit)
    g = fit.add_argument_group("Laplace options")
    kfac_options.add_arguments(g)
    g.add_argument("--prior-optimization", choices=("marglik", "none"), default="marglik",
                   help="tune the prior precision by maximising the marginal likelihood, or "
                   "keep --prior-precision (default: marglik)")
    g.add_argument("--prior-precision", type=float, default=1.0, metavar="P",
                   help="prior precision, or the start of its tuning (default: 1.0)")
    g.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed of the labels sampled by --fisher-type mc (default: 0)")
    g.add_argument("--hessian-structure", choices=("kron", "diag", "full"), default="kron",
                   help="posterior structure over the LoRA weights: Kronecker factors with "
                   "low-rank large sides, diagonal, or dense (small selections only, see "
                   "--max-params) (default: kron)")
    g.add_argument("--max-params", type=_positive_int, default=MAX_FULL_PARAMS, metavar="N",
                   help="--hessian-structure full refuses more LoRA weights than N "
                   f"(default: {MAX_FULL_PARAMS}; the error states the memory it would take)")
    g.add_argument("--lora-modules", nargs="+", metavar="PATTERN",
                   help="only these LoRA layers are Bayesian (names, suffixes or globs, e.g. "
                   "lm_head for last-layer LoRA Laplace, '*.q_proj'); the rest stay at their "
                   "fine-tuned values (default: every LoRA layer)")
    g.add_argument("--fsdp", action="store_true",
                   help="under a launcher: shard the model with FSDP2 (fully_shard on each "
                   "decoder layer and on the classifier) instead of a whole copy per process; "
                   "implied by `accelerate launch --use_fsdp --fsdp_version 2`")
    g.add_argument("--prior-structure", choices=("scalar", "layerwise"), default="scalar",
                   help="one prior precision, or one per LoRA block (weight tensor), tuned by "
                   "the marginal likelihood (default: scalar)")
    g.add_argument("--likelihood", choices=("classification", "regression", "reward_modeling"),
                   help="default: regression for --kind scores, reward_modeling for "
                   "preference, classification otherwise; a different choice is refused")
    g.add_argument("--sigma-noise", type=float, default=1.0, metavar="S",
                   help="regression: observation noise standard deviation, or the start of "
                   "its tuning (default: 1.0)")
    g.add_argument("--tune-sigma-noise", action="store_true",
                   help="regression: tune the noise together with the prior precision by "
                   "the marginal likelihood (laplace-torch's regression recipe)")
    g.add_argument("--min-trace-share", type=float, default=0.5, metavar="F",
                   help="kron: warn when a large Kronecker factor keeps less than this share "
                   "of its trace at --n-kfac (default: 0.5)")
    r = fit.add_argument_group("resuming a long fit")
    r.add_argument("--checkpoint", metavar="FILE",
                   help="write the curvature accumulated so far to FILE (safetensors, written "
                   "atomically) when the process receives SIGTERM or SIGINT, after the "
                   "current batch, and every --checkpoint-every batches; rerun with --resume "
                   "to continue. Under torchrun/accelerate every process writes FILE.rank<r>. "
                   "Removed once the posterior is written")
    r.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                   help="also write --checkpoint every N batches, so that a hard kill (OOM, "
                   "SIGKILL, a lost node) loses at most N batches (default: only on a signal)")
    r.add_argument("--timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="under torchrun/accelerate launch: how long a process waits for the "
                   "others when joining the process group and at each collective step of the "
                   "fit (summing the data size, the curvature's reductions after the batches, "
                   "a sharded model's forward passes) before every waiting process ends with "
                   "an error naming the step and the processes that did not arrive; a process "
                   "that dies ends the others at once. Must exceed how much later the slowest "
                   "process finishes its batches than the fastest (default: the process "
                   "group's own timeout, 30 minutes for gloo)")
    r.add_argument("--resume", action="store_true",
                   help="continue the fit saved in --checkpoint, if that file exists (else "
                   "start from the first batch): its batches are read again but not "
                   "computed, and the posterior equals the uninterrupted fit's. Needs the "
                   "same --model, --adapter, --data, --batch-size, options and --seed")
    fit.add_argument("--posterior", metavar="FILE",
                     help="where to write the posterior (safetensors; missing folders are "
                     "created; an existing folder means its laplace_posterior.safetensors). "
                     "Default: beside the adapter, --adapter/laplace_posterior.safetensors. "
                     "Under torchrun or accelerate launch every process fits its share of "
                     "--data and rank 0 writes")
    _add_common(fit)

    ev = sub.add_parser(
        "evaluate",
        help="report MAP vs Laplace metrics of a saved posterior on data",
        description="Load --posterior for --model + --adapter (refused if it was fitted on "
        "other LoRA weights), predict --data with the MAP model and the Laplace GLM "
        "predictive (probit and Monte Carlo), print accuracy, NLL, Brier score, ECE and "
        "AURC (area under the risk-coverage curve), and write metrics.json, "
        "reliability.png and risk_coverage.png to --out. With --ood-data, also the AUROC "
        "of telling --data from --ood-data by each method's confidence; with --val-data, "
        "also temperature scaling fitted on those labelled records (the baseline).",
    )
    _add_model_data(ev)
    ev.add_argument("--posterior", metavar="FILE",
                    help="posterior file written by `laplace-llm fit` (or `la.save`), or a "
                    "folder holding laplace_posterior.safetensors. Default: the one beside "
                    "the adapter, --adapter/laplace_posterior.safetensors")
    ev.add_argument("--ood-data", metavar="FILE.jsonl",
                    help="out-of-distribution inputs, JSON lines of the --kind format whose "
                    "labels may be missing (any are ignored): report each method's AUROC of "
                    "telling --data from them by max probability and by entropy")
    ev.add_argument("--val-data", metavar="FILE.jsonl",
                    help="labelled validation records of the --kind format, apart from "
                    "--data: fit temperature scaling on them and report it as the 'ts' row "
                    "(the baseline that needs validation data, which Laplace does not)")
    ev.add_argument("--out", default="laplace-llm-out", metavar="DIR",
                    help="output folder (default: laplace-llm-out/)")
    ev.add_argument("--mc-samples", type=_positive_int, default=1000, metavar="N",
                    help="logit samples of the Monte-Carlo predictive (default: 1000)")
    ev.add_argument("--seed", type=_non_negative_int, default=0,
                    help="seed of the Monte-Carlo predictive (default: 0)")
    _add_common(ev)
    return parser


# ---------------------------------------------------------------------- helpers
def _setup(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
        stream=sys.stderr, force=True,
    )
    # Deprecation notices of the libraries and laplace-torch's reminder about the link
    # approximation say nothing to a CLI user, who chooses neither.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*link_approx.*")
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def _lora_error(err: Exception, args: argparse.Namespace) -> UserError:
    hint = "" if args.adapter else " (pass the fine-tuned LoRA adapter with --adapter)"
    return UserError(f"{first_line(err)}{hint}")


# ---------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    from laplace_llm.app.demo import DemoConfig, run_demo
    from laplace_llm.app.evaluation import format_table

    cfg = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    cfg.llla = args.llla
    cfg.answers = args.answers
    cfg.pretrained = args.pretrain
    cfg.kfac = cfg.kfac.replace(evidence=args.evidence)
    log = None  # run_demo also logs each step through `logging`, shown at INFO here
    out = run_demo(cfg, out_dir=args.out, progress=not args.quiet, log=log)
    print(f"laplace-llm demo (seed {cfg.seed}{', quick' if args.quick else ''}"
          f"{', answers in words' if cfg.answers == 'words' else ''}"
          f"{'' if cfg.kfac.evidence == KFAC_DEFAULTS.evidence else f', evidence={args.evidence}'})")
    print(f"training split: MAP NLL {out['train']['map']['nll']:.3f}, accuracy "
          f"{out['train']['map']['accuracy']:.3f}; best possible held-out NLL "
          f"{out['bayes_nll']:.3f}, accuracy {cfg.p_main:.3f}")
    print(f"prior precision (marglik) {out['prior_precision']:.3g}, "
          f"log marginal likelihood {out['log_marglik']:.1f}")
    if out.get("temperature") is not None:
        print(f"temperature scaling (baseline): T = {out['temperature']:.4g} fitted on "
              f"{out['config']['n_val']} labelled validation questions")
    if out.get("llla"):
        print(f"LLLA over {out['llla']['n_params']:,} lm_head LoRA weights: prior precision "
              f"{out['llla']['prior_precision']:.3g}, log marginal likelihood "
              f"{out['llla']['log_marglik']:.1f}")
    print()
    print(format_table(out["results"]))
    print("aurc: area under the risk-coverage curve (lower is better); ood_auroc*: AUROC of "
          "telling id from shift questions by max probability / entropy (higher is better)")
    print()
    print("evidence across fine-tuning checkpoints (held-out = id split):")
    print(f"{'epoch':>6} {'log marglik':>12} {'prior prec':>11} {'NLL MAP':>9} {'NLL LA':>9}")
    for row in out["evidence"]:
        print(f"{row['epoch']:>6} {row['log_marglik']:>12.1f} {row['prior_precision']:>11.3g} "
              f"{row['heldout_nll_map']:>9.4f} {row['heldout_nll_la']:>9.4f}")
    print(f"the evidence picks epoch {out['evidence_choice']}; held-out NLL (Laplace) picks "
          f"epoch {out['heldout_choice']}")
    print()
    for path in out["files"].values():
        print(f"wrote {path}")
    print(f"done in {out['seconds']['total']:.0f} s")
    return 0


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
        raise _lora_error(err, args) from None
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

        optimize_prior_and_noise(la, prior_structure=args.prior_structure)
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


def _checkpoint_written(path: str) -> bool:
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from laplace_llm.app.evaluation import (
        METHODS,
        collect_probs,
        format_table,
        ood_score,
        score,
        write_reliability,
        write_risk_coverage,
    )
    from laplace_llm.errors import LoRAModelError, PosteriorFileError
    from laplace_llm.posterior.kron import LoRALaplace
    from laplace_llm.tools.baselines import TemperatureScaling

    check_paths(args, posterior_must_exist=True)
    for option, path in (("--ood-data", args.ood_data), ("--val-data", args.val_data)):
        if path is not None and not Path(path).is_file():  # fail before loading the model
            raise UserError(f"{option} {path}: no such file")
    clf, loader, likelihood, tokenizer = load_classifier_and_tokenizer(args)
    if likelihood == "regression":
        raise UserError(
            "evaluate reports classification metrics; for a regression posterior (--kind "
            "scores) use the Python API: `la(batch)` returns the predictive mean and variance"
        )
    try:
        la = LoRALaplace.load(args.posterior, clf)
    except LoRAModelError as err:
        raise _lora_error(err, args) from None
    except PosteriorFileError as err:
        raise UserError(f"--posterior: {err}") from None
    if la.likelihood != likelihood:
        raise UserError(
            f"--posterior was fitted with likelihood {la.likelihood!r} but --kind {args.kind} "
            f"needs {likelihood!r}"
        )
    fitting = likelihood == "reward_modeling"
    ood_loader = val_loader = None
    if args.ood_data is not None:
        ood_loader = load_extra_loader(args, clf, tokenizer, args.ood_data, "--ood-data",
                                       labelled=False)
    if args.val_data is not None:
        val_loader = load_extra_loader(args, clf, tokenizer, args.val_data, "--val-data",
                                       labelled=True)
    methods = list(METHODS)
    ts = None
    if val_loader is not None:
        ts = TemperatureScaling(clf)
        try:
            ts.fit(val_loader)
        except ValueError as err:
            raise UserError(f"--val-data: {err}") from None
        methods.insert(1, "ts")
    probs, labels = collect_probs(
        clf, la, loader, methods, mc_samples=args.mc_samples, seed=args.seed,
        progress=not args.quiet, fitting=fitting, ts=ts,
    )
    results = {"data": {m: score(p, labels) for m, p in probs.items()}}
    n_ood = None
    if ood_loader is not None:
        ood_probs, ood_labels = collect_probs(
            clf, la, ood_loader, methods, mc_samples=args.mc_samples, seed=args.seed,
            progress=not args.quiet, desc="predict OOD", fitting=fitting, ts=ts,
        )
        n_ood = len(ood_labels)
        for m in methods:
            results["data"][m].update(ood_score(probs[m], ood_probs[m]))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = write_reliability({m: probs[m] for m in ("map", "la_probit")}, labels,
                            out_dir / "reliability.png")
    rc_png = write_risk_coverage(probs, labels, out_dir / "risk_coverage.png")
    metrics_path = out_dir / "metrics.json"
    report = {
        "results": results,
        "n": len(labels),
        "data": str(args.data),
        "kind": args.kind,
        "model": str(args.model),
        "gguf_file": args.gguf_file,
        "adapter": None if args.adapter is None else str(args.adapter),
        "posterior": str(args.posterior),
        "prior_precision": la.prior_precision.detach().cpu().reshape(-1).tolist(),
        "ood_data": None if args.ood_data is None else str(args.ood_data),
        "n_ood": n_ood,
        "val_data": None if args.val_data is None else str(args.val_data),
        "temperature": None if ts is None else ts.temperature,
        "files": {"metrics": str(metrics_path), "reliability": str(png),
                  "risk_coverage": str(rc_png)},
    }
    with open(metrics_path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print(f"{len(labels)} records of {args.data}" + (
        " (preference pairs: probability that the chosen answer wins)"
        if likelihood == "reward_modeling" else ""))
    if ts is not None:
        print(f"temperature scaling: T = {ts.temperature:.4g} fitted on {args.val_data}")
    print(format_table(results))
    print("aurc: area under the risk-coverage curve (lower is better)" + (
        f"; ood_auroc*: AUROC of telling --data from the {n_ood} records of --ood-data by "
        "max probability / entropy (higher is better)" if n_ood is not None else ""))
    print(f"wrote {metrics_path}")
    print(f"wrote {png}")
    print(f"wrote {rc_png}")
    return 0


COMMANDS = {"demo": cmd_demo, "fit": cmd_fit, "evaluate": cmd_evaluate}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``laplace-llm`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup(args)
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"laplace-llm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        resume = ""
        if getattr(args, "checkpoint", None) and _checkpoint_written(args.checkpoint):
            resume = (f" (the fit's checkpoint is in {args.checkpoint}: rerun with --resume to "
                      "continue it)")
        print(f"interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
