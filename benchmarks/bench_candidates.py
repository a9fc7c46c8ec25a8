"""Text candidates: CandidateScorer (one prompt forward, shared KV cache) vs C naive forwards.

The naive model is what one writes without the scorer: for each of the C candidates, a
forward of ``prompt + candidate`` (batch B) through the causal LM, ``.logits`` of every
position over the whole vocabulary, log-softmax, and the sum of the candidate tokens'
log-probabilities. Both models hold the same LoRA weights; the script first checks that
they give the same scores. In one process, fastest of ``--repeat`` runs:

- ``score``: the C scores of one batch without gradients;
- ``fit``: ``LoRALaplace.fit`` (mc Fisher, ``n_kfac`` 16) over ``--n-fit`` examples;
- ``glm``: the GLM probit predictive of one batch (Jacobian-free for both: one forward
  and C backwards).

Peak memory of ``score`` is measured in fresh child processes (Linux: the high-water mark
``VmHWM`` of the resident set, reset through ``/proc/self/clear_refs`` just before the
call, minus the resident set then; glibc's mmap threshold fixed at 128 KiB so that freed
large blocks leave the resident set), at ``--vocab`` and at
twice it, so that the growth with V shows: the scorer forms one position's V logits per
predicted candidate token, ``B·(1 + C·(L−1))·V`` values, the naive model
``B·C·(T+L)·V``.

Default sizes are the issue's: prompt 256 tokens, C = 4 candidates of 8 tokens, batch 2,
a Llama-shaped model (hidden 256, 2 layers, vocabulary 32000), LoRA r=8 on q/v::

    OMP_NUM_THREADS=1 python benchmarks/bench_candidates.py --out benchmarks/results/candidates-cpu-1thread.json

``--quick`` uses tiny sizes (for the tests that run this script; ``--vocab`` still applies).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import warnings

import torch
from _results import write_results  # benchmarks/ is the script's folder
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from laplace_llm import CandidateScorer, LoRALaplace

warnings.filterwarnings("ignore")


class NaiveScorer(nn.Module):
    """C forwards of prompt + candidate with full-vocabulary logits (equal lengths)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        ids, cand = x["input_ids"], x["candidate_ids"]
        B, C, L = cand.shape
        T = ids.shape[1]
        scores = []
        for c in range(C):
            full = torch.cat([ids, cand[:, c]], 1)
            logp = self.model(input_ids=full, use_cache=False).logits.log_softmax(-1)
            picked = logp[:, T - 1 : T - 1 + L].gather(-1, cand[:, c, :, None])
            scores.append(picked.sum((1, 2)))
        return torch.stack(scores, 1)


class Items(torch.utils.data.Dataset):
    def __init__(self, n, T, C, L, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(10, vocab, (n, T), generator=g)
        self.cand = torch.randint(10, vocab, (n, C, L), generator=g)
        self.labels = torch.randint(0, C, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "candidate_ids": self.cand[i], "labels": self.labels[i]}


def build(args, vocab):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=int(2.6875 * args.hidden),
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=4096,
    )
    base = LlamaForCausalLM(cfg).eval()
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                           lora_dropout=0.0, init_lora_weights=False)).eval()
    return peft


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_child(args, method, vocab):
    """Peak resident-set growth (MiB) of one scoring call, in this process."""
    peft = build(args, vocab)
    model = CandidateScorer(peft, n_candidates=args.candidates) if method == "scorer" else NaiveScorer(peft)
    batch = next(iter(DataLoader(Items(args.batch, args.prompt, args.candidates, args.length,
                                       vocab, 1), batch_size=args.batch)))
    with torch.no_grad():
        model(batch)  # warm-up: lazy initialisations are not the method's cost
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark VmHWM to the current resident set
    with torch.no_grad():
        model(batch)
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure_memory(args, method, vocab):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", method, "--vocab", str(vocab),
           "--prompt", str(args.prompt), "--candidates", str(args.candidates),
           "--length", str(args.length), "--batch", str(args.batch), "--hidden", str(args.hidden),
           "--layers", str(args.layers)]
    # a fixed mmap threshold: glibc would otherwise raise it after the warm-up frees its
    # large blocks, serve the measured call from those resident pages and show no growth
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--length", type=int, default=8, help="tokens per candidate")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=None, help="32000; 500 with --quick")
    p.add_argument("--n-fit", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the child-process memory runs")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    p.add_argument("--out", default=None, help="write the rows and table as JSON here")
    p.add_argument("--memory-child", choices=("scorer", "naive"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.prompt, args.candidates, args.length, args.batch = 12, 3, 3, 2
        args.hidden, args.layers, args.n_fit, args.repeat = 64, 1, 4, 1
    if args.vocab is None:
        args.vocab = 500 if args.quick else 32000
    if args.memory_child:
        print(memory_child(args, args.memory_child, args.vocab))
        return 0

    peft = build(args, args.vocab)
    scorer = CandidateScorer(peft, n_candidates=args.candidates)
    naive = NaiveScorer(peft)
    items = Items(args.n_fit, args.prompt, args.candidates, args.length, args.vocab, 0)
    loader = DataLoader(items, batch_size=args.batch)
    batch = next(iter(DataLoader(Items(args.batch, args.prompt, args.candidates, args.length,
                                       args.vocab, 1), batch_size=args.batch)))
    with torch.no_grad():
        gap = (scorer(batch) - naive(batch)).abs().max().item()
    rows = []
    for name, model in (("scorer", scorer), ("naive", naive)):
        with torch.no_grad():
            score_s = timed(lambda m=model: m(batch), args.repeat)
        la = LoRALaplace(model, "classification", n_kfac=16, seed=0)
        fit_s = timed(lambda la_=la: la_.fit(loader), args.repeat)
        glm_s = timed(lambda la_=la: la_(batch, link_approx="probit"), args.repeat)
        rows.append({"method": name, "score_s": score_s, "fit_s": fit_s, "glm_s": glm_s})
    T, C, L, B, V = args.prompt, args.candidates, args.length, args.batch, args.vocab
    rows[0]["logit_values"] = B * (1 + C * (L - 1)) * V
    rows[1]["logit_values"] = B * C * (T + L) * V
    if not args.no_memory:
        for row in rows:
            row["peak_mib"] = measure_memory(args, row["method"], V)
            row["peak_mib_2v"] = measure_memory(args, row["method"], 2 * V)

    lines = [
        f"prompt {T} tokens, C={C} candidates of {L} tokens, batch {B}, hidden {args.hidden}, "
        f"{args.layers} layers, vocabulary {V}; max |score difference| {gap:.1e}",
        "| method | score (s) | fit (s) | GLM probit (s) | logit values formed | peak MiB at V | at 2V |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = "" if row is rows[1] else " ({:.1f}× faster)"
        mem = ("—", "—") if args.no_memory else (f"{row['peak_mib']:.0f}", f"{row['peak_mib_2v']:.0f}")
        lines.append(
            f"| {row['method']} | {row['score_s']:.3f}{ratio.format(rows[1]['score_s'] / row['score_s'])} "
            f"| {row['fit_s']:.3f}{ratio.format(rows[1]['fit_s'] / row['fit_s'])} "
            f"| {row['glm_s']:.3f}{ratio.format(rows[1]['glm_s'] / row['glm_s'])} "
            f"| {row['logit_values']:,} | {mem[0]} | {mem[1]} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_results(args.out, rows, table)
    if gap > 1e-3:
        print(f"scores differ by {gap}: the comparison is void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
