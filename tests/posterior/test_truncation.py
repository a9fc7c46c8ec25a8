"""The truncated part of low-rank factors: the isotropic remainder against exact K-FAC.

A rank-``k`` factor keeps its leading eigenpairs; ``truncation="isotropic"`` gives the
discarded directions the mean discarded eigenvalue (from the exact trace), and
``truncation="prior"`` leaves them to the prior. Exact K-FAC (``n_kfac`` ≥ every side)
is the reference. The data here are few enough positions that no intermediate
truncation happens while streaming, so each rank-``k`` factor holds the exact top-``k``
eigenpairs and the comparisons isolate the treatment of the rest.
"""

import pytest
import torch

from laplace_llm import LLMClassifier, LoRALaplace
from tests.fixtures.batches import TARGET_IDS, token_loader
from tests.fixtures.models import tiny_llama_lora

SIDE = 32  # hidden size: the large factors' side (lr_threshold=4 keeps only r dense)


def fitted(n_kfac, truncation):
    model = LLMClassifier(tiny_llama_lora(seed=0, dtype=torch.float64, hidden=SIDE), TARGET_IDS)
    la = LoRALaplace(model, "classification", fisher_type="ggn", n_kfac=n_kfac,
                     lr_threshold=4, truncation=truncation, prior_precision=0.3)
    la.fit(token_loader(n=6, length=5, batch_size=6))
    return la


def glm_var(la, batch):
    return la._glm_predictive_distribution(batch)[1].diagonal(dim1=-2, dim2=-1)


def test_evidence_approaches_exact_monotonically_as_rank_grows():
    """At a fixed prior the log evidence with the isotropic remainder rises to the exact
    one as n_kfac grows, and without it (the prior alone) falls to it: the remainder's
    log-determinant overstates the discarded log-eigenvalues (Jensen, per Kronecker row),
    less with each eigenvalue kept, and the prior alone understates them. The remainder
    is the nearer one at every rank."""
    exact = fitted(SIDE, "isotropic").log_marginal_likelihood().item()
    ranks = [1, 2, 4, 8, 16, 24]
    iso = [fitted(k, "isotropic").log_marginal_likelihood().item() for k in ranks]
    pri = [fitted(k, "prior").log_marginal_likelihood().item() for k in ranks]
    assert all(a >= b - 1e-9 for a, b in zip(iso[1:], iso))  # non-decreasing
    assert all(a <= b + 1e-9 for a, b in zip(pri[1:], pri))  # non-increasing
    assert all(i <= exact + 1e-9 <= p + 2e-9 for i, p in zip(iso, pri))
    assert all(abs(i - exact) < abs(p - exact) for i, p in zip(iso, pri))


def test_predictive_variance_of_the_remainder_is_nearer_exact():
    """The GLM variance with the remainder is nearer the exact K-FAC variance than the
    prior-only truncation at every rank, and its error shrinks from rank 1 to rank 24."""
    batch = next(iter(token_loader(n=4, length=5, seed=3)))
    exact = glm_var(fitted(SIDE, "isotropic"), batch)
    errors = {}
    for k in (1, 4, 16, 24):
        iso = glm_var(fitted(k, "isotropic"), batch)
        pri = glm_var(fitted(k, "prior"), batch)
        e_iso = ((iso - exact).abs() / exact).mean().item()
        e_pri = ((pri - exact).abs() / exact).mean().item()
        assert e_iso < e_pri
        errors[k] = e_iso
    assert errors[24] < errors[1]


@pytest.mark.parametrize("truncation", ["isotropic", "prior"])
def test_full_rank_ignores_the_truncation_option(truncation):
    """With n_kfac ≥ every side nothing is discarded: both options give the same posterior."""
    a, b = fitted(SIDE, truncation), fitted(SIDE, "prior")
    torch.testing.assert_close(a.log_marginal_likelihood(), b.log_marginal_likelihood(),
                               rtol=1e-12, atol=0)
