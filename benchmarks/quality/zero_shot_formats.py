"""Zero-shot accuracy of SmolLM2-135M-Instruct: lettered answers against text answers.

On the first 100 test questions (the same shuffle as ``paper_table_underfit.py``) of each set,
without fine-tuning: the letters' next-token logits after the lettered prompt
(``LLMClassifier.from_choices``) against each choice's summed log-likelihood after
``"{question}\\nAnswer:"`` (``CandidateScorer``). Printed, this machine: ARC-Easy letters
0.24 / text 0.54; OpenBookQA 0.23 / 0.19; CommonsenseQA 0.18 / 0.22; BoolQ 0.34 / 0.35.
With ``mean`` (each choice's log-likelihood divided by its number of tokens): text
ARC-Easy 0.49, OpenBookQA 0.40, CommonsenseQA 0.27, BoolQ 0.35 (letters unchanged): the
summed score's preference for short answers is what puts OpenBookQA below chance.

Run: ``python -m benchmarks.quality.zero_shot_formats`` (``mean`` as first argument: length-
averaged log-likelihoods).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import laplace_llm  # noqa: E402
from benchmarks.quality import paper_table_underfit as pt  # noqa: E402
from laplace_llm.data import make_candidate_loader, make_loader  # noqa: E402
from laplace_llm.models.pretrained import load_causal_lm, smollm2_gguf  # noqa: E402


def main(reduction: str = "sum") -> None:
    torch.set_num_threads(2)
    folder, gguf = smollm2_gguf()
    base, tok = load_causal_lm(folder, gguf_file=gguf)
    for name, c in pt.SETS.items():
        test = pt.read_set(name, "test", c, 450)
        random.Random(1234).shuffle(test)
        test = test[:100]
        y = torch.tensor([r["answer"] for r in test])
        letters = laplace_llm.LLMClassifier.from_choices(base, tok, pt.mcqa_choices(c)).eval()
        text = laplace_llm.CandidateScorer(base, n_candidates=c, reduction=reduction).eval()
        with torch.no_grad():
            f = torch.cat([letters(b) for b in make_loader(test, tok, 8, "mcqa")])
            g = torch.cat([text(b) for b in make_candidate_loader(test, tok, 8)])
        acc_l = (f.argmax(-1) == y).double().mean().item()
        acc_t = (g.argmax(-1) == y).double().mean().item()
        print(f"{name}: letters {acc_l:.2f}, text {acc_t:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sum")
