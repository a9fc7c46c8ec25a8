"""Labelled batches.

Tokenised records (:class:`LLMDataset`), padded dict batches (:func:`collate`) and their
loader (:func:`make_loader`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from laplace_llm.data.prompts import _default_template, _record_text
from laplace_llm.data.records import KINDS, _check_record, _is_int

__all__ = ["LLMDataset", "check_tokenizer", "collate"]


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
