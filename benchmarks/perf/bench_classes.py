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
  exact covariance of each example's k most probable classes and of the rest merged
  into one: k + 1 backwards; skipped where k ≥ C), and the NN-sampling predictive
  (``pred_type="nn"``, ``--samples`` forwards).

Columns: backward passes per batch (counted by wrapping the backend's
``output_gradients``), seconds and their ratio to the floor of the same process run,
and the peak extra resident memory (MiB) and its ratio to the floor's, each measured in
a fresh child process (Linux ``VmHWM`` reset through ``/proc/self/clear_refs`` after
``malloc_trim``, glibc's mmap threshold fixed at 64 KiB so that freed blocks leave the
process). For ``top_k``: the total-variation distance of its probit predictive from the
full GLM's, beside that of the simpler choice of zero variance for the classes outside
the top k, and that of the full GLM from the MAP softmax (how much the GLM moves the
prediction at all), and the MAP probability mass outside the top k (means over the
batch). Before measuring, the LoRA weights are trained for ``--train-steps``
epochs over the fit data, so that the MAP is confident as a fine-tuned adapter's is, and
the predictives' posterior (mc) has its prior precision tuned by the marginal likelihood. Times are the fastest of ``--repeat`` runs (absolute times on a shared
machine are noise; the ratios are what to read).

The table of BENCHMARKS.md::

    OMP_NUM_THREADS=1 python -m benchmarks.perf.bench_classes --classes 4 16 100 1000 \\
        --scorer-classes 4 16 100 --out benchmarks/results/classes-cpu.json

``--quick`` uses tiny sizes (for the test that runs this script).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import warnings

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from benchmarks.common.args import parser
from benchmarks.common.models import Tokens, floor, llama_config, lora_llama
from benchmarks.common.results import best_time, child_peak_mib, cpu_peak, finish
from laplace_llm import CandidateScorer, LLMClassifier, LoRALaplace

warnings.filterwarnings("ignore")
METHODS = ("floor", "fit mc", "fit ggn", "glm", "nn")
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
    # logits of a pretrained model's scale (std about 3 over the vocabulary), not the
    # near-uniform ones of transformers' initialisation (std 0.02·√hidden)
    model = lora_llama(llama_config(args.hidden, args.layers, args.vocab, max_positions=1024),
                       lm_head_std=3 / args.hidden**0.5)
    tok = tokenizer(args.vocab)
    if kind == "choices":
        return LLMClassifier.from_choices(model, tok, [f" w{i}" for i in range(C)],
                                          center=True).eval()
    return CandidateScorer.from_texts(model, tok, [f" w{2 * i} w{2 * i + 1}" for i in range(C)],
                                      center=True).eval()


