"""``LaplaceCallback`` in a real ``transformers.Trainer`` run on tiny peft models.

The reference is a posterior fitted by hand with :class:`LoRALaplace` on the trained
weights and the trainer's dataset in order (``DataLoader(train_dataset, batch_size,
collate_fn)``), which is what the callback promises to compute; both run the same
float32 kernels in the same order, so they agree to rounding (1e-6, float32 sums of a
few hundred terms), and the written file reloads bit for bit.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments, default_data_collator

from laplace_llm import LLMClassifier, LoRALaplace, PosteriorFileError
from laplace_llm.callback import EVIDENCE_FILENAME, LaplaceCallback
from laplace_llm.serialization import POSTERIOR_FILENAME
from tests.fixtures.batches import DictDataset, token_items
from tests.fixtures.models import (
    tiny_bert_seqcls,
    tiny_bert_seqcls_lora,
    tiny_causal_lm,
    tiny_llama_lora,
    tiny_tokenizer,
)

N_CLASSES = 3
OPTIONS = dict(fisher_type="ggn", n_kfac=8, lr_threshold=16)  # low rank on the 32-sides


def training_args(out, **kwargs):
    defaults = dict(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
        disable_tqdm=True, dataloader_drop_last=True,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def test_trainer_callback_writes_the_hand_fitted_posterior_beside_the_adapter(tmp_path):
    """The trainer shuffles and drops the last partial batch; the posterior still covers
    all 14 examples in order, equals the hand fit (predictions 1e-6), and loads from the
    adapter folder that trainer.save_model() wrote."""
    train = DictDataset(token_items(14, 6, seed=1, n_classes=N_CLASSES, min_length=3))
    trainer = Trainer(model=tiny_bert_seqcls_lora(N_CLASSES, seed=0), args=training_args(tmp_path),
                      train_dataset=train, data_collator=default_data_collator)
    cb = LaplaceCallback(LLMClassifier, **OPTIONS).attach(trainer)
    trainer.train()
    trainer.save_model()
    assert (tmp_path / POSTERIOR_FILENAME).is_file()
    assert (tmp_path / "adapter_config.json").is_file()

    ref = LoRALaplace(LLMClassifier(trainer.model), "classification", **OPTIONS)
    ref.fit(DataLoader(train, batch_size=4, collate_fn=default_data_collator))
    ref.optimize_prior_precision(method="marglik")
    assert ref.n_data == 14

    model = PeftModel.from_pretrained(tiny_bert_seqcls(N_CLASSES, seed=0), tmp_path,
                                      is_trainable=True).eval()
    loaded = LoRALaplace.load(tmp_path, LLMClassifier(model))  # the folder, not the file
    test = default_data_collator(token_items(5, 6, seed=7, n_classes=N_CLASSES, min_length=2))
    torch.testing.assert_close(loaded(test), ref(test), rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.prior_precision, ref.prior_precision, rtol=1e-6, atol=0)
    lml = ref.log_marginal_likelihood().item()
    assert loaded.log_marginal_likelihood().item() == pytest.approx(lml, rel=1e-6)
    # the evidence reached the trainer's log (and with it the reporting integrations)
    logged = [h for h in trainer.state.log_history if "laplace/log_marglik" in h]
    assert len(logged) == 1 and logged[0]["laplace/log_marglik"] == pytest.approx(lml, rel=1e-6)
    assert cb.evidence[0]["prior_precision"] == pytest.approx(ref.prior_precision.tolist(),
                                                            rel=1e-6)


class ChoiceTrainer(Trainer):
    """Fine-tunes a causal LM on the class-index labels of its answer-token logits."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        clf = LLMClassifier.from_choices(model, self.processing_class, [" A", " B", " C", " D"])
        logits = clf(inputs)
        loss = F.cross_entropy(logits, inputs["labels"])
        return (loss, logits) if return_outputs else loss


