"""``laplace-llm evaluate``.

Load a saved posterior, report MAP, temperature-scaling and Laplace metrics, and plot them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from laplace_llm.app.loading import (
    UserError,
    check_paths,
    load_classifier_and_tokenizer,
    load_extra_loader,
    lora_error,
)

__all__ = ["cmd_evaluate"]


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``laplace-llm evaluate`` with the parsed ``args``; return the exit status."""
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
        raise lora_error(err, args) from None
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
