"""End-to-end demonstration: an over-confident LoRA fine-tune and its Laplace posterior.

Everything is generated, offline and seeded:

1. **Pretraining task.** A small Llama is trained from scratch as a language model on two
   kinds of text: *facts* (``"e12 is red . e7 is blue ."``: every entity has one colour)
   and *direct questions* (``"red is which ?  A. blue  B. red … Answer: B"``: find the
   option equal to the asked colour). It learns the facts and the pointing-to-a-letter
   skill, so its features mean something before fine-tuning.
2. **Fine-tuning task.** Multiple-choice questions about entities
   (``"e12 is which ?  A. green  B. red  C. pink  D. blue  Answer:"``): the model must recall
   the entity's colour and point at the option holding it. A small split is learnt with
   LoRA for many epochs, until the training NLL is near zero; the fine-tuned model is then
   over-confident on new questions.
3. **Laplace.** :class:`~laplace_llm.LoRALaplace` is fitted on the training split, its prior
   precision tuned by the marginal likelihood, and MAP and Laplace predictives are
   compared on held-out questions of the same kind (``"id"``) and on shifted questions
   (``"shift"``: distractor words and an extra, irrelevant fact in the prompt).
4. **Evidence.** The same is done at earlier fine-tuning checkpoints; the log marginal
   likelihood of each is reported beside its held-out NLL, showing which checkpoint the
   evidence would pick without a validation set.
5. **Baseline and uncertainty.** Temperature scaling fitted on a held-out labelled split
   of in-distribution questions (``n_val``, apart from training and test) is reported
   beside MAP and Laplace; every method also gets its AURC (selective prediction) and
   the AUROC of telling the in-distribution split from the shifted one by confidence.

:func:`run_demo` returns every number; the CLI (``laplace-llm demo``) prints and saves them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from laplace_llm.app.demo_task import COLOURS, DemoTask, build_tokenizer
from laplace_llm.app.evaluation import (
    METHODS,
    collect_probs,
    ood_score,
    score,
    write_reliability,
    write_risk_coverage,
)
from laplace_llm.data import make_loader, mcqa_choices
from laplace_llm.models.classifier import LLMClassifier
from laplace_llm.options import KFACOptions
from laplace_llm.progress import progress_bar
from laplace_llm.tools.baselines import TemperatureScaling
from laplace_llm.tools.training import train_lora

__all__ = ["BASES", "DemoConfig", "build_model", "pretrained_base", "pretraining_key", "run_demo"]

logger = logging.getLogger(__name__)

@dataclasses.dataclass
class DemoConfig:
    """Sizes and schedule of the demo. :meth:`quick` is a reduced version for tests.

    Attributes
    ----------
    seed : int
        Seeds the task, the model initialisation, the training order and the Laplace
        sampling; one seed gives one result.
    n_entities, n_distractors : int
        Entities with a colour each; distractor words (seen in pretraining, inserted into
        prompts of the shifted split).
    p_main : float
        Probability that a fact or a label gives an entity's main colour (the rest goes
        to its second colour): the best possible accuracy.
    hidden, layers, heads : int
        Llama size.
    pretrain_steps, pretrain_batch, pretrain_lr : pretraining schedule.
    lora_r, lora_alpha, lora_targets : LoRA configuration.
    n_train, n_test : int
        Fine-tuning questions; held-out questions per evaluation split.
    n_val : int
        Labelled in-distribution questions that temperature scaling is fitted on (the
        baseline's validation split; Laplace does not use them).
    epochs : int
        Fine-tuning epochs; the final model is the one compared in the main table.
    checkpoints : tuple of int
        Epochs after which the LoRA weights are kept for the evidence comparison (the
        final epoch is always added).
    finetune_batch, finetune_lr : fine-tuning schedule.
    kfac : KFACOptions
        The LoRALaplace options (the package defaults).
    mc_samples : int
        Logit samples of the GLM Monte-Carlo predictive.
    batch_size : int
        Batch size of the Laplace fit and of prediction.
    llla : bool
        Also put LoRA on ``lm_head`` and report last-layer LoRA Laplace (LLLA:
        ``lora_modules=["lm_head"]``, the rest at MAP) beside Laplace over all LoRA weights.
    answers : {"letters", "words"}
        Lettered options scored by their letter's token, or colours named by phrases of
        1 to 3 tokens scored by likelihood (:mod:`laplace_llm.app.demo_words`).
    prior_structure : {"scalar", "layerwise"} or None
        The structure marglik tunes; ``None`` (default): the library's default
        (:attr:`~laplace_llm.posterior.base.LoRALaplaceBase.default_prior_structure`).
    pretrained : {"shipped", "train", "save"}
        Where the base model comes from. ``"shipped"``: the base weights that ship with
        the package for this pretraining configuration (:data:`BASES`), else pretraining
        at run time. Pretraining runs 1,200 optimiser steps in float32, whose rounding
        differs between CPU kinds and grows over the steps, so only shipped weights make
        the demo print the same numbers on every machine. ``"train"``: always pretrain.
        ``"save"``: pretrain and write the weights into :data:`BASES` (maintainers).
    """

    seed: int = 0
    n_entities: int = 48
    n_distractors: int = 16
    p_main: float = 0.75
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    pretrain_steps: int = 1200
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    n_train: int = 256
    n_test: int = 1000
    n_val: int = 200
    epochs: int = 40
    checkpoints: tuple[int, ...] = (10, 20)
    finetune_batch: int = 16
    finetune_lr: float = 5e-3
    kfac: KFACOptions = dataclasses.field(default_factory=KFACOptions)
    mc_samples: int = 1000
    batch_size: int = 64
    llla: bool = False
    answers: str = "letters"
    prior_structure: str | None = None
    pretrained: str = "shipped"

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """Return a reduced configuration that runs in well under a minute (tests, smoke runs)."""
        return cls(
            seed=seed, n_entities=24, pretrain_steps=500, n_train=128, n_test=256, n_val=64,
            epochs=30, checkpoints=(8, 15), mc_samples=200,
        )


def build_model(cfg: DemoConfig, vocab_size: int) -> nn.Module:
    """Build a randomly initialised Llama causal LM of the configured size (seeded)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config)


