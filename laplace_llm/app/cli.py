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
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from laplace_llm.app.commands.demo import cmd_demo
from laplace_llm.app.commands.evaluate import cmd_evaluate
from laplace_llm.app.commands.fit import checkpoint_written, cmd_fit
from laplace_llm.app.loading import UserError
from laplace_llm.app.parser import build_parser

__all__ = ["main", "build_parser", "COMMANDS"]


EXIT_USER_ERROR = 2


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
        if getattr(args, "checkpoint", None) and checkpoint_written(args.checkpoint):
            resume = (f" (the fit's checkpoint is in {args.checkpoint}: rerun with --resume to "
                      "continue it)")
        print(f"interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
