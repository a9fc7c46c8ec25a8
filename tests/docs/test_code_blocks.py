"""Every ```python and ```bash block of README.md and of the documentation pages runs here,
or is marked as an excerpt with a reason, so a renamed function or option cannot leave a
stale example.

Rules a page follows (``test_every_block_runs_or_is_an_excerpt`` enforces them):

- A fenced block names its language. ``python`` and ``bash`` blocks are code; ``text``
  blocks (printed output, a synopsis) are not run.
- A code block runs unless the line before it (blank lines skipped) is
  ``<!-- excerpt: REASON -->``. ``<!-- slow: REASON -->`` runs it in the slow job (a block
  that needs the real SmolLM2).
- The python blocks of a page run in order in one namespace, from the current folder of a
  temporary directory, on the tiny models of ``tests/fixtures/models.py``. The names a block uses
  without defining them (``peft_model``, ``tokenizer``, ``train_loader``, ``batch``, …)
  come from the page's setup below (``SETUPS``; ``causal`` unless the page is listed).
- A bash block that runs holds ``laplace-llm`` commands only; ``M``, ``A`` and ``D.jsonl``
  stand for a model folder, an adapter folder and a JSONL file of multiple-choice
  records, which the test writes.
- Excerpts are still read: their python must parse, what they import from
  ``laplace_llm`` must exist, and the methods and keyword arguments they call on ``la``
  must exist on ``LoRALaplace``; every option of a ``laplace-llm`` command in any block
  must be one its ``--help`` lists.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import random
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^```(\S*)\s*$")
MARK = re.compile(r"^<!--\s*(excerpt|slow):\s*(.*?)\s*-->$")
CODE = {"python", "bash"}


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mark: str | None  # None (runs), "excerpt" or "slow"
    reason: str

    @property
    def runs(self) -> bool:
        return self.lang in CODE and self.mark != "excerpt"

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(page: str) -> list[Block]:
    lines = (ROOT / page).read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = MARK.match(lines[k].strip()) if k >= 0 else None
        out.append(Block(page, i + 1, m.group(1), "\n".join(lines[i + 1:j]),
                         mark.group(1) if mark else None, mark.group(2) if mark else ""))
        i = j + 1
    return out


BLOCKS = {page: read_blocks(page) for page in PAGES}


def commands(code: str, only_cli: bool = False) -> list[list[str]]:
    """The shell commands of a block, continuation lines joined, comments dropped
    (``only_cli``: only the lines that call the command line)."""
    text = re.sub(r"\\\n", " ", code)
    out = []
    for line in text.split("\n"):
        line = line.split(" #")[0].strip()
        if only_cli and "laplace-llm" not in line and "laplace_llm.app.cli" not in line:
            continue
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


# ------------------------------------------------------------------ the rules
def test_every_block_runs_or_is_an_excerpt():
    problems = []
    for blocks in BLOCKS.values():
        for b in blocks:
            if not b.lang:
                problems.append(f"{b}: a fenced block without a language (python, bash or text)")
            if b.mark and not b.reason:
                problems.append(f"{b}: a {b.mark} mark without a reason")
            if b.mark and b.lang not in CODE:
                problems.append(f"{b}: a {b.mark} mark on a {b.lang!r} block, which never runs")
            if b.lang == "bash" and b.runs:
                for cmd in commands(b.code):
                    if cmd[0] != "laplace-llm":
                        problems.append(f"{b}: `{' '.join(cmd)[:60]}` does not run here; mark "
                                        "the block <!-- excerpt: why --> or make it laplace-llm only")
    assert not problems, "\n".join(problems)
    n_run = sum(b.runs for bs in BLOCKS.values() for b in bs)
    assert n_run >= 10  # the guides' examples run; this is not a list of excerpts


def test_readme_is_short_and_its_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text().split("\n")
    assert len(readme) <= 200
    first = "\n".join(readme[:30])
    assert "laplace-llm demo" in first and 'python -m pytest -q -m "not slow"' in first
    setup = next(b for b in BLOCKS["README.md"] if b.lang == "bash")
    install, test = [c for c in setup.code.split("\n") if c and not c.startswith("#")]
    assert install.endswith("&& laplace-llm demo")
    command = test.split("&&", 1)[1].strip()  # after activating the venv
    ci = (ROOT / ".ci" / "run").read_text().split("\n")
    assert command in [line.strip() for line in ci], f"{command!r} is not a line of .ci/run"


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+\.\d+", text)


def test_readme_smollm2_table_is_the_scripts_headline_and_its_prose_figures_are_rendered():
    """The README's SmolLM2 table is, line for line, the headline that
    ``benchmarks/quality/paper_table.py`` rendered into ``fitted/table.md`` (which the
    docs page includes whole), and every figure of the prose around it appears in that
    file."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("<!-- smollm2:start -->"):readme.index("<!-- smollm2:end -->")]
    table = (ROOT / "benchmarks/results/paper_table/fitted/table.md").read_text()
    headline = table[table.index("**Headline**"):]
    rows = [line for line in block.split("\n") if line.startswith("| ")]
    assert rows and all(line in headline.split("\n") for line in rows)
    prose = "\n".join(line for line in block.split("\n") if not line.startswith("| "))
    missing = [x for x in _numbers(prose) if x not in table]
    assert not missing, missing


