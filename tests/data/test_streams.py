"""Streamed JSONL files: the same batches, errors and fit as records read into memory.

References: :func:`laplace_llm.data.read_jsonl` + :class:`LLMDataset` /
:class:`CandidateDataset` (the in-memory path, which reads the whole file), and
``tracemalloc`` for the memory that the streamed fit holds.
"""

import json
import random
import tracemalloc

import pytest
import torch
from torch.utils.data import DataLoader

from laplace_llm import LLMClassifier, LoRALaplace
from laplace_llm.data import (
    CandidateStream,
    JsonlStream,
    make_candidate_loader,
    make_loader,
    read_jsonl,
    scan_jsonl,
)
from laplace_llm.data.loaders import _Collator
from laplace_llm.distributed import shard
from tests.fixtures.models import TINY_WORDS, tiny_llama_lora, tiny_tokenizer
from tests.fixtures.records import write_lines

WORDS = [w for w in TINY_WORDS[4:] if len(w) > 1]  # words and fillers, no letters


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def records(kind, n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if kind == "mcqa":
            k = rng.randint(2, 5)
            out.append({"question": sentence(rng, rng.randint(1, 6)),
                        "choices": [sentence(rng, rng.randint(1, 3)) for _ in range(k)],
                        "answer": rng.randrange(k) if i % 3 else "AB"[rng.randrange(2)]})
        elif kind == "text":
            out.append({"text": sentence(rng, rng.randint(1, 9)), "label": rng.randrange(3)})
        elif kind == "names":  # text with string labels
            out.append({"text": sentence(rng, rng.randint(1, 9)),
                        "label": rng.choice(["good", " bad", 1])})
        elif kind == "unlabelled":
            out.append({"text": sentence(rng, rng.randint(1, 9))})
        elif kind == "scores":
            out.append({"text": sentence(rng, rng.randint(1, 9)),
                        "target": [rng.random(), rng.randint(0, 3)]})
        else:
            out.append({"prompt": sentence(rng, 3), "chosen": sentence(rng, 2),
                        "rejected": sentence(rng, rng.randint(1, 4))})
    return out


def write(tmp_path, kind, items, blank_every=4):
    lines = []
    for i, r in enumerate(items):
        lines.append(json.dumps(r))
        if i % blank_every == 1:
            lines.append("  ")  # blank lines are skipped, and line numbers still count them
    return write_lines(tmp_path / f"{kind}.jsonl", lines)


def assert_same_batches(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


CASES = [
    ("mcqa", "mcqa", {}),
    ("text", "text", {}),
    ("unlabelled", "text", {"labelled": False}),
    ("scores", "scores", {}),
    ("preference", "preference", {"pair_order": "random", "seed": 3}),
    ("names", "text", {"label_names": ["bad", "w1", "good"]}),
]


@pytest.mark.parametrize(("name", "kind", "kwargs"), CASES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_streamed_batches_equal_the_in_memory_batches(tmp_path, name, kind, kwargs, side):
    kwargs = dict(kwargs)
    items = records(name, 23, seed=1)
    path = write(tmp_path, name, items)
    tok = tiny_tokenizer(padding_side=side, add_bos=True)
    streamed = make_loader(path, tok, 5, kind, max_length=6, **kwargs)
    assert isinstance(streamed.dataset, JsonlStream)
    if name == "names":  # in memory: label_indices first, as the docs say
        from laplace_llm.data import label_indices

        mem = read_jsonl(path, kind)
        mem = label_indices(mem, kwargs["label_names"])
        memory = make_loader(mem, tok, 5, kind, max_length=6)
    else:
        labelled = kwargs.pop("labelled", True)
        memory = make_loader(read_jsonl(path, kind, labelled), tok, 5, kind, max_length=6,
                             **kwargs)
    assert len(streamed.dataset) == len(memory.dataset) == 23
    assert len(streamed) == len(memory) == 5
    assert_same_batches(streamed, memory)
    assert_same_batches(streamed, memory)  # a second epoch reads the file again


def test_streamed_candidates_equal_the_in_memory_candidates(tmp_path):
    items = records("mcqa", 17, seed=2)
    path = write(tmp_path, "mcqa", items)
    tok = tiny_tokenizer(padding_side="left")
    streamed = make_candidate_loader(path, tok, 4, max_length=5)
    memory = make_candidate_loader(read_jsonl(path, "mcqa"), tok, 4, max_length=5)
    assert isinstance(streamed.dataset, CandidateStream)
    assert streamed.dataset.n_candidates == memory.dataset.n_candidates == 5
    assert len(streamed.dataset) == 17
    assert_same_batches(streamed, memory)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "a", "label": 1', r"invalid JSON"),
        ('["a", 1]', r"expected a JSON object, got list"),
        ('{"text": "a", "label": true}', r"'label' must be a non-negative integer"),
        ('{"text": 3, "label": 0}', r"'text' must be a string"),
    ],
)
def test_a_bad_line_is_refused_before_iterating_with_read_jsonls_error(tmp_path, line, match):
    good = json.dumps({"text": "the cat", "label": 1})
    path = write_lines(tmp_path / "data.jsonl", [good, "", good, line, good])
    with pytest.raises(ValueError, match=r"data\.jsonl:4: .*" + match) as expected:
        read_jsonl(path, "text")
    with pytest.raises(ValueError) as got:
        JsonlStream(path, tiny_tokenizer(), "text")  # at construction, before any batch
    assert str(got.value) == str(expected.value)


def test_file_wide_checks_name_the_lines(tmp_path):
    tok = tiny_tokenizer()
    mixed = write_lines(tmp_path / "mixed.jsonl", [json.dumps({"text": "b", "label": 0}),
                                                   json.dumps({"text": "a"})])
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: missing key\(s\) \['label'\]"):
        JsonlStream(mixed, tok, "text")
    sizes = write_lines(tmp_path / "sizes.jsonl", [json.dumps({"text": "a", "target": [1, 2]}),
                                                   "", json.dumps({"text": "b", "target": 3})])
    with pytest.raises(ValueError, match=r"sizes\.jsonl:3: 'target' has 1 values but line 1 has 2"):
        JsonlStream(sizes, tok, "scores")
    names = write_lines(tmp_path / "names.jsonl", [json.dumps({"text": "a", "label": "good"})])
    with pytest.raises(ValueError, match="pass label_names"):
        JsonlStream(names, tok, "text")
    with pytest.raises(ValueError, match=r"labels \['good'\] are none of the label names"):
        JsonlStream(names, tok, "text", label_names=["bad"])
    empty = write_lines(tmp_path / "empty.jsonl", ["", " "])
    with pytest.raises(ValueError, match=r"empty\.jsonl: no 'text' records"):
        JsonlStream(empty, tok, "text")
    with pytest.raises(ValueError, match="cannot be shuffled"):
        make_loader(names, tok, 2, "text", shuffle=True, label_names=["good"])
    with pytest.raises(ValueError, match="the summary is of"):
        JsonlStream(mixed, tok, "text", summary=scan_jsonl(names, "text"))


def test_a_file_that_changes_after_its_scan_is_refused(tmp_path):
    path = write(tmp_path, "text", records("text", 6, seed=8))
    stream = JsonlStream(path, tiny_tokenizer(), "text")
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "the cat", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="holds 7 records now but held 6 when it was scanned"):
        list(stream)


