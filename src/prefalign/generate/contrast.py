"""Shared machinery of PopAlign's contrasts (Wang et al. 2024, "PopAlign: Diversifying Contrasting
Patterns for a More Comprehensive Alignment", arXiv:2410.13785).

A *prompt-level* contrast asks the same model twice with a good and a bad variant of the prompt
(prefix, demonstrations, elicitive instruction); the record's prompt is the plain prompt, so the
student learns the good behaviour without the instruction that produced it. A *model-level*
contrast (nparam, leaderboard) asks two models the same plain prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefalign.data.prompts import Prompt
from prefalign.generate.backends.base import Conversation, same_ending
from prefalign.generate.core import Candidate, Strategy, complete_one, make_pair, user
from prefalign.generate.steer import join_opening, opening_for, prefilled


class PromptContrast(Strategy):
    """Subclasses implement :meth:`conversations` (and :meth:`parse` when the output has a format)."""

    def conversations(self, prompt: str) -> tuple[Conversation, Conversation]:
        """The (good, bad) conversations for one prompt."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, dict]:
        """The response part of a generation (``None``: unusable) and what to keep in meta."""
        return text, {}

    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        # chosen_prefill (contrasts that support it): the good answer starts with a given opening
        spec = getattr(self.config, "chosen_prefill", None) or []
        picked = [opening_for(spec, seed, f"{self.name}:{p.id}", p.prompt) for p in prompts]
        conversations: list[Conversation] = []
        for p, opening in zip(prompts, picked):
            good, bad = self.conversations(p.prompt)
            conversations += [prefilled(good, opening), bad]
        texts = complete_one(self.backend, conversations, self.ctx.params(seed, self.name))
        out = []
        for i, p in enumerate(prompts):
            good_raw, bad_raw = join_opening(picked[i], texts[2 * i]), texts[2 * i + 1]
            good, good_meta = self.parse(good_raw)
            bad, bad_meta = self.parse(bad_raw)
            good, bad = _tail_keeps_ending(good_raw, good), _tail_keeps_ending(bad_raw, bad)
            meta = {**{f"chosen_{k}": v for k, v in good_meta.items()}, **{f"rejected_{k}": v for k, v in bad_meta.items()}}
            if picked[i]:
                meta["chosen_opening"] = picked[i]
            if good is None or bad is None:
                meta.update(chosen_raw=good_raw, rejected_raw=bad_raw)
                out.append([Candidate.drop(self.name, f"{self.name}_unparseable", meta)])
                continue
            out.append([make_pair(self.name, p.prompt, good, bad, meta)])
        return out


def _tail_keeps_ending(raw: str, part: str | None) -> str | None:
    """A parsed part that ends where the raw generation ends was cut wherever the generation was."""
    if part is not None and raw.rstrip().endswith(part.strip()):
        return same_ending(raw, part)
    return part


class ModelContrast(Strategy):
    """The same plain prompt to a strong and a weak model (subclasses pick them in :meth:`pick`)."""

    min_models = 2

    def __init__(self, config, ctx) -> None:
        super().__init__(config, ctx)
        self.strong, self.weak, self.reason = self.pick()

    def pick(self) -> tuple[int, int, str]:
        """Indices of the (strong, weak) backends and why."""
        raise NotImplementedError

    def model_ids(self) -> list[str]:
        return [self.ctx.backends[self.strong].model_id, self.ctx.backends[self.weak].model_id]

    def name_of(self, i: int) -> str:
        names = self.ctx.model_names
        return names[i] if i < len(names) else self.ctx.backends[i].model_id

    def index_of(self, name: str) -> int | None:
        for i, backend in enumerate(self.ctx.backends):
            if name in (self.name_of(i), backend.model_id):
                return i
        return None

    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        conversations = [[user(p.prompt)] for p in prompts]
        strong = complete_one(self.ctx.backends[self.strong], conversations, self.ctx.params(seed, f"{self.name}/chosen"))
        weak = complete_one(self.ctx.backends[self.weak], conversations, self.ctx.params(seed, f"{self.name}/rejected"))
        meta = {"chosen_model": self.ctx.backends[self.strong].model_id,
                "rejected_model": self.ctx.backends[self.weak].model_id, "why": self.reason}
        return [[make_pair(self.name, p.prompt, s, w, dict(meta))] for p, s, w in zip(prompts, strong, weak)]
