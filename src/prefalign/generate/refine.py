"""``refine`` (PopAlign refine contrast): the model answers, then is asked in a second turn to
refine its answer; the refinement is chosen over the first answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from prefalign.data.prompts import Prompt
from prefalign.generate.core import Candidate, Strategy, StrategyConfig, assistant, complete_one, make_pair, user
from prefalign.generate.steer import ChosenPrefill, continue_openings, opening_for

REFINE_REQUEST = (
    "Please refine your previous answer: make it more helpful, accurate and harmless, fix any "
    "mistakes, and remove anything unsafe. Reply with the improved answer only."
)


class RefineConfig(ChosenPrefill):
    """Refine contrast."""

    refine_request: str = Field(REFINE_REQUEST, min_length=1, description="the second user turn")


def refine_conversation(prompt: str, answer: str, request: str) -> list[dict]:
    return [user(prompt), assistant(answer), user(request)]


class RefineContrast(Strategy):
    name: ClassVar[str] = "refine"
    Config = RefineConfig
    description = "PopAlign: a second-turn refinement (chosen) vs the first answer (rejected)"

    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        answers = complete_one(self.backend, [[user(p.prompt)] for p in prompts], self.ctx.params(seed, "refine/answer"))
        out: list[list[Candidate] | None] = [None] * len(prompts)
        todo = []
        for i, answer in enumerate(answers):
            if answer.strip():
                todo.append(i)
            else:
                out[i] = [Candidate.drop(self.name, "empty_answer", {"answer": answer})]
        picked = [opening_for(self.config.chosen_prefill, seed, f"{self.name}:{prompts[i].id}", prompts[i].prompt) for i in todo]
        refined = [texts[0] for texts in continue_openings(
            self.backend,
            [refine_conversation(prompts[i].prompt, answers[i], self.config.refine_request) for i in todo],
            picked, self.ctx.params(seed, "refine/refinement", n=1),
        )]
        for i, opening, text in zip(todo, picked, refined):
            out[i] = [make_pair(self.name, prompts[i].prompt, text, answers[i], {"chosen_opening": opening} if opening else None)]
        return out  # type: ignore[return-value]
