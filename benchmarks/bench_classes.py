"""Many answers: fit and predictive cost as the number of classes C grows.

A Llama-shaped model (``--hidden``, 2 layers, LoRA r=8 on q_proj and v_proj with random
non-zero B: a trained adapter) is read out by ``LLMClassifier.from_choices`` over C
single-token answers (``" w0"``, ``" w1"``, … of a word-level tokenizer), and by
``CandidateScorer.from_texts`` over C answers of two tokens (``" w0 w1"``, …), both with
centred logits (``center=True``, as the command line builds them). For each C
of ``--classes`` (``--scorer-classes`` for the scorer), in one process:

- the **floor**: one forward + backward of the LoRA weights (summed cross-entropy) over
  the fit data, and over the prediction batch;
- ``LoRALaplace.fit`` (``n_kfac`` 16) with ``fisher_type="mc"`` (one backward per batch
  whatever C) and ``"ggn"`` (C backwards per batch);
- the GLM probit predictive of the prediction batch (C backwards), with ``top_k`` (the
  covariance of each example's k most probable classes: k backwards; skipped where
  k ≥ C), and the NN-sampling predictive (``pred_type="nn"``, ``--samples`` forwards).

Columns: backward passes per batch (counted by wrapping the backend's
``output_gradients``), seconds and their ratio to the floor of the same process run,
and the peak extra resident memory (MiB) and its ratio to the floor's, each measured in
a fresh child process (Linux ``VmHWM`` reset through ``/proc/self/clear_refs`` after
``malloc_trim``, glibc's mmap threshold fixed at 64 KiB so that freed blocks leave the
process). For ``top_k``: the total-variation distance of its probit predictive from the
full GLM's (beside that of the full GLM from the MAP softmax: how much the GLM moves the
prediction at all), and the MAP probability mass of the classes it leaves out (means
over the batch). Before measuring, the LoRA weights are trained for ``--train-steps``
epochs over the fit data, so that the MAP is confident as a fine-tuned adapter's is. Times are the fastest of ``--repeat`` runs (absolute times on a shared
machine are noise; the ratios are what to read).

The table of BENCHMARKS.md::

    OMP_NUM_THREADS=1 python benchmarks/bench_classes.py --classes 4 16 100 1000 \\
        --scorer-classes 4 16 100 --out benchmarks/results/classes-cpu.json

``--quick`` uses tiny sizes (for the test that runs this script).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import warnings

import torch
from _results import peak_meter, write_results  # benchmarks/ is the script's folder
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from laplace_llm import CandidateScorer, LLMClassifier, LoRALaplace

warnings.filterwarnings("ignore")
METHODS = ("floor", "fit mc", "fit ggn", "glm", "glm top_k", "nn")
SPECIALS = ["<pad>", "<unk>"]


def tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ``<pad>``, ``<unk>``, then ``w0`` … ``w{vocab-3}``."""
    words = SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left")


def build(args, kind: str, C: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=int(round(args.hidden * 2.6875 / 64)) * 64 or 2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 64, 1), max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(cfg).eval()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.02)
    tok = tokenizer(args.vocab)
    if kind == "choices":
        return LLMClassifier.from_choices(model, tok, [f" w{i}" for i in range(C)],
                                          center=True).eval()
    return CandidateScorer.from_texts(model, tok, [f" w{2 * i} w{2 * i + 1}" for i in range(C)],
                                      center=True).eval()


