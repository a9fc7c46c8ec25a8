"""Quickstart: a Laplace posterior over the LoRA weights of an LLM, the laplace-torch way.

A tiny Llama (built from a config, nothing downloaded) with LoRA answers 4-way questions
through the next-token logits of 4 answer tokens. It is fine-tuned briefly, then
``Laplace(..., subset_of_weights="lora")`` fits a Kronecker-factored posterior over the
LoRA weights, the marginal likelihood tunes the prior, and the GLM predictive gives
calibrated class probabilities. ``python examples/quickstart.py [--quick]``.
"""

import os
import sys

import torch
from laplace import Laplace
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig

import laplace_llm  # importing registers subset_of_weights="lora"


def main(quick: bool = False) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    model = get_peft_model(AutoModelForCausalLM.from_config(config), lora)
    clf = laplace_llm.LLMClassifier(model, target_ids=[4, 5, 6, 7])  # logits (batch, 4)

    def example(_):  # the answer is the last token's id mod 4 (80 % of the time)
        ids = torch.randint(8, 64, (10,))
        ids[-1] = torch.randint(8, 24, ())  # 16 tokens: a linear probe can tell them apart
        label = ids[-1] % 4 if torch.rand(()) < 0.8 else torch.randint(0, 4, ())
        return {"input_ids": ids, "labels": label}

    train = DataLoader([example(i) for i in range(64 if quick else 256)], batch_size=16)
    test = DataLoader([example(i) for i in range(128 if quick else 512)], batch_size=64)
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5 if quick else 20):  # fine-tune: this is the MAP the posterior centres on
        for batch in train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(clf(batch), batch["labels"]).backward()
            opt.step()

    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(train)
    la.optimize_prior_precision(method="marglik")
    batch = next(iter(test))
    map_probs = torch.softmax(clf(batch).detach(), -1)
    la_probs = la(batch, pred_type="glm", link_approx="probit")
    nll = lambda p: -p.log().gather(1, batch["labels"][:, None]).mean().item()  # noqa: E731
    out = {"prior_precision": la.prior_precision.mean().item(),
           "log_marglik": la.log_marginal_likelihood().item(),
           "nll_map": nll(map_probs), "nll_laplace": nll(la_probs),
           "confidence_map": map_probs.max(-1).values.mean().item(),
           "confidence_laplace": la_probs.max(-1).values.mean().item()}
    for key, value in out.items():
        print(f"{key:<20} {value:.4f}")
    return out


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:] or os.environ.get("LAPLACE_LLM_QUICK") == "1")