# ------------------------------------------------------------------ pretraining
#: Folder of the base weights shipped with the package, one file per pretraining
#: configuration (:func:`pretraining_key`); safetensors, read without executing code.
BASES = Path(__file__).resolve().parent / "demo_bases"
#: The fields of :class:`DemoConfig` that the pretrained weights depend on.
PRETRAINING_FIELDS = ("seed", "n_entities", "n_distractors", "p_main", "hidden", "layers",
                      "heads", "pretrain_steps", "pretrain_batch", "pretrain_lr", "answers")


def pretraining_key(cfg: DemoConfig, task: DemoTask) -> str:
    """Return the name of the shipped base of ``cfg``.

    A hash of its pretraining fields and of the task's vocabulary (the token ids the
    weights are indexed by).
    """
    fields = {k: getattr(cfg, k) for k in PRETRAINING_FIELDS}
    text = json.dumps(fields, sort_keys=True) + "\n" + " ".join(task.words)
    return "base-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrained_base(
    model: nn.Module, tokenizer: Any, task: DemoTask, cfg: DemoConfig, progress: bool = False
) -> tuple[float, str]:
    """Give ``model`` its pretrained weights: shipped ones, or pretrain (see ``cfg.pretrained``).

    Returns
    -------
    pretrain_loss_last : float
        Mean pretraining loss of the last 20 steps (recorded in a shipped file).
    source : str
        ``"shipped"`` or ``"pretrained"``.
    """
    from safetensors.torch import load_file, save_file

    if cfg.pretrained not in ("shipped", "train", "save"):
        raise ValueError(
            f"pretrained must be 'shipped', 'train' or 'save', got {cfg.pretrained!r}"
        )
    path = BASES / f"{pretraining_key(cfg, task)}.safetensors"
    if cfg.pretrained == "shipped" and path.is_file():
        from safetensors import safe_open

        model.load_state_dict(load_file(path), strict=True)
        model.eval()
        with safe_open(path, "pt") as fh:
            return float(fh.metadata()["pretrain_loss_last"]), "shipped"
    losses = pretrain(model, tokenizer, task, cfg, progress)
    last = float(sum(losses[-20:]) / len(losses[-20:]))
    if cfg.pretrained == "save":
        BASES.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        fields = {k: getattr(cfg, k) for k in PRETRAINING_FIELDS}
        save_file(state, path, metadata={"pretrain_loss_last": repr(last),
                                         "config": json.dumps(fields, sort_keys=True)})
        logger.info("wrote the pretrained base %s", path)
    return last, "pretrained"


