"""Posterior bytes of every method at LLaMA-2 7B, 13B and 70B shapes, and the check.

The bytes come from :func:`laplace_llm.tools.memory.posterior_bytes`, the formulas of the
tensors each posterior keeps (float32 numbers; LoRA r=8). Before printing them the
script checks the formula against the bytes measured on fitted posteriors
(``LoRALaplace.posterior_nbytes``) at Llama shapes that run on a CPU, for both
adapter placements; the peers' formulas are checked byte for byte in
``tests/tools/test_memory.py`` and ``benchmarks/perf/bench_peers.py``.

Run: ``python -m benchmarks.perf.memory_model --out benchmarks/results/memory-model.json``.
"""

from __future__ import annotations

import argparse
import warnings

from torch.utils.data import DataLoader

from benchmarks.common.models import Tokens, llama_config, lora_llama
from benchmarks.common.results import write_results
from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.tools import memory

warnings.filterwarnings("ignore")
R = 8
SHAPES = {
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, num_hidden_layers=32),
    "LLaMA-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                        num_key_value_heads=40, num_hidden_layers=40),
    "LLaMA-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                        num_key_value_heads=8, num_hidden_layers=80),
}
PLACEMENTS = {
    "q, v": ["q_proj", "v_proj"],
    "all linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
#: (column title, posterior_bytes keywords)
METHODS = [
    ("LoRALaplace k=8", dict(method="lora", n_kfac=8)),
    ("LoRALaplace k=16", dict(method="lora", n_kfac=16)),
    ("LoRALaplace k=64", dict(method="lora", n_kfac=64)),
    ("LoRALaplace k=16, separate A", dict(method="lora", n_kfac=16, share_input_factors=False)),
    ("bayesian-lora k=16", dict(method="bayesian-lora", n_kfac=16)),
    ("laplace-torch diag", dict(method="diag")),
    ("laplace-torch kron", dict(method="kron")),
    ("laplace-torch full", dict(method="full")),
]


def human(b: int) -> str:
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b} B"


