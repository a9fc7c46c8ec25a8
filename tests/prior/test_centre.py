"""``prior_mean_from``: a prior centred at the weights a fine-tune started from.

Reference: the evidence of laplace-torch's formula depends on the prior mean only through
``−½ (θ*−μ₀)ᵀ Λ₀ (θ*−μ₀)``, so with a per-block prior ``δ_b`` the change of the log
marginal likelihood between ``μ₀ = 0`` and ``μ₀ = θ₀`` is
``−½ Σ_b δ_b (‖θ*_b − θ₀_b‖² − ‖θ*_b‖²)``, computed here from ``model.named_parameters()``
block by block, without the helper's ordering. Distinct ``δ_b`` make a wrong order or a
wrong block show (float64: measured 1e-14 relative, asserted at 1e-10).
"""

import pytest
import torch
from peft import get_peft_model_state_dict

from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.prior.centre import prior_mean_from
from tests.fixtures.batches import TARGET_IDS, token_loader
from tests.fixtures.models import tiny_llama_lora


def started_and_trained():
    """A tiny Llama with peft's usual start (random A, zero B), its starting LoRA weights,
    and the model after a few optimiser steps."""
    peft_model = tiny_llama_lora(seed=0, dtype=torch.float64, hidden=32, init_lora_weights=True)
    start = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_start = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    model = LLMClassifier(peft_model, TARGET_IDS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for batch in token_loader(n=6, length=5, batch_size=6):
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
            opt.step()
    return model, start, peft_start


@pytest.mark.parametrize("keys", ["named_parameters", "peft_state_dict"])
def test_centring_changes_the_evidence_by_the_blockwise_prior_term(keys):
    model, start, peft_start = started_and_trained()
    la = LoRALaplace(model, "classification", fisher_type="ggn", n_kfac=3, lr_threshold=4)
    la.fit(token_loader(n=6, length=5, batch_size=6))
    la.prior_precision = torch.linspace(0.2, 3.0, la.n_layers, dtype=torch.float64)
    at_zero = la.log_marginal_likelihood()

    la.prior_mean = prior_mean_from(la, start if keys == "named_parameters" else peft_start)
    centred = la.log_marginal_likelihood()

    trained = dict(model.named_parameters())
    change = 0.0
    for delta, block in zip(la.prior_precision, la.blocks):
        theta = trained[block.name].detach()
        theta0 = start[block.name.removeprefix("model.")]
        change += -0.5 * delta * ((theta - theta0).square().sum() - theta.square().sum())
    assert abs(float(change)) > 1.0  # the start's A carries a norm the evidence sees
    torch.testing.assert_close(centred - at_zero, change, rtol=1e-10, atol=0)


def test_missing_and_misshapen_entries_name_the_block_and_the_fix():
    model, start, _ = started_and_trained()
    la = LoRALaplace(model, "classification", n_kfac=3)
    first = next(iter(start))
    with pytest.raises(ValueError, match=r"1 of \d+ blocks have no entry.*before training"):
        prior_mean_from(la, {k: v for k, v in start.items() if k != first})
    bad = dict(start)
    bad[first] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape .*same adapter configuration"):
        prior_mean_from(la, bad)