def test_summary_counts_what_the_command_line_checks(tmp_path):
    path = write(tmp_path, "mcqa", records("mcqa", 30, seed=4))
    summary = scan_jsonl(path, "mcqa")
    memory = read_jsonl(path, "mcqa")
    assert summary.n_records == len(memory) == 30
    assert summary.max_choices == max(len(r["choices"]) for r in memory)
    assert summary.max_label == max(r["answer"] for r in memory)
    scores = scan_jsonl(write(tmp_path, "scores", records("scores", 5)), "scores")
    assert scores.target_size == 2 and scores.max_label is None


@pytest.mark.parametrize("world", [2, 3])
def test_shards_of_a_stream_are_the_shards_of_the_records(tmp_path, world):
    path = write(tmp_path, "preference", records("preference", 11, seed=5))
    tok = tiny_tokenizer()
    stream = JsonlStream(path, tok, "preference", pair_order="random", seed=1)
    memory = make_loader(read_jsonl(path, "preference"), tok, 3, "preference",
                         pair_order="random", seed=1).dataset
    for rank in range(world):
        mine = shard(stream, rank, world)
        ref = shard(memory, rank, world)
        assert len(mine) == len(ref)
        assert_same_batches(DataLoader(mine, batch_size=3, collate_fn=_Collator(tok)),
                            DataLoader(ref, batch_size=3, collate_fn=_Collator(tok)))


