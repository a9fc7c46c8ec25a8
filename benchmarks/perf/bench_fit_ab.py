"""Fit time over the floor with the accumulation code of two commits, interleaved in one process.

A change to the per-batch bookkeeping of a fit moves its time by a few milliseconds, less
than two runs of ``bench_fit_ratio.py`` differ on a shared machine. This script times
both versions side by side in one process: it loads the classes of ``--files`` as they
are at ``--base`` (``git show``; run it inside the repository) next to the working tree's,
and before each fit puts one set or the other into the live classes (every function of
each class defined in both versions; a base method keeps its own module's globals, so
its helpers are the base ones too). Then it runs ``--repeat`` rounds of the floor
(forward and backward over the fit data) and the two fits, base and head in turns
(ABBA), and reports the minima and medians with their ratios to the floor's, and the
median of the rounds' paired differences (head − base) with a bootstrap interval: on a
machine whose speed drifts, a pair timed side by side says more than two minima. Model
and data are those of ``bench_fit_ratio.py`` (issue 31's small fit at ``--hidden 512``).

Run, with a change to those files in the working tree: ``OMP_NUM_THREADS=1 python -m
benchmarks.perf.bench_fit_ab --base HEAD --repeat 40``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import types
import warnings

import torch
from torch.utils.data import DataLoader

from benchmarks.common.args import parser
from benchmarks.common.models import Tokens, floor
from benchmarks.common.results import finish
from benchmarks.perf.bench_fit_ratio import build
from laplace_llm import LoRALaplace

warnings.filterwarnings("ignore")

FILES = ["laplace_llm/curvature/kfac_accumulation.py", "laplace_llm/matrix/factor.py"]


def module_at(commit: str, path: str) -> types.ModuleType:
    """The module ``path`` as it is at ``commit``, loaded under a name of its own."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True,
                            text=True, check=True).stdout
    name = "_base_" + path.removesuffix(".py").replace("/", "_")
    module = types.ModuleType(name)
    module.__file__ = path
    sys.modules[name] = module  # dataclasses and typing look their module up
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def live_module(path: str) -> types.ModuleType:
    import importlib

    return importlib.import_module(path.removesuffix(".py").replace("/", "."))


def class_functions(module: types.ModuleType) -> dict[str, dict[str, object]]:
    """``{class name: {attribute: function}}`` of the classes defined in ``module``."""
    out = {}
    for name, obj in vars(module).items():
        if isinstance(obj, type) and obj.__module__ == module.__name__:
            out[name] = {k: v for k, v in vars(obj).items() if isinstance(v, types.FunctionType)}
    return out


def versions(base: str, files: list[str]):
    """``(classes, {"base": ..., "head": ...})``: the live classes and each version's functions."""
    live, sets = {}, {"base": {}, "head": {}}
    for path in files:
        now, then = live_module(path), module_at(base, path)
        now_f, then_f = class_functions(now), class_functions(then)
        for cls in now_f.keys() & then_f.keys():
            live[(path, cls)] = getattr(now, cls)
            sets["head"][(path, cls)] = now_f[cls]
            sets["base"][(path, cls)] = then_f[cls]
    return live, sets


def use(live, functions) -> None:
    for key, cls in live.items():
        for attr, fn in functions[key].items():
            setattr(cls, attr, fn)


def main(argv=None):
    args = parser(__doc__.split("\n\n")[0], raw=True, base="HEAD~1", files=FILES, hidden=512,
                  layers=2, targets=["q_proj", "v_proj"], n_fit=64, seq=32, batch_size=8,
                  n_kfac=16, repeat=20, out=None).parse_args(argv)
    live, sets = versions(args.base, args.files)
    clf = build(args.hidden, args.layers, args.targets)
    loader = DataLoader(Tokens(args.n_fit, args.seq, 1024, seed=0), batch_size=args.batch_size)

    def fit():
        LoRALaplace(clf, "classification", n_kfac=args.n_kfac, seed=0).fit(loader)

    times = {k: [] for k in ("floor", "base", "head")}
    try:
        for rep in range(args.repeat + 1):  # the first round warms up
            # floor first, then base and head in turns (ABBA), so that a drift of the
            # machine's speed within a round does not favour either
            order = ["base", "head"] if rep % 2 else ["head", "base"]
            for k in ["floor", *order]:
                if k != "floor":
                    use(live, sets[k])
                t = time.perf_counter()
                fit() if k != "floor" else floor(clf, loader)
                if rep:
                    times[k].append(time.perf_counter() - t)
    finally:
        use(live, sets["head"])
    diff = torch.tensor(times["head"]) - torch.tensor(times["base"])  # paired by round
    gen = torch.Generator().manual_seed(0)
    boot = diff[torch.randint(len(diff), (2000, len(diff)), generator=gen)].median(1).values
    lo, hi = (float(q) for q in torch.quantile(boot, torch.tensor([0.025, 0.975])))
    f = min(times["floor"])
    row = {"base": args.base, "files": args.files, "hidden": args.hidden, "times": times,
           **{f"{k}_min_s": min(v) for k, v in times.items()},
           **{f"{k}_median_s": statistics.median(v) for k, v in times.items()},
           "head_minus_base_median_s": float(diff.median()), "interval_95_s": [lo, hi]}
    lines = [f"hidden {args.hidden}, {args.layers} layers, {args.n_fit}×{args.seq} tokens, "
             f"n_kfac {args.n_kfac}; {args.repeat} interleaved rounds; base = "
             f"{args.base} for {', '.join(args.files)}", "",
             "| run | min s (× floor) | median s (× floor) |", "|---|---|---|"]
    fm = statistics.median(times["floor"])
    for k, v in times.items():
        m, md = min(v), statistics.median(v)
        lines.append(f"| {k} | {m:.4f} ({m / f:.3f}×) | {md:.4f} ({md / fm:.3f}×) |")
    lines += ["", f"head − base, median of the {len(diff)} rounds' paired differences: "
              f"{1000 * float(diff.median()):+.1f} ms (bootstrap 95 % interval "
              f"[{1000 * lo:+.1f}, {1000 * hi:+.1f}] ms)"]
    finish(lines, [row], args.out)


if __name__ == "__main__":
    main()
