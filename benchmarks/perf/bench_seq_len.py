"""Long sequences: peak memory of fit and of the GLM predictive as T grows, at two vocabularies.

A 2-layer Llama-shaped model (``--hidden``, LoRA r=8 on q_proj and v_proj with random
non-zero B) read out by ``LLMClassifier`` at 4 answer tokens (centred), at a small
vocabulary and a large one (``--vocabs``, default 1,024 and SmolLM2's 49,152), for each
sequence length T of ``--lengths`` (batch 1, ``--n-fit`` sequences):

- the **floor**: one forward + backward of the LoRA weights (summed cross-entropy) over
  the fit data;
- ``LoRALaplace.fit`` (``n_kfac`` 16) with ``fisher_type="mc"`` and ``"ggn"``;
- the GLM probit predictive of one sequence (4 backward passes);
- for reference, the floor computed the way the causal LM's own forward computes it:
  the ``(1, T, V)`` logits of every position, then the 4 answers' at the last one (what
  ``LLMClassifier`` avoids).

Peak memory is the extra resident memory of one call, each in a fresh child process
(Linux ``VmHWM`` reset through ``/proc/self/clear_refs`` after ``malloc_trim``, glibc's
mmap threshold fixed at 64 KiB so that freed blocks leave the process); the column
``T·V logits`` is what one ``(1, T, V)`` float32 logits tensor would take, the tensor
``LLMClassifier`` never forms (it applies the LM head to the last real position only).
If anything held per-position vocabulary logits, the large vocabulary's peaks would
exceed the small one's by about that much. Times are the fastest of ``--repeat`` runs in
one process, as ratios to its floor (absolute times on a shared machine are noise).

The table of BENCHMARKS.md::

    OMP_NUM_THREADS=1 python -m benchmarks.perf.bench_seq_len --lengths 256 1024 2048 4096 \\
        --out benchmarks/results/seq-len-cpu.json

``--quick`` uses tiny sizes (for the test that runs this script).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common.args import parser
from benchmarks.common.models import Tokens, floor, llama_config, lora_llama
from benchmarks.common.results import best_time, child_peak_mib, cpu_peak, finish
from laplace_llm import LLMClassifier, LoRALaplace

warnings.filterwarnings("ignore")
METHODS = ("floor", "fit mc", "fit ggn", "glm", "full logits")
TARGETS = [10, 11, 12, 13]


def build(args, vocab: int, T: int) -> LLMClassifier:
    model = lora_llama(llama_config(args.hidden, args.layers, vocab, max_positions=max(T, 512)))
    return LLMClassifier(model, TARGETS, center=True).eval()


def full_logits(clf, batches):
    """The floor the way a causal LM's forward does it: ``(1, T, V)`` logits, then read."""
    targets = clf.target_ids
    for batch in batches:
        out = clf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        f = out.logits[:, -1, targets]
        nn.functional.cross_entropy(f, batch["labels"], reduction="sum").backward()
    clf.zero_grad(set_to_none=True)


def steps(args, clf, vocab, T):
    loader = DataLoader(Tokens(args.n_fit, T, vocab, seed=0), batch_size=1)
    batches = list(loader)
    pred = next(iter(DataLoader(Tokens(1, T, vocab, seed=1), batch_size=1)))
    fns = {
        "floor": lambda: floor(clf, batches),
        "full logits": lambda: full_logits(clf, batches),
        "fit mc": lambda: LoRALaplace(clf, "classification", fisher_type="mc", n_kfac=16,
                                      seed=0).fit(loader),
        "fit ggn": lambda: LoRALaplace(clf, "classification", fisher_type="ggn", n_kfac=16,
                                       seed=0).fit(loader),
    }

    def glm():
        return la(pred, link_approx="probit")

    la = LoRALaplace(clf, "classification", fisher_type="mc", n_kfac=16, seed=0)
    la.fit(loader)
    fns["glm"] = glm
    return fns, batches