# ------------------------------------------------------------------ training
def pretrain(
    model: nn.Module, tokenizer: Any, task: DemoTask, cfg: DemoConfig, progress: bool = False
) -> list[float]:
    """Language-model pretraining on :meth:`DemoTask.pretraining_text` documents.

    Returns
    -------
    list of float
        The training loss of every step.
    """
    rng = random.Random(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.pretrain_lr, total_steps=cfg.pretrain_steps, pct_start=0.1
    )
    model.train()
    losses = []
    bar = progress_bar(range(cfg.pretrain_steps), enabled=progress, desc="pretrain", leave=False)
    for _ in bar:
        texts = [task.pretraining_text(rng) for _ in range(cfg.pretrain_batch)]
        # Right padding for the LM loss; padded positions get label -100 (ignored).
        enc = tokenizer(texts, padding=True, return_tensors="pt", padding_side="right")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return losses


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


@torch.no_grad()
def _mean_nll(clf: nn.Module, loader) -> float:
    total, n = 0.0, 0
    for batch in loader:
        logits = clf(batch)
        total += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        n += len(batch["labels"])
    return total / n


def finetune(
    clf: nn.Module,
    train_loader,
    cfg: DemoConfig,
    eval_loader=None,
    progress: bool = False,
) -> tuple[dict[int, dict[str, torch.Tensor]], list[dict[str, float]]]:
    """LoRA fine-tuning with cross-entropy on the selected-token logits.

    Returns
    -------
    checkpoints : dict of int to dict
        Epoch -> trainable weights after that epoch (``cfg.checkpoints`` and the last).
    history : list of dict
        Per epoch: ``epoch``, ``train_nll`` (mean over the epoch's batches) and, with
        ``eval_loader``, ``heldout_nll`` of the MAP model.
    """
    torch.manual_seed(cfg.seed + 2)  # the loader's shuffling order
    keep = set(cfg.checkpoints) | {cfg.epochs}
    checkpoints, history = {}, []

    def after_epoch(epoch: int, train_nll: float) -> None:
        row = {"epoch": epoch, "train_nll": train_nll}
        if eval_loader is not None:
            row["heldout_nll"] = _mean_nll(clf, eval_loader)
        history.append(row)
        if epoch in keep:
            checkpoints[epoch] = _lora_state(clf)

    # A decaying rate lets the run settle in a minimum (train NLL near zero), where the
    # Laplace approximation is meant to be taken.
    train_lora(
        clf, train_loader, cfg.epochs, cfg.finetune_lr, schedule="cosine",
        on_epoch=after_epoch, progress=progress,
    )
    return checkpoints, history


# ------------------------------------------------------------------ Laplace
def fit_laplace(
    clf: nn.Module, train_loader, cfg: DemoConfig, progress: bool = False, lora_modules=None
):
    """Fit a :class:`~laplace_llm.LoRALaplace` at the current weights, prior by marglik.

    Over the LoRA layers ``lora_modules`` only, when given.

    Returns
    -------
    la : LoRALaplace
    log_marglik : float
        Log marginal likelihood at the tuned prior precision.
    """
    from laplace import Laplace

    import laplace_llm  # noqa: F401  (registers subset_of_weights="lora")

    la = Laplace(
        clf, "classification", subset_of_weights="lora", hessian_structure="kron",
        options=cfg.kfac, seed=cfg.seed, lora_modules=lora_modules,
    )
    la.fit(train_loader, progress_bar=progress)
    la.optimize_prior_precision(method="marglik", progress_bar=False,
                                prior_structure=cfg.prior_structure)
    return la, float(la.log_marginal_likelihood().item())


