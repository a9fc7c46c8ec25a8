"""The parser of the ``laplace-llm`` console script: every subcommand and option.

The curvature options and their defaults come from :class:`~laplace_llm.options.KFACOptions`.
"""

from __future__ import annotations

import argparse

from laplace_llm import options as kfac_options
from laplace_llm.posterior.full import MAX_FULL_PARAMS

__all__ = ["build_parser", "KFAC_DEFAULTS"]


KFAC_DEFAULTS = kfac_options.KFACOptions()


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
    demo.add_argument("--prior-structure", choices=("scalar", "layerwise"), default=None,
                      help="one prior precision, or one per LoRA block (default: layerwise, "
                      "the library's default)")
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
    g.add_argument("--prior-structure", choices=("scalar", "layerwise"), default=None,
                   help="one prior precision, or one per LoRA block (weight tensor), tuned by "
                   "the marginal likelihood (default: layerwise; scalar with "
                   "--tune-sigma-noise)")
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
