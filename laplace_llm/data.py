"""Data for LLM classifiers: JSONL records, prompts, and padded dict batches.

Record kinds (one JSON object per line of a ``.jsonl`` file; extra keys are kept):

* ``"mcqa"``: ``{"question": str, "choices": [str, ...], "answer": int | "A" | "B" ...}``;
  ``answer`` is normalised to the 0-based index of the correct choice.
* ``"text"``: ``{"text": str, "label": int | str}``, a labelled text (classification) or,
  without ``label`` in a :class:`LLMDataset`, a text to score with a reward model. A
  string label names one of the answer strings (:func:`label_indices` turns it into an
  index).

Answers that are text (scored by :class:`~laplace_llm.CandidateScorer`): an ``"mcqa"``
record's ``choices`` are then the candidates themselves, not lettered options;
:class:`CandidateDataset` and :func:`collate_candidates` build batches that carry each
question's candidates (``candidate_ids``, ``candidate_attention_mask``, ``(batch, C, L)``,
and ``candidate_mask`` ``(batch, C)`` when questions have fewer than C candidates).
* ``"preference"``: ``{"prompt": str, "chosen": str, "rejected": str}``, a reward-model pair.
* ``"scores"``: ``{"text": str, "target": float | [float, ...]}``, a text with ``k`` real
  targets for ``likelihood="regression"`` (a ``num_labels=k`` regression head).

Files larger than memory: :class:`JsonlStream` and :class:`CandidateStream` (what
``make_loader(path, ...)`` and ``make_candidate_loader(path, ...)`` build) read a file line
by line, after one validating pass (:func:`scan_jsonl`) that counts the records and
raises :func:`read_jsonl`'s errors; their items equal :class:`LLMDataset`'s and
:class:`CandidateDataset`'s over the records read into memory.

Batch format (what :func:`collate` returns and :class:`~laplace_llm.LLMClassifier` takes):
a dict of LongTensors

* ``input_ids``, ``attention_mask``: ``(batch, T)``, or ``(batch, 2, T)`` for preference
  pairs; padding uses the tokenizer's pad id and padding side, mask 0 on padding;
* ``token_type_ids``: same shape, only for tokenizers that produce them (BERT);
* ``labels``: ``(batch,)``, the class index; for pairs the index (0 or 1) of the chosen
  sequence, as laplace-torch's ``likelihood="reward_modeling"`` expects; for ``"scores"``
  a float tensor ``(batch, k)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MCQA_TEMPLATE",
    "DEFAULT_PAIR_TEMPLATE",
    "DEFAULT_TEXT_ANSWER_TEMPLATE",
    "KINDS",
    "CandidateDataset",
    "CandidateStream",
    "JsonlStream",
    "JsonlSummary",
    "LLMDataset",
    "check_tokenizer",
    "collate",
    "collate_candidates",
    "label_indices",
    "make_candidate_loader",
    "format_mcqa_prompt",
    "iter_jsonl",
    "make_loader",
    "mcqa_choices",
    "read_jsonl",
    "scan_jsonl",
]

#: Record kinds understood by :func:`read_jsonl` and :class:`LLMDataset`.
KINDS = ("mcqa", "text", "preference", "scores")

#: Default prompt of a multiple-choice question; ``{options}`` becomes "A. …\nB. …".
DEFAULT_MCQA_TEMPLATE = "{question}\n{options}\nAnswer:"
#: Default text of one side of a preference pair.
DEFAULT_PAIR_TEMPLATE = "{prompt}\n{response}"

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ---------------------------------------------------------------------- records
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_record(record: Any, kind: str) -> dict:
    """Validate one record of ``kind``; return a normalised copy or raise ValueError.

    A malformed record is bad *data* (a file's content), hence ValueError even for a
    wrong JSON type: callers report every malformed line the same way.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")  # noqa: TRY004
    required = {
        "mcqa": ("question", "choices", "answer"),
        "text": ("text", "label"),
        "preference": ("prompt", "chosen", "rejected"),
        "scores": ("text", "target"),
    }[kind]
    missing = [key for key in required if key not in record]
    if missing:
        raise ValueError(f"missing key(s) {missing} for kind {kind!r} (keys: {sorted(record)})")
    out = dict(record)
    if kind == "mcqa":
        if not isinstance(record["question"], str):
            raise ValueError(f"'question' must be a string, got {record['question']!r}")
        choices = record["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"'choices' must be a list of strings, got {choices!r}")
        if not 2 <= len(choices) <= len(_LETTERS):
            raise ValueError(f"'choices' must have 2 to 26 entries, got {len(choices)}")
        out["answer"] = _answer_index(record["answer"], len(choices))
    elif kind == "text":
        if not isinstance(record["text"], str):
            raise ValueError(f"'text' must be a string, got {record['text']!r}")
        label = record["label"]
        if not (isinstance(label, str) and label.strip()) and not (_is_int(label) and label >= 0):
            raise ValueError(
                f"'label' must be a non-negative integer or a label string, got {label!r}"
            )
    elif kind == "scores":
        if not isinstance(record["text"], str):
            raise ValueError(f"'text' must be a string, got {record['text']!r}")
        target = record["target"]
        target = target if isinstance(target, list) else [target]
        if not target or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and t == t and abs(t) != float("inf")
            for t in target
        ):
            raise ValueError(f"'target' must be a finite number or a list of them, got {record['target']!r}")
        out["target"] = [float(t) for t in target]
    else:
        for key in required:
            if not isinstance(record[key], str):
                raise ValueError(f"{key!r} must be a string, got {record[key]!r}")  # noqa: TRY004
    return out


def _answer_index(answer: Any, n_choices: int) -> int:
    if _is_int(answer):
        index = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        index = _LETTERS.index(answer.strip().upper())
    else:
        raise ValueError(
            f"'answer' must be a 0-based index or a letter 'A'-'Z', got {answer!r}"
        )
    if not 0 <= index < n_choices:
        raise ValueError(f"'answer' {answer!r} is out of range for {n_choices} choices")
    return index


def read_jsonl(path: str | Path, kind: str, labelled: bool = True) -> list[dict]:
    """Read and validate a JSON-lines file of records of one kind.

    Parameters
    ----------
    path : str or Path
    kind : {"mcqa", "text", "preference"}
        Record format, see the module docstring.
    labelled : bool
        ``False`` for inputs whose labels are not used (e.g. out-of-distribution data):
        the ``answer`` (mcqa) or ``label`` (text) key may be missing, and whatever it
        holds is replaced by the placeholder ``0``.

    Returns
    -------
    list of dict
        One dict per non-blank line, in file order; MCQA answers normalised to ``int``.

    Raises
    ------
    ValueError
        On the first malformed line (bad JSON, not an object, missing key, wrong type,
        answer out of range), naming the file and the 1-based line number; or if the file
        holds no record. Only lines that are empty or whitespace are skipped.
    """
    records = [record for _, record in iter_jsonl(path, kind, labelled)]
    if not records:
        raise ValueError(f"{Path(path)}: no {kind!r} records (the file is empty)")
    return records


def iter_jsonl(path: str | Path, kind: str, labelled: bool = True) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` of a JSON-lines file, validated one line at a time.

    What :func:`read_jsonl` reads, without holding the file: the same records, the same
    errors (naming the file and the 1-based line number), raised when the bad line is
    reached.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    for number, record in _json_lines(path):
        yield number, _checked_line(path, number, record, kind, labelled)


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of each non-blank line; invalid JSON names its line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON: {err.msg}") from err


def _checked_line(path: Path, number: int, record: Any, kind: str, labelled: bool) -> dict:
    """Validate one parsed line as :func:`read_jsonl` does; errors name ``path:number``."""
    if not labelled and isinstance(record, dict) and kind in ("mcqa", "text"):
        record = {**record, "answer" if kind == "mcqa" else "label": 0}
    try:
        return _check_record(record, kind)
    except ValueError as err:
        raise ValueError(f"{path}:{number}: {err}") from None


# ---------------------------------------------------------------------- prompts
def mcqa_choices(n: int) -> list[str]:
    """Answer strings of an ``n``-way lettered question: ``[" A", " B", …]``.

    The leading space matters: after "Answer:" most BPE tokenizers produce the letter as
    the single token " A". Pass the result to ``LLMClassifier.from_choices``.
    """
    if not _is_int(n) or not 2 <= n <= len(_LETTERS):
        raise ValueError(f"n must be an integer from 2 to 26, got {n!r}")
    return [" " + letter for letter in _LETTERS[:n]]


def format_mcqa_prompt(item: Mapping[str, Any], template: str = DEFAULT_MCQA_TEMPLATE) -> str:
    r"""Write the prompt of a multiple-choice question, with lettered options.

    Parameters
    ----------
    item : Mapping
        An ``"mcqa"`` record with ``question`` and ``choices``.
    template : str
        ``str.format`` template with the fields ``{question}`` and ``{options}``; the
        options are "A. first\\nB. second…". The default is
        ``"{question}\\n{options}\\nAnswer:"``.

    Returns
    -------
    str
        E.g. ``"2 + 2 =\\nA. 3\\nB. 4\\nAnswer:"``.
    """
    for field in ("{question}", "{options}"):
        if field not in template:
            raise ValueError(f"template {template!r} lacks the field {field}")
    options = "\n".join(
        f"{letter}. {choice}" for letter, choice in zip(_LETTERS, item["choices"])
    )
    return template.format(question=item["question"], options=options)


# ---------------------------------------------------------------------- dataset
def check_tokenizer(tokenizer: Any) -> None:
    """Refuse a tokenizer that cannot pad batches consistently.

    Raises
    ------
    ValueError
        no pad token, or a ``padding_side`` other than ``"left"`` or ``"right"``.
    """
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            "the tokenizer has no pad token, so batches cannot be padded: set "
            "tokenizer.pad_token = tokenizer.eos_token."
        )
    side = getattr(tokenizer, "padding_side", None)
    if side not in ("left", "right"):
        raise ValueError(
            f"the tokenizer's padding_side is {side!r}; it must be 'left' or 'right' so that "
            "batches are padded consistently: set tokenizer.padding_side = 'left'."
        )


class LLMDataset(Dataset):
    """Tokenised records of one kind; items are dicts of id lists, see :func:`collate`.

    Parameters
    ----------
    items : sequence of dict
        Records as :func:`read_jsonl` returns them (validated again here).
    tokenizer : PreTrainedTokenizerBase
        Must have a pad token and ``padding_side`` ``"left"`` or ``"right"``.
    kind : {"mcqa", "text", "preference"}
        For ``"text"``, ``label`` may be absent from every item (texts to score with a
        reward model); then batches have no ``labels``.
    max_length : int, optional
        Sequences longer than this keep their *last* ``max_length`` tokens (special tokens
        included), because the prediction is read at the last token.
    template : str, optional
        For ``"mcqa"`` the prompt template of :func:`format_mcqa_prompt`; for
        ``"preference"`` a template with ``{prompt}`` and ``{response}``
        (default :data:`DEFAULT_PAIR_TEMPLATE`); unused for ``"text"``.
    pair_order : {"chosen_first", "random"}
        Preference pairs only: chosen first with label 0, or a random order (fixed by
        ``seed``, per item) with the label the index of the chosen sequence.
    seed : int
        Seed of the random pair order.
    add_special_tokens : bool
        Passed to the tokenizer (e.g. Llama's BOS, BERT's [CLS] … [SEP]).

    Attributes
    ----------
    texts : list
        The text of each item (a pair of texts for preferences), for inspection.
    labels : list of int or None
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        kind: str,
        max_length: int | None = None,
        template: str | None = None,
        pair_order: str = "chosen_first",
        seed: int = 0,
        add_special_tokens: bool = True,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if pair_order not in ("chosen_first", "random"):
            raise ValueError(f"pair_order must be 'chosen_first' or 'random', got {pair_order!r}")
        if max_length is not None and (not _is_int(max_length) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = max_length
        self.add_special_tokens = add_special_tokens

        unlabelled = kind == "text" and all("label" not in item for item in items)
        if unlabelled:
            items = [{**item, "label": 0} for item in items]
        records = []
        for index, item in enumerate(items):
            try:
                records.append(_check_record(dict(item), kind))
            except ValueError as err:
                raise ValueError(f"item {index}: {err}") from None

        template = _default_template(kind, template)
        rng = random.Random(seed)
        self.texts, self.labels = [], []
        for r in records:
            text, label = _record_text(r, kind, template, pair_order, rng)
            self.texts.append(text)
            self.labels.append(label)
        if unlabelled:
            self.labels = None
        elif kind == "text" and not all(_is_int(y) for y in self.labels):
            raise ValueError(
                "some labels are strings: turn them into class indices with "
                "laplace_llm.data.label_indices(records, choices) first."
            )
        elif kind == "scores" and len({len(t) for t in self.labels}) > 1:
            raise ValueError("every 'target' must have the same number of values")

        flat = [t for pair in self.texts for t in pair] if kind == "preference" else self.texts
        encoded = self._encode(flat)
        if kind == "preference":
            self._encoded = [encoded[2 * i : 2 * i + 2] for i in range(len(self.texts))]
        else:
            self._encoded = encoded

    def _encode(self, texts: list[str]) -> list[dict[str, list[int]]]:
        return _encode_texts(self.tokenizer, texts, self.max_length, self.add_special_tokens)

    def __len__(self) -> int:
        """Return the number of records."""
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return record ``index``, encoded."""
        item: dict[str, Any] = {"encoded": self._encoded[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


def _default_template(kind: str, template: str | None) -> str | None:
    """Return the template of ``kind`` (the default one for ``None``), checked for its fields."""
    if kind == "mcqa":
        return DEFAULT_MCQA_TEMPLATE if template is None else template
    if kind == "preference":
        template = DEFAULT_PAIR_TEMPLATE if template is None else template
        for field in ("{prompt}", "{response}"):
            if field not in template:
                raise ValueError(f"template {template!r} lacks the field {field}")
    return template


def _record_text(record: Mapping[str, Any], kind: str, template: str | None, pair_order: str,
                 rng: random.Random) -> tuple[Any, Any]:
    """Return the text (a pair of texts for preferences) and the label of a validated record.

    Preference pairs draw their order from ``rng`` (one draw per pair, with
    ``pair_order="random"``), so records read in the same order get the same orders.
    """
    if kind == "mcqa":
        return format_mcqa_prompt(record, template), record["answer"]
    if kind == "text":
        return record["text"], record["label"]
    if kind == "scores":
        return record["text"], record["target"]
    chosen = template.format(prompt=record["prompt"], response=record["chosen"])
    rejected = template.format(prompt=record["prompt"], response=record["rejected"])
    swap = pair_order == "random" and rng.random() < 0.5
    return ((rejected, chosen) if swap else (chosen, rejected)), (1 if swap else 0)


def _encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int | None,
                  add_special_tokens: bool) -> list[dict[str, list[int]]]:
    """Token ids of each text (``token_type_ids`` too where the tokenizer makes them).

    Sequences longer than ``max_length`` keep their last ``max_length`` tokens.
    """
    if not texts:
        return []
    keys = ["input_ids"]
    if "token_type_ids" in getattr(tokenizer, "model_input_names", ()):
        keys.append("token_type_ids")
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, padding=False,
                    truncation=False)
    out = []
    for i in range(len(texts)):
        row = {key: list(enc[key][i]) for key in keys if key in enc}
        if max_length is not None and len(row["input_ids"]) > max_length:
            row = {key: value[-max_length:] for key, value in row.items()}
        out.append(row)
    return out


def _pad(rows: list[list[int]], length: int, value: int, left: bool) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids = torch.as_tensor(row, dtype=torch.long)
            if left:
                out[i, length - len(row) :] = ids
            else:
                out[i, : len(row)] = ids
    return out


def collate(items: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Pad :class:`LLMDataset` items into a dict batch.

    Parameters
    ----------
    items : sequence of dict
        ``LLMDataset[i]`` values.
    tokenizer : PreTrainedTokenizerBase
        Gives the pad id and the padding side.

    Returns
    -------
    dict of torch.Tensor
        ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when present):
        ``(batch, T)``, or ``(batch, 2, T)`` for pairs, with T the longest sequence of the
        batch; ``labels`` ``(batch,)`` when the items have labels.
    """
    check_tokenizer(tokenizer)
    left = tokenizer.padding_side == "left"
    pairs = isinstance(items[0]["encoded"], (list, tuple))
    rows = [seq for it in items for seq in it["encoded"]] if pairs else [it["encoded"] for it in items]
    length = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": _pad([r["input_ids"] for r in rows], length, tokenizer.pad_token_id, left),
        "attention_mask": _pad([[1] * len(r["input_ids"]) for r in rows], length, 0, left),
    }
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = _pad([r["token_type_ids"] for r in rows], length, 0, left)
    if pairs:
        batch = {key: value.reshape(len(items), 2, length) for key, value in batch.items()}
    if "label" in items[0]:
        regression = isinstance(items[0]["label"], list)  # "scores": (batch, k) floats
        dtype = torch.float32 if regression else torch.long
        batch["labels"] = torch.tensor([it["label"] for it in items], dtype=dtype)
    return batch


class _Collator:
    """Picklable collate function (DataLoader workers need one)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, items):
        return collate(items, self.tokenizer)


def make_loader(
    items: Sequence[Mapping[str, Any]] | str | os.PathLike,
    tokenizer: Any,
    batch_size: int,
    kind: str,
    max_length: int | None = None,
    shuffle: bool = False,
    template: str | None = None,
    **dataset_kwargs: Any,
) -> DataLoader:
    """Build a ``DataLoader`` of dict batches for ``Laplace.fit`` and for prediction.

    Parameters
    ----------
    items : sequence of dict, or str or PathLike
        Records (as :class:`LLMDataset`), or the path of a JSON-lines file, which is then
        streamed: read and tokenised batch by batch, never held (:class:`JsonlStream`).
    tokenizer, kind, max_length, template
        As :class:`LLMDataset`.
    batch_size : int
    shuffle : bool
        Shuffle the order of items each epoch (not for a streamed file).
    **dataset_kwargs
        ``pair_order``, ``seed``, ``add_special_tokens`` of :class:`LLMDataset`; for a
        file also ``labelled``, ``label_names`` and ``summary`` of :class:`JsonlStream`.

    Returns
    -------
    DataLoader
        Yields :func:`collate` batches; ``loader.dataset`` is the :class:`LLMDataset` (or
        :class:`JsonlStream`), whose ``len`` laplace-torch uses as the number of data
        points.
    """
    if isinstance(items, (str, os.PathLike)):
        if shuffle:
            raise ValueError(
                f"a streamed file ({items}) is read in file order and cannot be shuffled: "
                "shuffle the file once (e.g. `shuf data.jsonl -o shuffled.jsonl`), or pass "
                "read_jsonl(path) to shuffle records in memory."
            )
        dataset = JsonlStream(items, tokenizer, kind, max_length=max_length, template=template,
                              **dataset_kwargs)
        return DataLoader(dataset, batch_size=batch_size, collate_fn=_Collator(tokenizer))
    dataset = LLMDataset(
        items, tokenizer, kind, max_length=max_length, template=template, **dataset_kwargs
    )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=_Collator(tokenizer)
    )


# ------------------------------------------------------------ text answers
#: Default prompt of a question whose answers are scored as text (no lettered options).
DEFAULT_TEXT_ANSWER_TEMPLATE = "{question}\nAnswer:"


def label_indices(records: Sequence[Mapping[str, Any]], choices: Sequence[str]) -> list[dict]:
    """Return copies of ``"text"`` records whose string labels are replaced by their index.

    A label matches the choice equal to it after stripping surrounding spaces
    (``"very negative"`` names the choice ``" very negative"``); integer labels stay.

    Raises
    ------
    ValueError
        A string label that names no choice (the message lists them).
    """
    names = {c.strip(): i for i, c in enumerate(choices)}
    out = []
    for number, record in enumerate(records):
        label = record.get("label")
        if isinstance(label, str):
            if label.strip() not in names:
                raise ValueError(
                    f"record {number}: label {label!r} is none of the choices "
                    f"{[c.strip() for c in choices]}; use one of them or its index."
                )
            record = {**record, "label": names[label.strip()]}
        out.append(record)
    return out


def _candidate_item(record: Mapping[str, Any], tokenizer: Any, template: str, answer_prefix: str,
                    max_length: int | None, add_special_tokens: bool, where: str) -> dict:
    """Return a validated ``"mcqa"`` record as a :class:`CandidateDataset` item.

    ``where`` names the record in messages (``"item 3"``, ``"data.jsonl:7"``).
    """
    prompt = list(tokenizer(
        template.format(question=record["question"]), add_special_tokens=add_special_tokens,
    )["input_ids"])
    if max_length is not None:
        prompt = prompt[-max_length:]
    candidates = []
    for c, choice in enumerate(record["choices"]):
        ids = list(tokenizer.encode(answer_prefix + choice, add_special_tokens=False))
        if not ids:
            raise ValueError(
                f"{where}: choice {c} ({choice!r}) encodes to no token; every answer needs "
                "at least one."
            )
        candidates.append(ids)
    return {"encoded": {"input_ids": prompt}, "candidates": candidates, "label": record["answer"]}


class CandidateDataset(Dataset):
    r"""Questions whose answers are texts: the prompt and each question's own candidates.

    Parameters
    ----------
    items : sequence of dict
        ``"mcqa"`` records; ``choices`` are the candidate answers, ``answer`` the index
        (or letter) of the right one.
    tokenizer : PreTrainedTokenizerBase
        Must have a pad token and a padding side.
    template : str, optional
        Prompt with the field ``{question}`` (default
        :data:`DEFAULT_TEXT_ANSWER_TEMPLATE`, ``"{question}\nAnswer:"``).
    answer_prefix : str, default " "
        Put before every candidate so that it continues the prompt as a word would.
    max_length : int, optional
        Prompts keep their last ``max_length`` tokens.
    add_special_tokens : bool, default True
        For the prompt (candidates never get special tokens).

    Attributes
    ----------
    n_candidates : int
        The largest number of candidates of a question: the C of the classifier.
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        template: str | None = None,
        answer_prefix: str = " ",
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ):
        check_tokenizer(tokenizer)
        template = DEFAULT_TEXT_ANSWER_TEMPLATE if template is None else template
        if "{question}" not in template:
            raise ValueError(f"template {template!r} lacks the field {{question}}")
        if max_length is not None and (not _is_int(max_length) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        self.tokenizer = tokenizer
        self.items = []
        for index, item in enumerate(items):
            try:
                record = _check_record(dict(item), "mcqa")
            except ValueError as err:
                raise ValueError(f"item {index}: {err}") from None
            self.items.append(_candidate_item(
                record, tokenizer, template, answer_prefix, max_length, add_special_tokens,
                f"item {index}",
            ))
        self.n_candidates = max((len(it["candidates"]) for it in self.items), default=0)

    def __len__(self) -> int:
        """Return the number of questions."""
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return question ``index``: its prompt and candidates as token ids."""
        return self.items[index]


def collate_candidates(
    items: Sequence[Mapping[str, Any]], tokenizer: Any, n_candidates: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad :class:`CandidateDataset` items into a batch for :class:`~laplace_llm.CandidateScorer`.

    Parameters
    ----------
    items : sequence of dict
        ``{"encoded": {"input_ids": [...]}, "candidates": [[...], ...], "label": int}``.
    tokenizer : PreTrainedTokenizerBase
        Gives the pad id and the prompts' padding side.
    n_candidates : int, optional
        Pad every question to this C, marking the added candidates missing in
        ``candidate_mask``; ``None`` requires every question to have the same C.

    Returns
    -------
    dict of torch.Tensor
        ``input_ids``, ``attention_mask`` ``(B, T)``; ``candidate_ids``,
        ``candidate_attention_mask`` ``(B, C, L)`` (right-padded); ``candidate_mask``
        ``(B, C)`` when ``n_candidates`` is given; ``labels`` ``(B,)``.

    Raises
    ------
    ValueError
        Questions with different numbers of candidates and no ``n_candidates``, or more
        candidates than ``n_candidates``.
    """
    batch = collate([{"encoded": it["encoded"]} for it in items], tokenizer)
    counts = [len(it["candidates"]) for it in items]
    if n_candidates is None:
        if len(set(counts)) > 1:
            raise ValueError(
                f"the questions of this batch have {sorted(set(counts))} candidates: pass "
                "n_candidates (the largest C) to pad them with a candidate_mask, so that the "
                "missing ones get probability 0."
            )
        C = counts[0]
    else:
        C = n_candidates
        if max(counts) > C:
            raise ValueError(f"a question has {max(counts)} candidates, more than n_candidates={C}")
    L = max(len(c) for it in items for c in it["candidates"])
    ids = torch.full((len(items), C, L), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(items), C, L, dtype=torch.long)
    for b, it in enumerate(items):
        for c, tokens in enumerate(it["candidates"]):
            ids[b, c, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            mask[b, c, : len(tokens)] = 1
    batch.update(candidate_ids=ids, candidate_attention_mask=mask)
    if n_candidates is not None:
        present = torch.zeros(len(items), C, dtype=torch.long)
        for b, count in enumerate(counts):
            present[b, :count] = 1
        batch["candidate_mask"] = present
    if "label" in items[0]:
        batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    return batch


class _CandidateCollator:
    """Picklable :func:`collate_candidates` with a fixed C."""

    def __init__(self, tokenizer: Any, n_candidates: int | None):
        self.tokenizer = tokenizer
        self.n_candidates = n_candidates

    def __call__(self, items):
        return collate_candidates(items, self.tokenizer, self.n_candidates)


def make_candidate_loader(
    items: Sequence[Mapping[str, Any]] | str | os.PathLike,
    tokenizer: Any,
    batch_size: int,
    n_candidates: int | None = None,
    shuffle: bool = False,
    **dataset_kwargs: Any,
) -> DataLoader:
    """Return a ``DataLoader`` of :func:`collate_candidates` batches over ``"mcqa"`` records.

    ``n_candidates`` defaults to the largest number of choices of a record, so questions
    with fewer are padded with missing candidates; ``dataset_kwargs`` go to
    :class:`CandidateDataset` (``template``, ``answer_prefix``, ``max_length``, …).
    ``items`` may be the path of a JSON-lines file, which is then streamed
    (:class:`CandidateStream`; not shuffled).
    """
    if isinstance(items, (str, os.PathLike)):
        if shuffle:
            raise ValueError(
                f"a streamed file ({items}) is read in file order and cannot be shuffled: "
                "shuffle the file once, or pass read_jsonl(path, 'mcqa') to shuffle in memory."
            )
        dataset = CandidateStream(items, tokenizer, **dataset_kwargs)
    else:
        dataset = CandidateDataset(items, tokenizer, **dataset_kwargs)
    C = dataset.n_candidates if n_candidates is None else n_candidates
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle,
        collate_fn=_CandidateCollator(tokenizer, C),
    )



# ------------------------------------------------------------- streamed files
@dataclasses.dataclass(frozen=True)
class JsonlSummary:
    """What one validating pass over a JSON-lines file learns, holding no record.

    Attributes
    ----------
    path : Path
    kind : str
    labelled : bool
        as given to :func:`scan_jsonl`.
    n_records : int
        non-blank lines: the data set size ``N``.
    max_choices : int or None
        ``"mcqa"``: the most choices of a question.
    max_label : int or None
        the largest integer answer (``"mcqa"``) or label (``"text"``).
    string_labels : frozenset of str
        ``"text"``: the distinct string labels (class names), stripped.
    target_size : int or None
        ``"scores"``: the number of values of every ``target``.
    """

    path: Path
    kind: str
    labelled: bool
    n_records: int
    max_choices: int | None = None
    max_label: int | None = None
    string_labels: frozenset = frozenset()
    target_size: int | None = None


def scan_jsonl(path: str | Path, kind: str, labelled: bool = True) -> JsonlSummary:
    """Validate every line of a JSON-lines file once, keeping only counts.

    The same checks and errors as :func:`read_jsonl` (naming the file and the line),
    plus the one :class:`LLMDataset` makes over all records: ``"scores"`` targets of
    different sizes (naming both lines). Memory does not grow with the file.

    Parameters
    ----------
    path : str or Path
    kind : {"mcqa", "text", "preference", "scores"}
    labelled : bool
        As :func:`read_jsonl`.

    Returns
    -------
    JsonlSummary

    Raises
    ------
    ValueError
        The first malformed line, or a file without records.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    n = 0
    max_choices = max_label = target_size = None
    target_line = 0
    names: set[str] = set()
    for number, record in iter_jsonl(path, kind, labelled):
        n += 1
        if kind == "mcqa":
            max_choices = max(max_choices or 0, len(record["choices"]))
        if kind in ("mcqa", "text"):
            label = record["answer" if kind == "mcqa" else "label"]
            if isinstance(label, str):
                names.add(label.strip())
            else:
                max_label = label if max_label is None else max(max_label, label)
        if kind == "scores":
            if target_size is None:
                target_size, target_line = len(record["target"]), number
            elif len(record["target"]) != target_size:
                raise ValueError(
                    f"{path}:{number}: 'target' has {len(record['target'])} values but line "
                    f"{target_line} has {target_size}; every 'target' must have the same "
                    "number of values"
                )
    if not n:
        raise ValueError(f"{path}: no {kind!r} records (the file is empty)")
    logger.debug("%s: %d valid %r records", path, n, kind)
    return JsonlSummary(path, kind, labelled, n, max_choices, max_label, frozenset(names),
                        target_size)


class _StreamBase(IterableDataset):
    """A JSON-lines file read line by line: length from one validating pass, shards."""

    #: records tokenised together (the tokenizer's batch call; memory: one block)
    BLOCK = 256

    def __init__(self, path, kind: str, labelled: bool, summary: JsonlSummary | None):
        path = Path(path)
        if summary is None:
            summary = scan_jsonl(path, kind, labelled)
        elif (Path(summary.path), summary.kind, summary.labelled) != (path, kind, labelled):
            raise ValueError(
                f"the summary is of {summary.path} ({summary.kind}, labelled="
                f"{summary.labelled}), not of {path} ({kind}, labelled={labelled}): pass "
                "scan_jsonl(path, kind, labelled) of this file, or no summary."
            )
        self.path, self.kind, self.labelled, self.summary = path, kind, labelled, summary
        self.rank, self.world = 0, 1

    def __len__(self) -> int:
        """Return the number of records this stream yields (its shard's)."""
        return len(range(self.rank, self.summary.n_records, self.world))

    def shard(self, rank: int, world: int) -> _StreamBase:
        """Return a copy that yields the records ``rank, rank + world, …`` (in file order).

        What :func:`laplace_llm.distributed.shard` does to a sized dataset; each process
        reads the whole file and tokenises its share.
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.rank, copy.world = rank, world
        return copy

    def _mine(self) -> Iterator[tuple[int, int, dict, bool]]:
        """``(index, line number, record, mine)`` of every record, in file order.

        ``mine``: the record belongs to this shard and this ``DataLoader`` worker.
        """
        worker = get_worker_info()
        wid, workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        records = iter_jsonl(self.path, self.kind, self.labelled)
        count = 0
        for i, (number, record) in enumerate(records):
            count = i + 1
            yield i, number, record, (i % self.world == self.rank
                                      and (i // self.world) % workers == wid)
        if count != self.summary.n_records:
            raise ValueError(
                f"{self.path} holds {count} records now but held {self.summary.n_records} "
                "when it was scanned: the file changed while it was being read; leave it "
                "unchanged during the fit (or build the loader again)."
            )


class JsonlStream(_StreamBase):
    """:class:`LLMDataset` of a JSON-lines file, read and tokenised as it is iterated.

    For training sets that should not be read into memory: ``len`` comes from one
    validating pass (:func:`scan_jsonl`: every line checked with :func:`read_jsonl`'s
    errors, naming the line, before anything is trained), and each iteration reads the
    file again, tokenising :attr:`BLOCK` records at a time. Items and batches
    (:func:`collate`) equal :class:`LLMDataset`'s over :func:`read_jsonl` of the same file,
    in file order. ``make_loader(path, ...)`` builds a loader over one.

    Parameters
    ----------
    path : str or Path
    tokenizer, kind, max_length, template, pair_order, seed, add_special_tokens
        As :class:`LLMDataset` (``pair_order="random"`` draws the same orders).
    labelled : bool, default True
        As :func:`read_jsonl`.
    label_names : sequence of str, optional
        ``"text"`` string labels: the class names, in class order (what
        :func:`label_indices` takes); a string label becomes its index.
    summary : JsonlSummary, optional
        A :func:`scan_jsonl` of this file, to skip the validating pass.

    Notes
    -----
    A stream cannot be shuffled. With ``DataLoader(num_workers=w)`` every worker reads
    the file and tokenises every w-th record, and the loader's batches then interleave
    the workers' records (the fit's sums are the same).
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer: Any,
        kind: str,
        max_length: int | None = None,
        template: str | None = None,
        pair_order: str = "chosen_first",
        seed: int = 0,
        add_special_tokens: bool = True,
        labelled: bool = True,
        label_names: Sequence[str] | None = None,
        summary: JsonlSummary | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if pair_order not in ("chosen_first", "random"):
            raise ValueError(f"pair_order must be 'chosen_first' or 'random', got {pair_order!r}")
        if max_length is not None and (not _is_int(max_length) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        check_tokenizer(tokenizer)
        super().__init__(path, kind, labelled, summary)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.template = _default_template(kind, template)
        self.pair_order, self.seed, self.add_special_tokens = pair_order, seed, add_special_tokens
        self.label_index = None
        if label_names is not None:
            self.label_index = {c.strip(): i for i, c in enumerate(label_names)}
            unknown = sorted(self.summary.string_labels - set(self.label_index))
            if unknown:
                raise ValueError(
                    f"{self.path}: labels {unknown[:5]} are none of the label names "
                    f"{list(self.label_index)}; use one of them or its index."
                )
        elif self.summary.string_labels:
            raise ValueError(
                f"{self.path}: some labels are strings ({sorted(self.summary.string_labels)[:5]}):"
                " pass label_names (the class names in class order) to turn them into "
                "class indices."
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield the items of the file, as ``LLMDataset[i]`` for ``i`` in order."""
        rng = random.Random(self.seed)  # drawn for every record, so shards agree
        block: list[tuple[Any, Any]] = []
        for _, _, record, mine in self._mine():
            text, label = _record_text(record, self.kind, self.template, self.pair_order, rng)
            if not mine:
                continue
            if isinstance(label, str):
                label = self.label_index[label.strip()]
            block.append((text, label))
            if len(block) == self.BLOCK:
                yield from self._items(block)
                block = []
        if block:
            yield from self._items(block)

    def _items(self, block: list[tuple[Any, Any]]) -> list[dict[str, Any]]:
        pairs = self.kind == "preference"
        flat = [t for text, _ in block for t in (text if pairs else [text])]
        encoded = _encode_texts(self.tokenizer, flat, self.max_length, self.add_special_tokens)
        items = []
        for i, (_, label) in enumerate(block):
            items.append({"encoded": encoded[2 * i : 2 * i + 2] if pairs else encoded[i],
                          "label": label})
        return items


class CandidateStream(_StreamBase):
    """:class:`CandidateDataset` of a JSON-lines file of ``"mcqa"`` records, streamed.

    As :class:`JsonlStream`: one validating pass gives ``len`` and
    :attr:`n_candidates` (the most choices of a question), then every iteration reads
    and tokenises the file again; items equal :class:`CandidateDataset`'s, in file order.

    Parameters
    ----------
    path : str or Path
    tokenizer, template, answer_prefix, max_length, add_special_tokens
        As :class:`CandidateDataset`.
    labelled : bool, default True
        As :func:`read_jsonl`.
    summary : JsonlSummary, optional
        A :func:`scan_jsonl` of this file (kind ``"mcqa"``).
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer: Any,
        template: str | None = None,
        answer_prefix: str = " ",
        max_length: int | None = None,
        add_special_tokens: bool = True,
        labelled: bool = True,
        summary: JsonlSummary | None = None,
    ):
        check_tokenizer(tokenizer)
        template = DEFAULT_TEXT_ANSWER_TEMPLATE if template is None else template
        if "{question}" not in template:
            raise ValueError(f"template {template!r} lacks the field {{question}}")
        if max_length is not None and (not _is_int(max_length) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        super().__init__(path, "mcqa", labelled, summary)
        self.tokenizer, self.template, self.answer_prefix = tokenizer, template, answer_prefix
        self.max_length, self.add_special_tokens = max_length, add_special_tokens
        self.n_candidates = self.summary.max_choices

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield the questions of the file, as ``CandidateDataset[i]`` for ``i`` in order."""
        for _, number, record, mine in self._mine():
            if mine:
                yield _candidate_item(record, self.tokenizer, self.template, self.answer_prefix,
                                      self.max_length, self.add_special_tokens,
                                      f"{self.path}:{number}")
