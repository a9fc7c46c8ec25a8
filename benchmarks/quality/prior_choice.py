"""The default prior, chosen across families: every label-free candidate of the prior study
against laplace-torch's evidence with one scalar prior (``lt``, laplace-torch's default),
on validation questions only.

Reads the committed prior-study results of three families of LoRA fine-tunes:

- SmolLM2-135M on ARC-Easy, OpenBookQA, CommonsenseQA and BoolQ
  (``benchmarks/results/paper_table/fitted/SET/seedS/prior_study_val.json``, written by
  ``python -m benchmarks.quality.paper_table --stage val``);
- the demo's task and MiniLM on TREC-6 (``benchmarks/results/prior_study/{demo,trec6}.json``,
  written by ``python -m benchmarks.quality.prior_study [--task trec6]``).

Per family and candidate it prints the mean validation NLL minus ``lt``'s, the number of
runs where the candidate's NLL is at most ``lt``'s + 0.005 (``≤ lt``), and the mean and
the worst accuracy change against the MAP, in points. No test number enters the choice.

Run: ``python -m benchmarks.quality.prior_choice`` (prints the table and writes
``benchmarks/results/prior_study/choice.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.common.priors import PRIOR_CANDIDATES

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "results" / "prior_study"
FITTED = ROOT / "results" / "paper_table" / "fitted"
TIE = 0.005  # nats: a candidate within this of lt counts as not worse


def families() -> dict[str, list[dict]]:
    """Family name → list of runs, each ``{candidate: {"nll", "accuracy"}, "map": …}``."""
    out = {"SmolLM2, 4 MCQA sets": [json.loads(p.read_text())
                                   for p in sorted(FITTED.glob("*/seed*/prior_study_val.json"))]}
    for task, label in (("demo", "demo task"), ("trec6", "MiniLM, TREC-6")):
        path = STUDY / f"{task}.json"
        if path.exists():
            out[label] = json.loads(path.read_text())
    return out


def table() -> str:
    fams = families()
    lines = ["Validation NLL of each label-free prior minus laplace-torch's scalar evidence "
             "(`lt`, laplace-torch's default); `≤ lt`: runs within "
             f"{TIE} nats or better; accuracy change against the MAP in points (mean, worst)",
             "", "| candidate | " + " | ".join(f"{f} ({len(r)} runs)" for f, r in fams.items())
             + " |", "|---" * (1 + len(fams)) + "|"]
    for cand in [c for c in PRIOR_CANDIDATES if c != "lt"] + ["lt"]:
        cells = [f"`{cand}`"]
        for runs in fams.values():
            runs = [r for r in runs if cand in r and "lt" in r]
            if not runs:
                cells.append("—")
                continue
            d = np.array([r[cand]["nll"] - r["lt"]["nll"] for r in runs])
            acc = np.array([100 * (r[cand]["accuracy"] - r["map"]["accuracy"]) for r in runs])
            cells.append(f"{d.mean():+.3f}, {int((d <= TIE).sum())}/{len(d)} ≤ lt; "
                         f"acc {acc.mean():+.1f} (worst {acc.min():+.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["MAP (no Laplace)"]
    for runs in fams.values():
        d = np.array([r["map"]["nll"] - r["lt"]["nll"] for r in runs if "lt" in r])
        cells.append(f"{d.mean():+.3f}, {int((d <= TIE).sum())}/{len(d)} ≤ lt")
    lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Centred at the fine-tune's starting weights against centred at zero, the same "
              "evidence and structure (NLL difference; runs within "
              f"{TIE} nats or better)", "",
              "| pair | " + " | ".join(fams) + " |", "|---" * (1 + len(fams)) + "|"]
    for init, zero in (("lt_init", "lt"), ("lt_block_init", "lt_block")):
        cells = [f"`{init}` − `{zero}`"]
        for runs in fams.values():
            d = np.array([r[init]["nll"] - r[zero]["nll"] for r in runs
                          if init in r and zero in r])
            cells.append(f"{d.mean():+.3f}, {int((d <= TIE).sum())}/{len(d)}" if len(d)
                         else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    text = table()
    STUDY.mkdir(parents=True, exist_ok=True)
    (STUDY / "choice.md").write_text("<!-- python -m benchmarks.quality.prior_choice -->\n"
                                     + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
