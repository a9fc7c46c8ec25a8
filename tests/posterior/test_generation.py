"""Posterior adapters for generation, and the GLM spread of an answer's log-likelihood.

References: ``la.sample`` with the same seed (the adapters must hold exactly its draws:
float64 weights written as safetensors and read back are bit-identical, so we assert
equality), laplace-torch's NN predictive with the same generator (the logits of the
loaded adapters are the same function of the same weights, asserted to 1e-12), and for
the answer moments the naive full forward with ``torch.func`` Jacobians contracted by
laplace-torch's ``functional_variance`` (1e-5 relative, as in test_candidates.py).
"""

import json

import pytest
import torch
from peft import PeftModel
from torch.utils.data import DataLoader

from laplace_llm import CandidateScorer, LoRALaplace
from laplace_llm.posterior.generation import answer_log_likelihood
from tests.fixtures.batches import DictDataset
from tests.fixtures.models import tiny_causal_lm, tiny_llama_lora, tiny_tokenizer
from tests.fixtures.naive_candidates import NaiveScorer, candidate_batch, split

DT = torch.float64


@pytest.fixture(scope="module")
def fitted():
    sc = CandidateScorer(tiny_llama_lora(seed=0, dtype=DT), n_candidates=3)
    la = LoRALaplace(sc, "classification", n_kfac=4, lr_threshold=0, seed=0, prior_precision=2.0)
    la.fit(DataLoader(DictDataset(split(candidate_batch(8, 3, seed=0), 0)), batch_size=4))
    return la


def test_sampled_adapters_hold_the_posterior_draws_and_give_the_nn_predictive(fitted, tmp_path):
    la = fitted
    mean_before = torch.cat([p.detach().flatten() for p in la.params])
    paths = la.sample_adapters(3, tmp_path, seed=5)
    assert [p.name for p in paths] == ["sample_000", "sample_001", "sample_002"]
    assert json.loads((tmp_path / "samples.json").read_text())["seed"] == 5
    # the model is back at the posterior mean
    assert torch.equal(torch.cat([p.detach().flatten() for p in la.params]), mean_before)
    draws = la.sample(3, generator=torch.Generator().manual_seed(5))
    names = [b.name for b in la.blocks]
    batch = candidate_batch(4, 3, seed=1, left=True)
    logits = []
    for path, draw in zip(paths, draws):
        loaded = PeftModel.from_pretrained(tiny_causal_lm("llama", seed=0, dtype=DT), path).eval()
        params = dict(loaded.named_parameters())
        start = 0
        for name, block in zip(names, la.blocks):
            n = block.module.weight.numel() if name.endswith("weight") else block.module.bias.numel()
            key = name.removeprefix("model.")
            assert torch.equal(params[key].detach().flatten(), draw[start : start + n])
            start += n
        assert start == draw.numel()
        with torch.no_grad():
            logits.append(CandidateScorer(loaded, n_candidates=3)(batch))
    logits = torch.stack(logits)
    nn_logits = la._nn_functional_samples(batch, 3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits, nn_logits, rtol=0, atol=1e-12)
    nn_probs = la(batch, pred_type="nn", link_approx="mc", n_samples=3,
                  generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits.softmax(-1).mean(0), nn_probs, rtol=0, atol=1e-12)


def test_sample_adapters_needs_a_peft_model(tmp_path):
    """LoRA layers injected without a PeftModel (peft's inject_adapter_in_model)."""
    from peft import LoraConfig, inject_adapter_in_model

    from tests.fixtures.models import MLP

    torch.manual_seed(0)
    mlp = inject_adapter_in_model(LoraConfig(r=2, target_modules=["l1"], init_lora_weights=False), MLP(6, 8, 3))
    for name, p in mlp.named_parameters():
        p.requires_grad_("lora_" in name)
    la = LoRALaplace(mlp, "classification")
    la.fit(DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 6), torch.randint(0, 3, (6,))),
                      batch_size=3))
    with pytest.raises(ValueError, match="holds no peft PeftModel"):
        la.sample_adapters(2, tmp_path)


def test_answer_log_likelihood_moments_equal_the_naive_glm(fitted):
    la = fitted
    tok = tiny_tokenizer(padding_side="left")
    prompts = ["Question : is the cat red ?", "a dog"]
    answers = [" yes it is", " no"]
    mean, var = answer_log_likelihood(la, tok, prompts, answers)
    enc = tok(prompts, padding=True, return_tensors="pt")
    ans = [tok.encode(a, add_special_tokens=False) for a in answers]
    L = max(map(len, ans))
    ids = torch.zeros(2, 1, L, dtype=torch.long)
    mask = torch.zeros(2, 1, L, dtype=torch.long)
    for i, a in enumerate(ans):
        ids[i, 0, : len(a)] = torch.tensor(a)
        mask[i, 0, : len(a)] = 1
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "candidate_ids": ids, "candidate_attention_mask": mask}
    naive_la = LoRALaplace(NaiveScorer(la.model.model), "classification", jacobian_free=False)
    Js, f = naive_la.backend.jacobians(batch)
    torch.testing.assert_close(mean, f[:, 0], rtol=0, atol=1e-12)
    ref = la.functional_variance(Js)[:, 0, 0]
    assert (torch.linalg.norm(var - ref) / torch.linalg.norm(ref)) < 1e-5
    assert (var > 0).all()
    # token ids of the answers give the same moments as the strings
    mean_ids, var_ids = answer_log_likelihood(la, tok, prompts, ans)
    torch.testing.assert_close(mean_ids, mean)
    torch.testing.assert_close(var_ids, var)