def data(args, C):
    loader = DataLoader(Tokens(args.n_fit, args.seq, args.vocab, C, 0, low=args.vocab // 2), batch_size=args.batch)
    pred = next(iter(DataLoader(Tokens(args.batch, args.seq, args.vocab, C, 1, low=args.vocab // 2),
                                batch_size=args.batch)))
    return loader, pred


def train(clf, loader, steps):
    """Adam on the LoRA weights over the fit data, so that the MAP is confident, as a
    fine-tuned adapter's is (costs do not depend on the weights' values)."""
    params = [p for p in clf.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-2)
    for _ in range(steps):
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(clf(batch), batch["labels"]).backward()
            opt.step()
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
    for k in args.top_k:
        if k < C:
            out[f"glm top_k={k}"] = lambda k=k: la(pred, link_approx="probit", top_k=k)
    return out, la


def methods(fns) -> list[str]:
    """The measured methods of ``fns`` in the table's order (top_k after the GLM)."""
    top = [m for m in fns if m.startswith("glm top_k")]
    return [m for m in METHODS[:4] if m in fns] + top + ["nn"]


class BackwardCounter:
    """Counts the backward passes (probes) of every LoRA backend while in the context."""

    def __enter__(self):
        from laplace_llm.curvature.kfac import LoRAKFAC

        self.cls, self.original, self.count = LoRAKFAC, LoRAKFAC.output_gradients, 0
        original = self.original

        def counting(backend, f, outputs, probes, keep_graph=False):
            self.count += len(probes)
            return original(backend, f, outputs, probes, keep_graph)

        # the fit adds output gradients inside each probe's backward (streamed)
        self.original_stream = LoRAKFAC._stream_output_gradients
        original_stream = self.original_stream

        def counting_stream(backend, f, rec, probes, *args):
            self.count += len(probes)
            return original_stream(backend, f, rec, probes, *args)

        LoRAKFAC.output_gradients = counting
        LoRAKFAC._stream_output_gradients = counting_stream
        return self

    def __exit__(self, *exc):
        self.cls.output_gradients = self.original
        self.cls._stream_output_gradients = self.original_stream


def memory_child(args, kind, C, method):
    """Peak resident growth (bytes) of one call of ``method``, in this fresh process."""
    clf = build(args, kind, C)
    loader, pred = data(args, C)
    fns, _ = steps(args, clf, loader, pred, C)
    floor(clf, [pred])  # warm-up of the model's lazy initialisations
    return cpu_peak(fns[method])


def measure_memory(args, kind, C, method):
    return child_peak_mib(__spec__.name, [
        "--memory-child", kind, str(C), method, "--hidden", str(args.hidden), "--layers",
        str(args.layers), "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch",
        str(args.batch), "--n-fit", str(args.n_fit), "--samples", str(args.samples),
        "--top-k", *map(str, args.top_k)])


def run(args, kind, C) -> list[dict]:
    clf = build(args, kind, C)
    loader, pred = data(args, C)
    train(clf, loader, args.train_steps)
    fns, la = steps(args, clf, loader, pred, C)
    la.optimize_prior_precision(method="marglik", prior_structure="scalar")  # costs as before
    floor(clf, [pred])  # warm-up
    base = {"model": kind, "C": C}
    t_floor = best_time(fns["floor"], max(args.repeat, 3))
    t_floor_pred = best_time(fns["floor pred"], max(args.repeat, 3))
    mem = {}
    if not args.no_memory:
        for method in ("floor", "floor pred", *methods(fns)[1:]):
            mem[method] = measure_memory(args, kind, C, method)
    rows = []
    for method in methods(fns):
        fn = fns[method]
        with BackwardCounter() as counter:
            t = t_floor if method == "floor" else best_time(fn, args.repeat)
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
        if method.startswith("glm top_k"):
            row["top_k"] = k = int(method.split("=")[1])
            # fresh inputs, and the first fit batch (seen in training: a confident MAP)
            for name, batch in (("fresh", pred), ("seen", next(iter(loader)))):
                row[name] = top_k_accuracy(la, clf, batch, k)
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


def probit(f_mu, var):
    return torch.softmax(f_mu / torch.sqrt(1 + torch.pi / 8 * var), -1)


def top_k_accuracy(la, clf, batch, k) -> dict:
    """top_k's probit predictive (and with zero variance for the rest) against the full GLM's."""
    with torch.no_grad():
        p_map = torch.softmax(clf(batch), -1)
    full = la(batch, link_approx="probit")
    f_mu, f_var = la.glm_moments_over_priors(batch, [la.prior_precision], top_k=k)[0]
    var = f_var.diagonal(dim1=1, dim2=2)
    top = probit(f_mu, var)
    keep = torch.zeros_like(var, dtype=torch.bool).scatter_(1, torch.topk(f_mu, k, -1).indices, True)
    zero_rest = probit(f_mu, torch.where(keep, var, 0.0))

    def tv(a, b):
        return float(0.5 * (a - b).abs().sum(-1).mean())

    return {
        "map_mass_left_out": float((1 - torch.topk(p_map, k, -1).values.sum(-1)).mean()),
        "map_max_prob": float(p_map.max(-1).values.mean()),
        "tv_top_k_to_full_glm": tv(top, full),
        "tv_zero_rest_to_full_glm": tv(zero_rest, full),
        "tv_full_glm_to_map": tv(full, p_map),
    }


def _model(r) -> str:
    return "from_choices" if r["model"] == "choices" else "CandidateScorer (2 tokens)"


def table(rows, args) -> str:
    lines = [
        f"Llama-shaped, hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}, "
        f"LoRA r=8 on q,v; {args.n_fit} fit sequences and a prediction batch of {args.batch}, "
        f"{args.seq} tokens each; n_kfac 16, nn {args.samples} samples, centred logits. "
        "Ratios: to the floor (one forward + backward) of the same process, over the fit "
        "data (fit rows) or the prediction batch (predictive rows).",
        "",
        "| model | C | method | backwards / batch | time × floor | peak MiB | peak × floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "floor":
            continue
        peak = "—" if r.get("peak_mib") is None else f"{r['peak_mib']:.1f}"
        ratio = "—" if r.get("peak_ratio_to_floor") is None else f"{r['peak_ratio_to_floor']:.1f}"
        backwards = (f"0 ({r['forwards_per_batch']} fwd)" if r["method"] == "nn"
                     else f"{r['backwards_per_batch']:g}")
        lines.append(f"| {_model(r)} | {r['C']} | {r['method']} | {backwards} | "
                     f"{r['ratio_to_floor']:.1f} | {peak} | {ratio} |")
    lines += [
        "",
        "top_k against the full GLM (probit; total-variation distances, means over the "
        "batch): fresh inputs / the first fit batch (seen in training). 'rest merged' is "
        "top_k (the other classes move as one); 'rest at MAP' gives them zero variance "
        "instead; TV(full GLM, MAP) is how far the GLM moves the prediction at all.",
        "",
        "| model | C | k | MAP mass left out | TV(top_k rest merged, full) | TV(rest at MAP, full) | TV(full GLM, MAP) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "top_k" not in r:
            continue
        cols = [" / ".join(f"{r[n][key]:.3f}" for n in ("fresh", "seen"))
                for key in ("map_mass_left_out", "tv_top_k_to_full_glm",
                            "tv_zero_rest_to_full_glm", "tv_full_glm_to_map")]
        lines.append(f"| {_model(r)} | {r['C']} | {r['top_k']} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = parser(
        __doc__.splitlines()[0], classes=[4, 16, 100, 1000],
        scorer_classes=dict(default=[4, 16, 100], nargs="*"), hidden=128, layers=2, vocab=2560,
        seq=32, batch=8, n_fit=16, samples=dict(default=20, type=int, help="NN predictive samples"),
        top_k=[10, 100], train_steps=dict(default=20, type=int, help="Adam steps (epochs over "
                                          "the fit data) before measuring"),
        repeat=1, no_memory=False, quick=False, threads=1, out=None,
        memory_child=dict(nargs=3, metavar=("KIND", "C", "METHOD"), help=argparse.SUPPRESS),
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.classes, args.scorer_classes = [3, 20], [3]
        args.hidden, args.layers, args.vocab, args.seq = 32, 1, 128, 6
        args.batch, args.n_fit, args.samples, args.top_k, args.train_steps = 2, 4, 3, [2], 2
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
    finish([table(rows, args)], rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
