"""JSON-lines records: the record kinds, their checks, and reading a file.

A file is read whole (:func:`read_jsonl`), line by line (:func:`iter_jsonl`) or in one
validating pass that keeps only counts (:func:`scan_jsonl`).

See :mod:`laplace_llm.data` for the record kinds and the batch format.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "JsonlSummary", "iter_jsonl", "read_jsonl", "scan_jsonl"]


#: Record kinds understood by :func:`read_jsonl` and :class:`LLMDataset`.
KINDS = ("mcqa", "text", "preference", "scores")


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
