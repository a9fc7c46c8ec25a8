"""bf16 / fp16 models: the posterior is accumulated and solved in float32.

Reference: the same weights in float32. Measured deviations (seed 0, 20 sequences of 8
tokens, n_kfac 8, all factors low rank) and the asserted bounds:

| quantity | bf16 measured | bf16 bound | fp16 measured | fp16 bound |
|---|---|---|---|---|
| K-FAC factors (rel. Frobenius) | 3.4e-3 | 3e-2 | 6e-4 | 5e-3 |
| GLM covariance (rel. Frobenius) | 7.3e-3 | 5e-2 | 1.1e-3 | 1e-2 |
| probit probabilities (abs) | 2.1e-4 | 5e-3 | 1.2e-5 | 5e-4 |
| log marginal likelihood (rel) | 2.2e-4 | 5e-3 | 2.3e-5 | 1e-3 |
| marglik prior precision (rel) | 4.6e-4 | 1e-2 | 3.2e-5 | 1e-3 |

The bounds are about ten times the measurement: bf16 keeps 8 mantissa bits (relative
rounding 4e-3 per operation), fp16 keeps 11 (5e-4), and every quantity passes
through the model's half-precision forward and backward.
"""

import pytest
import torch

from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.matrix import LowRankFactor
from tests.fixtures.batches import TARGET_IDS, token_loader
from tests.fixtures.models import tiny_llama_lora

BOUNDS = {
    torch.bfloat16: dict(factor=3e-2, var=5e-2, prob=5e-3, lml=5e-3, prior=1e-2),
    torch.float16: dict(factor=5e-3, var=1e-2, prob=5e-4, lml=1e-3, prior=1e-3),
}


def rel(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def dense(f):
    return f.to_dense() if isinstance(f, LowRankFactor) else f


def fitted(dtype):
    clf = LLMClassifier(tiny_llama_lora(seed=0, dtype=torch.float32), TARGET_IDS).to(dtype)
    la = LoRALaplace(clf, "classification", fisher_type="ggn", n_kfac=8, lr_threshold=0)
    la.fit(token_loader(n=20, length=8))
    la.optimize_prior_precision(method="marglik", n_steps=50)
    return la


@pytest.fixture(scope="module")
def reference():
    return fitted(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_matches_float32(reference, dtype):
    la = fitted(dtype)
    bound = BOUNDS[dtype]
    assert next(la.model.parameters()).dtype == dtype  # the model stayed in half precision
    for F, G in zip(la.H_facs.kfacs, reference.H_facs.kfacs):
        for f, g in zip(F, G):
            assert f.dtype == torch.float32
            assert rel(dense(f), dense(g)) < bound["factor"]
    batch = next(iter(token_loader(n=4, length=8, seed=3)))
    p, p_ref = la(batch), reference(batch)
    assert p.dtype == torch.float32
    assert (p - p_ref).abs().max() < bound["prob"]
    _, var = la._glm_predictive_distribution(batch)
    _, var_ref = reference._glm_predictive_distribution(batch)
    assert rel(var, var_ref) < bound["var"]
    lml, lml_ref = la.log_marginal_likelihood(), reference.log_marginal_likelihood()
    assert torch.isfinite(lml) and abs((lml - lml_ref) / lml_ref) < bound["lml"]
    assert abs(la.prior_precision / reference.prior_precision - 1).max().item() < bound["prior"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_nn_predictive_restores_half_precision_weights(dtype):
    clf = LLMClassifier(tiny_llama_lora(seed=1, dtype=torch.float32), TARGET_IDS).to(dtype)
    la = LoRALaplace(clf, "classification", n_kfac=4, seed=0)
    la.fit(token_loader(n=8, length=5))
    before = [p.detach().clone() for p in la.params]
    probs = la(next(iter(token_loader(n=3, length=5, seed=2))), pred_type="nn", link_approx="mc", n_samples=5)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    for b, p in zip(before, la.params):
        assert p.dtype == dtype and torch.equal(b, p)


def test_near_singular_factors_give_finite_evidence():
    """Identical sequences make every factor rank one; eigenvalues must stay ≥ 0 and the
    marglik optimisation must not produce NaN."""
    clf = LLMClassifier(tiny_llama_lora(seed=2), TARGET_IDS)
    loader = token_loader(n=1, length=4)
    item = loader.dataset[0]
    loader.dataset.items = [item] * 12
    la = LoRALaplace(clf, "classification", fisher_type="ggn", n_kfac=64)
    la.fit(loader)
    assert all((lam >= 0).all() for ls in la.H.eigenvalues for lam in ls)
    la.optimize_prior_precision(method="marglik", n_steps=100, init_prior_prec=1e-3)
    assert torch.isfinite(la.prior_precision).all() and (la.prior_precision > 0).all()
    assert torch.isfinite(la.log_marginal_likelihood())
