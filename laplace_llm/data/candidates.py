"""Candidate batches.

Questions whose answers are text, each with its candidates (for
:class:`~laplace_llm.CandidateScorer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from laplace_llm.data.batches import check_tokenizer, collate
from laplace_llm.data.prompts import DEFAULT_TEXT_ANSWER_TEMPLATE
from laplace_llm.data.records import _check_record, _is_int

__all__ = ["CandidateDataset", "collate_candidates"]


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
