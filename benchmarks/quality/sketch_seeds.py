"""The sketch against the truncation on the wide tiny Llama, over many draws of model and data.

:mod:`benchmarks.quality.sketch_accuracy` measures one wide Llama (``seed`` 0). One draw
cannot say whether a difference is the method's or the draw's. Here each ``seed`` draws
the Llama's weights, LoRA ``B``, its 32 fit and 16 test sequences and the sampled labels
of the mc Fisher anew (:func:`~benchmarks.quality.sketch_accuracy.llama_wide`), and fits
it exactly, by truncation, by the default sketch and by the sketch adapted once (to the
first batch only, ``sketch_readapt=False``, the default before the second adaptation);
the best rank-16 reference is built as there. Per seed: the log-evidence and
GLM-variance relative errors of each variant at the exact fit's marglik prior. Over
seeds: the mean of each, and each sketch's paired difference from the truncation with a
bootstrap 95 % interval over the seeds (resampling seeds, each keeping all of its
variants). An interval that holds 0 is a tie.

Rows are appended to ``--rows`` (JSON lines) as each seed ends, and seeds already there
are skipped, so an interrupted run resumes.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.quality.sketch_seeds --seeds 0-23 --threads 1
--rows benchmarks/results/sketch-seeds.jsonl``; ``--render`` prints the table of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.quality import sketch_accuracy as sa

VARIANTS = {"exact": sa.VARIANTS["exact"], "truncate": sa.VARIANTS["truncate"],
            "sketch": sa.VARIANTS["sketch"],
            "sketch adapted once": sa.VARIANTS["sketch adapted once"]}
#: the sketches compared with the truncation, seed by seed
SKETCHES = ("sketch", "sketch adapted once")
METRICS = {"evidence_rel_error": "log-evidence error", "variance_rel_error": "GLM-variance error"}


def seeds(text: str) -> list[int]:
    """``"0-3,7"`` → ``[0, 1, 2, 3, 7]``."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def paired(a: np.ndarray, b: np.ndarray, reps: int = 10000, seed: int = 0):
    """Mean of ``a − b`` and its bootstrap 95 % interval over the paired rows."""
    d = a - b
    idx = np.random.default_rng(seed).integers(0, len(d), size=(reps, len(d)))
    means = d[idx].mean(1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summary(rows: list[dict]) -> str:
    """Means per variant and each sketch's paired difference from the truncation."""
    n = len(rows)
    sketches = [v for v in SKETCHES if all(v in r["variants"] for r in rows)]
    lines = [f"wide tiny Llama, {n} seeds ({', '.join(str(r['seed']) for r in rows)}); "
             "relative errors against the exact fit at its marglik prior", "",
             "| metric | variant | mean | − truncate's mean (95 % interval) | verdict | "
             "seeds where it is lower |", "|---|---|---|---|---|---|"]
    for key, label in METRICS.items():
        col = {v: np.array([r["variants"][v][key] for r in rows])
               for v in ("truncate", "best rank-16", *sketches)}
        lines.append(f"| {label} | truncate | {col['truncate'].mean():.3e} | | | |")
        for v in sketches:
            mean, lo, hi = paired(col[v], col["truncate"])
            verdict = ("tie" if lo <= 0 <= hi else
                       ("lower than the truncation" if hi < 0 else "higher than the truncation"))
            wins = int((col[v] < col["truncate"]).sum())
            lines.append(f"| {label} | {v} | {col[v].mean():.3e} | {mean:+.2e} ({lo:+.2e}, "
                         f"{hi:+.2e}) | {verdict} | {wins} of {n} |")
        lines.append(f"| {label} | best rank-16 | {col['best rank-16'].mean():.3e} | | | |")
    head = " | ".join(f"{v} / truncate" for v in sketches)
    lines += ["", f"| seed | evidence error: truncate | {head} | best rank-16 / truncate |",
              "|---|---|" + "---|" * len(sketches) + "---|"]
    for r in rows:
        v = r["variants"]
        t = v["truncate"]["evidence_rel_error"]
        ratios = " | ".join(f"{v[s]['evidence_rel_error'] / t:.3f}" for s in sketches)
        lines.append(f"| {r['seed']} | {t:.3e} | {ratios} | "
                     f"{v['best rank-16']['evidence_rel_error'] / t:.3f} |")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=seeds, default=seeds("0-23"))
    ap.add_argument("--n-kfac", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=Path, required=True, help="JSON lines, appended per seed")
    ap.add_argument("--render", action="store_true", help="print the table of --rows, and exit")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_rows(args.rows)
    if not args.render:
        done = {r["seed"] for r in rows}
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads")
        for s in args.seeds:
            if s in done:
                continue
            out = sa.run("llama-wide", args, seed=s, variants=VARIANTS)
            out["machine"] = machine
            out["command"] = "python -m benchmarks.quality.sketch_seeds " + " ".join(
                sys.argv[1:] if argv is None else argv)
            with args.rows.open("a") as fh:
                fh.write(json.dumps(out) + "\n")
            rows.append(out)
            t = out["variants"]["truncate"]["evidence_rel_error"]
            print(f"seed {s}: evidence error over the truncation's: " + ", ".join(
                f"{v} {out['variants'][v]['evidence_rel_error'] / t:.3f}" for v in SKETCHES),
                file=sys.stderr, flush=True)
    rows = sorted((r for r in rows if r["seed"] in set(args.seeds)), key=lambda r: r["seed"])
    print(summary(rows))
    return rows


if __name__ == "__main__":
    main()
