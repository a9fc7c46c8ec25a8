"""Where a fit's time over its floor goes: wall time inside each part of ``LoRALaplace.fit``.

``bench_fit_ratio.py`` gives the fit's time over its floor (forward and backward over
the fit data); this script splits that difference. It wraps the functions that do each
part of the fit with timers (exclusive time: a part's time less that of the timed parts
it calls), runs ``--repeat`` rounds of the floor and the default fit in turns, and
reports the median per fit of each part, in the fit and in the floor:

- ``forward``: the model's forward (``LLMClassifier.forward``), with the fit's hooks
  that record the LoRA modules' inputs and outputs;
- ``backward``: ``torch.autograd.grad`` less the output-gradient hooks' timed parts (in
  the floor, the floor less its forward);
- ``sketch products``: ``LowRankFactor.append_``, the two products per batch and factor
  that take columns into a sketch, and its exact trace, less the adaptation;
- ``adaptation``: ``LowRankFactor._adapt``, once per factor (the first batch's sketch
  with the Gaussian ``Ω``, its range and the adapted columns' products);
- ``decomposition``: ``finalise_sketches``, the sketches into rank-``k`` roots, once;
- ``dense factors``: the small factors (sides at most ``lr_threshold``), one ``addmm_`` each;
- ``columns``: the output gradients and inputs as factor columns, and the rows of
  zeros left out (``_g_columns``, ``_a_columns``, ``_accumulate`` of a low-rank factor
  less its ``append_``);
- ``the rest``: what no timer holds (building the ``LoRALaplace``, the probes and the
  loss, the batch checks, the posterior's decomposition, the data loader).

The timers cost about a microsecond per call (a few hundred calls per fit), so the fit
timed here is slower than untimed by well under a millisecond. Model and data are those
of ``bench_fit_ratio.py`` (issue 31's small fit at ``--hidden 512``).

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.perf.bench_fit_parts --repeat 15 --out
benchmarks/results/fit-parts-cpu.json``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings

import torch
from torch.utils.data import DataLoader

from benchmarks.common.args import parser
from benchmarks.common.models import Tokens, floor
from benchmarks.common.results import finish
from benchmarks.perf.bench_fit_ratio import build
from laplace_llm import LoRALaplace
from laplace_llm.curvature import kfac_accumulation
from laplace_llm.matrix import LowRankFactor
from laplace_llm.matrix import factor as factor_module
from laplace_llm.matrix import kron as kron_module
from laplace_llm.models.classifier import LLMClassifier

warnings.filterwarnings("ignore")

PARTS = ["forward", "backward", "sketch products", "adaptation", "decomposition",
         "dense factors", "columns", "the rest"]


class Timers:
    """Exclusive wall time per label: a timed call's time less that of the timed calls in it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []  # [label, start, time of timed calls inside]

    def reset(self) -> None:
        self.totals.clear()

    def wrap(self, fn, label):
        """``fn`` timed under ``label`` (a string, or a function of the call's arguments)."""

        def timed(*args, **kwargs):
            name = label(*args) if callable(label) else label
            self._stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                name, start, inner = self._stack.pop()
                elapsed = time.perf_counter() - start
                self.totals[name] = self.totals.get(name, 0.0) + elapsed - inner
                if self._stack:
                    self._stack[-1][2] += elapsed

        return timed


@contextlib.contextmanager
def timed_parts(timers: Timers):
    """Put the timers into the fit's functions; take them out again on leaving."""
    slots = [
        (LLMClassifier, "forward", "forward"),
        (torch.autograd, "grad", "backward"),
        (LowRankFactor, "append_", "sketch products"),
        (LowRankFactor, "_adapt", "adaptation"),
        (kron_module, "finalise_sketches", "decomposition"),
        (factor_module, "finalise_sketches", "decomposition"),
        (kfac_accumulation, "_accumulate",
         lambda F, *a: "columns" if isinstance(F, LowRankFactor) else "dense factors"),
        (kfac_accumulation.KFACAccumulation, "_g_columns", "columns"),
        (kfac_accumulation.KFACAccumulation, "_a_columns", "columns"),
    ]
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in slots]
    try:
        for owner, attr, label in slots:
            setattr(owner, attr, timers.wrap(getattr(owner, attr), label))
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def split(total: float, parts: dict[str, float], floor_run: bool) -> dict[str, float]:
    """One run's seconds per part of :data:`PARTS` (a floor: forward and backward only)."""
    if floor_run:
        fwd = parts.get("forward", 0.0)
        return {"forward": fwd, "backward": total - fwd}
    out = {p: parts.get(p, 0.0) for p in PARTS[:-1]}
    out["the rest"] = total - sum(out.values())
    return out


def main(argv=None):
    args = parser(__doc__.split("\n\n")[0], raw=True, hidden=512, layers=2,
                  targets=["q_proj", "v_proj"], n_fit=64, seq=32, batch_size=8, n_kfac=16,
                  repeat=15, out=None).parse_args(argv)
    clf = build(args.hidden, args.layers, args.targets)
    loader = DataLoader(Tokens(args.n_fit, args.seq, 1024, seed=0), batch_size=args.batch_size)
    timers = Timers()
    runs = {"floor": [], "fit": []}
    with timed_parts(timers):
        for rep in range(args.repeat + 1):  # the first round warms up
            for k in ("floor", "fit"):
                timers.reset()
                t = time.perf_counter()
                if k == "floor":
                    floor(clf, loader)
                else:
                    LoRALaplace(clf, "classification", n_kfac=args.n_kfac, seed=0).fit(loader)
                total = time.perf_counter() - t
                if rep:
                    runs[k].append({"total": total, **split(total, timers.totals, k == "floor")})
    med = {k: {p: statistics.median(r[p] for r in v) for p in v[0]} for k, v in runs.items()}
    over = med["fit"]["total"] - med["floor"]["total"]
    lines = [f"hidden {args.hidden}, {args.layers} layers, LoRA r=8 on {', '.join(args.targets)}, "
             f"{args.n_fit}×{args.seq} tokens, mc, n_kfac {args.n_kfac}; medians of "
             f"{args.repeat} rounds (floor and fit in turns)", "",
             "| part | fit ms | floor ms | fit − floor ms | share of the difference |",
             "|---|---|---|---|---|"]
    for p in PARTS:
        f, fl = 1000 * med["fit"][p], 1000 * med["floor"].get(p, 0.0)
        lines.append(f"| {p} | {f:.1f} | {fl:.1f} | {f - fl:+.1f} | {(f - fl) / (1000 * over):.0%} |")
    f, fl = 1000 * med["fit"]["total"], 1000 * med["floor"]["total"]
    lines.append(f"| **total** | {f:.1f} | {fl:.1f} | {f - fl:+.1f} ({f / fl:.3f}×) | 100% |")
    finish(lines, [{"hidden": args.hidden, "runs": runs, "medians": med}], args.out)
    return med


if __name__ == "__main__":
    main()
