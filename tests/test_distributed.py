"""Fitting across two processes (gloo, CPU) equals one fit on all the data."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.matrix import LowRankFactor
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items
from tests.fixtures.models import tiny_llama_lora

ITEMS = 13  # an odd number: the shards differ in size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_kwargs(n_kfac, accumulation="sketch"):
    return dict(fisher_type="ggn", n_kfac=n_kfac, lr_threshold=0, accumulation=accumulation)


def shard_fit(rank, world, port, n_kfac, out, accumulation="sketch"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        clf = LLMClassifier(tiny_llama_lora(seed=0, dtype=torch.float64), TARGET_IDS)
        items = token_items(ITEMS, 6, seed=1)[rank::world]
        la = LoRALaplace(clf, "classification", **fit_kwargs(n_kfac, accumulation))
        la.fit(DataLoader(DictDataset(items), batch_size=4), distributed=True)
        if rank == 0:
            torch.save(
                {
                    "factors": [[f.to_dense() if isinstance(f, LowRankFactor) else f for f in F] for F in la.H_facs.kfacs],
                    "lml": la.log_marginal_likelihood().detach(),
                    "n_data": la.n_data,
                },
                out,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing torch+transformers: ~25 s each
@pytest.mark.parametrize("n_kfac, accumulation", [(64, "truncate"), (64, "sketch"), (3, "sketch")],
                         ids=["full-rank-truncate", "full-rank-sketch", "rank3-sketch"])
def test_two_process_fit_equals_single_fit(tmp_path, n_kfac, accumulation):
    """The merged factors, data size and evidence equal a single-process fit to rounding.

    Truncation: at full rank (n_kfac ≥ every side) only, as the merge gathers roots and
    truncates, a different order of truncations than one process'. Sketch: also at rank
    3, because the shards' sketches add up to the sketch of all the data (same Ω)."""
    out = tmp_path / "rank0.pt"
    mp.spawn(shard_fit, args=(2, free_port(), n_kfac, str(out), accumulation), nprocs=2,
             join=True)
    merged = torch.load(out, weights_only=True)
    clf = LLMClassifier(tiny_llama_lora(seed=0, dtype=torch.float64), TARGET_IDS)
    single = LoRALaplace(clf, "classification", **fit_kwargs(n_kfac, accumulation))
    single.fit(DataLoader(DictDataset(token_items(ITEMS, 6, seed=1)), batch_size=4))
    assert merged["n_data"] == ITEMS
    for F, G in zip(merged["factors"], single.H_facs.kfacs):
        for f, g in zip(F, G):
            g = g.to_dense() if isinstance(g, LowRankFactor) else g
            torch.testing.assert_close(f, g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(merged["lml"], single.log_marginal_likelihood().detach())


def test_shards_are_disjoint_cover_the_data_in_order_and_seeds_differ():
    from laplace_llm.distributed import process_rank, process_seed, shard

    data = list(range(13))
    shards = [list(shard(data, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9, 12], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert shard(data, 0, 1) is data
    assert [process_seed(7, r) for r in range(3)] == [7, 8, 9]
    assert process_seed(None, 2) is None
    assert process_rank() == (0, 1)  # no process group here


def dense_shard_fit(rank, world, port, out):
    from laplace_llm import LoRADiagLaplace, LoRAFullLaplace
    from laplace_llm.distributed import shard
    from tests.fixtures.models import lora_mlp
    from tests.posterior.test_base import mlp_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = mlp_loader(n=13)
        mine = DataLoader(shard(loader.dataset, rank, world), batch_size=4)
        fits = {}
        for cls in (LoRADiagLaplace, LoRAFullLaplace):
            la = cls(lora_mlp(seed=0), "classification", fisher_type="ggn")
            la.fit(mine, distributed=True)
            fits[cls.__name__] = {"H": la.H, "loss": torch.as_tensor(la.loss), "n_data": la.n_data}
        if rank == 0:
            torch.save(fits, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing torch+transformers: ~25 s
def test_two_process_diag_and_full_fits_equal_single_fits(tmp_path):
    """The dense curvature of diag and full is summed across processes, as K-FAC's is."""
    from laplace_llm import LoRADiagLaplace, LoRAFullLaplace
    from tests.fixtures.models import lora_mlp
    from tests.posterior.test_base import mlp_loader

    out = tmp_path / "rank0.pt"
    mp.spawn(dense_shard_fit, args=(2, free_port(), str(out)), nprocs=2, join=True)
    merged = torch.load(out, weights_only=True)
    for cls in (LoRADiagLaplace, LoRAFullLaplace):
        single = cls(lora_mlp(seed=0), "classification", fisher_type="ggn")
        single.fit(mlp_loader(n=13))
        got = merged[cls.__name__]
        assert got["n_data"] == 13
        torch.testing.assert_close(got["H"], single.H, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["loss"], torch.as_tensor(single.loss), rtol=1e-12, atol=0)
