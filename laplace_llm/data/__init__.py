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

Modules: :mod:`~laplace_llm.data.records` (record kinds and checks, reading files),
:mod:`~laplace_llm.data.prompts` (templates, lettered options), :mod:`~laplace_llm.data.batches`
(labelled batches), :mod:`~laplace_llm.data.candidates` (candidate batches),
:mod:`~laplace_llm.data.streams` (files read line by line) and
:mod:`~laplace_llm.data.loaders` (the DataLoaders); every public name is importable from
:mod:`laplace_llm.data`.
"""

from laplace_llm.data.batches import LLMDataset, check_tokenizer, collate
from laplace_llm.data.candidates import CandidateDataset, collate_candidates
from laplace_llm.data.loaders import make_candidate_loader, make_loader
from laplace_llm.data.prompts import (
    DEFAULT_MCQA_TEMPLATE,
    DEFAULT_PAIR_TEMPLATE,
    DEFAULT_TEXT_ANSWER_TEMPLATE,
    format_mcqa_prompt,
    label_indices,
    mcqa_choices,
)
from laplace_llm.data.records import KINDS, JsonlSummary, iter_jsonl, read_jsonl, scan_jsonl
from laplace_llm.data.streams import CandidateStream, JsonlStream

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
