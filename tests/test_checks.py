"""Bad input: a clear error naming problem and fix, and the model left as it was."""

import math

import pytest
import torch
from laplace import Laplace
from torch.utils.data import DataLoader

from laplace_llm import LLMClassifier, LoRALaplace, LoRAModelError, NonFiniteError
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items, token_loader
from tests.fixtures.models import tiny_bert_seqcls_lora, tiny_causal_lm, tiny_llama_lora


def snapshot(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    weights, modes, flags = snap
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
        assert p.requires_grad == flags[n], n
        assert p.grad is None, n
    for n, m in model.named_modules():
        assert m.training == modes[n], n


@pytest.fixture
def clf():
    model = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    model.train()  # a non-default mode that must survive
    return model


# ---------------------------------------------------------------- the model
def test_model_without_lora_layers():
    model = LLMClassifier(tiny_causal_lm("llama"), TARGET_IDS)
    with pytest.raises(LoRAModelError, match="no trainable LoRA parameters.*get_peft_model"):
        Laplace(model, "classification", subset_of_weights="lora")


def test_merged_adapters(clf):
    clf.model.merge_adapter()
    snap = snapshot(clf)
    with pytest.raises(LoRAModelError, match="merged adapters.*unmerge_adapter"):
        LoRALaplace(clf, "classification")
    assert_unchanged(clf, snap)


def test_disabled_adapters(clf):
    with clf.model.disable_adapter():
        with pytest.raises(LoRAModelError, match="disabled.*Re-enable"):
            LoRALaplace(clf, "classification")


def test_trainable_parameters_outside_supported_blocks(clf):
    norm = clf.model.base_model.model.model.norm.weight
    norm.requires_grad_(True)
    snap = snapshot(clf)
    with pytest.raises(LoRAModelError, match=r"fit no supported.*norm.weight.*requires_grad_\(False\)"):
        LoRALaplace(clf, "classification")
    assert_unchanged(clf, snap)


def test_lora_on_embeddings_is_named():
    model = tiny_llama_lora(seed=0, target_modules=("q_proj", "embed_tokens"))
    with pytest.raises(LoRAModelError, match="lora_embedding_A"):
        LoRALaplace(LLMClassifier(model, TARGET_IDS), "classification")


def test_bert_head_is_a_supported_block():
    model = LLMClassifier(tiny_bert_seqcls_lora(num_labels=2))
    la = LoRALaplace(model, "classification")
    roles = {b.role for b in la.blocks}
    assert roles == {"lora_A", "lora_B", "linear"}
    assert {b.kind for b in la.blocks if b.role == "linear"} == {"weight", "bias"}


# ---------------------------------------------------------------- options
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_kfac=0), "n_kfac must be an integer ≥ 1"),
        (dict(n_kfac=2.5), "n_kfac must be an integer"),
        (dict(n_kfac=True), "n_kfac must be an integer"),
        (dict(fisher_type="hessian"), "fisher_type must be one of"),
        (dict(kfac_approx="mean"), "kfac_approx must be one of"),
        (dict(mc_samples=0), "mc_samples must be an integer ≥ 1"),
        (dict(prior_precision=0.0), "Prior precision must be finite and > 0"),
        (dict(prior_precision=-1.0), "Prior precision must be finite and > 0"),
        (dict(prior_precision=math.nan), "Prior precision must be finite and > 0"),
    ],
)
def test_bad_options(clf, kwargs, message):
    snap = snapshot(clf)
    with pytest.raises(ValueError, match=message):
        LoRALaplace(clf, "classification", **kwargs)
    assert_unchanged(clf, snap)


def test_prior_precision_of_wrong_length(clf):
    la = LoRALaplace(clf, "classification")
    with pytest.raises(ValueError, match=f"one per LoRA block \\({la.n_layers} blocks"):
        la.prior_precision = torch.ones(3)
    with pytest.raises(ValueError, match="finite and > 0"):
        la.prior_precision = torch.tensor([1.0, -2.0])


