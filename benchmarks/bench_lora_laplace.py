"""Fit and GLM-predictive cost of LoRALaplace against laplace-torch and the floor.

For each hidden size, in one process and on the same model and data:

- ``floor fit``: one plain forward + backward (cross-entropy, LoRA gradients) over the
  fit data;
- ``LoRALaplace`` fit (``fisher_type`` mc and ggn, ``n_kfac`` 16) and its posterior bytes;
- laplace-torch ``Laplace(model, "classification", "all", "kron")`` (its default
  CurvlinopsGGN backend, i.e. exact GGN with C backwards) fit and posterior bytes;
- ``floor glm``: one forward + C backward passes over the prediction batch;
- the GLM predictive (probit) of both.

The model is Llama-shaped (2 layers, intermediate 2.6875·h, heads of 64, vocabulary
1024: the vocabulary only sizes the embedding, the wrapper reads 4 logits), LoRA r=8
on q_proj and v_proj with non-zero random B (a trained adapter), through
``LLMClassifier``. Example::

    python benchmarks/bench_lora_laplace.py --hidden 512 1024 2048 4096 \\
        --out benchmarks/results/cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from _results import write_results  # benchmarks/ is the script's folder
from laplace import Laplace
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from laplace_llm import LLMClassifier, LoRALaplace

warnings.filterwarnings("ignore")
TARGETS = [10, 11, 12, 13]


class Items(torch.utils.data.Dataset):
    def __init__(self, n, T, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(20, vocab, (n, T), generator=g)
        self.labels = torch.randint(0, len(TARGETS), (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def build(hidden: int, seed: int = 0) -> LLMClassifier:
    torch.manual_seed(seed)
    inter = int(round(hidden * 2.6875 / 64)) * 64
    cfg = LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).eval()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return LLMClassifier(model, TARGETS).eval()


REPEAT = 1


def timed(fn):
    """Fastest of ``REPEAT`` runs (the least disturbed by other processes)."""
    best, out = float("inf"), None
    for _ in range(REPEAT):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def floor_fit(clf, loader):
    for batch in loader:
        f = clf(batch)
        torch.nn.functional.cross_entropy(f, batch["labels"], reduction="sum").backward()
    clf.zero_grad(set_to_none=True)


def floor_glm(clf, batch):
    params = [p for p in clf.parameters() if p.requires_grad]
    f = clf(batch)
    for c in range(f.shape[1]):
        torch.autograd.grad(f[:, c].sum(), params, retain_graph=c < f.shape[1] - 1)


def kron_bytes(la) -> int:
    total = 0
    for F in la.H_facs.kfacs:
        total += sum(t.numel() * t.element_size() for t in F)
    for qs, ls in zip(la.H.eigenvectors, la.H.eigenvalues):
        total += sum(t.numel() * t.element_size() for t in (*qs, *ls))
    return total


def run(hidden: int, args) -> dict:
    clf = build(hidden)
    fit_loader = DataLoader(Items(args.n_fit, args.seq, 1024, 0), batch_size=args.batch_size)
    pred = next(iter(DataLoader(Items(args.n_pred, args.seq, 1024, 1), batch_size=args.n_pred)))
    row = {"hidden": hidden}
    floor_fit(clf, fit_loader)  # warm-up
    row["floor_fit_s"], _ = timed(lambda: floor_fit(clf, fit_loader))
    for fisher in args.fisher:
        la = LoRALaplace(clf, "classification", fisher_type=fisher, n_kfac=args.n_kfac, seed=0)
        row[f"lora_{fisher}_fit_s"], _ = timed(lambda la=la: la.fit(fit_loader))
        row["lora_posterior_bytes"] = la.posterior_nbytes()
    row["floor_glm_s"], _ = timed(lambda: floor_glm(clf, pred))
    row["lora_glm_s"], _ = timed(lambda: la(pred, pred_type="glm", link_approx="probit"))
    if hidden <= args.laplace_torch_max_hidden:
        ref = Laplace(clf, "classification", "all", "kron")
        row["laplace_torch_fit_s"], _ = timed(lambda: ref.fit(fit_loader))
        row["laplace_torch_posterior_bytes"] = kron_bytes(ref)
        row["laplace_torch_glm_s"], _ = timed(lambda: ref(pred, pred_type="glm", link_approx="probit"))
        del ref
    return row


def fmt_table(rows) -> str:
    head = (
        "| hidden | floor fit s | LoRALaplace mc fit s (× floor) | laplace-torch fit s (× floor) "
        "| posterior MiB: ours / laplace-torch | floor GLM s | LoRALaplace GLM s (× floor) "
        "| laplace-torch GLM s (× floor) |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        ff, fg = r["floor_fit_s"], r["floor_glm_s"]
        lt_fit = r.get("laplace_torch_fit_s")
        lt_glm = r.get("laplace_torch_glm_s")
        lt_b = r.get("laplace_torch_posterior_bytes")
        mc = r.get("lora_mc_fit_s", float("nan"))
        lines.append(
            f"| {r['hidden']} | {ff:.2f} | {mc:.2f} ({mc / ff:.2f}×) | "
            + (f"{lt_fit:.2f} ({lt_fit / ff:.2f}×)" if lt_fit else "not run")
            + f" | {r['lora_posterior_bytes'] / 2**20:.2f} / "
            + (f"{lt_b / 2**20:.1f}" if lt_b else "—")
            + f" | {fg:.2f} | {r['lora_glm_s']:.2f} ({r['lora_glm_s'] / fg:.2f}×) | "
            + (f"{lt_glm:.2f} ({lt_glm / fg:.2f}×)" if lt_glm else "not run")
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--n-fit", type=int, default=64)
    ap.add_argument("--n-pred", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-kfac", type=int, default=16)
    ap.add_argument("--fisher", nargs="+", default=["mc"], choices=["mc", "ggn", "ef"])
    ap.add_argument("--laplace-torch-max-hidden", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2, help="report the fastest of this many runs")
    ap.add_argument("--out", default=None, help="write the rows and machine as JSON here")
    args = ap.parse_args(argv)
    global REPEAT
    REPEAT = args.repeat
    rows = []
    for h in args.hidden:
        rows.append(run(h, args))
        print(json.dumps(rows[-1]), flush=True)
    table = fmt_table(rows)
    print(table)
    if args.out:
        write_results(args.out, rows, table)


if __name__ == "__main__":
    main()
