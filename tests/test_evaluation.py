"""Centred selected-token logits, and the prediction/scoring helpers of the CLI and demo."""

import math

import pytest
import torch
from laplace import Laplace
from torch.utils.data import DataLoader

import laplace_llm  # noqa: F401
from laplace_llm import LLMClassifier
from laplace_llm.evaluation import (
    METHODS,
    CenteredLLMClassifier,
    collect_probs,
    format_table,
    score,
)
from laplace_llm.matrix import LowRankFactor
from tests.batches import TARGET_IDS, DictDataset, token_items
from tests.models import tiny_bert_seqcls_lora, tiny_llama_lora


def dense(f):
    return f.to_dense() if isinstance(f, LowRankFactor) else f


def loader(n=10, seed=0, batch_size=4):
    return DataLoader(DictDataset(token_items(n, 6, seed=seed, min_length=3)), batch_size=batch_size)


def test_centred_logits_keep_the_softmax_and_have_nearly_zero_mean():
    model = tiny_llama_lora(seed=0)
    plain, centred = LLMClassifier(model, TARGET_IDS), CenteredLLMClassifier(model, TARGET_IDS)
    batch = next(iter(loader()))
    with torch.no_grad():
        f, g = plain(batch), centred(batch)
    torch.testing.assert_close(torch.softmax(g, -1), torch.softmax(f, -1))
    torch.testing.assert_close(g.mean(-1), 0.01 * f.mean(-1))
    # same parameter names: a posterior of one loads with the other
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in centred.named_parameters()]


@pytest.mark.parametrize("fisher_type", ["ggn", "ef"])
def test_centring_leaves_the_curvature_unchanged(fisher_type):
    """Every Fisher probe sums to zero over classes, so Jᵀv ignores the common offset."""
    model = tiny_llama_lora(seed=0, dtype=torch.float64)
    fits = []
    for cls in (LLMClassifier, CenteredLLMClassifier):
        la = Laplace(cls(model, TARGET_IDS), "classification", subset_of_weights="lora",
                     fisher_type=fisher_type)
        la.fit(loader())
        fits.append(la)
    for F, G in zip(fits[0].H_facs.kfacs, fits[1].H_facs.kfacs, strict=True):
        for f, g in zip(F, G, strict=True):
            torch.testing.assert_close(dense(f), dense(g), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fits[0].log_marginal_likelihood(),
                               fits[1].log_marginal_likelihood(), rtol=1e-9, atol=0)


def test_centring_removes_the_common_mode_variance_that_moves_probit():
    model = tiny_llama_lora(seed=0, dtype=torch.float64)
    batch = next(iter(loader(seed=3)))
    out = {}
    for cls in (LLMClassifier, CenteredLLMClassifier):
        la = Laplace(cls(model, TARGET_IDS), "classification", subset_of_weights="lora",
                     fisher_type="ggn", prior_precision=0.1)
        la.fit(loader())
        out[cls] = la._glm_predictive_distribution(batch)
    (f, var), (g, var_c) = out[LLMClassifier], out[CenteredLLMClassifier]
    torch.testing.assert_close(g, f - (1 - 0.01) * f.mean(-1, keepdim=True))
    C = f.shape[-1]
    P = torch.eye(C, dtype=f.dtype) - (1 - 0.01) / C
    # the centred covariance is P Σ Pᵀ, and all-ones is (almost) in its null space
    torch.testing.assert_close(var_c, P @ var @ P.T, rtol=1e-5, atol=1e-8)
    ones = torch.ones(C, dtype=f.dtype) / math.sqrt(C)
    assert bool((ones @ var_c @ ones < 1e-3 * (ones @ var @ ones)).all())


def test_reward_heads_are_not_centred():
    model = tiny_bert_seqcls_lora(num_labels=1, seed=0)
    batch = next(iter(loader()))
    with torch.no_grad():
        torch.testing.assert_close(CenteredLLMClassifier(model)(batch), LLMClassifier(model)(batch))


def test_collect_probs_returns_every_method_in_loader_order():
    clf = CenteredLLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    la = Laplace(clf, "classification", subset_of_weights="lora")
    la.fit(loader())
    test = loader(n=7, seed=5, batch_size=3)
    probs, labels = collect_probs(clf, la, test, mc_samples=20)
    assert set(probs) == set(METHODS)
    assert labels.tolist() == [int(item["labels"]) for item in test.dataset.items]
    for p in probs.values():
        assert p.shape == (7, 4)
        torch.testing.assert_close(p.sum(-1), torch.ones(7, dtype=p.dtype))
    with torch.no_grad():
        expected = torch.cat([torch.softmax(clf(b).double(), -1) for b in test])
    torch.testing.assert_close(probs["map"], expected)
    # seeded Monte Carlo: the same numbers twice
    again, _ = collect_probs(clf, la, test, methods=["la_mc"], mc_samples=20)
    torch.testing.assert_close(again["la_mc"], probs["la_mc"], rtol=0, atol=0)


def test_collect_probs_needs_a_posterior_for_laplace_methods():
    clf = CenteredLLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    with pytest.raises(ValueError, match="fitted posterior"):
        collect_probs(clf, None, loader(), methods=["la_probit"])
    with pytest.raises(ValueError, match="unknown methods"):
        collect_probs(clf, None, loader(), methods=["bma"])


def test_score_and_table():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    s = score(probs, labels)
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3)
    table = format_table({"id": {"map": s}})
    assert "MAP" in table and f"{s['nll']:.4f}" in table
