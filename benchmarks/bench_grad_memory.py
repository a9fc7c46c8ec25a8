"""Peak memory of ``fit`` beyond its floor: output gradients added in the backward or gathered.

A Llama-shaped model (random weights, ``--hidden``, ``--layers``) with LoRA r=8 on every
linear layer of its blocks, one batch of ``--batch`` sequences of ``--seq`` tokens. Each
measurement runs in a fresh process, without a warm-up step (a warm-up's freed blocks
are reused and not counted, which hides the workspace), and reports the resident
high-water mark above the level before the step (model built, data made) (``peak_meter`` of
``_results.py``, CPU): the floor (forward + backward of the LoRA weights), ``fit`` with
the output gradients added to the G factors inside the backward, layer by layer (the
default, ``LoRAKFAC.stream_output_gradients = True``), and ``fit`` gathering every
layer's output gradient for the batch first (``False``, the path before). The difference
between the two fits is the output-gradient workspace that issue 21 asks to remove
(predicted: ``Σ_layers B·T·d_out`` floats per probe).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_grad_memory.py --out
benchmarks/results/grad-memory-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from _results import peak_meter, write_results  # benchmarks/ is the script's folder

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def one(kind: str, hidden: int, layers: int, batch: int, seq: int) -> int:
    from bench_peers import llama_config
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from laplace_llm import LLMClassifier, LoRALaplace
    from laplace_llm.curvature.kfac import LoRAKFAC

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**llama_config(hidden, layers))).eval()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                             lora_dropout=0.0))
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.kind:  # the child process
        print(json.dumps(one(args.kind, args.hidden, args.layers, args.batch, args.seq)))
        return
    rows = []
    for kind in ("floor", "fit (streamed)", "fit (gathered)"):
        out = subprocess.run(
            [sys.executable, __file__, "--kind", kind, "--hidden", str(args.hidden), "--layers",
             str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)],
            capture_output=True, text=True, check=True)
        rows.append({"kind": kind, "peak_bytes": json.loads(out.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    floor = rows[0]["peak_bytes"]
    lines = [f"hidden {args.hidden}, {args.layers} layers, LoRA r=8 on every linear layer, "
             f"{args.batch}×{args.seq} tokens, mc; resident peak above the step's start, MiB",
             "", "| run | peak MiB | beyond the floor MiB |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['peak_bytes'] / 2**20:.0f} | "
                     f"{(r['peak_bytes'] - floor) / 2**20:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_results(args.out, rows, table)


if __name__ == "__main__":
    main()
