"""``laplace-llm demo``.

The offline calibration demo (:mod:`laplace_llm.app.demo`), printed as a table.
"""

from __future__ import annotations

import argparse

from laplace_llm.app.parser import KFAC_DEFAULTS

__all__ = ["cmd_demo"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``laplace-llm demo`` with the parsed ``args``; return the exit status."""
    from laplace_llm.app.demo import DemoConfig, run_demo
    from laplace_llm.app.evaluation import format_table

    cfg = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    cfg.llla = args.llla
    cfg.answers = args.answers
    cfg.pretrained = args.pretrain
    cfg.kfac = cfg.kfac.replace(evidence=args.evidence)
    cfg.prior_structure = args.prior_structure
    log = None  # run_demo also logs each step through `logging`, shown at INFO here
    out = run_demo(cfg, out_dir=args.out, progress=not args.quiet, log=log)
    print(f"laplace-llm demo (seed {cfg.seed}{', quick' if args.quick else ''}"
          f"{', answers in words' if cfg.answers == 'words' else ''}"
          f"{'' if cfg.kfac.evidence == KFAC_DEFAULTS.evidence else f', evidence={args.evidence}'}"
          f"{'' if args.prior_structure is None else f', prior {args.prior_structure}'})")
    print(f"training split: MAP NLL {out['train']['map']['nll']:.3f}, accuracy "
          f"{out['train']['map']['accuracy']:.3f}; best possible held-out NLL "
          f"{out['bayes_nll']:.3f}, accuracy {cfg.p_main:.3f}")
    print(f"prior precision (marglik, mean over blocks) {out['prior_precision']:.3g}, "
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
