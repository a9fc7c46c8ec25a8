"""GLM moments of many priors from one Jacobian pass, and the gridsearch built on them.

References: the moments each prior gives when it is set and the predictive is called
(the code path every other predictive test checks against dense matrices and
laplace-torch), and laplace-torch's own ``_gridsearch`` loop run on the same object.
Float64 throughout; the one-pass moments do the same arithmetic per prior, so they
agree to rounding (asserted at 1e-12 relative).
"""

import pytest
import torch
from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.utils import RunningNLLMetric, validate
from torch.utils.data import DataLoader, TensorDataset

from laplace_llm import LLMClassifier, LoRADiagLaplace, LoRAFullLaplace, LoRALaplace
from tests.fixtures.batches import TARGET_IDS, token_loader
from tests.fixtures.models import lora_mlp, tiny_llama_lora

PARENTS = {LoRALaplace: KronLaplace, LoRADiagLaplace: DiagLaplace, LoRAFullLaplace: FullLaplace}
GRID = [1e-2, 0.3, 1.0, 4.0, 30.0, 1e3]


def mlp_loader(regression=False, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (torch.randn(n, 3, generator=g, dtype=torch.float64) if regression
         else torch.randint(3, (n,), generator=g))
    return DataLoader(TensorDataset(X, y), batch_size=5)


def mlp_laplace(flavor, likelihood="classification"):
    model = lora_mlp(seed=3, d_in=3, hidden=20, d_out=3, alpha=2, target_modules=("l1", "l2"),
                     modules_to_save=None)
    kw = {"n_kfac": 4} if flavor is LoRALaplace else {}  # kron: truncated factors
    la = flavor(model, likelihood, fisher_type="ggn", **kw)
    la.fit(mlp_loader(likelihood == "regression"))
    return la


@pytest.fixture(scope="module")
def llm_laplace():
    torch.manual_seed(0)
    model = LLMClassifier(tiny_llama_lora(seed=0, dtype=torch.float64), TARGET_IDS)
    la = LoRALaplace(model, "classification", n_kfac=6, lr_threshold=0)
    la.fit(token_loader(n=8, length=6, seed=1, batch_size=4))
    return la


def moments_one_by_one(la, X, grid, joint=False):
    saved = la.prior_precision.clone()
    out = []
    for prior in grid:
        la.prior_precision = prior
        out.append(la._glm_predictive_distribution(X, joint=joint))
    la.prior_precision = saved
    return out


def assert_moments_equal(got, want):
    assert len(got) == len(want)
    for (mu, var), (mu_ref, var_ref) in zip(got, want):
        torch.testing.assert_close(mu, mu_ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(var, var_ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("flavor", list(PARENTS))
@pytest.mark.parametrize("joint", [False, True])
def test_moments_over_priors_equal_each_prior_set_in_turn(flavor, joint):
    la = mlp_laplace(flavor)
    la.prior_precision = 2.5
    X = next(iter(mlp_loader(seed=7)))[0]
    layerwise = torch.linspace(0.5, 8.0, la.n_layers, dtype=torch.float64)
    grid = [*GRID, layerwise]
    got = la.glm_moments_over_priors(X, grid, joint=joint)
    assert_moments_equal(got, moments_one_by_one(la, X, grid, joint=joint))
    assert float(la.prior_precision) == 2.5  # left as it was
    # the priors are distinct posteriors, not one moment repeated
    assert not torch.allclose(got[0][1], got[-2][1])


def test_moments_over_priors_on_a_language_model(llm_laplace):
    la = llm_laplace
    batch = next(iter(token_loader(n=5, length=6, seed=9)))
    got = la.glm_moments_over_priors(batch, torch.tensor(GRID, dtype=torch.float64))
    assert_moments_equal(got, moments_one_by_one(la, batch, GRID))


def test_moments_over_priors_refuses_an_empty_grid(llm_laplace):
    batch = next(iter(token_loader(n=2, length=6, seed=9)))
    with pytest.raises(ValueError, match="at least one prior"):
        llm_laplace.glm_moments_over_priors(batch, [])
    with pytest.raises(ValueError, match="finite and > 0"):
        llm_laplace.glm_moments_over_priors(batch, [1.0, -2.0])


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def laplace_torch_loop(la, **kw):
    """laplace-torch's own _gridsearch loop on ``la`` (every prior predicted anew)."""
    return PARENTS[type(la)]._gridsearch(la, **kw)


def offline_nll(probs, y):
    """A stateless loss (validate's offline branch): laplace-torch's loop scores each
    prior with it on its own, so the two loops must agree exactly."""
    return -probs.gather(-1, y[:, None]).log().mean()


def offline_gaussian_nll(mu, var, y):
    return torch.nn.functional.gaussian_nll_loss(mu, y, var.diagonal(dim1=-2, dim2=-1))


def spy_on_predictive(la, seen):
    original = la._glm_predictive_distribution

    def spy(X, joint=False, diagonal_output=False):
        out = original(X, joint=joint, diagonal_output=diagonal_output)
        seen.append((float(la.prior_precision), out[1].clone()))
        return out

    la._glm_predictive_distribution = spy


@pytest.mark.parametrize("flavor", list(PARENTS))
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_gridsearch_scores_every_prior_as_laplace_torch_does(flavor, likelihood):
    la = mlp_laplace(flavor, likelihood)
    val = mlp_loader(likelihood == "regression", n=11, seed=5)
    loss = offline_nll if likelihood == "classification" else offline_gaussian_nll
    kw = dict(loss=loss, interval=torch.logspace(-2, 3, 9), val_loader=val,
              pred_type="glm", link_approx="probit", n_samples=100)
    runs = []
    for run in (la._gridsearch, lambda **k: laplace_torch_loop(la, **k)):
        seen = []
        spy_on_predictive(la, seen)
        try:
            runs.append((run(**kw), seen))
        finally:
            del la._glm_predictive_distribution
    (chosen, seen), (chosen_ref, seen_ref) = runs
    assert float(chosen) == float(chosen_ref)
    assert [p for p, _ in seen] == [p for p, _ in seen_ref]  # 9 priors × 3 batches, in order
    assert len(seen) == 27
    for (_, var), (_, var_ref) in zip(seen, seen_ref):
        torch.testing.assert_close(var, var_ref, rtol=1e-12, atol=1e-15)
    want = [validate(la_at(la, p), val, loss, pred_type="glm") for p in kw["interval"]]
    assert [s for _, s in la._gridsearch_scores] == pytest.approx(want, rel=1e-12)


def la_at(la, prior):
    la.prior_precision = prior
    return la


def test_gridsearch_resets_a_running_metric_before_each_prior(llm_laplace):
    """laplace-torch 0.3 accumulates RunningNLLMetric over the grid (its k-th score is the
    mean over the first k priors); each prior here is scored on its own."""
    la = llm_laplace
    val = token_loader(n=9, length=6, seed=11, batch_size=3)
    interval = torch.logspace(-4, 4, 9)
    la._gridsearch(RunningNLLMetric(), interval, val, pred_type="glm")
    got = [s for _, s in la._gridsearch_scores]
    alone = [validate(la_at(la, p), val, RunningNLLMetric(), pred_type="glm") for p in interval]
    assert got == pytest.approx(alone, rel=1e-9)
    assert float(la._gridsearch(RunningNLLMetric(), interval, val, "glm")) == float(
        interval[int(torch.tensor(alone).argmin())])
    # the running mean laplace-torch's loop scores by is another sequence
    running = torch.tensor(alone).cumsum(0) / torch.arange(1, 10)
    assert not torch.allclose(running, torch.tensor(alone))


def test_gridsearch_reads_the_data_once(llm_laplace):
    la = llm_laplace
    val = token_loader(n=9, length=6, seed=11, batch_size=3)
    calls, handle = count_forwards(la.model)
    kw = dict(loss=offline_nll, interval=torch.logspace(-4, 4, 12), val_loader=val,
              pred_type="glm")
    try:
        chosen = la._gridsearch(**kw)
        one_pass = len(calls)
        calls.clear()
        ref = laplace_torch_loop(la, **kw)
        loop = len(calls)
    finally:
        handle.remove()
    assert one_pass == 3 and loop == 12 * 3  # batches, against priors × batches
    assert la._glm_replay is None  # nothing left behind for later predictions
    assert float(chosen) == float(ref)


def test_gridsearch_through_the_public_call_reads_the_data_once(llm_laplace):
    """laplace-torch's optimize_prior_precision passes PredType.GLM (a str enum whose str()
    is "PredType.GLM"), not "glm": the one pass must not depend on how it is spelt."""
    from laplace.utils.enums import PredType

    la = llm_laplace
    val = token_loader(n=9, length=6, seed=11, batch_size=3)
    calls, handle = count_forwards(la.model)
    try:
        la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=12,
                                    loss=offline_nll, pred_type=PredType.GLM)
    finally:
        handle.remove()
    assert len(calls) == 3  # one forward per validation batch for all 12 priors


def test_gridsearch_through_optimize_prior_precision(llm_laplace):
    la = llm_laplace
    val = token_loader(n=6, length=6, seed=14, batch_size=3)
    la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=7,
                                loss=offline_nll)
    chosen = la.prior_precision.clone()
    interval = torch.logspace(-4, 4, 7)
    ref = laplace_torch_loop(la, loss=offline_nll, interval=interval, val_loader=val,
                             pred_type="glm")
    assert float(chosen) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("link_approx", ["mc", "bridge"])
def test_gridsearch_other_links_score_as_validate_does(llm_laplace, link_approx):
    """Each prior scored as laplace-torch's validate scores it on the same batches.

    Iterating a DataLoader draws a seed from torch's global generator, and the one-pass
    search iterates it once, not once per prior; so the Monte-Carlo reference reads the
    batches once too, then draws its samples in the same order.
    """
    la = llm_laplace
    val = token_loader(n=6, length=6, seed=12, batch_size=3)
    kw = dict(loss=offline_nll, interval=torch.logspace(-2, 2, 5), val_loader=val,
              pred_type="glm", link_approx=link_approx, n_samples=50)
    torch.manual_seed(4)
    chosen = la._gridsearch(**kw)
    scores = [s for _, s in la._gridsearch_scores]
    torch.manual_seed(4)
    batches = list(val)
    ref = [validate(la_at(la, p), batches, offline_nll, pred_type="glm",
                    link_approx=link_approx, n_samples=50) for p in kw["interval"]]
    assert scores == pytest.approx(ref, rel=1e-12)
    assert float(chosen) == float(kw["interval"][int(torch.tensor(ref).argmin())])
    if link_approx == "bridge":  # deterministic: laplace-torch's loop picks the same
        assert float(chosen) == float(laplace_torch_loop(la, **kw))


def test_gridsearch_nn_predictive_runs_per_prior(llm_laplace):
    la = llm_laplace
    val = token_loader(n=4, length=6, seed=15, batch_size=2)
    kw = dict(loss=offline_nll, interval=torch.logspace(-1, 3, 3), val_loader=val,
              pred_type="nn", link_approx="mc", n_samples=5)
    torch.manual_seed(5)
    chosen = la._gridsearch(**kw)
    torch.manual_seed(5)  # per prior, as laplace-torch: the loader is read anew each time
    assert float(chosen) == float(laplace_torch_loop(la, **kw))


def test_gridsearch_scores_a_failing_posterior_as_infinite(llm_laplace, monkeypatch):
    """A prior whose posterior fails (laplace-torch: LinAlgError) scores inf, not a crash."""
    la = llm_laplace
    val = token_loader(n=6, length=6, seed=13, batch_size=3)
    interval = torch.logspace(-2, 2, 5)
    kw = dict(loss=offline_nll, interval=interval, val_loader=val, pred_type="glm")
    bad = float(la._gridsearch(**kw))
    real = type(la.backend).glm_moments

    def failing(self, x, precision, joint=False):
        precisions = precision if isinstance(precision, list) else [precision]
        if any(float(p.deltas.reshape(-1)[0]) == pytest.approx(bad) for p in precisions):
            raise torch.linalg.LinAlgError("not positive-definite (injected)")
        return real(self, x, precision, joint=joint)

    monkeypatch.setattr(type(la.backend), "glm_moments", failing)
    chosen = float(la._gridsearch(**kw))
    nearest = min(la._gridsearch_scores, key=lambda t: abs(float(t[0]) - bad))
    assert nearest[1] == float("inf")
    assert sum(s == float("inf") for _, s in la._gridsearch_scores) == 1
    assert chosen != pytest.approx(bad)
    assert chosen == float(laplace_torch_loop(la, **kw))
