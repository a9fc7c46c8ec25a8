"""Bad inputs that used to escape the library's own errors, and progress output in logs.

- A NaN LoRA weight with the default ``fisher_type="mc"`` made torch's sampler fail
  ("probability tensor contains either inf, nan or element < 0"); every structure now
  raises :class:`laplace_llm.NonFiniteError` naming the module first.
- ``from_choices`` with an answer of several tokens points to ``CandidateScorer.from_texts``.
- Progress bars write nothing to a stream that is not a terminal (CI, nohup).
"""

import io

import pytest
import torch
from laplace import Laplace
from torch.utils.data import DataLoader

from laplace_llm import LLMClassifier, NonFiniteError
from laplace_llm.progress import progress_bar
from laplace_llm.tools.training import train_lora
from tests.fixtures.batches import TARGET_IDS, DictDataset, token_items
from tests.fixtures.models import tiny_llama_lora, tiny_tokenizer


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("fisher_type", ["mc", "ggn", "ef"])
def test_nan_lora_weight_raises_non_finite_error_naming_the_module(structure, fisher_type):
    model = tiny_llama_lora(seed=0)
    name = next(n for n, _ in model.named_parameters()
                if "layers.1" in n and "v_proj.lora_B" in n)
    with torch.no_grad():
        dict(model.named_parameters())[name][0, 0] = float("nan")
    la = Laplace(LLMClassifier(model, TARGET_IDS), "classification", subset_of_weights="lora",
                 hessian_structure=structure, fisher_type=fisher_type)
    loader = DataLoader(DictDataset(token_items(6, 5, seed=0)), batch_size=3)
    with pytest.raises(NonFiniteError, match=r"LoRA weights of \[.*layers\.1\.self_attn\.v_proj"):
        la.fit(loader)


def test_nan_inputs_say_that_the_lora_weights_are_finite():
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    emb = clf.model.get_input_embeddings()
    with torch.no_grad():
        emb.weight[:] = float("nan")
    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron")
    loader = DataLoader(DictDataset(token_items(4, 5, seed=0)), batch_size=2)
    with pytest.raises(NonFiniteError, match="every LoRA weight is finite"):
        la.fit(loader)


def test_multi_token_choice_points_to_candidate_scorer():
    tok = tiny_tokenizer(padding_side="left")
    with pytest.raises(ValueError, match=r"CandidateScorer\.from_texts"):
        LLMClassifier.from_choices(tiny_llama_lora(seed=0), tok, [" cat dog", " red"])


def test_progress_bar_is_silent_on_a_stream_that_is_not_a_terminal():
    stream = io.StringIO()
    assert list(progress_bar(range(500), enabled=True, file=stream)) == list(range(500))
    assert stream.getvalue() == ""


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_terminal_and_not_when_disabled():
    tty = _TTY()
    list(progress_bar(range(5), enabled=True, file=tty, desc="work"))
    assert "work" in tty.getvalue() and "5/5" in tty.getvalue()
    tty = _TTY()
    list(progress_bar(range(5), enabled=False, file=tty))
    assert tty.getvalue() == ""


def test_training_with_progress_writes_no_bar_into_captured_stderr(capfd):
    clf = LLMClassifier(tiny_llama_lora(seed=0), TARGET_IDS)
    items = token_items(8, 5, seed=0)
    loader = DataLoader(DictDataset(items), batch_size=4)
    train_lora(clf, loader, epochs=3, lr=1e-3, progress=True)
    la = Laplace(clf, "classification", subset_of_weights="lora", hessian_structure="kron")
    la.fit(loader, progress_bar=True)
    err = capfd.readouterr().err
    assert "\r" not in err and "it/s" not in err