def test_results_pages_include_what_the_scripts_render():
    includes = {
        "docs/results/smollm2.md": "benchmarks/results/paper_table/fitted/table.md",
        "docs/results/minilm-trec6.md": "benchmarks/results/real_text_default/table.md",
    }
    for page, rendered in includes.items():
        assert f'--8<-- "{rendered}"' in (ROOT / page).read_text(), page
        assert (ROOT / rendered).is_file()


# ------------------------------------------------------------------ excerpts are read too
def _cli_options(command: str) -> str:
    from laplace_llm.app.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and command in a.choices)
    return sub.choices[command].format_help()


def _check_cli(block: Block) -> list[str]:
    problems = []
    for cmd in commands(block.code, only_cli=True):
        if "laplace-llm" in cmd:
            args = cmd[cmd.index("laplace-llm") + 1:]
        elif "laplace_llm.app.cli" in cmd:
            args = cmd[cmd.index("laplace_llm.app.cli") + 1:]
        else:
            continue
        if not args or args[0].startswith("-"):
            continue
        text = _cli_options(args[0])
        for tok in args[1:]:
            opt = tok.split("=")[0].strip("[]")
            if opt.startswith("--") and opt not in text:
                problems.append(f"{block}: `laplace-llm {args[0]}` has no option {opt}")
    return problems


def _has(module, name: str) -> bool:
    """``from module import name`` works: an attribute, or a submodule of a package."""
    if hasattr(module, name):
        return True
    return hasattr(module, "__path__") and importlib.util.find_spec(
        f"{module.__name__}.{name}") is not None


