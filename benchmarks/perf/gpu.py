"""LoRALaplace at LLaMA-2-7B shape on one GPU: cost against the floor, and memory.

Builds a LLaMA-2-7B-shaped model (hidden 4096, intermediate 11008, 32 heads, 32
layers, vocabulary 32000) in bf16 directly on the device from its config (random
weights: the cost does not depend on them), adds LoRA r=8 on q_proj, v_proj (variant
``qv``) or on every linear layer (variant ``all``), and measures, per variant:

- **fit**: ``LoRALaplace.fit`` (``fisher_type="mc"``, ``n_kfac`` 16) on ``--n-fit``
  sequences of ``--seq`` tokens against the floor, the same number of plain forward +
  backward passes of the LoRA weights (cross-entropy of the 4 answer logits);
- **GLM**: the probit GLM predictive on ``--n-pred`` sequences against its floor, one
  forward + C backward passes;
- the posterior bytes, beside :func:`laplace_llm.tools.memory.posterior_bytes`;
- the peak memory beyond the model's (``torch.cuda.max_memory_allocated`` minus what
  was allocated before the step), for the floor and for the Laplace step; their
  difference is what the Laplace step adds, beside the output gradients that
  ``LoRAKFAC`` holds at once for one batch (:func:`laplace_llm.tools.memory.output_gradient_bytes`,
  the reason for the default batches of 2 sequences for fit and 1 for the GLM).

Goals: fit ≤ 1.3× its floor, GLM ≤ 1.5× its floor, extra peak ≤ 2 GiB over the floor's.
The script stops starting new steps once ``--budget-s`` seconds have passed and says so;
the last thing it prints is a short table. ``--tiny`` runs a 2-layer, hidden-256 model
on a few short sequences: the test suite runs it on CPU (bf16 model, float32 factors).

Run on a CUDA machine::

    python -m benchmarks.perf.gpu --out benchmarks/results/gpu-7b.json
"""

from __future__ import annotations

import json
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common.args import parser
from benchmarks.common.results import peak_meter, write_results
from laplace_llm import LLMClassifier, LoRALaplace, matrix
from laplace_llm.matrix import LowRankFactor, truncation
from laplace_llm.tools import memory

warnings.filterwarnings("ignore")
TARGETS = [319, 350, 315, 360]  # " A", " B", " C", " D" in LLaMA-2's vocabulary
LORA_R = 8
VARIANTS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                  num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000,
                  max_position_embeddings=4096)
TINY = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
            num_hidden_layers=2, vocab_size=1024, max_position_embeddings=512)
GIB = 2**30