def test_evidence_at_every_checkpoint_of_a_causal_lm_over_choices(tmp_path):
    """Each checkpoint folder gets the posterior of its own weights (its evidence equals a
    hand fit on that checkpoint's adapter, 1e-6); the table and the best checkpoint are
    written; the tokenizer comes from the trainer's processing_class."""
    tok = tiny_tokenizer(padding_side="left")
    train = DictDataset(token_items(10, 5, seed=2, n_classes=4))
    trainer = ChoiceTrainer(
        model=tiny_llama_lora(seed=0), processing_class=tok, train_dataset=train,
        data_collator=default_data_collator,
        args=training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2,
                           dataloader_drop_last=False),
    )
    cb = LaplaceCallback(choices=[" A", " B", " C", " D"], at_checkpoints=True, **OPTIONS)
    trainer.add_callback(cb)
    with pytest.warns(UserWarning, match="not attached"):
        trainer.train()
    assert [r["step"] for r in cb.evidence] == [2, 4]
    table = json.loads((tmp_path / EVIDENCE_FILENAME).read_text())
    assert table == json.loads(json.dumps(cb.evidence))
    assert (tmp_path / POSTERIOR_FILENAME).is_file()  # the end = checkpoint-4's weights
    for row in cb.evidence:
        folder = tmp_path / f"checkpoint-{row['step']}"
        model = PeftModel.from_pretrained(tiny_causal_lm("llama", seed=0), folder,
                                          is_trainable=True).eval()
        clf = LLMClassifier.from_choices(model, tok, [" A", " B", " C", " D"], center=True)
        ref = LoRALaplace(clf, "classification", **OPTIONS)
        ref.fit(DataLoader(train, batch_size=4, collate_fn=default_data_collator))
        ref.optimize_prior_precision(method="marglik")
        lml = ref.log_marginal_likelihood().item()
        assert row["log_marglik"] == pytest.approx(lml, rel=1e-6)
        loaded = LoRALaplace.load(folder, clf)
        assert loaded.log_marginal_likelihood().item() == pytest.approx(lml, rel=1e-6)
    best = max(cb.evidence, key=lambda r: r["log_marglik"])
    assert cb.best_checkpoint() == str(tmp_path / f"checkpoint-{best['step']}")
    assert "checkpoint-2" in cb.evidence_table()
    prior = torch.tensor(best["prior_precision"])  # the default: one per block
    assert f"mean {float(prior.mean()):.4g} of {prior.numel()} |" in cb.evidence_table()
    assert any("laplace/log_marglik" in h for h in trainer.state.log_history)


def test_a_callback_without_a_classifier_is_refused():
    with pytest.raises(ValueError, match="one way to build the classifier.*neither"):
        LaplaceCallback()
    with pytest.raises(ValueError, match="got both"):
        LaplaceCallback(LLMClassifier, choices=[" A", " B"])
    with pytest.raises(ValueError, match="unknown arguments"):
        LaplaceCallback(LLMClassifier, n_kfc=4)


