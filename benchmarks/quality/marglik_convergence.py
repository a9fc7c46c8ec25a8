"""Does marglik converge? laplace-torch's single Adam loop against the restarted one.

On the real-text setting of ``benchmarks/quality/real_text.py`` (MiniLM + LoRA fine-tuned on 500
TREC-6 questions, seed 0), fits the default posterior once and tunes its prior by the
linearised evidence (``evidence="linearised"``, an option) twice: with laplace-torch's ``optimize_prior_precision`` loop alone
(100 Adam steps on log δ from δ = 1) and with :class:`~laplace_llm.LoRALaplace`'s, which
restarts that loop until it converges. For each it prints δ, the log evidence and the
evidence's slope in log δ, then the log evidence on a grid of δ.

Run: ``python -m benchmarks.quality.marglik_convergence`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import random

import torch
from laplace import Laplace

from benchmarks.common.results import RESULTS_SKETCH_ADAPT
from benchmarks.quality import real_text as rt  # the benchmark's data, model and training
from laplace_llm.data import make_loader
from laplace_llm.posterior.base import LoRALaplaceBase
from laplace_llm.tools.training import train_lora


def slope(la) -> float:
    log_delta = la.prior_precision.log().detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(la.log_marginal_likelihood(log_delta.exp()), log_delta)
    return g.item()


def main(size: int = 500, seed: int = 0) -> dict:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    records = rt.read_jsonl(rt.DATA / "train.jsonl")
    random.Random(seed).shuffle(records)
    clf, tok = rt.build_model(seed)
    loader = make_loader(records[:size], tok, 16, "text", shuffle=True)
    torch.manual_seed(seed)
    train_lora(clf, loader, epochs=5, lr=2e-3)
    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron",
                 seed=seed, evidence="linearised", sketch_adapt=RESULTS_SKETCH_ADAPT)
    la.fit(make_loader(records[:size], tok, 16, "text"))
    out = {}
    for name, optimise in [
        ("laplace-torch's loop (100 steps)",
         lambda: super(LoRALaplaceBase, la).optimize_prior_precision(method="marglik")),
        ("restarted until converged",
         lambda: la.optimize_prior_precision(method="marglik", prior_structure="scalar")),
    ]:
        la.prior_precision = 1.0
        optimise()
        with torch.no_grad():
            lml = la.log_marginal_likelihood().item()
        out[name] = {"delta": la.prior_precision.item(), "log_marglik": lml, "slope": slope(la)}
        print(f"{name:34s} δ {out[name]['delta']:8.1f}  log marglik {lml:9.2f}  "
              f"slope in log δ {out[name]['slope']:8.3f}")
    with torch.no_grad():
        for d in (20, 50, 100, 150, 300, 1000, 10000):
            print(f"  δ {d:6d}: log marglik "
                  f"{la.log_marginal_likelihood(torch.tensor(float(d))).item():9.2f}")
    return out


if __name__ == "__main__":
    main()
