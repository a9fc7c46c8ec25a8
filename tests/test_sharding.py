"""Laplace over LoRA of an FSDP2-sharded model (two gloo processes) equals the unsharded fit.

The reference is the same tiny float64 Llama, unsharded, fitted in this process on all
the examples. Tolerances: float64 throughout; the sharded fit sums two shards' factors
where the reference sums one pass, and the merge eigendecomposes the gathered roots
(:func:`laplace_llm.posterior.kron.all_reduce_kron`), so factors agree to rounding of
eigh on ~30×30 matrices, ~1e-13 relative; ``rtol=1e-9`` leaves room for the
accumulation over 13 examples and the log-determinants of the evidence, and is still
six orders of magnitude below any modelling difference (a missing example changes the
factors by ~1/13).
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from laplace_llm import LLMClassifier, LoRADiagLaplace, LoRALaplace
from laplace_llm.errors import LoRAModelError
from laplace_llm.matrix import LowRankFactor
from laplace_llm.models.discovery import find_blocks
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items
from tests.fixtures.models import tiny_llama_lora

ITEMS = 13  # odd, batch 3: rank 0 runs 3 batches, rank 1 two and one idle pass
BATCH = 3
KFAC = dict(fisher_type="ggn", n_kfac=64, lr_threshold=0)  # rank 64 > every side: exact


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def classifier(root: str | None = None) -> nn.Module:
    """The tiny float64 Llama with random LoRA A and B; FSDP2 on each layer and on ``root``.

    ``root``: ``"classifier"`` (the module Laplace calls), ``"peft"`` (the PeftModel, as the
    HF Trainer and accelerate shard it; LLMClassifier routes its forward through it) or
    ``None`` (unsharded).
    """
    peft = tiny_llama_lora(seed=0, dtype=torch.float64)
    if root is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in peft.base_model.model.model.layers:
            fully_shard(layer)
        if root == "peft":
            fully_shard(peft)
    clf = LLMClassifier(peft, TARGET_IDS)
    if root == "classifier":
        from torch.distributed.fsdp import fully_shard

        fully_shard(clf)
    return clf


def query_batch() -> dict:
    items = token_items(5, 6, seed=7, min_length=3)
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask")}


def dense(factors):
    return [[f.to_dense() if isinstance(f, LowRankFactor) else f for f in F] for F in factors]


def predictions(la, X):
    """What both sides compare: GLM moments, the NN predictive and samples of one seed."""
    f_mu, f_var = la._glm_predictive_distribution(X)
    nn_probs = la(X, pred_type="nn", link_approx="mc", n_samples=4,
                  generator=torch.Generator().manual_seed(3))
    return {
        "f_mu": f_mu.detach(),
        "f_var": f_var.detach(),
        "probit": la(X, pred_type="glm", link_approx="probit").detach(),
        "nn": nn_probs.detach(),
        "samples": la.sample(3, generator=torch.Generator().manual_seed(5)).detach(),
    }


def sharded_worker(rank, world, port, out_dir, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from laplace_llm.sharding import equals_vector, is_sharded

        clf = classifier(root)
        local_bytes = sum(p.to_local().numel() * p.element_size() for p in clf.parameters())
        items = token_items(ITEMS, 6, seed=1)[rank::world]
        loader = DataLoader(DictDataset(items), batch_size=BATCH)
        la = LoRALaplace(clf, "classification", **KFAC)
        assert all(is_sharded(p) for p in la.params)
        la.fit(loader, distributed=True)
        X = query_batch()
        result = {
            "factors": dense(la.H_facs.kfacs),
            "mean": la.mean,
            "lml": la.log_marginal_likelihood().detach(),
            "n_data": la.n_data,
            **predictions(la, X),
            "restored": equals_vector(la.params, la.mean),
            "local_param_bytes": local_bytes,
        }
        path = la.save(os.path.join(out_dir, f"posterior_rank{rank}"))
        result["saved_exists"] = path.exists()
        la.sample_adapters(2, os.path.join(out_dir, "adapters"), seed=0)
        diag = LoRADiagLaplace(clf, "classification", fisher_type="ggn")
        diag.fit(loader, distributed=True)
        result["diag_H"] = diag.H
        result["diag_f_var"] = diag._glm_predictive_distribution(X)[1].detach()
        if root == "peft":  # how the HF Trainer shards: the callback's fit on that model
            from laplace_llm.callback import LaplaceCallback

            # a fixed prior: this tiny model's evidence is flat towards large priors, so
            # where marglik stops moves with rounding (see tests/app/test_launchers.py)
            callback = LaplaceCallback(lambda m: LLMClassifier(m, TARGET_IDS),
                                       prior_optimization="none", **KFAC)
            whole = DataLoader(DictDataset(token_items(ITEMS, 6, seed=1)), batch_size=BATCH)
            fitted = callback.fit(clf.model, whole, BATCH)  # shards the data itself
            result["callback_factors"] = dense(fitted.H_facs.kfacs)
            result["callback_lml"] = fitted.log_marginal_likelihood().detach()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing torch+transformers, two fits each: ~20 s each
@pytest.mark.parametrize("root", ["classifier", "peft"])
def test_fsdp2_fit_predict_save_equal_the_unsharded_fit(tmp_path, root):
    mp.spawn(sharded_worker, args=(2, free_port(), str(tmp_path), root), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    clf = classifier()
    all_items = DataLoader(DictDataset(token_items(ITEMS, 6, seed=1)), batch_size=BATCH)
    single = LoRALaplace(clf, "classification", **KFAC)
    single.fit(all_items)
    X = query_batch()
    want = predictions(single, X)

    for r, res in enumerate(got):
        assert res["n_data"] == ITEMS
        assert res["restored"], f"rank {r}: the LoRA shards are not back at the mean"
        # the gathered mean is the unsharded model's LoRA vector, exactly
        torch.testing.assert_close(res["mean"], single.mean, rtol=0, atol=0)
        for F, G in zip(res["factors"], dense(single.H_facs.kfacs)):
            for f, g in zip(F, G):
                torch.testing.assert_close(f, g, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res["lml"], single.log_marginal_likelihood().detach(),
                                   rtol=1e-9, atol=0)
        for key in ("f_mu", "f_var", "probit", "samples", "nn"):
            torch.testing.assert_close(res[key], want[key], rtol=1e-9, atol=1e-12, msg=key)
    # not trivially equal: the posterior moves the logits, and the NN predictive's
    # draws (written into the shards) move the probabilities off the MAP's
    assert float(want["f_var"].diagonal(dim1=-2, dim2=-1).min()) > 1e-6
    map_probs = torch.softmax(want["f_mu"], -1)
    assert float((got[1]["nn"] - map_probs).abs().max()) > 1e-4

    # the memory model's shards are what each rank holds (float64 base and adapters)
    from laplace_llm.tools.memory import fsdp_rank_bytes

    config = clf.model.base_model.model.config
    shards = fsdp_rank_bytes(config, ["q_proj", "v_proj"], 4, world=2, tokens=1,
                             param_bytes=8, adapter_bytes=8)["shards"]
    assert [res["local_param_bytes"] for res in got] == [shards, shards]

    # one file, rank 0's; it loads into the unsharded model in one process
    assert got[0]["saved_exists"] and not got[1]["saved_exists"]
    assert not (tmp_path / "posterior_rank1").exists()
    import laplace_llm

    loaded = laplace_llm.load(tmp_path / "posterior_rank0", classifier())
    f_mu, f_var = loaded._glm_predictive_distribution(X)
    torch.testing.assert_close(f_var, want["f_var"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loaded.log_marginal_likelihood(), single.log_marginal_likelihood(),
                               rtol=1e-9, atol=0)

    # the adapters hold the full LoRA weights of the seed-0 draws
    draws = single.sample(2, generator=torch.Generator().manual_seed(0))
    for i, draw in enumerate(draws):
        weights = load_file(tmp_path / "adapters" / f"sample_{i:03d}" / "adapter_model.safetensors")
        start = 0
        for b in single.blocks:
            key = b.name.removeprefix("model.").replace(".default", "")
            torch.testing.assert_close(weights[key], draw[start : start + b.numel].view(b.shape),
                                       rtol=1e-9, atol=1e-12)
            start += b.numel
    assert (tmp_path / "adapters" / "samples.json").exists()

    if root == "peft":  # LaplaceCallback.fit on the sharded PeftModel
        from laplace_llm.callback import LaplaceCallback

        callback = LaplaceCallback(lambda m: LLMClassifier(m, TARGET_IDS),
                                   prior_optimization="none", **KFAC)
        fitted = callback.fit(classifier().model, all_items, BATCH)
        for res in got:
            for F, G in zip(res["callback_factors"], dense(fitted.H_facs.kfacs)):
                for f, g in zip(F, G):
                    torch.testing.assert_close(f, g, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(res["callback_lml"],
                                       fitted.log_marginal_likelihood().detach(), rtol=1e-9, atol=0)

    # diag: per-example curvature under FSDP2 as well
    diag = LoRADiagLaplace(classifier(), "classification", fisher_type="ggn")
    diag.fit(all_items)
    for res in got:
        torch.testing.assert_close(res["diag_H"], diag.H, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(res["diag_f_var"], diag._glm_predictive_distribution(X)[1],
                                   rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ refused wrappers
@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp1_is_refused_naming_fsdp2(single_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    wrapped = FullyShardedDataParallel(clf, use_orig_params=True, device_id=torch.device("cpu"))
    for build in (lambda: LoRALaplace(wrapped, "classification"), lambda: find_blocks(wrapped)):
        with pytest.raises(LoRAModelError, match=r"FSDP1.*fully_shard.*DDP"):
            build()


def test_zero3_parameters_are_refused_naming_the_alternatives():
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    p = next(p for n, p in clf.named_parameters() if "lora_A" in n)
    p.ds_id = 7  # what DeepSpeed ZeRO-3 puts on each partitioned parameter
    with pytest.raises(LoRAModelError, match=r"ZeRO-3.*fully_shard.*ZeRO stage 0-2"):
        LoRALaplace(clf, "classification")


def test_fsdp2_module_whose_forward_is_bypassed_is_refused_naming_the_fix(single_process_group):
    """LLMClassifier calls the base model's parts: a root on the base model inside the
    PeftModel would never all-gather (the PeftModel itself is routed, and allowed)."""
    from torch.distributed.fsdp import fully_shard

    peft = tiny_llama_lora(seed=0)
    for layer in peft.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft.base_model.model)
    with pytest.raises(LoRAModelError, match=r"base_model\.model.*fully_shard\(LLMClassifier"):
        LoRALaplace(LLMClassifier(peft, TARGET_IDS), "classification")
