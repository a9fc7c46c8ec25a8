"""Every Laplace-LoRA method side by side, in one process, on the same model and data.

For each size (``HIDDENxLAYERS``) of a Llama-shaped model with LoRA r=8 on q_proj and
v_proj (non-zero random B: a trained adapter), read out through ``LLMClassifier`` at 4
answer logits, this script measures in one run:

- the **floor**: one plain forward + backward of the LoRA weights over the fit data
  (for fit), one forward + C backwards over the prediction batch (for the GLM);
- ``LoRALaplace`` with ``fisher_type`` mc and ggn and ``n_kfac`` 8, 16, 64, and once
  (mc, the middle ``n_kfac``) with ``share_input_factors=False``, the fit before q/k/v
  shared their input factor;
- laplace-torch ``Laplace(model, "classification", "all", "kron")`` with its
  ``CurvlinopsGGN`` and ``AsdlGGN`` backends;
- bayesian-lora 0.0.6: ``calculate_kronecker_factors`` (+ its Cholesky of the small
  factors) for fit, ``jacobian_mean`` + ``variance`` for the GLM covariance.

Columns: fit time, GLM predictive time per sequence (probit for the Laplace classes; the
logit covariance for bayesian-lora, whose package has no predictive), posterior bytes
(measured, and from :func:`laplace_llm.tools.memory.posterior_bytes`), and the peak extra
process memory of fit and of the GLM: the high-water mark of the process's resident
memory above what it held before the step (Linux ``/proc/self/clear_refs`` resets the
mark; on CUDA ``torch.cuda.max_memory_allocated``). Times are the fastest of
``--repeat`` runs; memory is that of the first. A peer that is not installed, or that
fails on this model, gets a row saying so.

Example (the table of BENCHMARKS.md)::

    OMP_NUM_THREADS=1 python -m benchmarks.perf.bench_peers --sizes 512x2 1024x2 2048x2 512x4 \\
        --out benchmarks/results/peers-cpu.json
"""

from __future__ import annotations

import gc
import json
import time
import warnings

import torch
from laplace import Laplace
from laplace.curvature import AsdlGGN, CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common.args import parser
from benchmarks.common.models import Tokens, llama_config, lora_llama
from benchmarks.common.models import floor as floor_fit
from benchmarks.common.results import peak_meter, versions, write_results
from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.tools import memory

warnings.filterwarnings("ignore")
TARGETS = [10, 11, 12, 13]
LORA_R = 8
LORA_MODULES = ["q_proj", "v_proj"]
REPEAT = 1

try:
    import bayesian_lora
except ImportError:  # reported in the table, not silently dropped
    bayesian_lora = None


def build(cfg: dict, device, seed: int = 0) -> LLMClassifier:
    model = lora_llama(cfg, LORA_MODULES, LORA_R, seed=seed)
    return LLMClassifier(model, TARGETS).eval().to(device)


# ----------------------------------------------------------------- measuring
def measured(fn, device):
    """``(seconds, peak extra bytes, result)``: fastest of ``REPEAT``, memory of the first."""
    start, stop = peak_meter(device)
    best, peak, out = float("inf"), None, None
    for i in range(REPEAT):
        gc.collect()
        base = start()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        if i == 0:
            peak = stop(base)
    return best, peak, out


def floor_glm(clf, batch):
    params = [p for p in clf.parameters() if p.requires_grad]
    f = clf(batch)
    for c in range(f.shape[1]):
        torch.autograd.grad(f[:, c].sum(), params, retain_graph=c < f.shape[1] - 1)


def tensor_bytes(ts) -> int:
    seen = {id(t): t for t in ts}
    return sum(t.numel() * t.element_size() for t in seen.values())


def kron_bytes(la) -> int:
    ts = [t for F in la.H_facs.kfacs for t in F]
    ts += [t for qs, ls in zip(la.H.eigenvectors, la.H.eigenvalues) for t in (*qs, *ls)]
    return tensor_bytes(ts)


class KeywordModel(nn.Module):
    """``model(**batch)`` as bayesian-lora calls it, onto ``LLMClassifier(batch)``."""

    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, **batch):
        return self.clf(batch)


