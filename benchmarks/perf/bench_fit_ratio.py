"""Fit time over the floor, with shared and with separate input factors, interleaved.

On a loaded machine a single timing says little, so this script alternates the three
measurements ``--repeat`` times — the floor (plain forward + backward of the LoRA
weights over the fit data), ``LoRALaplace.fit`` with its defaults (shared input factors,
sketched low-rank factors), with ``share_input_factors=False``, and with
``accumulation="truncate"`` (the incremental truncation that was the default before the
sketch) and with ``sketch_adapt=0`` (the sketch's Ω all Gaussian, the default before issue
31) and with ``sketch_readapt=False`` (half of Ω adapted to the first batch only, the
default before the second adaptation) — and reports the minimum and the median of each,
and the ratios of the minima. With ``--memory`` it also measures each one's peak resident
memory: in a fresh single-threaded process per variant, after one warm-up call (lazy
initialisations, the cached test matrices ``Ω``), the growth of the resident high-water
mark over the resident size before the measured call (glibc's mmap threshold fixed, so
that blocks freed by the warm-up leave the resident set and are counted again). Model
and data are those of ``bench_lora_laplace.py`` (Llama-shaped, 2 layers,
LoRA r=8 on ``--targets``, 64 sequences of 32 tokens in batches of 8, mc Fisher,
``n_kfac`` 16).

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.perf.bench_fit_ratio --hidden 512 1024 --repeat 7
--out benchmarks/results/fit-ratio-cpu.json`` (``--memory`` for the peaks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

from torch.utils.data import DataLoader

from benchmarks.common.args import parser
from benchmarks.common.models import Tokens, floor, llama_config, lora_llama
from benchmarks.common.results import child_peak_mib, finish, peak_of_call
from laplace_llm import LLMClassifier, LoRALaplace

warnings.filterwarnings("ignore")


def build(hidden, layers, targets):
    model = lora_llama(llama_config(hidden, layers), targets)
    return LLMClassifier(model, [10, 11, 12, 13]).eval()


#: the variants timed, in the order of the table's columns
VARIANTS = ("floor", "shared", "separate", "truncate", "gaussian", "once")


def steps_of(clf, loader, args) -> dict:
    """The calls timed (or measured): the floor and each variant's fit, by :data:`VARIANTS` key."""
    def fit(**options):
        return lambda: LoRALaplace(clf, "classification", n_kfac=args.n_kfac, seed=0,
                                   **options).fit(loader)

    return {
        "floor": lambda: floor(clf, loader),
        "shared": fit(),
        "separate": fit(share_input_factors=False),
        "truncate": fit(accumulation="truncate"),
        "gaussian": fit(sketch_adapt=0),
        "once": fit(sketch_readapt=False),
    }


def data(args) -> DataLoader:
    return DataLoader(Tokens(args.n_fit, args.seq, 1024, seed=0), batch_size=args.batch_size)


def run(hidden, args) -> dict:
    clf = build(hidden, args.layers, args.targets)
    steps = steps_of(clf, data(args), args)
    for fn in steps.values():  # warm-up
        fn()
    times = {k: [] for k in steps}
    for _ in range(args.repeat):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    row = {"hidden": hidden, "layers": args.layers, "targets": args.targets, "times": times}
    for k in steps:
        row[f"{k}_min_s"] = min(times[k])
        row[f"{k}_median_s"] = statistics.median(times[k])
    if args.memory:
        for k in steps:
            row[f"{k}_peak_mib"] = measure_memory(hidden, k, args)
    return row


def memory_child(args) -> int | None:
    """Peak resident growth (bytes) of one call of ``args.memory_child``, in this process."""
    clf = build(args.hidden[0], args.layers, args.targets)
    return peak_of_call(steps_of(clf, data(args), args)[args.memory_child])


def measure_memory(hidden, key, args) -> float | None:
    """MiB of :func:`memory_child` for variant ``key``, in a fresh process."""
    argv = ["--memory-child", key, "--hidden", str(hidden), "--layers", str(args.layers),
            "--targets", *args.targets, "--n-fit", str(args.n_fit), "--seq", str(args.seq),
            "--batch-size", str(args.batch_size), "--n-kfac", str(args.n_kfac)]
    return child_peak_mib(__spec__.name, argv)


def main(argv=None):
    args = parser(__doc__, raw=True, hidden=[512, 1024], layers=2, targets=["q_proj", "v_proj"],
                  n_fit=64, seq=32, batch_size=8, n_kfac=16, repeat=7, memory=False, out=None,
                  memory_child=dict(choices=VARIANTS, help=argparse.SUPPRESS)).parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return
    rows = []
    for h in args.hidden:
        rows.append(run(h, args))
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"LoRA r=8 on {', '.join(args.targets)}, {args.layers} layers, {args.n_fit}×{args.seq} "
             f"tokens, mc, n_kfac {args.n_kfac}; min (median) of {args.repeat} interleaved runs",
             "", "| hidden | floor s | default (sketch, shared A): fit s (× floor) | separate A "
             "| truncate (before the sketch) | sketch with a Gaussian Ω (sketch_adapt=0) "
             "| Ω adapted once (sketch_readapt=False) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["floor_min_s"]
        lines.append(
            f"| {r['hidden']} | {f:.2f} ({r['floor_median_s']:.2f}) | {r['shared_min_s']:.2f} "
            f"({r['shared_median_s']:.2f}) {r['shared_min_s'] / f:.2f}× | {r['separate_min_s']:.2f} "
            f"({r['separate_median_s']:.2f}) {r['separate_min_s'] / f:.2f}× | "
            f"{r['truncate_min_s']:.2f} ({r['truncate_median_s']:.2f}) "
            f"{r['truncate_min_s'] / f:.2f}× | {r['gaussian_min_s']:.2f} "
            f"({r['gaussian_median_s']:.2f}) {r['gaussian_min_s'] / f:.2f}× | "
            f"{r['once_min_s']:.2f} ({r['once_median_s']:.2f}) {r['once_min_s'] / f:.2f}× |"
        )
    if args.memory:
        names = ["floor", "default", "separate A", "truncate", "Gaussian Ω", "Ω adapted once"]
        lines += ["", "Peak resident memory of one call, MiB (fit − floor), fresh process each",
                  "", "| hidden | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in rows:
            f = r["floor_peak_mib"]
            cells = [f"{f:.1f}"] + [f"{r[k + '_peak_mib']:.1f} ({r[k + '_peak_mib'] - f:+.1f})"
                                    for k in VARIANTS[1:]]
            lines.append(f"| {r['hidden']} | " + " | ".join(cells) + " |")
    finish(lines, rows, args.out)


if __name__ == "__main__":
    main()
