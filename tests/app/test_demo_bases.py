"""The demo's base weights ship with the package, so a fresh machine of any CPU kind starts
the fine-tune from the same pretrained model (pretraining's float32 rounding differs
between CPU kinds and grows over its steps; see laplace_llm.app.demo.pretrained_base)."""

import pytest
import torch
from safetensors.torch import load_file

from laplace_llm.app import demo
from laplace_llm.app.demo import DemoConfig, _task, build_model, pretrained_base, pretraining_key
from laplace_llm.app.demo_task import build_tokenizer

#: The configurations whose bases ship: the default command's seeds, the quick demo of the
#: tests, and the words demo of both.
SHIPPED = [DemoConfig(seed=s) for s in (0, 1, 2)] + [DemoConfig.quick(0)] + [
    DemoConfig(seed=0, answers="words"), DemoConfig.quick(0)]
SHIPPED[-1].answers = "words"


def _model(cfg):
    task = _task(cfg)
    return task, build_tokenizer(task.words), build_model(cfg, len(task.words))


@pytest.mark.parametrize("cfg", SHIPPED, ids=lambda c: f"{c.answers}-{c.pretrain_steps}-{c.seed}")
def test_shipped_base_loads_exactly(cfg):
    task, tok, model = _model(cfg)
    path = demo.BASES / f"{pretraining_key(cfg, task)}.safetensors"
    assert path.is_file(), f"no shipped base for {cfg}"
    loss, source = pretrained_base(model, tok, task, cfg)
    assert source == "shipped"
    assert 0.5 < loss < 1.5  # the pretraining loss recorded with the weights
    saved = load_file(path)
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved[name]), name


def test_key_follows_every_pretraining_field_and_the_vocabulary():
    cfg = DemoConfig.quick(0)
    task = _task(cfg)
    key = pretraining_key(cfg, task)
    for field, value in [("seed", 1), ("pretrain_steps", 499), ("hidden", 32),
                         ("pretrain_lr", 1e-3), ("answers", "words")]:
        other = DemoConfig.quick(0)
        setattr(other, field, value)
        assert pretraining_key(other, _task(other)) != key, field
    # fine-tuning fields leave the base alone
    other = DemoConfig.quick(0)
    other.epochs, other.n_train, other.llla = 3, 16, True
    assert pretraining_key(other, _task(other)) == key


def test_save_writes_a_base_that_loads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "BASES", tmp_path)
    cfg = DemoConfig.quick(7)
    cfg.pretrain_steps, cfg.pretrained = 3, "save"
    task, tok, model = _model(cfg)
    loss, source = pretrained_base(model, tok, task, cfg)
    assert source == "pretrained" and loss > 0
    cfg.pretrained = "shipped"
    task2, tok2, fresh = _model(cfg)
    loss2, source2 = pretrained_base(fresh, tok2, task2, cfg)
    assert source2 == "shipped" and loss2 == pytest.approx(loss)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_without_a_shipped_base_it_pretrains(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "BASES", tmp_path)  # nothing shipped there
    cfg = DemoConfig.quick(0)
    cfg.pretrain_steps = 2
    task, tok, model = _model(cfg)
    before = [p.clone() for p in model.parameters()]
    _, source = pretrained_base(model, tok, task, cfg)
    assert source == "pretrained"
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert list(tmp_path.iterdir()) == []  # "shipped" never writes


def test_unknown_pretrained_value_is_refused():
    cfg = DemoConfig.quick(0)
    cfg.pretrained = "download"
    task, tok, model = _model(cfg)
    with pytest.raises(ValueError, match="'shipped', 'train' or 'save'"):
        pretrained_base(model, tok, task, cfg)