# ------------------------------------------------------------------ the run
def run_demo(
    cfg: DemoConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole demonstration; optionally write ``metrics.json`` and the diagrams.

    Parameters
    ----------
    cfg : DemoConfig, optional
        Defaults to ``DemoConfig()``.
    out_dir : str or Path, optional
        Folder for ``metrics.json``, ``reliability_id.png``, ``reliability_shift.png``,
        ``risk_coverage_id.png`` and ``risk_coverage_shift.png`` (created if needed);
        nothing is written when ``None``.
    progress : bool
        tqdm bars for each stage.
    log : callable, optional
        Receives one-line stage messages (the CLI prints them); they also go to the
        module's logger at INFO level.

    Returns
    -------
    dict
        ``config``; ``results[split][method][metric]`` for splits ``"id"``, ``"shift"``,
        methods ``"map"``, ``"ts"`` and the Laplace ones of
        :data:`~laplace_llm.app.evaluation.METHODS`, metrics
        :data:`~laplace_llm.app.evaluation.METRICS` (the ``"id"`` rows also
        :data:`~laplace_llm.app.evaluation.OOD_METRICS`, against ``"shift"``);
        ``temperature`` (fitted on ``n_val`` validation questions); ``train`` (final training NLL
        and accuracy, pretraining loss); ``bayes_nll`` (the best possible held-out NLL); ``history`` (per-epoch NLLs); ``prior_precision``
        (the mean over blocks) and ``log_marglik`` of the final model; ``evidence`` (one row per checkpoint:
        ``epoch``, ``log_marglik``, ``prior_precision``, ``heldout_nll_map``,
        ``heldout_nll_la``) with ``evidence_choice`` and ``heldout_choice`` (epochs);
        ``seconds`` (wall time per stage); ``files`` (written paths).
    """
    cfg = cfg or DemoConfig()
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    def say(message: str) -> None:
        logger.info(message)
        if log is not None:
            log(message)

    def lap(stage: str, t0: float) -> float:
        seconds[stage] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    task = _task(cfg)
    tokenizer = build_tokenizer(task.words)
    model = build_model(cfg, len(task.words))
    n_params = sum(p.numel() for p in model.parameters())
    say(f"a {cfg.layers}-layer Llama (hidden {cfg.hidden}, {n_params:,} weights) pretrained "
        f"for {cfg.pretrain_steps} steps (base weights: {cfg.pretrained})")
    t0 = time.perf_counter()
    pretrain_loss_last, base_source = pretrained_base(model, tokenizer, task, cfg, progress)
    t0 = lap("pretrain", t0)

    clf, loader = _lora_classifier(model, tokenizer, task, cfg)
    train = task.questions(cfg.n_train, seed=cfg.seed * 1000 + 11)
    splits = {
        "id": task.questions(cfg.n_test, seed=cfg.seed * 1000 + 12),
        "shift": task.questions(cfg.n_test, seed=cfg.seed * 1000 + 13, shifted=True),
    }
    # the baseline's validation split: same distribution, its own seed (train and test
    # questions are unchanged by it)
    val = task.questions(cfg.n_val, seed=cfg.seed * 1000 + 14)
    train_loader = loader(train, shuffle=True, batch_size=cfg.finetune_batch)
    fit_loader = loader(train)
    test_loaders = {name: loader(records) for name, records in splits.items()}

    n_lora = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    say(f"LoRA fine-tuning ({n_lora:,} weights, r={cfg.lora_r}) on {cfg.n_train} questions "
        f"for {cfg.epochs} epochs")
    checkpoints, history = finetune(clf, train_loader, cfg, test_loaders["id"], progress)
    t0 = lap("finetune", t0)

    say(f"Laplace at epochs {sorted(checkpoints)}: fit, tune the prior by marginal likelihood")
    la, evidence = _evidence_at_checkpoints(clf, checkpoints, fit_loader, test_loaders["id"],
                                            cfg, progress)
    t0 = lap("laplace_checkpoints", t0)
    final = evidence[-1]

    say(f"temperature scaling on {cfg.n_val} validation questions (the baseline)")
    ts = TemperatureScaling(clf)
    temperature = ts.fit(loader(val))
    methods = ("map", "ts", *METHODS[1:])

    say("predicting on the held-out (id) and shifted splits")
    results, all_probs = _predict_splits(clf, la, ts, test_loaders, methods, cfg, progress)
    train_probs, train_labels = collect_probs(clf, None, fit_loader, ("map",))
    t0 = lap("predict", t0)
    llla = None
    if cfg.llla:
        say("last-layer LoRA Laplace (LLLA): only lm_head's LoRA is Bayesian")
        llla = _last_layer_laplace(clf, fit_loader, test_loaders, results, cfg, progress)
        t0 = lap("llla", t0)

    out = {
        "config": dataclasses.asdict(cfg),
        "results": results,
        "train": {
            "map": score(train_probs["map"], train_labels),
            "pretrain_loss_last": pretrain_loss_last,
            "base": base_source,
        },
        "bayes_nll": task.bayes_nll(),
        "history": history,
        "prior_precision": final["prior_precision"],
        "temperature": temperature,
        "log_marglik": final["log_marglik"],
        "evidence": evidence,
        "evidence_choice": max(evidence, key=lambda r: r["log_marglik"])["epoch"],
        "heldout_choice": min(evidence, key=lambda r: r["heldout_nll_la"])["epoch"],
        "llla": llla,
        "seconds": seconds,
        "files": {},
    }
    if out_dir is not None:
        out["files"] = _write_plots(all_probs, methods, Path(out_dir))
        out["files"]["metrics"] = str(Path(out_dir) / "metrics.json")
    seconds["total"] = round(time.perf_counter() - started, 2)
    if out_dir is not None:
        with open(out["files"]["metrics"], "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
    return out


# ------------------------------------------------------------ the run's stages
def _task(cfg: DemoConfig) -> DemoTask:
    """Return the task of ``cfg.answers``: letters (:class:`DemoTask`) or words."""
    if cfg.answers == "words":
        from laplace_llm.app.demo_words import WordsDemoTask

        return WordsDemoTask(cfg.n_entities, cfg.n_distractors, cfg.seed, cfg.p_main)
    if cfg.answers != "letters":
        raise ValueError(f"answers must be 'letters' or 'words', got {cfg.answers!r}")
    return DemoTask(cfg.n_entities, cfg.n_distractors, cfg.seed, cfg.p_main)


def _lora_classifier(model: nn.Module, tokenizer: Any, task: DemoTask, cfg: DemoConfig):
    """Freeze the pretrained model, add LoRA, wrap it as the task's classifier.

    Returns
    -------
    clf : LLMClassifier or CandidateScorer
        over the four letters, or (``answers="words"``) the four phrases.
    loader : callable
        ``loader(records, shuffle=False, batch_size=cfg.batch_size)``: the task's
        question records as ``clf``'s batches.
    """
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
        target_modules=list(cfg.lora_targets) + (["lm_head"] if cfg.llla else []),
    )
    torch.manual_seed(cfg.seed + 3)
    peft_model = get_peft_model(model, lora)
    if cfg.answers == "words":
        from laplace_llm.app.demo_words import words_classifier

        clf = words_classifier(peft_model, tokenizer)

        def loader(records, shuffle=False, batch_size=cfg.batch_size):
            return make_loader(task.text_records(records), tokenizer, batch_size, "text",
                               shuffle=shuffle)
    else:
        clf = LLMClassifier.from_choices(
            peft_model, tokenizer, mcqa_choices(len(COLOURS)), center=True
        )

        def loader(records, shuffle=False, batch_size=cfg.batch_size):
            return make_loader(records, tokenizer, batch_size, "mcqa", shuffle=shuffle)

    return clf, loader


def _evidence_at_checkpoints(clf, checkpoints: dict, fit_loader, test_loader, cfg: DemoConfig,
                             progress: bool):
    """Fit Laplace at every checkpoint (the last is the final model); score each.

    Returns
    -------
    la : LoRALaplace
        the final model's posterior (the weights are the last checkpoint's afterwards).
    evidence : list of dict
        per checkpoint: ``epoch``, ``log_marglik``, ``prior_precision``,
        ``heldout_nll_map``, ``heldout_nll_la``.
    """
    evidence = []
    for epoch in sorted(checkpoints):
        _load_lora_state(clf, checkpoints[epoch])
        la, lml = fit_laplace(clf, fit_loader, cfg, progress)
        probs, labels = collect_probs(
            clf, la, test_loader, methods=("map", "la_probit"), progress=progress,
            desc=f"epoch {epoch}",
        )
        evidence.append({
            "epoch": epoch,
            "log_marglik": lml,
            "prior_precision": float(la.prior_precision.mean()),
            "heldout_nll_map": score(probs["map"], labels)["nll"],
            "heldout_nll_la": score(probs["la_probit"], labels)["nll"],
        })
    return la, evidence


def _predict_splits(clf, la, ts, test_loaders: dict, methods, cfg: DemoConfig, progress: bool):
    """Score every method on every split; the ``"id"`` rows also against ``"shift"`` as OOD.

    Returns
    -------
    results : dict
        ``results[split][method][metric]``.
    all_probs : dict
        ``all_probs[split] = (probs by method, labels)``.
    """
    results: dict[str, dict[str, dict[str, float]]] = {}
    all_probs = {}
    for name, test_loader in test_loaders.items():
        probs, labels = collect_probs(
            clf, la, test_loader, methods, mc_samples=cfg.mc_samples, seed=cfg.seed,
            progress=progress, desc=name, ts=ts,
        )
        all_probs[name] = (probs, labels)
        results[name] = {m: score(p, labels) for m, p in probs.items()}
    # the shifted questions as foreign inputs: does a method's confidence tell them apart?
    for m in methods:
        results["id"][m].update(ood_score(all_probs["id"][0][m], all_probs["shift"][0][m]))
    return results, all_probs


def _last_layer_laplace(clf, fit_loader, test_loaders: dict, results: dict, cfg: DemoConfig,
                        progress: bool) -> dict[str, Any]:
    """Add the rows ``llla_probit``, ``llla_mc`` (only lm_head's LoRA Bayesian) to ``results``.

    Returns the LLLA posterior's ``n_params``, ``log_marglik`` and ``prior_precision``.
    """
    la_last, lml_last = fit_laplace(clf, fit_loader, cfg, progress, lora_modules=["lm_head"])
    last_probs = {}
    for name, test_loader in test_loaders.items():
        probs, labels = collect_probs(
            clf, la_last, test_loader, ("la_probit", "la_mc"), mc_samples=cfg.mc_samples,
            seed=cfg.seed, progress=progress, desc=f"LLLA {name}",
        )
        last_probs[name] = probs
        results[name]["llla_probit"] = score(probs["la_probit"], labels)
        results[name]["llla_mc"] = score(probs["la_mc"], labels)
    for m in ("la_probit", "la_mc"):
        results["id"][f"llla_{m[3:]}"].update(
            ood_score(last_probs["id"][m], last_probs["shift"][m]))
    return {"n_params": la_last.n_params, "log_marglik": lml_last,
            "prior_precision": float(la_last.prior_precision.mean())}


def _write_plots(all_probs: dict, methods, out_dir: Path) -> dict[str, str]:
    """Write the reliability and risk-coverage diagrams of each split; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (probs, labels) in all_probs.items():
        png = write_reliability(
            {m: probs[m] for m in ("map", "la_probit")}, labels,
            out_dir / f"reliability_{name}.png",
        )
        files[f"reliability_{name}"] = str(png)
        png = write_risk_coverage(
            {m: probs[m] for m in methods}, labels, out_dir / f"risk_coverage_{name}.png"
        )
        files[f"risk_coverage_{name}"] = str(png)
    return files