# ------------------------------------------------------------------- methods
def run_size(hidden: int, layers: int, args, device) -> list[dict]:
    cfg = llama_config(hidden, layers)
    clf = build(cfg, device)
    to_dev = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    fit_batches = [to_dev(b) for b in DataLoader(Tokens(args.n_fit, args.seq, 1024, seed=0),
                                                 batch_size=args.batch_size)]
    fit_loader = DataLoader(Tokens(args.n_fit, args.seq, 1024, seed=0), batch_size=args.batch_size)
    pred = to_dev(next(iter(DataLoader(Tokens(args.n_pred, args.seq, 1024, seed=1), batch_size=args.n_pred))))
    n_pred = args.n_pred
    size = {"hidden": hidden, "layers": layers}
    rows = []

    def row(method, note="", **values):
        r = {**size, "method": method, "note": note, **values}
        rows.append(r)
        print(json.dumps(r), flush=True)

    floor_fit(clf, fit_batches)  # warm-up
    t_fit, m_fit, _ = measured(lambda: floor_fit(clf, fit_batches), device)
    t_glm, m_glm, _ = measured(lambda: floor_glm(clf, pred), device)
    row("floor", "fwd+bwd over fit data; fwd + C bwd for GLM", fit_s=t_fit,
        glm_s_per_seq=t_glm / n_pred, peak_fit_bytes=m_fit, peak_glm_bytes=m_glm)

    variants = [(f, k, True) for f in args.fisher for k in args.n_kfac]
    variants.append((args.fisher[0], args.n_kfac[len(args.n_kfac) // 2], False))
    for fisher, n_kfac, share in variants:
        la = LoRALaplace(clf, "classification", fisher_type=fisher, n_kfac=n_kfac, seed=0,
                         share_input_factors=share)
        t_fit, m_fit, _ = measured(lambda la=la: la.fit(fit_loader), device)
        t_glm, m_glm, _ = measured(
            lambda la=la: la(pred, pred_type="glm", link_approx="probit"), device
        )
        row(f"LoRALaplace {fisher} k={n_kfac}" + ("" if share else ", separate A factors"),
            "every position; Jacobian-free GLM" + ("" if share else " (before issue 13)"),
            fit_s=t_fit, glm_s_per_seq=t_glm / n_pred, posterior_bytes=la.posterior_nbytes(),
            formula_bytes=memory.posterior_bytes(cfg, LORA_MODULES, LORA_R, n_kfac=n_kfac,
                                                 share_input_factors=share),
            peak_fit_bytes=m_fit, peak_glm_bytes=m_glm)
        del la

    for name, backend in (("CurvlinopsGGN", CurvlinopsGGN), ("AsdlGGN", AsdlGGN)):
        method = f"laplace-torch all/kron {name}"
        if hidden > args.laplace_torch_max_hidden:
            row(method, f"not run above hidden {args.laplace_torch_max_hidden} (--laplace-torch-max-hidden)")
            continue
        try:
            ref = Laplace(clf, "classification", "all", "kron", backend=backend)
            t_fit, m_fit, _ = measured(lambda ref=ref: ref.fit(fit_loader), device)
            t_glm, m_glm, _ = measured(
                lambda ref=ref: ref(pred, pred_type="glm", link_approx="probit"), device
            )
        except Exception as err:  # a peer that cannot handle this model: say so, go on
            row(method, f"fails: {type(err).__name__}: {str(err).splitlines()[0][:90]}")
            continue
        finally:
            clf.eval()
        row(method, "exact GGN (C bwd), dense d×d factors; GLM via P-long Jacobian",
            fit_s=t_fit, glm_s_per_seq=t_glm / n_pred, posterior_bytes=kron_bytes(ref),
            formula_bytes=memory.posterior_bytes(cfg, LORA_MODULES, LORA_R, method="kron"),
            peak_fit_bytes=m_fit, peak_glm_bytes=m_glm)
        del ref

    method = "bayesian-lora 0.0.6 K-FAC + variance"
    if bayesian_lora is None:
        row(method, "not installed (pip install -e '.[bench]')")
    else:
        # a fresh copy (same seed, same weights): a model that went through laplace-torch's
        # backends has backward hooks with which bayesian-lora's full backward hooks
        # refuse to mix (RuntimeError, measured)
        clf = None
        gc.collect()
        clf = build(cfg, device)
        rows.extend(_bayesian_lora(clf, fit_batches, pred, cfg, args, device, method, size))
        print(json.dumps(rows[-1]), flush=True)
    clf = None
    gc.collect()
    return rows


def _bayesian_lora(clf, fit_batches, pred, cfg, args, device, method, size):
    from transformers import BatchEncoding

    bl = bayesian_lora
    kw = KeywordModel(clf)
    n_kfac = 16

    def fit():
        factors = bl.calculate_kronecker_factors(
            kw, lambda m, b: m(**b), fit_batches, n_kfac=n_kfac, lr_threshold=128,
            target_module_keywords=["lora"],
        )
        return bl.cholesky_decompose_small_factors(factors, 128, device, torch.float32)

    try:
        t_fit, m_fit, factors = measured(fit, device)
        clf.eval()  # calculate_kronecker_factors leaves the model in train mode
        inputs = BatchEncoding({k: v for k, v in pred.items() if k != "labels"})

        def glm():
            jac, f_mu = bl.main.jacobian_mean(kw, inputs, output_callback=lambda out: out)
            return bl.variance(inputs, jac, factors, torch.tensor(1.0, device=device),
                               len(TARGETS), LORA_R, n_kfac, device)

        t_glm, m_glm, _ = measured(glm, device)
    except Exception as err:
        return [{**size, "method": method,
                 "note": f"fails: {type(err).__name__}: {str(err).splitlines()[0][:90]}"}]
    finally:
        clf.eval()
    return [{**size, "method": method,
             "note": "last token only; MC Fisher (1 sample); GLM via P-long jacrev Jacobian; "
                     "no predictive (covariance only)",
             "fit_s": t_fit, "glm_s_per_seq": t_glm / args.n_pred,
             "posterior_bytes": tensor_bytes([t for pair in factors.values() for t in pair]),
             "formula_bytes": memory.posterior_bytes(cfg, LORA_MODULES, LORA_R,
                                                     method="bayesian-lora", n_kfac=n_kfac),
             "peak_fit_bytes": m_fit, "peak_glm_bytes": m_glm}]


# --------------------------------------------------------------------- table
def _mib(b):
    if b is None:
        return "—"
    return f"{b / 2**20:.1f}" if b >= 2**20 else f"{b / 2**20:.3f}"


def fmt_table(rows) -> str:
    out = []
    for key in dict.fromkeys((r["hidden"], r["layers"]) for r in rows):
        rs = [r for r in rows if (r["hidden"], r["layers"]) == key]
        floor = next(r for r in rs if r["method"] == "floor")
        out.append(f"\n**hidden {key[0]}, {key[1]} layers** (LoRA r={LORA_R} on "
                   f"{', '.join(LORA_MODULES)})\n")
        out.append("| method | fit s (× floor) | GLM ms/seq (× floor) | posterior MiB "
                   "(formula) | peak fit MiB | peak GLM MiB | note |")
        out.append("|---|---|---|---|---|---|---|")
        for r in rs:
            if "fit_s" not in r:
                out.append(f"| {r['method']} | — | — | — | — | — | {r['note']} |")
                continue
            fit = f"{r['fit_s']:.2f}" + ("" if r is floor else f" ({r['fit_s'] / floor['fit_s']:.2f}×)")
            g = r["glm_s_per_seq"] * 1e3
            glm = f"{g:.1f}" + (
                "" if r is floor else f" ({r['glm_s_per_seq'] / floor['glm_s_per_seq']:.2f}×)"
            )
            post = "—" if "posterior_bytes" not in r else (
                f"{_mib(r['posterior_bytes'])} ({_mib(r['formula_bytes'])})"
            )
            out.append(f"| {r['method']} | {fit} | {glm} | {post} | {_mib(r['peak_fit_bytes'])} "
                       f"| {_mib(r['peak_glm_bytes'])} | {r['note']} |")
    return "\n".join(out)


def main(argv=None):
    args = parser(
        __doc__, raw=True,
        sizes=dict(default=["512x2", "1024x2", "2048x2", "512x4"], help="HIDDENxLAYERS"),
        n_fit=32, n_pred=8, seq=32, batch_size=8, n_kfac=[8, 16, 64],
        fisher=dict(default=["mc", "ggn"], nargs="+", choices=["mc", "ggn", "ef"]),
        laplace_torch_max_hidden=2048, repeat=1,
        device="cuda" if torch.cuda.is_available() else "cpu",
        tiny=dict(default=False, help="smallest run (tests): one 256x1 size, 8 sequences of 8 tokens"),
        out=None,
    ).parse_args(argv)
    if args.tiny:
        args.sizes, args.n_fit, args.n_pred, args.seq, args.batch_size = ["256x1"], 8, 2, 8, 4
        args.n_kfac = [8]
    global REPEAT
    REPEAT = args.repeat
    device = torch.device(args.device)
    print(json.dumps({"versions": versions()}), flush=True)
    rows = []
    for s in args.sizes:
        hidden, layers = (int(v) for v in s.lower().split("x"))
        rows.extend(run_size(hidden, layers, args, device))
        if args.out:  # after every size, so that an interrupted run keeps what it measured
            write_results(args.out, rows, fmt_table(rows))
    print(fmt_table(rows))


if __name__ == "__main__":
    main()