def test_workers_each_tokenise_their_share(tmp_path):
    path = write(tmp_path, "text", records("text", 13, seed=6))
    tok = tiny_tokenizer()
    loader = DataLoader(JsonlStream(path, tok, "text"), batch_size=None, num_workers=2)
    got = sorted(tuple(item["encoded"]["input_ids"]) + (item["label"],) for item in loader)
    ref = sorted(tuple(item["encoded"]["input_ids"]) + (item["label"],)
                 for item in JsonlStream(path, tok, "text"))
    assert got == ref and len(got) == 13


def laplace():
    clf = LLMClassifier(tiny_llama_lora(seed=0), [4, 5, 6])
    return LoRALaplace(clf, "classification", n_kfac=4, seed=0)


def fitted(loader):
    la = laplace()
    la.fit(loader)
    return la


def test_a_streamed_fit_equals_the_in_memory_fit_bit_for_bit(tmp_path):
    path = write(tmp_path, "text", records("text", 37, seed=7))
    tok = tiny_tokenizer(padding_side="left")
    a = fitted(make_loader(path, tok, 8, "text"))
    b = fitted(make_loader(read_jsonl(path, "text"), tok, 8, "text"))
    assert a.n_data == b.n_data == 37
    assert torch.equal(a.loss, b.loss)
    for Fa, Fb in zip(a.H_facs.kfacs, b.H_facs.kfacs):
        for fa, fb in zip(Fa, Fb):
            fa = fa.to_dense() if hasattr(fa, "to_dense") else fa
            fb = fb.to_dense() if hasattr(fb, "to_dense") else fb
            assert torch.equal(fa, fb)
    assert torch.equal(a.log_marginal_likelihood(), b.log_marginal_likelihood())


N_LINES = 100_000


@pytest.mark.slow  # measured 27 s (2 shared cores): fits over 100k and 10k records
def test_a_hundred_thousand_lines_stream_through_a_fit_in_little_memory(tmp_path):
    """The file is ~5.5 MB; read into memory its records take ~38 MB of Python objects.

    The streamed fit (validating pass, tokenising, batches of 512, the fit itself) holds
    one block and one batch at a time: its peak of Python allocations (tracemalloc;
    tensors' storage is not Python's, and the curvature does not grow with N) must be
    below 1/20 of what reading the file takes (measured 1/59), and the 90,000 lines more
    than a fit over the first 10,000 may add at most 2 % of what holding them takes
    (measured 0.4 %: cyclic garbage of the tokenizer that Python's collector frees late).
    """
    rng = random.Random(0)
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(N_LINES):
            fh.write(json.dumps({"text": sentence(rng, rng.randint(3, 12)),
                                 "label": rng.randrange(3)}) + "\n")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(path.read_text(encoding="utf-8").splitlines(True)[:10_000]))
    tok = tiny_tokenizer(padding_side="left")
    la = laplace()
    la.fit(make_loader(small, tok, 512, "text"))  # warm-up: lazy imports and caches

    def fit_peak(file):
        tracemalloc.start()
        try:
            la.fit(make_loader(file, tok, 512, "text"))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small_peak = fit_peak(small)
    assert la.n_data == 10_000
    stream_peak = fit_peak(path)
    assert la.n_data == N_LINES
    tracemalloc.start()
    try:
        held = read_jsonl(path, "text")  # the in-memory path's first step
        memory_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(held) == N_LINES and memory_peak > path.stat().st_size
    assert stream_peak < memory_peak / 20, (stream_peak, memory_peak)
    holding_the_rest = memory_peak * (N_LINES - 10_000) / N_LINES
    assert stream_peak - small_peak < 0.02 * holding_the_rest, (stream_peak, small_peak,
                                                                memory_peak)
