"""``laplace-llm fit/evaluate --stream``: the same posterior and metrics as reading the file.

The reference is the same command without ``--stream`` (which reads every record into
memory first): the posterior files must hold equal tensors, bit for bit (same batches in
the same order), and ``evaluate`` the same metrics. A bad line is the same one-line error.
"""

import json

import pytest
import torch
from safetensors import safe_open

from laplace_llm.app import loading
from laplace_llm.app.cli import main
from tests.app.test_cli import causal, mcqa_records, write_jsonl  # noqa: F401 (fixture)
from tests.app.test_text_answers import folders  # noqa: F401 (fixture)


def cli(*args):
    return main([str(a) for a in args])


def tensors(path):
    with safe_open(str(path), "pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}, fh.metadata()


def assert_same_files(a, b):
    (ta, ma), (tb, mb) = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    header_a, header_b = json.loads(ma["laplace_llm"]), json.loads(mb["laplace_llm"])
    assert header_a == header_b


def fit_evaluate(tmp_path, name, common, stream):
    post = tmp_path / f"{name}.safetensors"
    flag = ["--stream"] if stream else []
    assert cli("fit", *common, *flag, "--posterior", post, "--fisher-type", "ggn") == 0
    out = tmp_path / f"{name}-report"
    assert cli("evaluate", *common, *flag, "--posterior", post, "--out", out,
               "--mc-samples", 20) == 0
    return post, json.loads((out / "metrics.json").read_text())


def test_letters_fit_and_evaluate_streamed_equal_in_memory(causal, tmp_path):  # noqa: F811
    ood = write_jsonl(tmp_path / "ood.jsonl", [{k: v for k, v in r.items() if k != "answer"}
                                               for r in mcqa_records(5, seed=9)])
    common = ["--model", causal / "model", "--adapter", causal / "adapter",
              "--data", causal / "data.jsonl", "--batch-size", 4, "--quiet",
              "--ood-data", ood]
    common_fit = common[:-2]
    post_a = tmp_path / "a.safetensors"
    post_b = tmp_path / "b.safetensors"
    assert cli("fit", *common_fit, "--posterior", post_a) == 0
    assert cli("fit", *common_fit, "--stream", "--posterior", post_b) == 0
    assert_same_files(post_a, post_b)
    reports = []
    for flag, post in (([], post_a), (["--stream"], post_b)):
        out = tmp_path / f"report{len(reports)}"
        assert cli("evaluate", *common, *flag, "--posterior", post, "--out", out,
                   "--mc-samples", 20) == 0
        reports.append(json.loads((out / "metrics.json").read_text()))
    assert reports[0]["results"] == reports[1]["results"] and reports[0]["n_ood"] == 5


@pytest.mark.parametrize("kind", ["mcqa", "text"])
def test_text_answers_streamed_equal_in_memory(folders, tmp_path, kind):  # noqa: F811
    common = ["--model", folders / "model", "--adapter", folders / "adapter",
              "--data", folders / f"{kind}.jsonl", "--kind", kind, "--batch-size", 4, "--quiet"]
    common += (["--answer-format", "text"] if kind == "mcqa"
               else ["--choices", " very bad", " bad", " good"])
    post_a, report_a = fit_evaluate(tmp_path, "a", common, stream=False)
    post_b, report_b = fit_evaluate(tmp_path, "b", common, stream=True)
    assert_same_files(post_a, post_b)
    assert report_a["results"] == report_b["results"]


def test_large_files_stream_without_the_flag(causal, tmp_path, monkeypatch):  # noqa: F811
    common = ["--model", causal / "model", "--adapter", causal / "adapter",
              "--data", causal / "data.jsonl", "--batch-size", 4, "--quiet"]
    assert cli("fit", *common, "--posterior", tmp_path / "a.safetensors") == 0

    def no_reading(*args, **kwargs):
        raise AssertionError("a large file was read into memory")

    monkeypatch.setattr(loading, "STREAM_BYTES", 100)  # the file is larger than this
    monkeypatch.setattr(loading, "read_jsonl", no_reading)
    assert cli("fit", *common, "--posterior", tmp_path / "b.safetensors") == 0
    assert_same_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question": "q", "choices": ["a", "b"], "answer": 2}'], ":2: 'answer' 2 is out of range"),
        (['{"question": "q", "choices": ["a", "b"], "answer": 0'], ":2: invalid JSON"),
    ],
)
def test_a_bad_line_is_the_same_one_line_error(causal, tmp_path, capsys, lines, message):  # noqa: F811
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(mcqa_records(1)[0]) + "\n" + "\n".join(lines) + "\n")
    errors = []
    for flag in ([], ["--stream"]):
        assert cli("fit", "--model", causal / "model", "--adapter", causal / "adapter",
                   "--data", data, "--posterior", tmp_path / "p.safetensors", "--quiet",
                   *flag) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and message in errors[0] and errors[0].count("\n") == 1


@pytest.mark.slow  # one launch of two processes importing torch + transformers: ~25 s
def test_torchrun_streams_each_processes_share(tmp_path):
    from tests.app.test_launchers import BIN, assert_same_posterior, launch
    from tests.fixtures.models import write_model_folder

    write_model_folder(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", mcqa_records(11))  # odd: shards of 6 and 5
    single = tmp_path / "single.safetensors"
    fit = ["--batch-size", "4", "--fisher-type", "ggn", "--n-kfac", "64", "--lr-threshold", "8",
           "--quiet"]
    assert cli("fit", "--model", tmp_path / "model", "--adapter", tmp_path / "adapter",
               "--data", tmp_path / "data.jsonl", *fit, "--posterior", single) == 0
    launch([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"], tmp_path,
           tmp_path / "adapter", "--stream", "--posterior", str(tmp_path / "two.safetensors"))
    assert_same_posterior(tmp_path / "two.safetensors", single, tmp_path)
