"""The prediction and scoring helpers of the CLI, the demo and the examples."""

import math

import pytest
import torch
from laplace import Laplace
from torch.utils.data import DataLoader

import laplace_llm  # noqa: F401
from laplace_llm import LLMClassifier
from laplace_llm.app.evaluation import (
    METHODS,
    METRICS,
    OOD_METRICS,
    collect_probs,
    format_table,
    ood_score,
    score,
)
from laplace_llm.tools import metrics
from laplace_llm.tools.baselines import TemperatureScaling
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items
from tests.fixtures.models import tiny_llama_lora


def loader(n=10, seed=0, batch_size=4):
    return DataLoader(DictDataset(token_items(n, 6, seed=seed, min_length=3)), batch_size=batch_size)


def test_collect_probs_returns_every_method_in_loader_order():
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS, center=True)
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
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS, center=True)
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
    # AURC by hand: answered in order 0.9 (right), 0.8 (right), 0.6 (wrong): risks 0, 0, 1/3
    assert s["aurc"] == pytest.approx((0 + 0 + 1 / 3) / 3)
    assert list(s) == list(METRICS)
    table = format_table({"id": {"map": s}})
    assert "MAP" in table and f"{s['nll']:.4f}" in table and f"{s['aurc']:.4f}" in table
    assert "ood_auroc" not in table


def test_ood_score_and_a_table_with_ood_columns_on_some_rows():
    probs_in = torch.tensor([[0.9, 0.1], [0.7, 0.3]], dtype=torch.float64)
    probs_out = torch.tensor([[0.6, 0.4], [0.8, 0.2], [0.5, 0.5]], dtype=torch.float64)
    o = ood_score(probs_in, probs_out)
    # pairs (in, out) where in is more confident: 0.9 beats all 3, 0.7 beats 0.6 and 0.5
    assert o["ood_auroc"] == pytest.approx(5 / 6)
    assert o["ood_auroc_entropy"] == pytest.approx(metrics.ood_auroc(probs_in, probs_out, "entropy"))
    labels = torch.tensor([0, 1])
    results = {"id": {"map": {**score(probs_in, labels), **o}, "ts": score(probs_in, labels)},
               "shift": {"map": score(probs_in, labels)}}
    lines = format_table(results).splitlines()
    assert lines[0].split()[-len(METRICS) - len(OOD_METRICS):] == [*METRICS, *OOD_METRICS]
    assert f"{5 / 6:.4f}" in lines[2]
    # the long baseline label widens the method column; rows without OOD values end early
    assert lines[3].startswith("id         Temperature scaling (validation)")
    assert len(lines[4]) < len(lines[2])


def test_collect_probs_temperature_scaling_is_softmax_of_logits_over_t():
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS, center=True)
    ts = TemperatureScaling(clf)
    T = ts.fit(loader(n=12, seed=3))
    test = loader(n=7, seed=5, batch_size=3)
    probs, _ = collect_probs(clf, None, test, methods=["map", "ts"], ts=ts)
    with torch.no_grad():
        logits = torch.cat([clf(b).double() for b in test])
    torch.testing.assert_close(probs["ts"], torch.softmax(logits / T, -1), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="fitted TemperatureScaling"):
        collect_probs(clf, None, test, methods=["ts"], ts=TemperatureScaling(clf))
