"""The demo across seeds: the per-seed rows and the mean ± std lines of the demo page.

Runs ``laplace_llm.app.demo.run_demo`` (what ``laplace-llm demo --seed S`` runs) for each
seed and evidence, keeps the figures of each run in
``benchmarks/results/demo_seeds/{prior}_{evidence}_seed{S}.json`` (a run already there is
read, not rerun), and prints the tables of ``docs/results/demo.md``'s "Across seeds"
section:

- per seed and split, ``MAP → temperature scaling / Laplace probit / Laplace MC`` for NLL,
  ECE, accuracy, AURC and the OOD AUROC by max probability, then the mean ± std over the
  seeds (``n − 1`` in the denominator);
- the evidence table: laplace-torch's evidence (``map``) against the linearised one, the
  prior per seed and the Laplace rows' mean ± std, in distribution and under shift;
- the shifted split's per-seed NLL and ECE of temperature scaling and both predictives, and
  the shifted AURC's mean ± std, which the page quotes in its reading.

Run (about 2 min per demo on one thread; six demos)::

    OMP_NUM_THREADS=1 python -m benchmarks.quality.demo_seeds --prior-structure scalar

It writes ``benchmarks/results/demo_seeds/table_{prior}.md``, whose lines the docs test
finds verbatim on the demo page.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "demo_seeds"
EVIDENCES = ("map", "linearised")
ORDER = ("map", "ts", "la_probit", "la_mc")
COLUMNS = (("nll", "NLL"), ("ece", "ECE"), ("accuracy", "accuracy"), ("aurc", "AURC"),
           ("ood_auroc", "OOD AUROC (max prob)"))


def run_path(prior: str, evidence: str, seed: int, out: Path = OUT) -> Path:
    return out / f"{prior}_{evidence}_seed{seed}.json"


def run_one(prior: str, evidence: str, seed: int, out: Path = OUT, progress: bool = False) -> dict:
    """The figures of one demo run (read from ``out`` when there, else run and written)."""
    path = run_path(prior, evidence, seed, out)
    if path.exists():
        return json.loads(path.read_text())
    from laplace_llm.app.demo import DemoConfig, run_demo

    cfg = DemoConfig(seed=seed)
    cfg.kfac = cfg.kfac.replace(evidence=evidence)
    cfg.prior_structure = None if prior == "default" else prior
    res = run_demo(cfg, progress=progress)
    keep = {"seed": seed, "prior_structure": prior, "evidence": evidence,
            "prior_precision": res["prior_precision"], "log_marglik": res["log_marglik"],
            "temperature": res["temperature"], "results": res["results"],
            "command": (f"laplace-llm demo --seed {seed}"
                        + ("" if prior == "default" else f" --prior-structure {prior}")
                        + ("" if evidence == "map" else f" --evidence {evidence}"))}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(keep, indent=1))
    return keep


def mean_std(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def arrow(split_res: dict, metric: str, fmt=lambda x: f"{x:.3f}") -> str:
    """``MAP → TS / probit / MC`` of one metric."""
    vals = [fmt(split_res[m][metric]) for m in ORDER]
    return f"{vals[0]} → {' / '.join(vals[1:])}"


def seeds_table(runs: list[dict], split: str = "id") -> str:
    """Per-seed rows and the mean ± std row (MAP → TS / probit / MC)."""
    columns = [(m, label) for m, label in COLUMNS if m in runs[0]["results"][split]["map"]]
    lines = ["| seed | " + " | ".join(label for _, label in columns) + " |",
             "|---" * (1 + len(columns)) + "|"]
    for r in runs:
        res = r["results"][split]
        lines.append(f"| {r['seed']} | " + " | ".join(arrow(res, m) for m, _ in columns) + " |")
    cells = []
    for metric, _ in columns:
        per = [mean_std([r["results"][split][m][metric] for r in runs]) for m in ORDER]
        cells.append(f"{per[0]} → {' / '.join(per[1:])}")
    lines.append("| mean ± std | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evidence_table(by_evidence: dict[str, list[dict]]) -> str:
    """Laplace rows (probit / MC) under each evidence, mean ± std over the seeds."""
    lines = ["| evidence | prior δ (seeds " + ", ".join(str(r["seed"]) for r in
                                                   next(iter(by_evidence.values()))) + ") | "
             "id NLL probit / MC | id ECE probit / MC | shift NLL probit / MC | "
             "shift ECE probit / MC |", "|---|---|---|---|---|---|"]
    for evidence, runs in by_evidence.items():
        cells = [", ".join(f"{r['prior_precision']:.3g}" for r in runs)]
        for split in ("id", "shift"):
            for metric in ("nll", "ece"):
                cells.append(" / ".join(mean_std([r["results"][split][m][metric] for r in runs])
                                        for m in ("la_probit", "la_mc")))
        label = f"`{evidence}`" + (" (default, laplace-torch's)" if evidence == "map" else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shift_lines(runs: list[dict]) -> str:
    """The shifted split's figures the page's reading quotes."""
    out = []
    for metric in ("nll", "ece"):
        for m in ("ts", "la_probit", "la_mc"):
            vals = ", ".join(f"{r['results']['shift'][m][metric]:.3f}" for r in runs)
            out.append(f"- shift {metric.upper()} {m}: {vals}")
    for m in ORDER:
        out.append(f"- shift AURC {m}: {mean_std([r['results']['shift'][m]['aurc'] for r in runs])}")
    return "\n".join(out)


def render(prior: str, seeds: list[int], out: Path = OUT) -> str:
    by_evidence = {e: [json.loads(run_path(prior, e, s, out).read_text()) for s in seeds]
                   for e in EVIDENCES if all(run_path(prior, e, s, out).exists() for s in seeds)}
    runs = by_evidence["map"]
    parts = [f"# The demo across seeds (prior structure: {prior})", "",
             "Printed by `OMP_NUM_THREADS=1 python -m benchmarks.quality.demo_seeds "
             f"--prior-structure {prior}`; each run is `{runs[0]['command']}` with its seed.",
             "", "In distribution (MAP → temperature scaling / Laplace probit / Laplace MC):",
             "", seeds_table(runs, "id"), "", "Under shift:", "", seeds_table(runs, "shift"),
             "", "Evidence:", "", evidence_table(by_evidence), "", "Shifted split:", "",
             shift_lines(runs), ""]
    return "\n".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prior-structure", default="scalar",
                   help="'scalar' (the page's runs), 'layerwise', or 'default' (the library's)")
    p.add_argument("--evidence", nargs="+", default=list(EVIDENCES), choices=EVIDENCES)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--render", action="store_true", help="only print what is stored")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.render:
        for evidence in args.evidence:
            for seed in args.seeds:
                run_one(args.prior_structure, evidence, seed, args.out, progress=not args.quiet)
    text = render(args.prior_structure, args.seeds, args.out)
    (args.out / f"table_{args.prior_structure}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
