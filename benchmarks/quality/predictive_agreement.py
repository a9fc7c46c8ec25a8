"""Why the probit and Monte-Carlo predictives pick different answers with text answers.

Reads the GLM moments that ``benchmarks/quality/paper_table_underfit.py`` writes beside its rows
(``glm_moments.safetensors``, test split, the prior of laplace-torch's evidence) and, per
set and seed, measures how often each predictive's predicted class equals that of a
reference: the Monte-Carlo predictive with ``--reference-samples`` (100,000) logit samples.

Columns (fractions of the test questions):

- ``MC = MC'``: two Monte-Carlo predictives of 1,000 samples each (the table's size),
  different seeds: the noise floor of the agreement the issue asks of probit and MC;
- ``MC = ref``: the table's MC predictive (1,000 samples, the run's seed) against the
  reference;
- ``probit = ref``: laplace-torch's probit, ``softmax(μ / sqrt(1 + π/8 diag Σ))``;
- ``centred = ref``: the probit on the scores with 99 % of their common offset removed (the
  table's "probit centred" rows);
- ``contrasts = ref``: the probit on the fully centred scores ``(I − 11ᵀ/C) f``, whose
  softmax is that of ``f`` for every sample, so the exact predictive is unchanged while the
  common offset's variance, which the diagonal probit reads as per-answer uncertainty, is
  gone;
- ``MAP = ref``: the argmax of the mean scores;
- ``common var``: the mean share of ``tr Σ`` along ``1/√C`` (the common offset);
- ``tied``: questions whose reference top-two probabilities are within ``--margin`` (0.05);
  ``contrasts = ref, rest``: the contrasts' probit agreement on the other questions.

And a second table on answer length (characters of each choice; the test questions are
read again from the data the way ``paper_table_underfit.py`` draws them, and checked against the
labels its MAP row stored): ``len~var``, the rank correlation, within a question, of a
choice's length with its score variance (mean over questions); ``len~−score``, the same
with minus its mean score; and how often the MAP, the probit and the MC predictive pick
the shortest choice, against how often the shortest choice is right. A summed
log-likelihood prefers short answers; dividing each score by its own sd, the probit
undoes part of that, which MC, like the exact predictive, does not.

Run: ``python -m benchmarks.quality.predictive_agreement`` (after ``paper_table_underfit.py``); writes
``predictive_agreement.json`` and ``.md`` beside the paper table's results.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks.common.links import monte_carlo, probit
from benchmarks.quality import paper_table_underfit as pt

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/
LABELS = {"arc_easy": "ARC-Easy", "openbookqa": "OpenBookQA",
          "commonsenseqa": "CommonsenseQA", "boolq": "BoolQ"}
SHARE = 0.99  # laplace_llm.LLMClassifier.CENTER, the table's "centred" rows


def centre(mu: torch.Tensor, cov: torch.Tensor, share: float):
    c = mu.shape[-1]
    m = torch.eye(c, dtype=mu.dtype) - share * torch.full((c, c), 1.0 / c, dtype=mu.dtype)
    return mu @ m.T, m @ cov @ m.T


def agree(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.argmax(-1) == q.argmax(-1)).double().mean()) if len(p) else float("nan")


def measure(mu: torch.Tensor, cov: torch.Tensor, seed: int, n_ref: int,
            margin: float) -> dict[str, float]:
    c = mu.shape[-1]
    ref = monte_carlo(mu, cov, n_ref, 10_000 + seed)
    mc = monte_carlo(mu, cov, 1000, seed)  # the paper table's draw
    mc_other = monte_carlo(mu, cov, 1000, 20_000 + seed)
    contrasts = probit(*centre(mu, cov, 1.0))
    one = torch.full((c,), 1.0 / math.sqrt(c), dtype=mu.dtype)
    common = torch.einsum("i,nij,j->n", one, cov, one) / cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) >= margin
    return {
        "mc_mc": agree(mc, mc_other), "mc_ref": agree(mc, ref),
        "probit_mc": agree(probit(mu, cov), mc),
        "probit_ref": agree(probit(mu, cov), ref),
        "centred_ref": agree(probit(*centre(mu, cov, SHARE)), ref),
        "contrasts_ref": agree(contrasts, ref), "map_ref": agree(mu, ref),
        "common_var": float(common.mean()),
        "logit_sd": float(cov.diagonal(dim1=-2, dim2=-1).sqrt().mean()),
        "tied": int((~clear).sum()), "n": len(mu),
        "contrasts_ref_clear": agree(contrasts[clear], ref[clear]),
    }


def length_bias(name: str, seed: int, results: Path, mu, cov, mc) -> dict[str, float]:
    map_row = json.loads((results / name / f"seed{seed}" / "map.json").read_text())
    args = argparse.Namespace(n_train=256, n_val=64, n_test=map_row["n_test"], max_chars=450,
                              no_shift=True)
    test = pt.splits(name, seed, args)["test"]
    y = torch.tensor([q["answer"] for q in test])
    if y.tolist() != map_row["labels"]["test"]:
        raise RuntimeError(f"{name} seed {seed}: the test questions differ from the run's")
    length = torch.tensor([[len(c) for c in q["choices"]] for q in test], dtype=mu.dtype)

    def within_rank_corr(a, b):
        ra = a.argsort(-1).argsort(-1).to(mu.dtype)
        rb = b.argsort(-1).argsort(-1).to(mu.dtype)
        ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
        return float(((ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))).mean())

    shortest = length.argmin(-1)

    def picks(p):
        return float((p.argmax(-1) == shortest).double().mean())

    return {"len_var": within_rank_corr(length, cov.diagonal(dim1=-2, dim2=-1)),
            "len_score": within_rank_corr(length, -mu), "map_short": picks(mu),
            "probit_short": picks(probit(mu, cov)), "mc_short": picks(mc),
            "right_short": float((y == shortest).double().mean())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "results" / "paper_table" / "text"))
    p.add_argument("--prior", default="map", help="which prior's moments (map, lin, val)")
    p.add_argument("--reference-samples", type=int, default=100_000)
    p.add_argument("--margin", type=float, default=0.05)
    args = p.parse_args(argv)
    results = Path(args.results)
    rows = []
    for name in LABELS:
        for path in sorted(results.glob(f"{name}/seed*/glm_moments.safetensors")):
            seed = int(path.parent.name.removeprefix("seed"))
            with safe_open(path, "pt") as f:
                k = f.metadata()["priors"].split(",").index(args.prior)
                mu, cov = f.get_tensor("test.mean")[k], f.get_tensor("test.cov")[k]
            row = measure(mu, cov, seed, args.reference_samples, args.margin)
            row.update(length_bias(name, seed, results, mu, cov,
                                   monte_carlo(mu, cov, 1000, seed)))
            rows.append({"set": name, "seed": seed, **row})
    cols = [("mc_mc", "MC = MC'"), ("mc_ref", "MC = ref"), ("probit_mc", "probit = MC"),
            ("probit_ref", "probit = ref"), ("centred_ref", "centred = ref"),
            ("contrasts_ref", "contrasts = ref"), ("map_ref", "MAP = ref"),
            ("common_var", "common var"), ("logit_sd", "logit sd")]
    lines = [f"<!-- python -m benchmarks.quality.predictive_agreement (prior {args.prior}, reference "
             f"{args.reference_samples} samples, margin {args.margin}) -->",
             "| set | seed | " + " | ".join(c for _, c in cols) + " | tied | contrasts = ref, "
             "rest |", "|---" * (len(cols) + 4) + "|"]
    for r in rows:
        cells = [f"{r[k]:.3f}" if k != "logit_sd" else f"{r[k]:.2f}" for k, _ in cols]
        lines.append(f"| {LABELS[r['set']]} | {r['seed']} | " + " | ".join(cells)
                     + f" | {r['tied']}/{r['n']} | {r['contrasts_ref_clear']:.3f} |")
    lines += ["", "| set | seed | len~var | len~−score | MAP picks shortest | probit picks "
              "shortest | MC picks shortest | shortest is right |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {LABELS[r['set']]} | {r['seed']} | " + " | ".join(
            f"{r[k]:.2f}" for k in ("len_var", "len_score", "map_short", "probit_short",
                                    "mc_short", "right_short")) + " |")
    table = "\n".join(lines)
    (results / "predictive_agreement.json").write_text(json.dumps(rows, indent=1))
    (results / "predictive_agreement.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
