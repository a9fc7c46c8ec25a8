"""MCQA prompts: lettered options and templates."""

import pytest

from laplace_llm.data import (
    format_mcqa_prompt,
    mcqa_choices,
)
from tests.fixtures.records import MCQA


def test_mcqa_choices_are_spaced_letters():
    assert mcqa_choices(4) == [" A", " B", " C", " D"]
    assert mcqa_choices(2) == [" A", " B"]
    for bad in (1, 27, 2.0):
        with pytest.raises(ValueError, match="integer from 2 to 26"):
            mcqa_choices(bad)


def test_format_mcqa_prompt_default_and_custom_template():
    assert format_mcqa_prompt(MCQA[0]) == "the cat is\nA. red\nB. blue\nC. good\nAnswer:"
    template = "Q: {question}\n{options}\nA:"
    assert format_mcqa_prompt(MCQA[1], template) == "Q: Which dog ?\nA. yes\nB. no\nA:"
    with pytest.raises(ValueError, match=r"lacks the field \{options\}"):
        format_mcqa_prompt(MCQA[0], "{question} Answer:")