def test_choices_without_a_tokenizer_are_refused_before_training(tmp_path):
    train = DictDataset(token_items(4, 5, seed=2, n_classes=4))
    model = tiny_llama_lora(seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=train,
                      data_collator=default_data_collator)
    LaplaceCallback(choices=[" A", " B"]).attach(trainer)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_training_data_without_labels_is_refused_before_training(tmp_path):
    items = [{k: v for k, v in it.items() if k != "labels"} for it in token_items(6, 5)]
    trainer = Trainer(model=tiny_bert_seqcls_lora(N_CLASSES, seed=0), args=training_args(tmp_path),
                      train_dataset=DictDataset(items), data_collator=default_data_collator)
    LaplaceCallback(LLMClassifier).attach(trainer)
    with pytest.raises(ValueError, match="no 'labels'.*class index"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not (tmp_path / POSTERIOR_FILENAME).exists()


def test_token_labels_of_a_language_modelling_loss_are_refused(tmp_path):
    items = [{**it, "labels": it["input_ids"].clone()} for it in token_items(6, 5)]
    trainer = Trainer(model=tiny_llama_lora(seed=0), args=training_args(tmp_path),
                      processing_class=tiny_tokenizer(), train_dataset=DictDataset(items),
                      data_collator=default_data_collator)
    LaplaceCallback(choices=[" A", " B"]).attach(trainer)
    with pytest.raises(ValueError, match=r"labels of shape \(1, 5\).*class"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_posterior_of_another_model_in_the_output_folder_is_kept(tmp_path):
    """The check runs before training: the other model's file is unchanged, and no step ran."""
    other = LoRALaplace(LLMClassifier(tiny_llama_lora(seed=0), [4, 5, 6, 7]), "classification",
                        **OPTIONS)
    other.fit(DataLoader(DictDataset(token_items(4, 5)), batch_size=4))
    path = other.save(tmp_path)
    before = path.read_bytes()
    train = DictDataset(token_items(6, 5, n_classes=N_CLASSES))
    trainer = Trainer(model=tiny_bert_seqcls_lora(N_CLASSES, seed=0), args=training_args(tmp_path),
                      train_dataset=train, data_collator=default_data_collator)
    LaplaceCallback(LLMClassifier, **OPTIONS).attach(trainer)
    with pytest.raises(PosteriorFileError, match="another model"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert path.read_bytes() == before


def test_an_interrupted_fit_at_the_end_of_training_resumes(tmp_path, monkeypatch):
    """The fit at the end of training dies before batch 2 (4 batches, mc Fisher, seed 0,
    a checkpoint every batch); the rerun's end of training (same trained weights) resumes
    it and writes the posterior the uninterrupted callback fit gives, bit for bit (same
    operations in the same order), then removes the checkpoint."""
    import laplace_llm.posterior.fitting as base
    from laplace_llm.posterior.checkpoint import CHECKPOINT_FILENAME, read_checkpoint

    class Crash(Exception):
        pass

    options = dict(fisher_type="mc", seed=0, n_kfac=4, lr_threshold=16)
    train = DictDataset(token_items(14, 6, seed=1, n_classes=N_CLASSES, min_length=3))
    trainer = Trainer(model=tiny_bert_seqcls_lora(N_CLASSES, seed=0), args=training_args(tmp_path),
                      train_dataset=train, data_collator=default_data_collator)
    LaplaceCallback(LLMClassifier, fit_checkpoint_every=1, resume_fit=True,
                    prior_optimization="none", **options).attach(trainer)
    check_batch = base.check_batch

    def crash(data, i, *args, **kwargs):
        if i == 2:
            raise Crash
        return check_batch(data, i, *args, **kwargs)

    monkeypatch.setattr(base, "check_batch", crash)
    with pytest.raises(Crash):
        trainer.train()
    ckpt = tmp_path / CHECKPOINT_FILENAME
    assert read_checkpoint(ckpt)[0]["batches_seen"] == 2
    assert not (tmp_path / POSTERIOR_FILENAME).exists()
    monkeypatch.setattr(base, "check_batch", check_batch)

    trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    assert not ckpt.exists() and (tmp_path / POSTERIOR_FILENAME).is_file()
    ref = LaplaceCallback(LLMClassifier, prior_optimization="none", **options).fit(
        trainer.model, trainer.get_train_dataloader(), 4)
    got = LoRALaplace.load(tmp_path, LLMClassifier(trainer.model))
    assert got.n_data == ref.n_data == 14 and torch.equal(got.loss, ref.loss)
    for mine, theirs in zip(got.H_facs.to_state(), ref.H_facs.to_state()):
        for f, g in zip(mine, theirs):
            assert f.keys() == g.keys()
            assert all(torch.equal(f[k], g[k]) if isinstance(f[k], torch.Tensor) else f[k] == g[k]
                       for k in f)
    assert torch.equal(got.log_marginal_likelihood(), ref.log_marginal_likelihood())


def test_resume_fit_needs_fit_checkpoint_every():
    with pytest.raises(ValueError, match="resume_fit=True .*pass fit_checkpoint_every"):
        LaplaceCallback(LLMClassifier, resume_fit=True)
    with pytest.raises(ValueError, match="fit_checkpoint_every must be an integer ≥ 1"):
        LaplaceCallback(LLMClassifier, fit_checkpoint_every=0)
