"""Temperature scaling against a brute-force search of the validation NLL."""

import numpy as np
import pytest
import torch

from laplace_llm.tools.baselines import TemperatureScaling


def _nll(logits, labels, T):
    return torch.nn.functional.cross_entropy(logits / T, labels).item()


def test_fitted_temperature_minimises_validation_nll():
    """The fitted T beats every T of a fine log grid, and the grid's best lies within one
    grid step of it (the NLL is smooth and convex in 1/T)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=g)
    logits = torch.randn(400, 5, generator=g, dtype=torch.float64)
    logits[torch.arange(400), labels] += 1.5
    logits = 4.0 * logits  # over-confident: the best T is well above 1
    ts = TemperatureScaling()
    T = ts.fit(logits, labels)
    grid = np.exp(np.linspace(np.log(0.2), np.log(20), 2001))
    nlls = [_nll(logits, labels, t) for t in grid]
    best = grid[int(np.argmin(nlls))]
    assert _nll(logits, labels, T) <= min(nlls) + 1e-12
    assert abs(np.log(T) - np.log(best)) < np.log(grid[1] / grid[0])
    assert T > 2.0
    probs = ts(logits)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, rtol=1e-12)
    assert torch.equal(probs.argmax(1), logits.argmax(1))  # ranking unchanged


def test_fit_on_a_loader_equals_fit_on_its_logits():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    batches = [{"x": torch.randn(8, 3, dtype=torch.float64),
                "labels": torch.randint(0, 4, (8,))} for _ in range(3)]

    class Wrap(torch.nn.Module):
        def forward(self, batch):
            return model(batch["x"])

    ts = TemperatureScaling(Wrap())
    T_loader = ts.fit(batches)
    logits = torch.cat([model(b["x"]) for b in batches]).detach()
    labels = torch.cat([b["labels"] for b in batches])
    assert T_loader == pytest.approx(TemperatureScaling().fit(logits, labels), rel=1e-12)
    torch.testing.assert_close(ts(batches[0]), torch.softmax(model(batches[0]["x"]) / T_loader, -1))


def test_bad_input_is_named():
    ts = TemperatureScaling()
    with pytest.raises(RuntimeError, match="Call `fit`"):
        ts(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="needs their labels"):
        ts.fit(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        ts.fit(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="Labels must lie"):
        ts.fit(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="no model"):
        ts.fit([{"labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="yielded no batch"):
        TemperatureScaling(torch.nn.Identity()).fit([])
