"""Reward models: LoRALaplace with ``likelihood="reward_modeling"`` against laplace-torch.

A reward model is a sequence classifier with one output. It is fitted on preference
pairs, input ``(B, 2, T)`` and output ``(B, 2)`` with the label the index of the
preferred answer (Bradley-Terry as two-way classification), and predicts single
sequences ``(B, T)`` as a regression output: mean ``(B, 1)``, variance ``(B, 1, 1)``.

Oracle: at full rank (``n_kfac`` ≥ every factor side) and ``fisher_type="ggn"`` the
posterior must equal laplace-torch's ``Laplace(model, "reward_modeling", "all", "kron",
backend=CurvlinopsGGN)`` on the same trainable weights (LoRA + the trained head). The
models are float64, so agreement is at rounding level (~1e-14); we assert 1e-8 on
factors and 1e-5 relative on rewards, variances and the evidence. curvlinops knows no
attention mask, so the oracle batches have no padding; padding is checked separately
by fitting the same pairs with and without it.
"""

import pytest
import torch
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch.utils.data import DataLoader

import laplace_llm  # noqa: F401  (registers subset_of_weights="lora")
from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.data import make_loader
from laplace_llm.matrix import LowRankFactor
from tests.fixtures.batches import DictDataset
from tests.fixtures.models import add_lora, tiny_seqcls, tiny_tokenizer

HEADS = {"bert": ("classifier", ("query", "value")), "llama": ("score", ("q_proj", "v_proj"))}


def reward_model(family: str, seed: int = 0) -> LLMClassifier:
    """Float64 one-output sequence classifier with LoRA and a trained head."""
    head, targets = HEADS[family]
    model = tiny_seqcls(family, num_labels=1, seed=seed).to(torch.float64)
    peft_model = add_lora(
        model, seed=seed, r=4, target_modules=targets, modules_to_save=[head],
        task_type="SEQ_CLS",
    )
    return LLMClassifier(peft_model)


def pair_items(n: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(8, 100, (2, length), generator=gen)
        items.append({
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (), generator=gen),
        })
    return items


def singles(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 100, (n, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def dense(f):
    return f.to_dense() if isinstance(f, LowRankFactor) else f


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def fit_pair(family: str, approx: str, lr_threshold: int):
    model = reward_model(family)
    loader = DataLoader(DictDataset(pair_items(10, 6, seed=0)), batch_size=4)
    la = Laplace(
        model, "reward_modeling", subset_of_weights="lora", hessian_structure="kron",
        fisher_type="ggn", n_kfac=256, lr_threshold=lr_threshold, kfac_approx=approx,
    )
    la.fit(loader)
    ref = Laplace(
        model, "reward_modeling", "all", "kron", backend=CurvlinopsGGN,
        asdl_fisher_kwargs={"kfac_approx": approx},
    )
    ref.fit(loader)
    return model, la, ref


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_full_rank_reward_posterior_equals_laplace_torch(family, approx):
    model, la, ref = fit_pair(family, approx, lr_threshold=0)
    assert type(la) is LoRALaplace and la.n_outputs == 2  # pairs: (B, 2) logits
    for F, G in zip(la.H_facs.kfacs, ref.H_facs.kfacs, strict=True):
        for f, g in zip(F, G, strict=True):
            assert rel(dense(f), g) < 1e-8

    x = singles(5, 6, seed=7)
    mean, var = la(x, pred_type="glm")
    ref_mean, ref_var = ref(x, pred_type="glm")
    assert mean.shape == (5, 1) and var.shape == (5, 1, 1)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=0)
    # the reward mean is the MAP reward of each single sequence
    with torch.no_grad():
        torch.testing.assert_close(mean, model(x), rtol=1e-10, atol=1e-12)

    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-5, atol=0
    )
    la.optimize_prior_precision(method="marglik", n_steps=50, prior_structure="scalar")
    ref.optimize_prior_precision(method="marglik", n_steps=50)
    torch.testing.assert_close(la.prior_precision, ref.prior_precision, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-5, atol=0
    )
    # after tuning the prior the variances still agree
    _, var = la(x, pred_type="glm")
    _, ref_var = ref(x, pred_type="glm")
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=0)


def test_dense_factors_give_the_same_reward_posterior():
    """lr_threshold above every side keeps all factors dense: same result."""
    _, la, ref = fit_pair("bert", "expand", lr_threshold=128)
    assert not any(isinstance(f, LowRankFactor) for F in la.H_facs.kfacs for f in F)
    x = singles(4, 6, seed=3)
    torch.testing.assert_close(la(x)[1], ref(x)[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-5, atol=0
    )


def test_pairs_predict_preference_probabilities_like_laplace_torch():
    """``fitting=True`` on pairs is the Bradley-Terry (two-way) GLM predictive."""
    _, la, ref = fit_pair("llama", "expand", lr_threshold=0)
    pairs = {k: torch.stack([v[: 6], v[6:]], 1) for k, v in singles(12, 6, seed=5).items()}
    probs = la(pairs, pred_type="glm", link_approx="probit", fitting=True)
    ref_probs = ref(pairs, pred_type="glm", link_approx="probit", fitting=True)
    assert probs.shape == (6, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, dtype=probs.dtype))
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=0)


def preference_records(n: int, seed: int) -> list[dict[str, str]]:
    import random

    rng = random.Random(seed)
    words = ["good", "bad", "yes", "no", "cat", "dog", "red", "blue", "the", "a"]
    return [
        {
            "prompt": " ".join(rng.choices(words, k=rng.randint(1, 3))),
            "chosen": " ".join(rng.choices(words, k=rng.randint(1, 4))),
            "rejected": " ".join(rng.choices(words, k=rng.randint(1, 4))),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_preference_jsonl_pipeline_is_padding_invariant(tmp_path, approx):
    """Preference records -> padded (B, 2, T) batches: the posterior is the same as with
    one pair per batch (no padding at all), for left and right padding."""
    import json

    from laplace_llm.data import read_jsonl

    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in preference_records(9, seed=1)) + "\n")
    records = read_jsonl(path, "preference")
    model = reward_model("bert")

    def fit(batch_size, side):
        tok = tiny_tokenizer(padding_side=side)
        loader = make_loader(records, tok, batch_size, "preference", pair_order="random")
        batch = next(iter(loader))
        assert batch["input_ids"].ndim == 3 and batch["input_ids"].shape[1] == 2
        la = Laplace(
            model, "reward_modeling", subset_of_weights="lora", hessian_structure="kron",
            fisher_type="ggn", kfac_approx=approx,
        )
        la.fit(loader)
        return la

    # BERT takes absolute positions, so only right padding leaves it unchanged
    unpadded = fit(1, "right")
    padded = fit(4, "right")
    torch.testing.assert_close(
        padded.log_marginal_likelihood(), unpadded.log_marginal_likelihood(), rtol=1e-8, atol=0
    )
    x = singles(3, 5, seed=2)
    torch.testing.assert_close(padded(x)[1], unpadded(x)[1], rtol=1e-8, atol=0)
    assert bool((padded(x)[1] > 0).all())
