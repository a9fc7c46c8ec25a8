"""Latency of the small symmetric eigendecompositions that truncate low-rank factors.

Each truncation of a low-rank K-FAC factor (``laplace_llm.matrix.compress_root``)
eigendecomposes an ``m × m`` float64 Gram matrix: the root grows by ``chunk`` columns
and is truncated once it holds more than ``n_kfac + chunk``, so ``m`` is up to
``n_kfac + 2·chunk`` (80 at the defaults ``n_kfac`` 16, chunk 32), and a fit truncates
every large factor about ``positions / (2·chunk)`` times per batch. On a CPU one such eigh takes tens of µs; on a GPU
it is a kernel launch plus a synchronisation. ``laplace_llm.matrix.append_many`` batches
the truncations due at the same step into one ``eigh`` call, and this script measures
what that buys on the machine it runs on: for each size ``m`` and batch ``n``, the
milliseconds per ``torch.linalg.eigh`` call (synchronised) on the GPU, on the CPU, and
on the CPU for Grams that live on the GPU (copied over and the eigenvectors back).

Run::

    python -m benchmarks.perf.gpu_eigh --out benchmarks/results/gpu-eigh.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common.results import finish


def grams(n: int, m: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    R = torch.randn(n, 4 * m, m, generator=g, dtype=torch.float64)
    return (R.transpose(1, 2) @ R).to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def per_call_ms(fn, device, repeats: int) -> float:
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
        sync(device)
    return 1e3 * (time.perf_counter() - t0) / repeats


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 80, 144])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 96])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    rows = []
    for m in args.sizes:
        for n in args.batches:
            row = {"m": m, "n": n}
            cpu = grams(n, m, "cpu")
            row["cpu_ms"] = per_call_ms(lambda x=cpu: torch.linalg.eigh(x), "cpu", args.repeats)
            if cuda:
                gpu = grams(n, m, "cuda")
                row["gpu_ms"] = per_call_ms(lambda x=gpu: torch.linalg.eigh(x), "cuda",
                                            args.repeats)

                def round_trip(x=gpu):
                    _, w = torch.linalg.eigh(x.cpu())
                    return w.to("cuda", non_blocking=True)

                row["gpu_to_cpu_ms"] = per_call_ms(round_trip, "cuda", args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = ["| m | n | CPU ms/call | GPU ms/call | GPU Grams, CPU eigh ms/call |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['m']} | {r['n']} | {r['cpu_ms']:.3f} | "
                     f"{r.get('gpu_ms', float('nan')):.3f} | "
                     f"{r.get('gpu_to_cpu_ms', float('nan')):.3f} |")
    table = finish(lines, rows, args.out)
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    main()
