"""``reward-model``: a local sequence-classification model scores (prompt, response) pairs.

``model`` is any local ``AutoModelForSequenceClassification`` folder (or one written by
``prefalign train-rm``, including its mean-pool MiniLM layout; see :mod:`prefalign.score.rm_model`).
The score is the logit of the model's single output, or of ``label`` (an index, or a name from
``config.label2id``) when it has several. Prompts are rendered by the one prompt renderer
(:mod:`prefalign.data.render`, ``chat_template: auto|always|never``), as for generation and
training; a cross-encoder (BERT-style) tokenizer without a chat template reads a text pair.

``response_lines: N`` scores only the first N lines of each response. A reward model judges
reliably only the kind of text it was trained on: one trained on bare multiple-choice answers
("(A) Agree") ranks an explained answer ("(A) Agree" + three lines of reasoning) mostly by its
reasoning. Measured on ``rdpo-sycophancy``'s revisions (one per answer option, 86 questions): the
whole-text scores picked the truthful option for 55, the first line's for 72.

``option_order: both`` scores an answer to a two-option question ("(A) Agree / (B) Disagree") twice,
as given and with the question's options swapped and the answer's opening letter with them
(:mod:`prefalign.data.options`), and averages the two: a reward model that leans to one letter
gives the same lean to both answers of a pair, so the lean cancels in their difference. Measured
on ``rdpo-sycophancy``'s dev split: trained on balanced bare options, the reward model still
preferred the "(A)" answer on 32 of 48 explained pairs whose answers pick different options; in
both orders, 11 of 20 against 13 of 20 as given (round five of
``benchmarks/recipes/rdpo-sycophancy-dev.yaml``, where rDPO's dev accuracy stayed the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from .base import Prompt, ScorerConfig, ScorerSpec, ScorerUnavailableError, canonical_json, check_inputs


class RewardModelConfig(ScorerConfig):
    model: str = Field(..., description="a local folder (or registry name) of a sequence-classification model")
    label: int | str | None = None
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(512, gt=8)
    chat_template: Literal["auto", "always", "never"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    response_lines: int | None = Field(
        None, gt=0, description="score only the first N lines of each response (what the reward model was trained to judge)"
    )
    option_order: Literal["as-given", "both"] = Field(
        "as-given", description="both: average each answer's score over the two option orders of its question"
    )


class RewardModelScorer:
    name = "reward-model"
    uses_prompts = True

    def __init__(self, config: RewardModelConfig) -> None:
        import torch

        from prefalign.models.registry import model_fingerprint

        from .rm_model import load_reward_model, resolve_label, use_chat_template

        self.config = config
        self.batch_size = config.batch_size
        try:
            self.model, self.tokenizer, folder = load_reward_model(
                config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code
            )
        except OSError as exc:
            raise ScorerUnavailableError(f"reward-model: cannot load '{config.model}': {exc}") from None
        self.label = resolve_label(self.model, config.label)
        use_chat_template(self.tokenizer, config.chat_template)  # 'always' without a template fails now
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        fingerprint = model_fingerprint(folder)
        self.cache_id = canonical_json([self.name, config.model_dump(mode="json"), fingerprint])

    def score(self, texts: Sequence[str], prompts: Sequence[Prompt] | None = None) -> list[float]:
        prompt_list = check_inputs(texts, prompts)
        if not texts:
            return []
        cut = [first_lines(t, self.config.response_lines) for t in texts]
        scores = self._rewards(prompt_list, cut)
        if self.config.option_order == "both":
            swapped = [swapped_question(p, t) for p, t in zip(prompt_list, cut)]
            twins = [i for i, pair in enumerate(swapped) if pair is not None]
            if twins:
                twin_scores = self._rewards([swapped[i][0] for i in twins], [swapped[i][1] for i in twins])
                for i, twin in zip(twins, twin_scores):
                    scores[i] = (scores[i] + twin) / 2
        return scores

    def _rewards(self, prompts: list[Prompt], texts: list[str]) -> list[float]:
        import torch

        from .rm_model import exchange_rewards

        with torch.inference_mode():
            logits = exchange_rewards(self.model, self.tokenizer, prompts, texts, max_length=self.config.max_length,
                                      chat_template=self.config.chat_template, device=self.device)
        return [float(x) for x in logits[:, self.label].float().cpu()]


def swapped_question(prompt: Prompt, text: str) -> tuple[Prompt, str] | None:
    """(the prompt with its two options swapped, the answer with its opening letter swapped), or
    None when the prompt (its last user message, for a chat) has not exactly two options."""
    from prefalign.data.options import swap_letter, swap_options

    if isinstance(prompt, str):
        swapped = swap_options(prompt)
        return None if swapped is None else (swapped, swap_letter(text))
    if isinstance(prompt, list):
        users = [i for i, m in enumerate(prompt) if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(prompt[users[-1]].get("content"), str):
            swapped = swap_options(prompt[users[-1]]["content"])
            if swapped is not None:
                messages = list(prompt)
                messages[users[-1]] = {**prompt[users[-1]], "content": swapped}
                return messages, swap_letter(text)
    return None


def first_lines(text: str, count: int | None) -> str:
    """The first ``count`` lines of ``text`` (all of it for ``None``), blank lines not counted, trailing space cut."""
    if count is None:
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[:count]).rstrip()


SPEC = ScorerSpec("reward-model", RewardModelConfig, RewardModelScorer,
                  "a local AutoModelForSequenceClassification (or train-rm) folder: the logit of one output")
