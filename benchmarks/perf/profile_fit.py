"""Where the time of ``LoRALaplace.fit`` goes, by operator, against its floor.

Profiles (``torch.profiler``, CPU) the floor — a plain forward and backward of the LoRA
weights over the fit data — and ``fit`` with each accumulation (``sketch``, the default,
and ``truncate``, the incremental truncation it replaced), on the model and data of
``benchmarks/perf/bench_fit_ratio.py``. Prints, per run, the self CPU time of the operators grouped as
matrix products (``mm``, ``addmm``, ``bmm``, ``matmul``, ``linear``), decompositions
(``linalg_eigh``, ``svd``, ``qr``, ``cholesky``), and everything else, and the operators
that ``fit`` spends the most time in beyond the floor. The question it answers: is the
per-batch work of the fit matrix products (GEMM-bound), or small decompositions and
bookkeeping? (On a GPU, the decompositions run one small matrix at a time, so their
count is what matters; see ``tests/matrix/test_truncation.py`` for that count.)

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.perf.profile_fit --hidden 512 --out
benchmarks/results/profile-fit-cpu.json``.
"""

from __future__ import annotations

import json
import os
import platform
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from benchmarks.common.args import parser
from benchmarks.common.models import Tokens, floor
from benchmarks.perf.bench_fit_ratio import build
from laplace_llm import LoRALaplace

GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
        "aten::baddbmm", "aten::addmm_", "aten::einsum", "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
DECOMP = {"aten::linalg_eigh", "aten::_linalg_eigh", "aten::linalg_svd", "aten::_linalg_svd",
          "aten::linalg_qr", "aten::linalg_cholesky_ex", "aten::linalg_eigvalsh"}


def by_op(fn) -> dict[str, float]:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        out[e.key] += e.self_cpu_time_total / 1e6
    return dict(out)


def group(ops: dict[str, float]) -> dict[str, float]:
    g = {"matrix products": 0.0, "decompositions": 0.0, "other": 0.0}
    for k, v in ops.items():
        g["matrix products" if k in GEMM else "decompositions" if k in DECOMP else "other"] += v
    g["total"] = sum(ops.values())
    return g


def main(argv=None):
    args = parser(__doc__.split("\n\n")[0], hidden=512, layers=2, targets=["q_proj", "v_proj"],
                  n_fit=64, seq=32, batch_size=8, n_kfac=16, top=8, out=None).parse_args(argv)
    clf = build(args.hidden, args.layers, args.targets)
    loader = DataLoader(Tokens(args.n_fit, args.seq, 1024, seed=0), batch_size=args.batch_size)
    runs = {
        "floor": lambda: floor(clf, loader),
        "fit (sketch)": lambda: LoRALaplace(clf, "classification", n_kfac=args.n_kfac,
                                            seed=0).fit(loader),
        "fit (truncate)": lambda: LoRALaplace(clf, "classification", n_kfac=args.n_kfac, seed=0,
                                              accumulation="truncate").fit(loader),
    }
    ops = {k: by_op(fn) for k, fn in runs.items()}
    groups = {k: group(v) for k, v in ops.items()}
    lines = [f"hidden {args.hidden}, {args.layers} layers, LoRA on {', '.join(args.targets)}, "
             f"{args.n_fit}×{args.seq} tokens, n_kfac {args.n_kfac}; self CPU seconds",
             "", "| run | matrix products | decompositions | other | total (× floor) |",
             "|---|---|---|---|---|"]
    f_total = groups["floor"]["total"]
    for k, g in groups.items():
        lines.append(f"| {k} | {g['matrix products']:.3f} | {g['decompositions']:.3f} | "
                     f"{g['other']:.3f} | {g['total']:.3f} ({g['total'] / f_total:.2f}×) |")
    for k in ("fit (sketch)", "fit (truncate)"):
        extra = {op: t - ops["floor"].get(op, 0.0) for op, t in ops[k].items()}
        top = sorted(extra.items(), key=lambda kv: -kv[1])[: args.top]
        lines += ["", f"{k}: operators with the most time beyond the floor (s): "
                  + ", ".join(f"{op.replace('aten::', '')} {t:.3f}" for op, t in top)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads")
        with open(args.out, "w") as fh:
            json.dump({"command": "OMP_NUM_THREADS=1 python -m benchmarks.perf.profile_fit "
                       f"--hidden {args.hidden} --out {args.out}", "machine": machine,
                       "groups": groups, "table": text}, fh, indent=1)


if __name__ == "__main__":
    main()
