"""DataLoaders of dict batches, over records in memory or a JSON-lines file streamed.

:func:`make_loader` (labelled batches) and :func:`make_candidate_loader` (candidate batches).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader

from laplace_llm.data.batches import LLMDataset, collate
from laplace_llm.data.candidates import CandidateDataset, collate_candidates
from laplace_llm.data.streams import CandidateStream, JsonlStream

__all__ = ["make_candidate_loader", "make_loader"]


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
