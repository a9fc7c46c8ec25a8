"""Hugging Face Trainer: LoRA fine-tuning with a Laplace posterior written beside the adapter.

A tiny Llama sequence classifier (built from a config, nothing downloaded) with LoRA is
fine-tuned by ``transformers.Trainer`` on a 4-way task (the answer is the last token's id
mod 4, 80 % of the time). :class:`laplace_llm.callback.LaplaceCallback` fits the LoRA Laplace
posterior at every epoch's checkpoint and at the end, tunes its prior by the marginal
likelihood, logs the evidence through the trainer, and writes
``laplace_posterior.safetensors`` into each checkpoint folder and the output folder,
where ``trainer.save_model()`` puts the adapter. The posterior is then loaded from that
folder and compared with the MAP model on held-out data.

Run it in one process or under a launcher (every process fits its share of the data;
one posterior, written by the main process; on GPUs the trainer uses nccl, on CPUs gloo)::

    python examples/hf_trainer.py [--quick] [--out DIR]
    torchrun --nproc-per-node 2 examples/hf_trainer.py --quick
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer.py --quick
"""

import argparse
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.callback import LaplaceCallback

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_labels=4, pad_token_id=0)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")


def make_data(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(8, 64, (10,), generator=gen)
        ids[-1] = torch.randint(8, 24, (), generator=gen)
        noisy = torch.rand((), generator=gen) >= 0.8
        label = torch.randint(0, 4, (), generator=gen) if noisy else ids[-1] % 4
        items.append({"input_ids": ids, "attention_mask": torch.ones(10, dtype=torch.long),
                      "labels": label})
    return items


def base_model():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(CONFIG)


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float(-probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean())


def main(quick: bool = False, out: str = "hf-trainer-out") -> dict:
    train, test = make_data(64 if quick else 256, 0), make_data(128 if quick else 512, 1)
    model = get_peft_model(base_model(), LORA)
    epoch = len(train) // 8  # optimiser steps per epoch in one process
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=8, num_train_epochs=3 if quick else 30,
        learning_rate=1e-2, save_strategy="steps", save_steps=epoch * (1 if quick else 5),
        logging_strategy="epoch", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=default_data_collator)
    # LLMClassifier passes a sequence classifier's logits through; for a causal LM use
    # choices=[" A", " B", ...] (with the tokenizer) instead
    callback = LaplaceCallback(LLMClassifier, at_checkpoints=True, n_kfac=16,
                               fisher_type="ggn").attach(trainer)
    trainer.train()
    trainer.save_model()  # the adapter, beside the posterior the callback wrote
    result = {"evidence": callback.evidence, "best_checkpoint": callback.best_checkpoint(),
              "out": out}
    if not trainer.is_world_process_zero():
        return result

    # later, elsewhere: the adapter folder is all one needs
    reloaded = PeftModel.from_pretrained(base_model(), out, is_trainable=True).eval()
    clf = LLMClassifier(reloaded)
    la = LoRALaplace.load(out, clf)
    batch = default_data_collator(test)
    batch = {k: v.to(la._device) for k, v in batch.items()}
    with torch.no_grad():
        probs_map = torch.softmax(clf(batch), -1)
    probs_la = la(batch, pred_type="glm", link_approx="probit")
    labels = batch["labels"]
    result.update(nll_map=nll(probs_map, labels), nll_laplace=nll(probs_la, labels),
                  prior_precision=la.prior_precision.mean().item())
    print(callback.evidence_table())
    print(f"best checkpoint by evidence: {result['best_checkpoint']}")
    print(f"held-out NLL: MAP {result['nll_map']:.4f}, Laplace {result['nll_laplace']:.4f}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("LAPLACE_LLM_QUICK") == "1")
    parser.add_argument("--out", default="hf-trainer-out")
    cli = parser.parse_args()
    main(quick=cli.quick, out=cli.out)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # under torchrun the other ranks return before rank 0 has scored the held-out
        # set; leaving the process group to interpreter exit can abort in gloo's threads
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
