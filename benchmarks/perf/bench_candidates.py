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

    OMP_NUM_THREADS=1 python -m benchmarks.perf.bench_candidates --out benchmarks/results/candidates-cpu-1thread.json

``--quick`` uses tiny sizes (for the tests that run this script; ``--vocab`` still applies).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common.args import parser
from benchmarks.common.models import llama_config, lora_llama
from benchmarks.common.results import best_time, child_peak_mib, finish, peak_of_call
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
    cfg = llama_config(args.hidden, args.layers, vocab, max_positions=4096,
                       intermediate=int(2.6875 * args.hidden))
    return lora_llama(cfg, b_std=None, init_lora_weights=False)


def memory_child(args, method, vocab):
    """Peak resident-set growth (bytes) of one scoring call, in this process."""
    peft = build(args, vocab)
    model = CandidateScorer(peft, n_candidates=args.candidates) if method == "scorer" else NaiveScorer(peft)
    batch = next(iter(DataLoader(Items(args.batch, args.prompt, args.candidates, args.length,
                                       vocab, 1), batch_size=args.batch)))
    with torch.no_grad():
        return peak_of_call(lambda: model(batch))


def measure_memory(args, method, vocab):
    return child_peak_mib(__spec__.name, [
        "--memory-child", method, "--vocab", str(vocab), "--prompt", str(args.prompt),
        "--candidates", str(args.candidates), "--length", str(args.length), "--batch",
        str(args.batch), "--hidden", str(args.hidden), "--layers", str(args.layers)],
        # a fixed mmap threshold: glibc would otherwise raise it after the warm-up frees its
        # large blocks, serve the measured call from those resident pages and show no growth
        mmap_threshold=128 * 1024)


def main(argv=None):
    args = parser(
        __doc__.splitlines()[0], prompt=256, candidates=4,
        length=dict(default=8, type=int, help="tokens per candidate"), batch=2, hidden=256,
        layers=2, vocab=dict(default=None, type=int, help="32000; 500 with --quick"), n_fit=8,
        repeat=2, no_memory=False, quick=False, out=None,
        memory_child=dict(choices=("scorer", "naive"), help=argparse.SUPPRESS),
    ).parse_args(argv)
    if args.quick:
        args.prompt, args.candidates, args.length, args.batch = 12, 3, 3, 2
        args.hidden, args.layers, args.n_fit, args.repeat = 64, 1, 4, 1
    if args.vocab is None:
        args.vocab = 500 if args.quick else 32000
    if args.memory_child:
        print(json.dumps(memory_child(args, args.memory_child, args.vocab)))
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
            score_s = best_time(lambda m=model: m(batch), args.repeat)
        la = LoRALaplace(model, "classification", n_kfac=16, seed=0)
        fit_s = best_time(lambda la_=la: la_.fit(loader), args.repeat)
        glm_s = best_time(lambda la_=la: la_(batch, link_approx="probit"), args.repeat)
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
    finish(lines, rows, args.out)
    if gap > 1e-3:
        print(f"scores differ by {gap}: the comparison is void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
