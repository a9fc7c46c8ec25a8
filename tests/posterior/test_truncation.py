"""The truncated part of low-rank factors: the isotropic remainder against exact K-FAC.

A rank-``k`` factor keeps its leading eigenpairs; ``truncation="isotropic"`` gives the
discarded directions the mean discarded eigenvalue (from the exact trace), and
``truncation="prior"`` leaves them to the prior. Exact K-FAC (``n_kfac`` ≥ every side)
is the reference. The data here are few enough positions that no intermediate
truncation happens while streaming, so each rank-``k`` factor holds the exact top-``k``
eigenpairs and the comparisons isolate the treatment of the rest.
"""

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


def test_full_rank_ignores_the_truncation_option():
    """With n_kfac ≥ every side nothing is discarded: both options give the same evidence
    and GLM variance, and every remainder is 0 up to rounding (≤ 1e-13 of the factor's
    largest eigenvalue; measured ≤ 2e-15 absolute, eigenvalues 4e-5 to 11). At n_kfac = 24 < 32 the same two
    posteriors differ (the factors of side 32 have rank 30 > 24), so the option is in
    effect and the equality at full rank is not that of two identical calls (the old
    test compared the "prior" fit with itself)."""
    batch = next(iter(token_loader(n=4, length=5, seed=3)))
    iso, pri = fitted(SIDE, "isotropic"), fitted(SIDE, "prior")
    for rs, ls in zip(iso.H.remainders, iso.H.eigenvalues):
        assert all(float(r) <= 1e-13 * float(lam.max()) for r, lam in zip(rs, ls))
    torch.testing.assert_close(iso.log_marginal_likelihood(), pri.log_marginal_likelihood(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(glm_var(iso, batch), glm_var(pri, batch), rtol=1e-10, atol=0)
    iso24, pri24 = fitted(24, "isotropic"), fitted(24, "prior")
    assert max(float(r) for rs in iso24.H.remainders for r in rs) > 1e-3
    gap = abs(float(iso24.log_marginal_likelihood() - pri24.log_marginal_likelihood()))
    assert gap > 1e-6
