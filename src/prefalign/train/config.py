"""Typed configuration for ``prefalign train``: one model drives both the YAML file and the flags,
and everything is validated before a model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prefalign.configfile import read_yaml_mapping, validation_messages
from prefalign.losses import AnyLoss, loss_names, resolve_loss
from prefalign.models.lora import LoraSettings
from prefalign.train.reference import reference_kind


class ConfigError(ValueError):
    """A config file or flag combination is invalid; the message names the file and field."""


class TrainConfig(BaseModel):
    # inf and nan are rejected by name ("Input should be a finite number"), before any range check.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = "smollm2-135m-instruct"
    data: Path
    output_dir: Path
    # A registry name, or a list of them mixed as a weighted sum per example (``[dpo, sft]``;
    # ``"dpo,sft"`` on the command line) with ``loss_weights`` (default: 1 each).
    loss: str | list[str] = "dpo"
    loss_weights: list[float] | None = None
    beta: float | None = Field(None, gt=0, description="shortcut for loss_params.beta")
    # Hyperparameters; in a mixture each applies to every term that takes it.
    loss_params: dict[str, float] = Field(default_factory=dict)

    # A kind of REFERENCE_KINDS (prefalign.train.reference says what each does: precompute, copy,
    # disable-adapters, ...); ``auto`` picks ``precompute``.
    reference: str = "auto"
    reference_model: str | None = None  # another model as reference (default: the starting model)
    toxic_reference_model: str | None = None  # ADPO inner toxic model (default: the reference)
    toxic_control_token: str = "[TOXIC]"
    ref_cache_dir: Path | None = None  # default: <cache>/ref-logps

    # Encode each prompt once for all of its responses (falls back, logged, where the model's
    # attention takes no custom mask). Same log-probs as the plain layout, far fewer tokens.
    share_prompt: bool = True
    # Padding-free: pack whole (prompt, responses) blocks into rows, each block attending only to
    # itself (needs share_prompt; falls back, logged, where the model cannot).
    pack: bool = False

    # D²O online: re-sample the anchors of the coming batches from the current policy every N
    # steps (0: off). Needs a live reference (copy or disable-adapters).
    anchor_refresh_every: int = Field(0, ge=0)
    anchor_max_new_tokens: int = Field(64, gt=0)
    anchor_temperature: float = Field(1.0, gt=0)

    lora: LoraSettings | None = None
    merge: bool = False  # with LoRA: also save merged full weights

    lr: float = Field(5e-6, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_length: int = Field(512, gt=8)
    max_prompt_length: int = Field(256, gt=0)
    chat_template: Literal["auto", "always", "never"] = "auto"
    # auto: bf16 autocast where the hardware runs it fast (recent GPU, CPU with AVX512-BF16/AMX),
    # else fp32; see prefalign.train.precision.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 0
    shuffle: bool = True  # False: the file's order (benchmarks, curricula)
    # Batch examples of similar length together (within a shuffled window), so padding is small.
    group_by_length: bool = True

    # A retain term (prefalign.train.retain): each micro-batch also lowers the token NLL of a batch
    # of written answers (records with prompt + chosen), weighted by retain_weight, so that pushing
    # responses down does not push ordinary text down with them.
    retain_data: Path | None = None
    retain_weight: float = Field(1.0, gt=0)
    retain_batch_size: int | None = Field(None, gt=0)  # per process, as batch_size; default: batch_size

    eval_data: Path | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    eval_every: int = Field(0, ge=0)  # 0: only at the end (when there is eval data)

    save_every: int = Field(50, gt=0)
    # Also keep the policy as it is after these steps (model-step{N}/ beside model/, each with its
    # card): points along one run, e.g. for a reward-vs-KL curve without one run per β.
    snapshot_steps: list[int] = Field(default_factory=list)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    skip_invalid: bool = False
    # Data the trainer would change silently (identical chosen/rejected, prompts or responses cut
    # to the length limits, ODPO pairs dropped for a reward gap <= 0) is an error instead of a count.
    strict: bool = False
    trust_remote_code: bool = False

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_names(cls, value):
        """``"dpo,sft"`` (a flag) is the list ``[dpo, sft]``; a list of one name is that name."""
        if isinstance(value, (str, list, tuple)):
            names = loss_names(value)
            return names[0] if len(names) == 1 else names
        return value

    @field_validator("snapshot_steps")
    @classmethod
    def _snapshot_steps(cls, value: list[int]) -> list[int]:
        if any(step < 1 for step in value):
            raise ValueError(f"snapshot_steps: steps count from 1 (got {value})")
        return sorted(set(value))

    @field_validator("reference")
    @classmethod
    def _known_reference(cls, value: str) -> str:
        reference_kind(value)  # an unknown name lists the registry's
        return value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        try:
            spec = self.loss_spec()
        except ValueError as exc:  # weight problems already name loss_weights
            raise ValueError(str(exc) if str(exc).startswith("loss_weights:") else f"loss: {exc}") from None
        name = spec.name
        unknown = set(self.loss_params) - set(spec.defaults)
        if unknown:
            raise ValueError(
                f"loss_params: {sorted(unknown)} not accepted by '{name}' (accepts {sorted(spec.defaults)})"
            )
        if self.beta is not None and "beta" not in spec.defaults:
            raise ValueError(f"beta: loss '{name}' has no beta")
        kind = reference_kind(self.reference)
        if kind.on_lora_policy and self.lora is None:
            raise ValueError(f"reference: '{kind.name}' needs LoRA (set lora: {{r: 16}})")
        if self.anchor_refresh_every:
            if "anchors" not in spec.responses:
                raise ValueError(f"anchor_refresh_every: loss '{name}' uses no anchors (d2o does)")
            if not kind.live:
                raise ValueError(f"anchor_refresh_every: new anchors need a live reference, not '{kind.name}': "
                                 "set reference: copy (or disable-adapters with LoRA)")
        if self.merge and self.lora is None:
            raise ValueError("merge: only meaningful with LoRA")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be below max_length")
        if self.retain_data is None and ("retain_weight" in self.model_fields_set or self.retain_batch_size is not None):
            raise ValueError("retain_weight / retain_batch_size: set retain_data (the retain records) too")
        if self.eval_data is not None and self.eval_fraction > 0:
            raise ValueError("eval_fraction: give either eval_data or eval_fraction, not both")
        return self

    def loss_spec(self) -> AnyLoss:
        """The registry entry (or the mixture) this config trains with."""
        return resolve_loss(self.loss, self.loss_weights)

    def loss_overrides(self) -> dict[str, float]:
        """The hyperparameters the config sets (``loss_params``, ``beta``); the loss adds its defaults."""
        params = dict(self.loss_params)
        if self.beta is not None:
            params["beta"] = self.beta
        return params

    def resolved_loss_params(self) -> dict[str, float]:
        """Defaults and overrides (for a mixture, the first term's default where two differ)."""
        return {**self.loss_spec().defaults, **self.loss_overrides()}

    def reference_mode(self) -> str:
        """The reference kind's name (``auto`` resolved)."""
        return reference_kind(self.reference).name


def load_train_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML file (optional), apply flag overrides (flags win), validate everything."""
    values: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        source = str(path)
        # A recipe may nest the training section under ``train:``.
        values.update(read_yaml_mapping(path, ConfigError, section="train"))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(validation_messages(exc, source)) from None
