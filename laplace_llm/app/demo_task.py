"""The demo's generated task: entity colours, facts and multiple-choice questions.

:class:`DemoTask` writes the pretraining texts and the questions of
:mod:`laplace_llm.app.demo`, answered by letters; :mod:`laplace_llm.app.demo_words`
answers the same questions in words. Both build their tokenizer over the task's words
with :func:`build_tokenizer`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from laplace_llm.data import format_mcqa_prompt, mcqa_choices

__all__ = ["COLOURS", "FORMAT_WORDS", "SPECIALS", "DemoTask", "build_tokenizer"]

#: The tokenizer's special words, in id order: pad, unk, bos, eos.
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
#: The words of the prompts' format.
FORMAT_WORDS = ["Answer", ":", ".", "is", "which", "?"]
#: The four answer options, always in this order: A. red, B. blue, C. green, D. yellow.
COLOURS = ["red", "blue", "green", "yellow"]



class DemoTask:
    """Generated texts of the demo: entity colours, facts and multiple-choice questions.

    Every entity ``e<i>`` has a *main* colour and a *second* colour; a fact or a question
    about it states the main colour with probability ``p_main`` and the second one
    otherwise. So the best possible predictor has accuracy ``p_main`` and NLL
    ``H(p_main)`` (see :meth:`bayes_nll`), and a model that memorises its training labels
    is over-confident by construction.

    Parameters
    ----------
    n_entities : int
        Entities ``e0 … e{n-1}``.
    n_distractors : int
        Distractor words ``x0 … x{n-1}``.
    seed : int
        Seed of the colour assignment.
    p_main : float
        Probability of the main colour.
    """

    def __init__(self, n_entities: int, n_distractors: int, seed: int, p_main: float = 0.75):
        rng = random.Random(seed)
        self.entities = [f"e{i}" for i in range(n_entities)]
        self.distractors = [f"x{i}" for i in range(n_distractors)]
        self.p_main = p_main
        self.main = {}
        self.second = {}
        for e in self.entities:
            self.main[e], self.second[e] = rng.sample(range(len(COLOURS)), 2)

    @property
    def words(self) -> list[str]:
        """Every word the task uses, in a fixed order (the tokenizer's vocabulary)."""
        letters = [c.strip() for c in mcqa_choices(len(COLOURS))]
        return SPECIALS + letters + FORMAT_WORDS + COLOURS + self.entities + self.distractors

    def bayes_nll(self) -> float:
        """NLL of the true label distribution (the best any model can reach)."""
        import math

        p = self.p_main
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    def sample_colour(self, rng: random.Random, entity: str) -> int:
        """Draw an entity's colour: the main one with probability ``p_main``."""
        return self.main[entity] if rng.random() < self.p_main else self.second[entity]

    def fact(self, rng: random.Random, entity: str) -> str:
        """State one (sampled) colour of ``entity``: ``"e12 is red ."``."""
        return f"{entity} is {COLOURS[self.sample_colour(rng, entity)]} ."

    def facts_text(self, rng: random.Random, n_facts: int = 4, p_distractor: float = 0.3) -> str:
        """Write a pretraining sentence of ``n_facts`` facts, distractor words sprinkled between."""
        parts = []
        for entity in rng.sample(self.entities, n_facts):
            if rng.random() < p_distractor:
                parts.append(rng.choice(self.distractors))
            parts.append(self.fact(rng, entity))
        return " ".join(parts)

    def question(
        self, rng: random.Random, direct: bool = False, shifted: bool = False
    ) -> dict[str, Any]:
        """One four-option ``mcqa`` record (see :mod:`laplace_llm.data`).

        The question names an entity after two distractor words (which make every prompt
        unique, so that a model can memorise its training labels); the options are the
        colours in a fixed order.

        Parameters
        ----------
        direct : bool
            Ask for a colour by name (pretraining) instead of an entity's colour.
        shifted : bool
            Longer prompt: an irrelevant fact about another entity first, and more
            distractor words, one between the entity and the rest of the question.
        """
        entity = rng.choice(self.entities)
        answer = self.sample_colour(rng, entity)
        subject = COLOURS[answer] if direct else entity
        noise = rng.sample(self.distractors, 4)
        if shifted:
            other = rng.choice([e for e in self.entities if e != entity])
            question = (f"{noise[0]} {self.fact(rng, other)} {noise[1]} {noise[2]} {subject} "
                        f"{noise[3]} is which ?")
        else:
            question = f"{noise[0]} {noise[1]} {subject} is which ?"
        return {"question": question, "choices": list(COLOURS), "answer": answer}

    def questions(self, n: int, seed: int, **kwargs: Any) -> list[dict[str, Any]]:
        """Generate ``n`` seeded questions (``kwargs`` as :meth:`question`)."""
        rng = random.Random(seed)
        return [self.question(rng, **kwargs) for _ in range(n)]

    def pretraining_text(self, rng: random.Random, p_question: float = 0.25) -> str:
        """Write a pretraining document: a fact sentence, or a direct question with its answer."""
        if rng.random() >= p_question:
            return self.facts_text(rng)
        record = self.question(rng, direct=True)
        letter = mcqa_choices(len(COLOURS))[record["answer"]]
        return format_mcqa_prompt(record) + letter


def build_tokenizer(words: Sequence[str]) -> Any:
    """Build a word-level fast tokenizer over ``words`` (first four: pad, unk, bos, eos).

    Whitespace and punctuation split words, so ``"Answer:"`` is two tokens and the
    choices ``" A"`` … ``" D"`` are one token each. Left padding, no special tokens added.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", padding_side="left",
    )
