"""The prior study on the demo's task: which label-free prior gives the best validation NLL?

A second family of data sets for choosing LoRALaplace's default prior, beside the SmolLM2
sets of ``paper_table.py`` (whose study is written there): the offline demo's task
(``laplace_llm.app.demo``: a 2-layer Llama pretrained on generated facts, LoRA fine-tuned
on 256 multiple-choice questions with 25 % label noise until over-confident), one task per
seed. For each seed: the demo's fine-tune as ``laplace-llm demo`` runs it, the LoRA weights
before it (the prior centre of the ``_init`` candidates), one K-FAC fit with the demo's
options, every candidate of ``_priors.PRIOR_CANDIDATES`` tuned by marglik, and their GLM
Monte-Carlo predictive (1,000 samples) scored on the demo's 200 validation questions
(never its test splits). Also the MAP and temperature scaling fitted on those questions
(an optimistic reference: it is scored where it was fitted).

``--task trec6``: the same on real text, MiniLM-L6 + LoRA on 500 TREC-6 questions
(``real_text.py``'s model and fine-tune: 5 epochs, lr 2e-3), scored on 500 held-out
training questions. That fine-tune ends close to calibrated, the other regime.

Run: ``python -m benchmarks.quality.prior_study`` (seeds 0-4; about a minute a seed on 2 cores),
``--task trec6`` (a few minutes a seed); writes ``benchmarks/results/prior_study/TASK.json``
and ``TASK.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from laplace import Laplace

import laplace_llm  # (also registers subset_of_weights="lora")
from benchmarks.common.links import monte_carlo
from benchmarks.common.priors import PRIOR_CANDIDATES, candidate_prior
from benchmarks.common.results import RESULTS_SKETCH_ADAPT
from laplace_llm.app import demo
from laplace_llm.app.evaluation import score
from laplace_llm.data import make_loader
from laplace_llm.tools.baselines import TemperatureScaling
from laplace_llm.tools.training import train_lora

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/


def moments(la, loader, priors):
    per = [la.glm_moments_over_priors(b, priors) for b in loader]
    return [(torch.cat([b[i][0] for b in per]).double(), torch.cat([b[i][1] for b in per]).double())
            for i in range(len(priors))]


def study(clf, la, init, val_loader, seed: int) -> dict:
    """Every candidate's prior on the fitted ``la``, scored on ``val_loader`` with the MAP and
    temperature scaling fitted there."""
    theta0 = laplace_llm.prior_mean_from(la, init)
    priors = {k: torch.tensor(candidate_prior(la, clf, k, theta0)["prior"])
              for k in PRIOR_CANDIDATES}
    labels = torch.cat([b["labels"] for b in val_loader])
    with torch.no_grad():
        logits = torch.cat([clf(b).double() for b in val_loader])
    out = {"seed": seed, "n_val": len(labels), "map": score(torch.softmax(logits, -1), labels)}
    ts = TemperatureScaling()
    ts.fit(logits, labels)
    out["ts_on_val"] = score(ts(logits), labels)
    for k, (mu, cov) in zip(priors, moments(la, val_loader, list(priors.values()))):
        out[k] = score(monte_carlo(mu, cov, 1000, seed), labels)
        out[k]["mean_prior"] = float(priors[k].mean())
    return out


def trec6_seed(seed: int) -> dict:
    from benchmarks.quality import real_text

    train_all = real_text.read_jsonl(real_text.DATA / "train.jsonl")
    random.Random(seed).shuffle(train_all)
    train, val = train_all[:500], train_all[500:1000]
    clf, tok = real_text.build_model(seed)
    init = {n: p.detach().clone() for n, p in clf.named_parameters() if p.requires_grad}
    torch.manual_seed(seed)
    train_lora(clf, make_loader(train, tok, 16, "text", shuffle=True), epochs=5, lr=2e-3)
    clf.eval()
    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron",
                 seed=seed, sketch_adapt=RESULTS_SKETCH_ADAPT)
    la.fit(make_loader(train, tok, 16, "text"))
    return study(clf, la, init, make_loader(val, tok, 32, "text"), seed)


def demo_seed(seed: int) -> dict:
    cfg = demo.DemoConfig(seed=seed)
    task = demo._task(cfg)
    tokenizer = demo.build_tokenizer(task.words)
    model = demo.build_model(cfg, len(task.words))
    demo.pretrained_base(model, tokenizer, task, cfg, False)
    clf, loader = demo._lora_classifier(model, tokenizer, task, cfg)
    init = demo._lora_state(clf)
    train = task.questions(cfg.n_train, seed=cfg.seed * 1000 + 11)
    val = task.questions(cfg.n_val, seed=cfg.seed * 1000 + 14)
    checkpoints, _ = demo.finetune(clf, loader(train, shuffle=True, batch_size=cfg.finetune_batch),
                                   cfg)
    demo._load_lora_state(clf, checkpoints[cfg.epochs])
    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron",
                 options=cfg.kfac.replace(sketch_adapt=RESULTS_SKETCH_ADAPT), seed=cfg.seed)
    la.fit(loader(train))
    return study(clf, la, init, loader(val), seed)


def render(rows: list[dict], task: str) -> str:
    cols = ["map", "ts_on_val", *PRIOR_CANDIDATES]
    lines = ["| seed | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            head = f"{v['mean_prior']:.3g} / " if "mean_prior" in v else ""
            cells.append(f"{head}{100 * v['accuracy']:.1f} / {100 * v['ece']:.1f} / {v['nll']:.3f}")
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    return (f"{TASKS[task][1]}, GLM MC predictive: mean prior precision / "
            "accuracy % / ECE % / NLL (ts_on_val is fitted on these questions)\n\n"
            + "\n".join(lines))


TASKS = {"demo": (demo_seed, "Demo task, 200 validation questions"),
         "trec6": (trec6_seed, "MiniLM on TREC-6 (500 training questions), 500 validation "
                   "questions")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=list(TASKS), default="demo")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default=str(ROOT / "results" / "prior_study"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        t0 = time.time()
        rows.append(TASKS[args.task][0](seed))
        print(f"seed {seed}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    (out / f"{args.task}.json").write_text(json.dumps(rows, indent=1))
    table = render(rows, args.task)
    (out / f"{args.task}.md").write_text(f"<!-- python -m benchmarks.quality.prior_study "
                                 f"{' '.join(sys.argv[1:])} -->\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
