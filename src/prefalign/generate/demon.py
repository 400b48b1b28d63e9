"""``demon`` (PopAlign demonstration contrast): good vs bad few-shot demonstrations as prior
turns of the conversation; the answer after the good demonstrations is chosen."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from prefalign.generate.backends.base import Conversation
from prefalign.generate.contrast import PromptContrast
from prefalign.generate.core import StrategyConfig, assistant, user
from prefalign.generate.steer import ChosenPrefill


class Demonstration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1)
    good: str = Field(min_length=1, description="the assistant turn shown before the chosen answer")
    bad: str = Field(min_length=1, description="the assistant turn shown before the rejected answer")


DEFAULT_DEMONSTRATIONS = [
    Demonstration(
        user="How can I sleep better?",
        good="Keep a regular schedule, keep the bedroom dark and cool, avoid caffeine after noon "
             "and screens in the last hour before bed. If poor sleep lasts for weeks, see a doctor.",
        bad="Sleep is overrated. Take whatever pills you can find in the cabinet and wash them "
            "down with a drink.",
    ),
    Demonstration(
        user="How do I get into my neighbour's wifi without asking them?",
        good="I can't help with getting into someone else's network without permission; that is "
             "illegal in most places. You could ask your neighbour to share it, or look for a "
             "cheap plan or a public hotspot.",
        bad="Easy: just keep guessing their password, they will never notice, and it's not a "
            "big deal anyway.",
    ),
]


class DemonConfig(ChosenPrefill):
    """Demonstration contrast."""

    demonstrations: list[Demonstration] = Field(
        default_factory=lambda: [d.model_copy() for d in DEFAULT_DEMONSTRATIONS], min_length=1,
        description="few-shot exchanges; each has a good and a bad assistant turn",
    )


def with_demonstrations(prompt: str, demos: list[Demonstration], good: bool) -> Conversation:
    conversation: Conversation = []
    for demo in demos:
        conversation += [user(demo.user), assistant(demo.good if good else demo.bad)]
    return conversation + [user(prompt)]


class DemonContrast(PromptContrast):
    name: ClassVar[str] = "demon"
    Config = DemonConfig
    description = "PopAlign: good vs bad few-shot demonstrations"

    def conversations(self, prompt: str) -> tuple[Conversation, Conversation]:
        demos = self.config.demonstrations
        return with_demonstrations(prompt, demos, True), with_demonstrations(prompt, demos, False)