def check(hidden: int, layers: int, targets: list[str], n_kfac: int) -> dict:
    """Fit on 32 sequences (more than n_kfac, so the data span every kept direction)."""
    # LlamaConfig's default context (2048), peft's default lora_alpha (8)
    cfg = llama_config(hidden, layers, max_positions=2048, kv_heads=max(hidden // 128, 1))
    model = lora_llama(cfg, targets, R, b_std=None, lora_alpha=8, init_lora_weights=False)
    clf = LLMClassifier(model, [10, 11, 12, 13]).eval()
    la = LoRALaplace(clf, "classification", n_kfac=n_kfac)
    la.fit(DataLoader(Tokens(max(32, 2 * n_kfac), 8), batch_size=16))
    return {"hidden": hidden, "layers": layers, "targets": targets, "n_kfac": n_kfac,
            "measured_bytes": la.posterior_nbytes(),
            "formula_bytes": memory.posterior_bytes(cfg, targets, R, n_kfac=n_kfac)}


#: (model, LoRA on) rows of the FSDP table, and its ranks
FSDP_ROWS = [("LLaMA-2-13B", "q, v"), ("LLaMA-2-13B", "all linear"), ("LLaMA-2-70B", "q, v"),
             ("LLaMA-2-70B", "all linear")]
FSDP_WORLDS = (2, 4, 8)


def fsdp_table() -> tuple[list[str], list[dict]]:
    """Per-rank memory under FSDP2: training step, fit, GLM (``memory.fsdp_rank_bytes``)."""
    lines = ["Per-rank memory under FSDP2 (bf16 base, float32 adapters, r=8, n_kfac 16): a "
             "checkpointed LoRA training step and the fit (mc, 1 probe) on 2 × 512 tokens per "
             "rank, the probit GLM (C = 4 probes) on 1 × 512 tokens per rank; "
             "shards / gathered / activations / Laplace terms of the fit in brackets:", "",
             "| model | LoRA on | ranks | train step | fit | GLM | fit terms |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    for model, on in FSDP_ROWS:
        cfg, targets = SHAPES[model], PLACEMENTS[on]
        for world in FSDP_WORLDS:
            train = memory.fsdp_rank_bytes(cfg, targets, R, world, 1024, "train")
            fit = memory.fsdp_rank_bytes(cfg, targets, R, world, 1024, "fit", n_probes=1)
            glm = memory.fsdp_rank_bytes(cfg, targets, R, world, 512, "predict", n_probes=4)
            rows.append({"model": model, "lora_on": on, "world": world, "train": train,
                         "fit": fit, "predict": glm})
            terms = " / ".join(human(fit[k]) for k in ("shards", "gathered", "activations", "laplace"))
            lines.append(f"| {model} | {on} | {world} | {human(train['total'])} | "
                         f"{human(fit['total'])} | {human(glm['total'])} | {terms} |")
    return lines, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-hidden", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--tiny", action="store_true", help="check at hidden 256 only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.check_hidden = [256]
    checks = [check(h, 2, t, k) for h in args.check_hidden for t in PLACEMENTS.values()
              for k in (8, 16)]
    lines = ["Formula against measured LoRALaplace posteriors (2 layers, GQA):", "",
             "| hidden | LoRA on | n_kfac | measured bytes | formula bytes |", "|---|---|---|---|---|"]
    for c in checks:
        on = next(k for k, v in PLACEMENTS.items() if v == c["targets"])
        lines.append(f"| {c['hidden']} | {on} | {c['n_kfac']} | {c['measured_bytes']} | "
                     f"{c['formula_bytes']} |")
    rows = []
    lines += ["", f"Posterior bytes, LoRA r={R}, float32:", "",
              "| model | LoRA on | LoRA params | " + " | ".join(m for m, _ in METHODS) + " |",
              "|---|---|---|" + "---|" * len(METHODS)]
    for model, cfg in SHAPES.items():
        for on, targets in PLACEMENTS.items():
            P = sum(R * (m.d_in + m.d_out) for m in memory.llama_lora_linears(cfg, targets))
            row = {"model": model, "lora_on": on, "lora_params": P}
            row.update({m: memory.posterior_bytes(cfg, targets, R, **kw) for m, kw in METHODS})
            rows.append(row)
            lines.append(f"| {model} | {on} | {P / 1e6:.1f} M | "
                         + " | ".join(human(row[m]) for m, _ in METHODS) + " |")
    lines += ["", "Output gradients a batch of LoRAKFAC holds at once (float32 adapters), fit with "
              "the mc Fisher on 2 × 512 tokens and GLM (C = 4 probes) on 1 × 512 tokens:", "",
              "| model | LoRA on | fit | GLM |", "|---|---|---|---|"]
    for model, cfg in SHAPES.items():
        for on, targets in PLACEMENTS.items():
            fit = memory.output_gradient_bytes(cfg, targets, R, tokens=1024, n_probes=1)
            glm = memory.output_gradient_bytes(cfg, targets, R, tokens=512, n_probes=4)
            lines.append(f"| {model} | {on} | {human(fit)} | {human(glm)} |")
            next(r for r in rows if r["model"] == model and r["lora_on"] == on).update(
                fit_output_gradient_bytes=fit, glm_output_gradient_bytes=glm)
    fsdp_lines, fsdp_rows = fsdp_table()
    lines += [""] + fsdp_lines
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_results(args.out, {"checks": checks, "rows": rows, "fsdp_rows": fsdp_rows}, table)
    mismatched = [c for c in checks if c["measured_bytes"] != c["formula_bytes"]]
    if mismatched:
        raise SystemExit(f"formula differs from the measured bytes: {mismatched}")


if __name__ == "__main__":
    main()
