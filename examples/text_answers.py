"""Answers in words: candidates scored by likelihood, and posterior adapters for generation.

A tiny Llama (built from a config, nothing downloaded) with LoRA learns a 3-way task whose
labels are phrases of different token lengths (token ids standing for " very negative",
" very positive" and " neutral": two share their first token). ``CandidateScorer`` scores
each label by its log-likelihood after the prompt; after a short over-fitting
fine-tune, ``Laplace(..., subset_of_weights="lora")`` fits the posterior, the marginal
likelihood tunes the prior, and MAP is compared with the GLM predictive on held-out
prompts. Then four posterior samples are written as peft adapters, each generates the
answer to one prompt, and ``answer_log_likelihood`` gives the GLM mean ± standard
deviation of the MAP answer's log-likelihood. ``python examples/text_answers.py [--quick]``.
"""

import os
import sys
import tempfile
import warnings

import torch
import transformers
from laplace import Laplace
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig

import laplace_llm  # importing registers subset_of_weights="lora"
from laplace_llm.posterior.generation import answer_log_likelihood

LABELS = [[30, 31], [30, 32, 33], [34]]  # three answers of 2, 3 and 1 tokens


def main(quick: bool = False) -> dict:
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    # peft notes that a LoRA on lm_head makes adapter folders carry the head's weights
    warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, pad_token_id=0)
    base = AutoModelForCausalLM.from_config(config)
    tmp = tempfile.TemporaryDirectory()
    base_dir = os.path.join(tmp.name, "base")
    base.save_pretrained(base_dir)  # the pretrained model that adapters load onto
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    model = get_peft_model(base, lora)
    L = max(map(len, LABELS))
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for c, tokens in enumerate(LABELS):
        ids[c, : len(tokens)], mask[c, : len(tokens)] = torch.tensor(tokens), 1
    clf = laplace_llm.CandidateScorer(model, ids, mask)  # scores (batch, 3)

    def example(_):  # the answer is the last token's id mod 3 (80 % of the time)
        x = torch.randint(8, 30, (8,))
        label = x[-1] % 3 if torch.rand(()) < 0.8 else torch.randint(0, 3, ())
        return {"input_ids": x, "labels": label}

    train = DataLoader([example(i) for i in range(48 if quick else 192)], batch_size=16)
    test = DataLoader([example(i) for i in range(96 if quick else 384)], batch_size=96 if quick else 384)
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15 if quick else 40):  # fine-tune until over-confident: the MAP
        for batch in train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(clf(batch), batch["labels"]).backward()
            opt.step()
    model.eval()

    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron",
                 seed=0)
    la.fit(train)
    la.optimize_prior_precision(method="marglik")
    batch = next(iter(test))
    with torch.no_grad():
        map_probs = clf(batch).softmax(-1)
    la_probs = la(batch, pred_type="glm", link_approx="probit")
    nll = lambda p: -p.log().gather(1, batch["labels"][:, None]).mean().item()  # noqa: E731
    acc = lambda p: (p.argmax(-1) == batch["labels"]).float().mean().item()  # noqa: E731
    out = {"prior_precision": la.prior_precision.mean().item(),
           "nll_map": nll(map_probs), "nll_laplace": nll(la_probs),
           "accuracy_map": acc(map_probs), "accuracy_laplace": acc(la_probs)}

    # open generation: posterior adapters, each answering one prompt
    prompt = {"input_ids": batch["input_ids"][:1], "attention_mask": torch.ones_like(batch["input_ids"][:1])}
    answers = []
    with tmp:
        for path in la.sample_adapters(4, os.path.join(tmp.name, "samples"), seed=0):
            sample = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path)
            generated = sample.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
            answers.append(generated[0, 8:].tolist())
    with torch.no_grad():
        map_answer = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 8:]
    mean, var = answer_log_likelihood(la, None, prompt, [map_answer.tolist()])
    out.update(sampled_answers=answers, map_answer=map_answer.tolist(),
               answer_loglik=mean.item(), answer_loglik_std=var.sqrt().item())
    for key, value in out.items():
        print(f"{key:<20} {value if isinstance(value, list) else f'{value:.4f}'}")
    return out


if __name__ == "__main__":
    main(quick="--quick" in sys.argv or os.environ.get("LAPLACE_LLM_QUICK") == "1")