def build_base(cfg: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Random-weight model built on ``device`` in ``dtype`` (no float32 copy on the host)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(LlamaConfig(**cfg))
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def with_lora(base: nn.Module, targets: list[str]) -> LLMClassifier:
    model = get_peft_model(
        base, LoraConfig(r=LORA_R, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # a trained adapter: non-zero B
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return LLMClassifier(model, TARGETS).eval()


def batches(n: int, seq: int, batch_size: int, vocab: int, seed: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.randint(1000 % vocab, vocab, (b, seq), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": torch.randint(0, len(TARGETS), (b,), generator=g).to(device)})
    return out


class Loader(list):
    """A list of batches with the ``dataset`` length that ``fit`` reads."""

    def __init__(self, items, n):
        super().__init__(items)
        self.dataset = range(n)


def step(fn, device) -> tuple[float, int | None]:
    """Seconds and peak bytes above the level before ``fn``."""
    start, stop = peak_meter(device)
    base = start()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, stop(base)


def floor_fit(clf, loader):
    for b in loader:
        f = clf(b)
        nn.functional.cross_entropy(f.float(), b["labels"], reduction="sum").backward()
    clf.zero_grad(set_to_none=True)


def floor_glm(clf, loader):
    params = [p for p in clf.parameters() if p.requires_grad]
    for b in loader:
        f = clf(b)
        for c in range(f.shape[1]):
            torch.autograd.grad(f[:, c].sum(), params, retain_graph=c < f.shape[1] - 1)


def factor_report(la: LoRALaplace) -> dict:
    """Dtypes of the factors and whether each sits on its layer's device."""
    dtypes, on_device = set(), True
    for b, F in zip(la.blocks, la.H_facs.kfacs):
        for f in F:
            t = f.root if isinstance(f, LowRankFactor) else f
            dtypes.add(str(t.dtype).replace("torch.", ""))
            on_device &= t.device == b.module.weight.device
    return {"factor_dtypes": sorted(dtypes), "factors_on_layer_device": bool(on_device)}


def run_variant(name, base, cfg, args, device, t0) -> tuple[dict, nn.Module]:
    targets = VARIANTS[name]
    clf = with_lora(base, targets)
    fit = Loader(batches(args.n_fit, args.seq, args.batch_size, cfg["vocab_size"], 0, device),
                 args.n_fit)
    pred = batches(args.n_pred, args.seq, args.pred_batch_size, cfg["vocab_size"], 1, device)
    row = {"variant": name, "targets": targets, "n_fit": args.n_fit, "seq": args.seq,
           "n_pred": args.n_pred, "n_kfac": args.n_kfac}
    floor_fit(clf, fit[:1])  # warm-up (kernels, allocator)
    row["floor_fit_s"], row["floor_fit_peak_bytes"] = step(lambda: floor_fit(clf, fit), device)
    la = LoRALaplace(clf, "classification", fisher_type=args.fisher, n_kfac=args.n_kfac, seed=0,
                     mc_samples=args.mc_samples)
    row["fit_s"], row["fit_peak_bytes"] = step(lambda: la.fit(fit), device)
    row["floor_glm_s"], row["floor_glm_peak_bytes"] = step(lambda: floor_glm(clf, pred), device)

    def glm():
        for b in pred:
            la(b, pred_type="glm", link_approx="probit")

    row["glm_s"], row["glm_peak_bytes"] = step(glm, device)
    row["posterior_bytes"] = la.posterior_nbytes()
    n_probes = args.mc_samples if args.fisher == "mc" else len(TARGETS)
    row["predicted_fit_grad_bytes"] = memory.output_gradient_bytes(
        cfg, targets, LORA_R, args.batch_size * args.seq, n_probes)
    row["predicted_glm_grad_bytes"] = memory.output_gradient_bytes(
        cfg, targets, LORA_R, args.pred_batch_size * args.seq, len(TARGETS))
    row["formula_bytes"] = memory.posterior_bytes(cfg, targets, LORA_R, n_kfac=args.n_kfac)
    row.update(factor_report(la))
    row["elapsed_s"] = time.perf_counter() - t0
    la = None  # free the posterior before the next variant
    return row, clf.model.unload()  # the base model again, without the adapters


def _ratio(a, b):
    return a / b if b else float("nan")


def fmt_table(rows, device_name) -> str:
    lines = [
        f"LoRALaplace on {device_name}: fit ≤ 1.3× floor, GLM ≤ 1.5× floor, extra peak ≤ 2 GiB",
        "| variant | fit s (floor) | fit × | GLM s (floor) | GLM × | posterior MiB "
        "(formula) | peak GiB fit (floor) | extra GiB (predicted grads) | goals |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "fit_s" not in r:
            lines.append(f"| {r['variant']} | {r['note']} |||||||| ")
            continue
        fx = _ratio(r["fit_s"], r["floor_fit_s"])
        gx = _ratio(r["glm_s"], r["floor_glm_s"])
        pk, fpk = r["fit_peak_bytes"], r["floor_fit_peak_bytes"]
        extra = None if pk is None or fpk is None else max(pk, r["glm_peak_bytes"] or 0) - max(
            fpk, r["floor_glm_peak_bytes"] or 0)
        grads = max(r["predicted_fit_grad_bytes"], r["predicted_glm_grad_bytes"])
        ok = fx <= 1.3 and gx <= 1.5 and (extra is None or extra <= 2 * GIB)
        def gib(b):
            return ("—" if b is None else f"{b / GIB:.2f}")
        lines.append(
            f"| {r['variant']} | {r['fit_s']:.1f} ({r['floor_fit_s']:.1f}) | {fx:.2f} | "
            f"{r['glm_s']:.1f} ({r['floor_glm_s']:.1f}) | {gx:.2f} | "
            f"{r['posterior_bytes'] / 2**20:.1f} ({r['formula_bytes'] / 2**20:.1f}) | "
            f"{gib(pk)} ({gib(fpk)}) | {gib(extra)} ({gib(grads)}) | "
            f"{'met' if ok else 'missed'} |"
        )
    return "\n".join(lines)


def main(argv=None):
    # LoRAKFAC holds every LoRA output's gradient of a batch at once
    # (memory.output_gradient_bytes): 2 × 512 tokens keep that near 1 GiB for q, v
    args = parser(
        __doc__, raw=True, device="cuda" if torch.cuda.is_available() else "cpu",
        dtype=dict(default="bfloat16", choices=["bfloat16", "float16", "float32"]),
        variants=dict(default=["qv", "all"], nargs="+", choices=list(VARIANTS)),
        n_fit=256, seq=512, n_pred=64, batch_size=2, pred_batch_size=1, n_kfac=16,
        fisher=dict(default="mc", choices=["mc", "ggn", "ef"]), mc_samples=1,
        budget_s=dict(default=420.0, type=float, help="start no new variant after this many seconds"),
        eigh_device=dict(default=matrix.EIGH_DEVICE, choices=["same", "cpu"],
                         help="where the truncations' small eighs run (laplace_llm.matrix.truncation.EIGH_DEVICE)"),
        tiny=dict(default=False, help="2 layers, hidden 256, 8 sequences"), out=None,
    ).parse_args(argv)
    cfg = LLAMA_2_7B
    if args.tiny:
        cfg = TINY
        args.n_fit, args.seq, args.n_pred, args.batch_size, args.pred_batch_size = 8, 16, 4, 4, 2
        args.n_kfac = 8
    truncation.EIGH_DEVICE = args.eigh_device  # read where the truncations run
    t0 = time.perf_counter()
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    base = build_base(cfg, device, getattr(torch, args.dtype))
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    print(json.dumps({"device": device_name, "dtype": args.dtype, "model_bytes": model_bytes,
                      "build_s": time.perf_counter() - t0}), flush=True)
    rows = []
    for name in args.variants:
        if time.perf_counter() - t0 > args.budget_s:
            rows.append({"variant": name, "note": f"not run: past --budget-s {args.budget_s:.0f}"})
            continue
        row, base = run_variant(name, base, cfg, args, device, t0)
        row["model_bytes"] = model_bytes
        row["eigh_device"] = args.eigh_device
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = fmt_table(rows, device_name)
    if args.out:
        write_results(args.out, rows, table)
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(table)


if __name__ == "__main__":
    main()
