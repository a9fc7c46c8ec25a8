"""The demo's task answered in words: colours named by phrases of 1 to 3 tokens.

Same entities, facts, label noise and splits as :class:`laplace_llm.app.demo_task.DemoTask`, but
each colour is a phrase (``"red"``, ``"dark blue"``, ``"light sea green"``,
``"yellow"``), facts read ``"e12 is dark blue ."``, and a question is answered by the
phrase itself after ``"Answer:"``, with no lettered options. The classifier is
:class:`~laplace_llm.CandidateScorer` over the four phrases, each scored by its
log-likelihood after the prompt. ``laplace-llm demo --answers words`` runs it.
"""

from __future__ import annotations

import random
from typing import Any

from torch import nn

from laplace_llm.app.demo_task import COLOURS, FORMAT_WORDS, SPECIALS, DemoTask
from laplace_llm.data import DEFAULT_TEXT_ANSWER_TEMPLATE
from laplace_llm.models.candidates import CandidateScorer

__all__ = ["PHRASES", "WordsDemoTask", "words_classifier"]

#: The answer of each colour of :data:`laplace_llm.app.demo_task.COLOURS`, in that order.
PHRASES = ["red", "dark blue", "light sea green", "yellow"]


class WordsDemoTask(DemoTask):
    """:class:`~laplace_llm.app.demo_task.DemoTask` whose colours are the phrases :data:`PHRASES`.

    :meth:`question` returns ``"mcqa"`` records whose ``choices`` are the phrases;
    :meth:`text_records` turns them into ``"text"`` records (prompt, label index) for the
    fixed-candidate scorer.
    """

    @property
    def words(self) -> list[str]:
        """Vocabulary of the task: the letter task's words and the phrases' words."""
        extra = sorted({w for p in PHRASES for w in p.split()} - set(COLOURS))
        return (SPECIALS + FORMAT_WORDS + COLOURS + extra + self.entities
                + self.distractors)

    def fact(self, rng: random.Random, entity: str) -> str:
        """Return a fact "``entity`` is ``phrase`` ." with the entity's sampled colour."""
        return f"{entity} is {PHRASES[self.sample_colour(rng, entity)]} ."

    def question(
        self, rng: random.Random, direct: bool = False, shifted: bool = False
    ) -> dict[str, Any]:
        """Return a question whose choices are the phrases (see :meth:`DemoTask.question`)."""
        record = super().question(rng, direct=direct, shifted=shifted)
        if direct:  # ask for the phrase by name, as the letter task asks for a colour
            name = COLOURS[record["answer"]]
            record["question"] = record["question"].replace(
                f" {name} is which", f" {PHRASES[record['answer']]} is which"
            )
        record["choices"] = list(PHRASES)
        return record

    def pretraining_text(self, rng: random.Random, p_question: float = 0.25) -> str:
        """Return facts, or with probability ``p_question`` a question answered by its phrase."""
        if rng.random() >= p_question:
            return self.facts_text(rng)
        record = self.question(rng, direct=True)
        prompt = DEFAULT_TEXT_ANSWER_TEMPLATE.format(question=record["question"])
        return f"{prompt} {PHRASES[record['answer']]}"

    @staticmethod
    def text_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``"text"`` records: the prompt without options, the answer's index as label."""
        return [
            {"text": DEFAULT_TEXT_ANSWER_TEMPLATE.format(question=r["question"]),
             "label": r["answer"]}
            for r in records
        ]


def words_classifier(peft_model: nn.Module, tokenizer: Any) -> CandidateScorer:
    """Return the scorer over ``" " + phrase`` for each of :data:`PHRASES` (centred scores)."""
    return CandidateScorer.from_texts(
        peft_model, tokenizer, [" " + p for p in PHRASES], center=True
    )
