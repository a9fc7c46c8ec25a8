"""What the base class gives every structure: one error type for a NaN batch, the class
registry that ``load`` reads, no method borrowed between the leaves."""

import math

import pytest
import torch
from laplace import DiagLaplace, FullLaplace, KronLaplace, Laplace
from torch.utils.data import DataLoader, TensorDataset

import laplace_llm
from laplace_llm import LoRADiagLaplace, LoRAFullLaplace, LoRALaplace, NonFiniteError
from laplace_llm.posterior.base import STRUCTURES, LoRALaplaceBase
from laplace_llm.posterior.files import LoRAFiles
from laplace_llm.posterior.fitting import LoRAFitting
from tests.fixtures.models import lora_mlp

LEAVES = {"kron": (LoRALaplace, KronLaplace), "diag": (LoRADiagLaplace, DiagLaplace),
          "full": (LoRAFullLaplace, FullLaplace)}


def mlp_loader(n=12, batch_size=4):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(X, torch.randint(0, 3, (n,), generator=g)),
                      batch_size=batch_size)


@pytest.mark.parametrize("structure", list(LEAVES))
def test_a_nan_batch_raises_non_finite_error_naming_it_and_keeps_nothing(structure):
    model = lora_mlp(seed=0)
    loader = mlp_loader()
    loader.dataset.tensors[0][5, 2] = math.nan  # one input of batch 1
    la = LEAVES[structure][0](model, "classification", fisher_type="ggn")
    model.train()
    with pytest.raises(NonFiniteError, match=r"^Batch 1: NaN or Inf"):
        la.fit(loader)
    assert not la._is_fitted()
    assert model.training  # the modules' modes are restored
    la.fit(mlp_loader())  # the same object fits once the data are finite
    assert la._is_fitted() and la.n_data == 12


def test_the_registry_maps_each_structure_to_its_leaf_and_laplace_finds_the_same():
    assert STRUCTURES == {s: cls for s, (cls, _) in LEAVES.items()}
    model = lora_mlp(seed=0)
    for structure, (cls, parent) in LEAVES.items():
        # the base first (with its fit loop and files, posterior/fitting.py and files.py),
        # laplace-torch's structure second (FullLLLaplace's order)
        assert cls.__mro__[1:5] == (LoRALaplaceBase, LoRAFitting, LoRAFiles, parent)
        la = Laplace(model, "classification", subset_of_weights="lora",
                     hessian_structure=structure)
        assert type(la) is cls
    assert not hasattr(LoRALaplaceBase, "_key")  # never a Laplace class of its own


def test_no_leaf_takes_a_method_from_another_class():
    """Each leaf's own members are its curvature and state; nothing is assigned from a
    sibling or the base (a function keeps the qualname of the class that defined it)."""
    family = {cls.__name__ for cls, _ in LEAVES.values()} | {"LoRALaplaceBase"}
    for cls, _ in LEAVES.values():
        for name, member in vars(cls).items():
            func = getattr(member, "fget", None) or getattr(member, "__func__", member)
            owner = getattr(func, "__qualname__", "").split(".")[0]
            assert owner not in family - {cls.__name__}, f"{cls.__name__}.{name} is {owner}'s"


@pytest.mark.parametrize("structure", list(LEAVES))
def test_load_builds_the_file_s_class_whichever_class_it_is_called_on(structure, tmp_path):
    model = lora_mlp(seed=0)
    la = LEAVES[structure][0](model, "classification", fisher_type="ggn")
    la.fit(mlp_loader())
    path = la.save(tmp_path)
    X = next(iter(mlp_loader()))[0]
    for reader in (laplace_llm.load, LoRALaplace.load, LoRADiagLaplace.load):
        again = reader(path, model)
        assert type(again) is type(la)
        torch.testing.assert_close(again(X), la(X), rtol=1e-12, atol=1e-14)
