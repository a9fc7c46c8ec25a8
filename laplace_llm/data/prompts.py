"""Prompts of records.

The default templates, lettered options, and string labels as indices.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from laplace_llm.data.records import _LETTERS, _is_int

__all__ = ["DEFAULT_MCQA_TEMPLATE", "DEFAULT_PAIR_TEMPLATE", "DEFAULT_TEXT_ANSWER_TEMPLATE", "label_indices", "format_mcqa_prompt", "mcqa_choices"]


#: Default prompt of a multiple-choice question; ``{options}`` becomes "A. …\nB. …".
DEFAULT_MCQA_TEMPLATE = "{question}\n{options}\nAnswer:"


#: Default text of one side of a preference pair.
DEFAULT_PAIR_TEMPLATE = "{prompt}\n{response}"


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