def _check_python(block: Block) -> list[str]:
    from laplace_llm import LoRALaplace

    problems = []
    tree = ast.parse(block.code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("laplace_llm"):
            module = importlib.import_module(node.module)
            problems += [f"{block}: {node.module} has no {a.name}" for a in node.names
                         if not _has(module, a.name)]
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "laplace_llm"):
            import laplace_llm

            if not hasattr(laplace_llm, node.attr):
                problems.append(f"{block}: laplace_llm has no {node.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "la"):
            method = getattr(LoRALaplace, node.func.attr, None)
            if method is None:
                problems.append(f"{block}: LoRALaplace has no {node.func.attr}")
                continue
            params = inspect.signature(method).parameters
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                continue
            problems += [f"{block}: la.{node.func.attr} takes no {k.arg}=" for k in node.keywords
                         if k.arg and k.arg not in params]
    return problems


@pytest.mark.parametrize("page", PAGES)
def test_names_and_options_in_every_block_exist(page):
    problems = []
    for b in BLOCKS[page]:
        problems += _check_cli(b)
        if b.lang == "python":
            problems += _check_python(b)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ the namespaces
EXTRA_WORDS = ["very", "negative", "positive", "Review", "plot", "drags", "Sentiment", "film"]


def doc_tokenizer():
    """The tiny word-level tokenizer with the words of the guides' examples in place of
    some fillers (same vocabulary size, so every tiny model embeds every token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.fixtures.models import TINY_WORDS

    fillers = [i for i, w in enumerate(TINY_WORDS) if re.fullmatch(r"w\d+", w)]
    words = list(TINY_WORDS)
    for i, w in zip(fillers, EXTRA_WORDS):
        words[i] = w
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>", padding_side="left")
    return tok


WORDS = ["cat", "dog", "red", "blue", "good", "bad", "yes", "no"]


def mcqa(n, seed=0):
    rng = random.Random(seed)
    return [{"question": f"Which is {rng.choice(WORDS)} ?", "choices": rng.sample(WORDS, 4),
             "answer": rng.randrange(4)} for _ in range(n)]


def setup_causal(tmp: Path) -> dict:
    """A tiny Llama with LoRA on q, v and lm_head (LLLA needs the head), its base saved in
    ``base_dir``, multiple-choice loaders, a fitted ``la``, and the files of the CLI."""
    from laplace import Laplace
    from transformers import AutoModelForCausalLM

    import laplace_llm
    from laplace_llm.data import make_loader
    from tests.fixtures.models import add_lora, tiny_causal_lm, write_model_folder

    tokenizer = doc_tokenizer()
    base = tiny_causal_lm("llama", seed=0)
    base.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    peft_model = add_lora(base, seed=0, r=4, target_modules=("q_proj", "v_proj", "lm_head"))
    train_loader = make_loader(mcqa(24, 0), tokenizer, 8, "mcqa")
    clf = laplace_llm.LLMClassifier.from_choices(peft_model, tokenizer, [" A", " B", " C", " D"])
    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(train_loader)
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mcqa(24, 3)))
    write_model_folder(tmp / "cli")
    (tmp / "cli" / "D.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mcqa(12, 4)))
    texts = ["the plot drags", "a good film", "very bad", "the film is good", "bad plot",
             "very good film"]
    labels = ["negative", "positive", "very negative", "positive", "negative", "positive"]
    return {
        "torch": torch, "Laplace": Laplace, "laplace_llm": laplace_llm,
        "AutoModelForCausalLM": AutoModelForCausalLM, "base_dir": str(tmp / "base"),
        "peft_model": peft_model, "tokenizer": tokenizer, "tok": tokenizer,
        "train_loader": train_loader, "clf": clf, "la": la,
        "batch": next(iter(make_loader(mcqa(8, 1), tokenizer, 8, "mcqa"))),
        "val_loader": make_loader(mcqa(16, 2), tokenizer, 8, "mcqa"),
        "foreign_batch": next(iter(make_loader(mcqa(8, 5), tokenizer, 8, "mcqa"))),
        "answers": [f" {chr(ord('A') + i)}" for i in range(12)],  # C = 12 > top_k
        "records": [{"text": t, "label": y} for t, y in zip(texts, labels)],
        "mcqa_records": [{"question": "Which is red ?", "choices": ["the cat", "red", "a dog"],
                          "answer": 1},
                         {"question": "Which is good ?", "choices": ["good", "very bad"],
                          "answer": 0}],
    }


def setup_laplace_torch(tmp: Path) -> dict:
    """causal, plus ``reg``: a tiny Llama regression head (2 outputs) with LoRA on v, and
    its float-labelled ``loader`` and ``batch``."""
    from torch.utils.data import DataLoader

    from laplace_llm import LLMClassifier
    from tests.fixtures.models import add_lora, tiny_seqcls

    ns = setup_causal(tmp)
    reg = LLMClassifier(add_lora(tiny_seqcls("llama", 2, seed=0), seed=0, r=4,
                                 target_modules=("v_proj",), task_type="SEQ_CLS"))
    gen = torch.Generator().manual_seed(0)
    items = [{"input_ids": torch.randint(4, 90, (6,), generator=gen),
              "attention_mask": torch.ones(6, dtype=torch.long),
              "labels": torch.randn(2, generator=gen)} for _ in range(16)]
    loader = DataLoader(items, batch_size=8)
    return {**ns, "reg": reg, "loader": loader, "batch": next(iter(loader))}


def setup_trainer(tmp: Path) -> dict:
    """The sequence classifier of examples/hf_trainer.py, its data and a short Trainer run."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    spec = importlib.util.spec_from_file_location("doc_hf_trainer",
                                                  ROOT / "examples" / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = TrainingArguments(output_dir=str(tmp / "out"), per_device_train_batch_size=8,
                             num_train_epochs=2, learning_rate=1e-2, save_strategy="steps",
                             save_steps=4, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True)
    return {"torch": torch, "Trainer": Trainer, "args": args,
            "peft_model": get_peft_model(example.base_model(), example.LORA),
            "train": example.make_data(32, 0), "collator": default_data_collator}


def setup_resuming(tmp: Path) -> dict:
    """causal, with a loader of 200 batches: the guide's ``checkpoint_every=200`` writes
    its file at the last batch, which the second call resumes from (nothing left to do)."""
    from laplace_llm.data import make_loader

    ns = setup_causal(tmp)
    return {**ns, "train_loader": make_loader(mcqa(200, 6), ns["tokenizer"], 1, "mcqa")}


SETUPS = {"docs/laplace-torch.md": setup_laplace_torch, "docs/guides/trainer.md": setup_trainer,
          "docs/guides/resuming.md": setup_resuming}


def run_cli(cmd: list[str], tmp: Path) -> None:
    from laplace_llm.app.cli import main

    names = {"M": tmp / "cli" / "model", "A": tmp / "cli" / "adapter",
             "D.jsonl": tmp / "cli" / "D.jsonl"}
    argv = [str(names.get(t, t)) for t in cmd[1:]]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main([*argv, "--quiet"] if argv[0] != "demo" else argv)
    assert code == 0, f"laplace-llm {' '.join(cmd[1:])} exited {code}:\n{out.getvalue()[-2000:]}"


def _page_param(page: str):
    marks = [pytest.mark.slow] if any(b.mark == "slow" for b in BLOCKS[page]) else []
    return pytest.param(page, marks=marks, id=page)


RUN_PAGES = [_page_param(p) for p in PAGES if any(b.runs for b in BLOCKS[p])]


@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = SETUPS.get(page, setup_causal)(tmp_path)
    for b in BLOCKS[page]:
        if not b.runs:
            continue
        if b.lang == "python":
            try:
                exec(compile(b.code, str(b), "exec"), ns)  # noqa: S102
            except Exception as exc:  # name the block
                raise AssertionError(f"the block at {b} fails: {exc!r}") from exc
        else:
            for cmd in commands(b.code):
                run_cli(cmd, tmp_path)