# ---------------------------------------------------------------- data
def loader_with(items, batch_size=4):
    return DataLoader(DictDataset(items), batch_size=batch_size)


def bad_label_items(value, dtype=torch.long):
    items = token_items(6, 5)
    items[5]["labels"] = torch.tensor(value, dtype=dtype)
    return items


@pytest.mark.parametrize(
    "items, error, message",
    [
        (bad_label_items(4), ValueError, r"Labels of batch 1 lie in \[.*4\].*labels must be in 0..3"),
        (bad_label_items(-1), ValueError, "labels must be in 0..3"),
        (bad_label_items(1.0, torch.float32), TypeError, "integer class indices"),
    ],
)
def test_bad_labels(clf, items, error, message):
    snap = snapshot(clf)
    with pytest.raises(error, match=message):
        LoRALaplace(clf, "classification").fit(loader_with(items))
    assert_unchanged(clf, snap)


def test_labels_of_wrong_batch_size(clf):
    batch = next(iter(token_loader(n=4, length=5)))
    batch["labels"] = batch["labels"][:3]
    with pytest.raises(ValueError, match=r"shape \(3,\) but the batch has 4 inputs"):
        LoRALaplace(clf, "classification").fit(DataLoader(DictDataset([None] * 4), collate_fn=lambda _: batch, batch_size=4))


def test_empty_loader(clf):
    snap = snapshot(clf)
    with pytest.raises(ValueError, match="empty"):
        LoRALaplace(clf, "classification").fit(loader_with([]))
    assert_unchanged(clf, snap)


def test_loader_without_dataset_length(clf):
    class NoLen:
        def __iter__(self):
            return iter([])

    with pytest.raises(TypeError, match="`dataset` with a length"):
        LoRALaplace(clf, "classification").fit(NoLen())


@pytest.mark.parametrize("missing", ["input_ids", "labels"])
def test_batches_missing_keys(clf, missing):
    items = [{k: v for k, v in it.items() if k != missing} for it in token_items(4, 5)]
    with pytest.raises(KeyError, match=f"no '{missing}'"):
        LoRALaplace(clf, "classification").fit(loader_with(items))


def test_nan_activations_name_the_batch(clf):
    snap = snapshot(clf)
    layer = clf.model.base_model.model.model.layers[1].self_attn.q_proj.base_layer
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * math.nan if calls["n"] == 2 else output

    h = layer.register_forward_hook(poison)
    la = LoRALaplace(clf, "classification")
    try:
        # NonFiniteError (a FloatingPointError) as raised, with the batch named
        with pytest.raises(NonFiniteError, match="Batch 1: NaN or Inf"):
            la.fit(token_loader(n=8, length=5, batch_size=4))
    finally:
        h.remove()
    assert getattr(la, "H_facs", None) is None  # nothing half-fitted is kept
    assert_unchanged(clf, snap)


def test_inputs_on_another_device(clf):
    batch = next(iter(token_loader(n=4, length=5)))
    meta = {k: v.to("meta") for k, v in batch.items()}
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        LoRALaplace(clf, "classification").fit(DataLoader(DictDataset([None] * 4), collate_fn=lambda _: meta, batch_size=4))


# ---------------------------------------------------------------- prediction
def test_predict_before_fit(clf):
    la = LoRALaplace(clf, "classification")
    with pytest.raises(AttributeError, match=r"not fitted: call `la.fit"):
        la(next(iter(token_loader(n=2, length=5))))


def test_changed_weights_after_fit_warn(clf):
    la = LoRALaplace(clf, "classification")
    la.fit(token_loader(n=8, length=5))
    batch = next(iter(token_loader(n=2, length=5)))
    with torch.no_grad():
        la.params[0].add_(0.1)
    with pytest.warns(UserWarning, match="LoRA weights changed since `fit`"):
        la(batch)
