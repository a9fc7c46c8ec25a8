"""JSONL records: reading, validating, the errors naming file and line."""

import json

import pytest

from laplace_llm.data import read_jsonl
from tests.fixtures.records import MCQA, PREF, TEXT, write_lines


# ------------------------------------------------------------------ read_jsonl
@pytest.mark.parametrize("kind, items", [("mcqa", MCQA), ("text", TEXT), ("preference", PREF)])
def test_read_jsonl_round_trip(tmp_path, kind, items):
    path = write_lines(tmp_path / f"{kind}.jsonl", [json.dumps(i) for i in items])
    records = read_jsonl(path, kind)
    expected = [dict(i) for i in items]
    if kind == "mcqa":
        expected[1]["answer"] = 0  # the letter "A" becomes index 0
    assert records == expected


def test_read_jsonl_skips_only_blank_lines_and_counts_them(tmp_path):
    lines = [json.dumps(TEXT[0]), "", "   ", json.dumps(TEXT[1]), '{"text": 3, "label": 0}']
    path = write_lines(tmp_path / "t.jsonl", lines[:4])
    assert read_jsonl(path, "text") == TEXT
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=r"bad\.jsonl:5: 'text' must be a string"):
        read_jsonl(path, "text")


@pytest.mark.parametrize(
    "kind, line, match",
    [
        ("text", '{"text": "a", "label": 1', r"invalid JSON"),
        ("text", '["a", 1]', r"expected a JSON object, got list"),
        ("text", '{"text": "a"}', r"missing key\(s\) \['label'\]"),
        ("text", '{"text": "a", "label": true}', r"'label' must be a non-negative integer"),
        ("text", '{"text": "a", "label": 1.0}', r"'label' must be a non-negative integer"),
        ("mcqa", '{"question": "q", "choices": ["a", "b"], "answer": 2}', r"out of range for 2"),
        ("mcqa", '{"question": "q", "choices": ["a", "b"], "answer": "C"}', r"'C' is out of range"),
        ("mcqa", '{"question": "q", "choices": ["a", "b"], "answer": "AB"}', r"a letter 'A'-'Z'"),
        ("mcqa", '{"question": "q", "choices": "ab", "answer": 0}', r"list of strings"),
        ("mcqa", '{"question": "q", "choices": ["a"], "answer": 0}', r"2 to 26 entries"),
        ("preference", '{"prompt": "p", "chosen": "c", "rejected": null}', r"'rejected' must be"),
    ],
)
def test_read_jsonl_malformed_line_names_file_and_line(tmp_path, kind, line, match):
    good = {"text": TEXT[0], "mcqa": MCQA[0], "preference": PREF[0]}[kind]
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(good), json.dumps(good), line])
    with pytest.raises(ValueError, match=r"data\.jsonl:3: .*" + match):
        read_jsonl(path, kind)


def test_read_jsonl_rejects_empty_file_and_unknown_kind(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", " "])
    with pytest.raises(ValueError, match=r"empty\.jsonl: no 'text' records"):
        read_jsonl(path, "text")
    with pytest.raises(ValueError, match="kind must be one of"):
        read_jsonl(path, "qa")


# ------------------------------------------------------------------ prompts
def test_read_jsonl_unlabelled_records_get_placeholder_labels(tmp_path):
    """labelled=False (out-of-distribution inputs): a missing or any given label becomes 0;
    everything else is still validated."""
    path = tmp_path / "ood.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"]}) + "\n"
                    + json.dumps({"question": "r", "choices": ["a", "b"], "answer": "Z"}) + "\n")
    assert [r["answer"] for r in read_jsonl(path, "mcqa", labelled=False)] == [0, 0]
    with pytest.raises(ValueError, match="missing key"):
        read_jsonl(path, "mcqa")
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "x", "label": "unknown words"}) + "\n"
                    + json.dumps({"text": "y"}) + "\n")
    assert [r["label"] for r in read_jsonl(text, "text", labelled=False)] == [0, 0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": "ab"}) + "\n")
    with pytest.raises(ValueError, match="'choices' must be a list"):
        read_jsonl(bad, "mcqa", labelled=False)
