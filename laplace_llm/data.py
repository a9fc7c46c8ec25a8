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

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DEFAULT_MCQA_TEMPLATE",
    "DEFAULT_PAIR_TEMPLATE",
    "DEFAULT_TEXT_ANSWER_TEMPLATE",
    "KINDS",
    "CandidateDataset",
    "LLMDataset",
    "check_tokenizer",
    "collate",
    "collate_candidates",
    "label_indices",
    "make_candidate_loader",
    "format_mcqa_prompt",
    "make_loader",
    "mcqa_choices",
    "read_jsonl",
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
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON: {err.msg}") from err
            if not labelled and isinstance(record, dict) and kind in ("mcqa", "text"):
                record = {**record, "answer" if kind == "mcqa" else "label": 0}
            try:
                records.append(_check_record(record, kind))
            except ValueError as err:
                raise ValueError(f"{path}:{number}: {err}") from None
    if not records:
        raise ValueError(f"{path}: no {kind!r} records (the file is empty)")
    return records


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

        if kind == "mcqa":
            template = DEFAULT_MCQA_TEMPLATE if template is None else template
            self.texts = [format_mcqa_prompt(r, template) for r in records]
            self.labels = [r["answer"] for r in records]
        elif kind == "text":
            self.texts = [r["text"] for r in records]
            self.labels = None if unlabelled else [r["label"] for r in records]
            if self.labels is not None and not all(_is_int(y) for y in self.labels):
                raise ValueError(
                    "some labels are strings: turn them into class indices with "
                    "laplace_llm.data.label_indices(records, choices) first."
                )
        elif kind == "scores":
            self.texts = [r["text"] for r in records]
            self.labels = [r["target"] for r in records]
            if len({len(t) for t in self.labels}) > 1:
                raise ValueError("every 'target' must have the same number of values")
        else:
            template = DEFAULT_PAIR_TEMPLATE if template is None else template
            for field in ("{prompt}", "{response}"):
                if field not in template:
                    raise ValueError(f"template {template!r} lacks the field {field}")
            rng = random.Random(seed)
            self.texts, self.labels = [], []
            for r in records:
                chosen = template.format(prompt=r["prompt"], response=r["chosen"])
                rejected = template.format(prompt=r["prompt"], response=r["rejected"])
                swap = pair_order == "random" and rng.random() < 0.5
                self.texts.append((rejected, chosen) if swap else (chosen, rejected))
                self.labels.append(1 if swap else 0)

        flat = [t for pair in self.texts for t in pair] if kind == "preference" else self.texts
        encoded = self._encode(flat)
        if kind == "preference":
            self._encoded = [encoded[2 * i : 2 * i + 2] for i in range(len(self.texts))]
        else:
            self._encoded = encoded

    def _encode(self, texts: list[str]) -> list[dict[str, list[int]]]:
        if not texts:
            return []
        keys = ["input_ids"]
        if "token_type_ids" in getattr(self.tokenizer, "model_input_names", ()):
            keys.append("token_type_ids")
        enc = self.tokenizer(
            list(texts), add_special_tokens=self.add_special_tokens, padding=False,
            truncation=False,
        )
        out = []
        for i in range(len(texts)):
            row = {key: list(enc[key][i]) for key in keys if key in enc}
            if self.max_length is not None and len(row["input_ids"]) > self.max_length:
                row = {key: value[-self.max_length :] for key, value in row.items()}
            out.append(row)
        return out

    def __len__(self) -> int:
        """Return the number of records."""
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return record ``index``, encoded."""
        item: dict[str, Any] = {"encoded": self._encoded[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


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
    items: Sequence[Mapping[str, Any]],
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
    items, tokenizer, kind, max_length, template
        As :class:`LLMDataset`.
    batch_size : int
    shuffle : bool
        Shuffle the order of items each epoch.
    **dataset_kwargs
        ``pair_order``, ``seed``, ``add_special_tokens`` of :class:`LLMDataset`.

    Returns
    -------
    DataLoader
        Yields :func:`collate` batches; ``loader.dataset`` is the :class:`LLMDataset`, whose
        ``len`` laplace-torch uses as the number of data points.
    """
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
            prompt = list(tokenizer(
                template.format(question=record["question"]),
                add_special_tokens=add_special_tokens,
            )["input_ids"])
            if max_length is not None:
                prompt = prompt[-max_length:]
            candidates = []
            for c, choice in enumerate(record["choices"]):
                ids = list(tokenizer.encode(answer_prefix + choice, add_special_tokens=False))
                if not ids:
                    raise ValueError(
                        f"item {index}: choice {c} ({choice!r}) encodes to no token; every "
                        "answer needs at least one."
                    )
                candidates.append(ids)
            self.items.append(
                {"encoded": {"input_ids": prompt}, "candidates": candidates,
                 "label": record["answer"]}
            )
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
    items: Sequence[Mapping[str, Any]],
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
    """
    dataset = CandidateDataset(items, tokenizer, **dataset_kwargs)
    C = dataset.n_candidates if n_candidates is None else n_candidates
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle,
        collate_fn=_CandidateCollator(tokenizer, C),
    )