class Items(torch.utils.data.Dataset):
    """``n`` random sequences of ``T`` tokens (ids above every answer's) with labels below C."""

    def __init__(self, n, T, vocab, C, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(vocab // 2, vocab, (n, T), generator=g)
        self.labels = torch.randint(0, C, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def data(args, C):
    loader = DataLoader(Items(args.n_fit, args.seq, args.vocab, C, 0), batch_size=args.batch)
    pred = next(iter(DataLoader(Items(args.batch, args.seq, args.vocab, C, 1),
                                batch_size=args.batch)))
    return loader, pred


def train(clf, loader, steps):
    """Adam on the LoRA weights over the fit data, so that the MAP is confident, as a
    fine-tuned adapter's is (costs do not depend on the weights' values)."""
    params = [p for p in clf.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(clf(batch), batch["labels"]).backward()
            opt.step()
    clf.zero_grad(set_to_none=True)


def floor(clf, batches):
    for batch in batches:
        f = clf(batch)
        nn.functional.cross_entropy(f, batch["labels"], reduction="sum").backward()
    clf.zero_grad(set_to_none=True)


def steps(args, clf, loader, pred, C):
    """Method name → callable; ``la`` (mc, fitted) serves the predictives."""
    batches = list(loader)
    la = LoRALaplace(clf, "classification", fisher_type="mc", n_kfac=16, seed=0)
    la.fit(loader)
    out = {
        "floor": lambda: floor(clf, batches),
        "floor pred": lambda: floor(clf, [pred]),
        "fit mc": lambda: LoRALaplace(clf, "classification", fisher_type="mc", n_kfac=16,
                                      seed=0).fit(loader),
        "fit ggn": lambda: LoRALaplace(clf, "classification", fisher_type="ggn", n_kfac=16,
                                       seed=0).fit(loader),
        "glm": lambda: la(pred, link_approx="probit"),
        "nn": lambda: la(pred, pred_type="nn", link_approx="mc", n_samples=args.samples,
                         generator=torch.Generator().manual_seed(0)),
    }
    if args.top_k < C:
        out["glm top_k"] = lambda: la(pred, link_approx="probit", top_k=args.top_k)
    return out, la


class BackwardCounter:
    """Counts the backward passes (probes) of every LoRA backend while in the context."""

    def __enter__(self):
        from laplace_llm.curvature.kfac import LoRAKFAC

        self.cls, self.original, self.count = LoRAKFAC, LoRAKFAC.output_gradients, 0
        original = self.original

        def counting(backend, f, outputs, probes, keep_graph=False):
            self.count += len(probes)
            return original(backend, f, outputs, probes, keep_graph)

        LoRAKFAC.output_gradients = counting
        return self

    def __exit__(self, *exc):
        self.cls.output_gradients = self.original


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: freed memory may stay, the peaks undercount
        pass


def memory_child(args, kind, C, method):
    """Peak resident growth (bytes) of one call of ``method``, in this fresh process."""
    clf = build(args, kind, C)
    loader, pred = data(args, C)
    fns, _ = steps(args, clf, loader, pred, C)
    floor(clf, [pred])  # warm-up of the model's lazy initialisations
    trim()
    start, stop = peak_meter("cpu")
    base = start()
    fns[method]()
    return stop(base)


def measure_memory(args, kind, C, method):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", kind, str(C), method,
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--seq", str(args.seq), "--batch", str(args.batch), "--n-fit", str(args.n_fit),
           "--samples", str(args.samples), "--top-k", str(args.top_k)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    value = json.loads(out.stdout.strip().splitlines()[-1])
    return None if value is None else value / 2**20


def run(args, kind, C) -> list[dict]:
    clf = build(args, kind, C)
    loader, pred = data(args, C)
    train(clf, loader, args.train_steps)
    fns, la = steps(args, clf, loader, pred, C)
    floor(clf, [pred])  # warm-up
    base = {"model": kind, "C": C}
    t_floor = timed(fns["floor"], max(args.repeat, 3))
    t_floor_pred = timed(fns["floor pred"], max(args.repeat, 3))
    mem = {}
    if not args.no_memory:
        for method in ("floor", "floor pred", *[m for m in METHODS[1:] if m in fns]):
            mem[method] = measure_memory(args, kind, C, method)
    rows = []
    for method in METHODS:
        if method not in fns:
            continue
        fn = fns[method]
        with BackwardCounter() as counter:
            t = t_floor if method == "floor" else timed(fn, args.repeat)
        fit = method.startswith("fit") or method == "floor"
        ref_t = t_floor if fit else t_floor_pred
        row = {**base, "method": method, "seconds": t, "ratio_to_floor": t / ref_t,
               "floor_seconds": ref_t}
        if method == "floor":
            row["backwards_per_batch"] = 1
        elif method == "nn":
            row["backwards_per_batch"] = 0
            row["forwards_per_batch"] = args.samples
        else:
            per_call = counter.count / args.repeat
            row["backwards_per_batch"] = per_call / len(loader) if fit else per_call
        if method == "glm top_k":
            with torch.no_grad():
                p_map = torch.softmax(clf(pred), -1)
            full = la(pred, link_approx="probit")
            top = fn()
            row["top_k"] = args.top_k
            row["tv_to_full_glm"] = float(0.5 * (top - full).abs().sum(-1).mean())
            row["tv_full_glm_to_map"] = float(0.5 * (full - p_map).abs().sum(-1).mean())
            row["map_max_prob"] = float(p_map.max(-1).values.mean())
            kept = torch.topk(p_map, args.top_k, -1).values.sum(-1)
            row["map_mass_left_out"] = float((1 - kept).mean())
        if mem:
            ref = "floor" if fit else "floor pred"
            row["peak_mib"] = mem[method]
            row["floor_peak_mib"] = mem[ref]
            row["peak_ratio_to_floor"] = (mem[method] / mem[ref]) if mem[ref] else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    del la, clf
    gc.collect()
    return rows


def table(rows, args) -> str:
    lines = [
        f"Llama-shaped, hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}, "
        f"LoRA r=8 on q,v; {args.n_fit} fit sequences and a prediction batch of {args.batch}, "
        f"{args.seq} tokens each; n_kfac 16, top_k {args.top_k}, nn {args.samples} samples. "
        "Ratios: to the floor (one forward + backward) of the same process, over the fit "
        "data (fit rows) or the prediction batch (predictive rows).",
        "",
        "| model | C | method | backwards / batch | time × floor | peak MiB | peak × floor | top_k: TV to the full GLM, MAP mass left out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "floor":
            continue
        peak = "—" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}"
        ratio = "—" if r.get("peak_ratio_to_floor") is None else f"{r['peak_ratio_to_floor']:.1f}"
        backwards = (f"0 ({r['forwards_per_batch']} fwd)" if r["method"] == "nn"
                     else f"{r['backwards_per_batch']:g}")
        extra = (f"{r['tv_to_full_glm']:.1e} (full GLM to MAP {r['tv_full_glm_to_map']:.1e}), "
                 f"{r['map_mass_left_out']:.3f}" if r["method"] == "glm top_k" else "")
        model = "from_choices" if r["model"] == "choices" else "CandidateScorer (2 tokens)"
        lines.append(f"| {model} | {r['C']} | {r['method']} | {backwards} | "
                     f"{r['ratio_to_floor']:.1f} | {peak} | {ratio} | {extra} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[4, 16, 100, 1000])
    p.add_argument("--scorer-classes", type=int, nargs="*", default=[4, 16, 100])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2560)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n-fit", type=int, default=16)
    p.add_argument("--samples", type=int, default=20, help="NN predictive samples")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--train-steps", type=int, default=20,
                   help="Adam steps (epochs over the fit data) before measuring")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the child-process memory runs")
    p.add_argument("--quick", action="store_true", help="tiny sizes (for the test)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the rows and table as JSON here")
    p.add_argument("--memory-child", nargs=3, metavar=("KIND", "C", "METHOD"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.classes, args.scorer_classes = [3, 20], [3]
        args.hidden, args.layers, args.vocab, args.seq = 32, 1, 128, 6
        args.batch, args.n_fit, args.samples, args.top_k, args.train_steps = 2, 4, 3, 2, 2
    if args.memory_child:
        kind, C, method = args.memory_child
        print(json.dumps(memory_child(args, kind, int(C), method)))
        return 0
    needed = max(args.classes + [2 * c for c in args.scorer_classes]) + len(SPECIALS)
    if needed > args.vocab // 2:
        p.error(f"--vocab {args.vocab} is too small: answers take ids up to {needed} and the "
                "inputs the upper half; pass --vocab at least twice that")
    rows = []
    for C in args.classes:
        rows.extend(run(args, "choices", C))
    for C in args.scorer_classes:
        rows.extend(run(args, "scorer", C))
    text = table(rows, args)
    print(text)
    if args.out:
        write_results(args.out, rows, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
