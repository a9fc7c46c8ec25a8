"""Peak memory of ``fit`` beyond its floor: output gradients added in the backward or gathered.

A Llama-shaped model (random weights, ``--hidden``, ``--layers``) with LoRA r=8 on every
linear layer of its blocks, one batch of ``--batch`` sequences of ``--seq`` tokens. Each
measurement runs in a fresh process, without a warm-up step (a warm-up's freed blocks
are reused and not counted, which hides the workspace), and reports the resident
high-water mark above the level before the step (model built, data made) (``peak_meter`` of
``benchmarks/common/results.py``, CPU): the floor (forward + backward of the LoRA weights), ``fit`` with
the output gradients added to the G factors inside the backward, layer by layer (the
default, ``LoRAKFAC.stream_output_gradients = True``), and ``fit`` gathering every
layer's output gradient for the batch first (``False``, the path before). The difference
between the two fits is the output-gradient workspace that issue 21 asks to remove
(predicted: ``Σ_layers B·T·d_out`` floats per probe).

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.perf.bench_grad_memory --out
benchmarks/results/grad-memory-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess

import torch

from benchmarks.common.args import parser
from benchmarks.common.results import finish, module_command, peak_meter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one(kind: str, hidden: int, layers: int, batch: int, seq: int) -> int:
    from torch import nn

    from benchmarks.common.models import llama_config, lora_llama
    from laplace_llm import LLMClassifier, LoRALaplace
    from laplace_llm.curvature.kfac import LoRAKFAC

    torch.set_num_threads(1)
    model = lora_llama(llama_config(hidden, layers), TARGETS, b_std=None)
    clf = LLMClassifier(model, [10, 11, 12, 13]).eval()
    x = {"input_ids": torch.randint(0, 1000, (batch, seq)),
         "attention_mask": torch.ones(batch, seq, dtype=torch.long),
         "labels": torch.randint(0, 4, (batch,))}
    loader = [x]

    class Loader(list):
        dataset = [0] * batch

    loader = Loader(loader)
    if kind == "floor":
        def step():
            f = clf(x)
            nn.functional.cross_entropy(f, x["labels"], reduction="sum").backward()
            clf.zero_grad(set_to_none=True)
    else:
        LoRAKFAC.stream_output_gradients = kind == "fit (streamed)"

        def step():
            LoRALaplace(clf, "classification", seed=0).fit(loader)
    # no warm-up: freed blocks of an earlier step would be reused and not counted
    start, stop = peak_meter("cpu")
    base = start()
    step()
    return stop(base)


def main(argv=None):
    args = parser(__doc__.split("\n\n")[0], hidden=1024, layers=4, batch=4, seq=512,
                  kind=dict(default=None, help=argparse.SUPPRESS), out=None).parse_args(argv)
    if args.kind:  # the child process
        print(json.dumps(one(args.kind, args.hidden, args.layers, args.batch, args.seq)))
        return
    rows = []
    for kind in ("floor", "fit (streamed)", "fit (gathered)"):
        cmd, env = module_command(__spec__.name, [
            "--kind", kind, "--hidden", str(args.hidden), "--layers", str(args.layers),
            "--batch", str(args.batch), "--seq", str(args.seq)])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append({"kind": kind, "peak_bytes": json.loads(out.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    floor = rows[0]["peak_bytes"]
    lines = [f"hidden {args.hidden}, {args.layers} layers, LoRA r=8 on every linear layer, "
             f"{args.batch}×{args.seq} tokens, mc; resident peak above the step's start, MiB",
             "", "| run | peak MiB | beyond the floor MiB |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['peak_bytes'] / 2**20:.0f} | "
                     f"{(r['peak_bytes'] - floor) / 2**20:.0f} |")
    finish(lines, rows, args.out)


if __name__ == "__main__":
    main()