def memory_child(args, vocab, T, method):
    """Peak resident growth (bytes) of one call of ``method``, in this fresh process."""
    clf = build(args, vocab, T)
    fns, batches = steps(args, clf, vocab, T)
    floor(clf, batches[:1])  # warm-up of the model's lazy initialisations
    return cpu_peak(fns[method])


def measure_memory(args, vocab, T, method):
    return child_peak_mib(__spec__.name, [
        "--memory-child", str(vocab), str(T), method, "--hidden", str(args.hidden),
        "--layers", str(args.layers), "--n-fit", str(args.n_fit)])


def run(args, vocab, T) -> list[dict]:
    clf = build(args, vocab, T)
    fns, batches = steps(args, clf, vocab, T)
    floor(clf, batches[:1])  # warm-up
    t_floor = best_time(fns["floor"], max(args.repeat, 2))
    rows = []
    mem = {} if args.no_memory else {m: measure_memory(args, vocab, T, m) for m in METHODS}
    for method in METHODS:
        t = t_floor if method == "floor" else best_time(fns[method], args.repeat)
        row = {"vocab": vocab, "T": T, "method": method, "seconds": t,
               "ratio_to_floor": t / t_floor, "floor_seconds": t_floor,
               "tv_logits_mib": T * vocab * 4 / 2**20}
        if mem:
            row["peak_mib"] = mem[method]
            row["floor_peak_mib"] = mem["floor"]
            row["peak_ratio_to_floor"] = mem[method] / mem["floor"] if mem["floor"] else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    del clf, fns
    gc.collect()
    return rows


def table(rows, args) -> str:
    lines = [
        f"Llama-shaped, hidden {args.hidden}, {args.layers} layers, LoRA r=8 on q,v, C = 4 "
        f"answer tokens; batch 1, {args.n_fit} fit sequences of T tokens; n_kfac 16. Peak: "
        "extra resident MiB of one call in a fresh process; ratios to the floor (one "
        "forward + backward over the fit data) of the same run.",
        "",
        "| V | T | T·V logits (MiB) | floor peak MiB | fit mc: peak (× floor) | fit ggn: peak (× floor) | GLM: peak (× floor) | full-logits floor: peak (× floor) | time × floor: mc / ggn / GLM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {}
    for r in rows:
        by.setdefault((r["vocab"], r["T"]), {})[r["method"]] = r
    for (vocab, T), ms in by.items():
        def peak(m, ms=ms):
            r = ms[m]
            if r.get("peak_mib") is None:
                return "—"
            ratio = r.get("peak_ratio_to_floor")
            return f"{r['peak_mib']:.1f} ({ratio:.2f})" if ratio else f"{r['peak_mib']:.1f}"

        floor_peak = "—" if ms["floor"].get("peak_mib") is None else f"{ms['floor']['peak_mib']:.1f}"
        times = " / ".join(f"{ms[m]['ratio_to_floor']:.1f}" for m in ("fit mc", "fit ggn", "glm"))
        lines.append(f"| {vocab:,} | {T:,} | {ms['floor']['tv_logits_mib']:.0f} | {floor_peak} | "
                     f"{peak('fit mc')} | {peak('fit ggn')} | {peak('glm')} | "
                     f"{peak('full logits')} | {times} |")
    return "\n".join(lines)


def main(argv=None):
    args = parser(
        __doc__.splitlines()[0], lengths=[256, 1024, 2048, 4096], vocabs=[1024, 49152],
        hidden=256, layers=2, n_fit=2, repeat=1, no_memory=False, quick=False, threads=1,
        out=None, memory_child=dict(nargs=3, metavar=("V", "T", "METHOD"), help=argparse.SUPPRESS),
    ).parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.vocabs, args.hidden, args.layers = [16, 64], [128, 2048], 64, 1
    if args.memory_child:
        vocab, T, method = args.memory_child
        print(json.dumps(memory_child(args, int(vocab), int(T), method)))
        return 0
    rows = []
    for vocab in args.vocabs:
        for T in args.lengths:
            rows.extend(run(args, vocab, T))
    finish([table(rows, args)], rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
