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
        import torch

        from .rm_model import exchange_rewards

        cut = [first_lines(t, self.config.response_lines) for t in texts]
        with torch.inference_mode():
            logits = exchange_rewards(self.model, self.tokenizer, prompt_list, cut, max_length=self.config.max_length,
                                      chat_template=self.config.chat_template, device=self.device)
        return [float(x) for x in logits[:, self.label].float().cpu()]


def first_lines(text: str, count: int | None) -> str:
    """The first ``count`` lines of ``text`` (all of it for ``None``), blank lines not counted, trailing space cut."""
    if count is None:
        return text
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[:count]).rstrip()


SPEC = ScorerSpec("reward-model", RewardModelConfig, RewardModelScorer,
                  "a local AutoModelForSequenceClassification (or train-rm) folder: the logit of one output")
