"""Posterior files written by earlier releases still load, as the class they were written by.

``tests/data/posteriors`` holds a kron, a diag and a full posterior written before the
three LoRA Laplace classes shared a base class (see the README there), with the
predictive probabilities they gave then (``expected.json``).
"""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import laplace_llm
from laplace_llm import LoRADiagLaplace, LoRAFullLaplace, LoRALaplace
from tests.fixtures.models import lora_mlp

DATA = Path(__file__).parent.parent / "data" / "posteriors"
CLASSES = {"kron": LoRALaplace, "diag": LoRADiagLaplace, "full": LoRAFullLaplace}


def old_posterior_loader() -> DataLoader:
    """The data the files were fitted on (13 examples, 5 features, 3 classes)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(13, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=g)
    return DataLoader(TensorDataset(X, y), batch_size=5)


@pytest.mark.parametrize("structure", list(CLASSES))
@pytest.mark.parametrize("reader", ["laplace_llm.load", "LoRALaplace.load"])
def test_an_old_file_loads_as_its_structure_and_predicts_as_before(structure, reader):
    expected = json.loads((DATA / "expected.json").read_text())[structure]
    model = lora_mlp(seed=0)
    path = DATA / f"{structure}.safetensors"
    # the package's load and any class's read every structure
    la = (laplace_llm.load if reader == "laplace_llm.load" else LoRALaplace.load)(path, model)
    assert type(la) is CLASSES[structure]
    assert la.options.fisher_type == "ggn"
    torch.testing.assert_close(la.prior_precision, torch.tensor([0.5], dtype=torch.float64))
    X = next(iter(old_posterior_loader()))[0][:4]
    probs = la(X)
    torch.testing.assert_close(probs, torch.tensor(expected["probs"], dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", list(CLASSES))
def test_an_old_file_equals_a_refit(structure):
    """The file holds the curvature this release fits on the same data."""
    model = lora_mlp(seed=0)
    old = LoRALaplace.load(DATA / f"{structure}.safetensors", model)
    kw = {"n_kfac": 2, "lr_threshold": 0} if structure == "kron" else {}
    new = CLASSES[structure](model, "classification", fisher_type="ggn", prior_precision=0.5, **kw)
    new.fit(old_posterior_loader())
    torch.testing.assert_close(new.mean, old.mean, rtol=0, atol=0)
    X = next(iter(old_posterior_loader()))[0]
    torch.testing.assert_close(new(X), old(X), rtol=1e-9, atol=1e-12)
