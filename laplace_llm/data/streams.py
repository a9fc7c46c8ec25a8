"""Files larger than memory.

JSON-lines files read line by line (:class:`JsonlStream`, :class:`CandidateStream`), with
items equal to the in-memory data sets'.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from laplace_llm.data.batches import _encode_texts, check_tokenizer
from laplace_llm.data.candidates import _candidate_item
from laplace_llm.data.prompts import DEFAULT_TEXT_ANSWER_TEMPLATE, _default_template, _record_text
from laplace_llm.data.records import KINDS, JsonlSummary, _is_int, iter_jsonl, scan_jsonl

__all__ = ["CandidateStream", "JsonlStream"]


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
