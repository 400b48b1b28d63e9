"""Typed configuration of ``prefalign generate``: one model for the YAML file and the flags,
validated (the strategy's own section included) before any model is loaded.

.. code-block:: yaml

    strategy: critique            # see `prefalign generate --help` for the list
    prompts:
      source: advbench            # advbench, donotanswer, realtoxicity, rho-*, file
      path: null                  # the file, for source: file
      prompt_field: prompt
      limit: 50
      split: train                # train | eval | null (stable hash split by normalised prompt text)
      eval_fraction: 0.25
      where: null                 # keep prompts whose meta matches, e.g. {harmful: false}
    models: [smollm2-135m-instruct]   # several for nparam / leaderboard / popalign
    backend: transformers         # a name in prefalign.generate.backends.BACKENDS (transformers, openai, vllm)
    base_url: null                # openai: the server's /v1 URL
    backend_options: {}           # extra backend arguments (dtype, api_key_env, ...)
    output: data/critique.jsonl
    seed: 0
    batch_size: 8                 # prompts per step (each step is written before the next)
    max_new_tokens: 256
    temperature: 0.7
    top_p: 1.0
    stop: []                      # cut each response at the first of these strings, e.g. ["\n"]
    params:                       # the strategy's own options
      principle: safety
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prefalign.configfile import read_yaml_mapping, validation_messages
from prefalign.data.options import OptionOrder
from prefalign.data.prompts import DEFAULT_EVAL_FRACTION, PROMPT_SOURCES
from prefalign.generate.core import StrategyConfig
from prefalign.generate.registry import STRATEGIES, get_strategy


class GenerateConfigError(ValueError):
    """The config file or a flag is invalid; the message names the file and the field."""


class PromptSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf/nan: an error naming the field

    source: str = Field("advbench", description="a built-in prompt set or 'file'")
    path: Path | None = Field(None, description="the prompt file, for source 'file'")
    prompt_field: str = Field("prompt", min_length=1, description="the prompt column of the file")
    limit: int | None = Field(None, gt=0, description="keep the first N prompts (after the split)")
    split: Literal["train", "eval"] | None = Field(None, description="one side of the stable split by normalised prompt text")
    eval_fraction: float = Field(DEFAULT_EVAL_FRACTION, gt=0, lt=1)
    where: dict[str, Any] | None = Field(None, description="keep prompts whose meta has these values, e.g. {harmful: false}")
    shuffle_seed: int | None = Field(None, description="order prompts by a hash of (seed, id) before the limit")
    option_order: OptionOrder = Field("as-given", description="two-option questions: 'both' asks each as given and "
                                      "with its options swapped, 'balanced' swaps half (prefalign.data.options)")

    @model_validator(mode="after")
    def _check(self) -> "PromptSettings":
        if self.source not in PROMPT_SOURCES:
            raise ValueError(f"source: unknown prompt source '{self.source}'; choose one of {', '.join(PROMPT_SOURCES)}")
        if PROMPT_SOURCES[self.source].needs_path and self.path is None:
            raise ValueError(f"path: prompt source '{self.source}' needs a file (--prompts-file)")
        if not PROMPT_SOURCES[self.source].needs_path and self.path is not None:
            raise ValueError(f"path: prompt source '{self.source}' is built in; use source 'file' for a file")
        return self


class GenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf/nan: an error naming the field

    strategy: str = Field(..., description="the generation strategy")
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    models: list[str] = Field(default_factory=lambda: ["smollm2-135m-instruct"], min_length=1)
    backend: str = Field("transformers", description="a generation backend (prefalign.generate.backends.BACKENDS)")
    base_url: str | None = None
    backend_options: dict[str, Any] = Field(default_factory=dict)
    output: Path
    seed: int = 0
    batch_size: int = Field(8, gt=0, description="prompts per step; each step is written before the next")
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(
        default_factory=list,
        description="cut each response at the first of these strings (removed), e.g. [\"\\n\"] for one-line "
                    "answers; a response cut there ended by itself (training gives it an end token). Intermediate "
                    "turns (critique's critique) are not cut",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the strategy's own options")

    @model_validator(mode="after")
    def _check(self) -> "GenerateConfig":
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: unknown strategy '{self.strategy}'; choose one of {', '.join(STRATEGIES)}")
        from prefalign.generate.backends import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend: unknown backend '{self.backend}'; choose one of {', '.join(BACKENDS)}")
        twice = sorted({m for m in self.models if self.models.count(m) > 1})
        if twice:
            raise ValueError(f"models: {', '.join(twice)} given more than once")
        needed = STRATEGIES[self.strategy].min_models
        if len(self.models) < needed:
            raise ValueError(f"models: strategy '{self.strategy}' needs at least {needed} models "
                             f"(give --model {needed} times), got {len(self.models)}")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must not be empty")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("base_url: the openai backend needs the server's URL (--base-url)")
        return self

    def strategy_config(self) -> StrategyConfig:
        """The strategy's typed options (validated)."""
        return get_strategy(self.strategy).Config.model_validate(self.params)


def load_generate_config(path: Path | None = None, overrides: dict[str, Any] | None = None,
                         param_overrides: dict[str, Any] | None = None) -> GenerateConfig:
    """Read the YAML (optional), apply flags (flags win; ``None`` means not given), validate
    everything including the strategy's ``params``. Errors name the file and the field."""
    values: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        source = str(path)
        values.update(read_yaml_mapping(path, GenerateConfigError, section="generate"))
        if not isinstance(values.get("prompts", {}), (dict, str)):
            raise GenerateConfigError(f"{path}: field 'prompts': expected a mapping (source, path, limit, ...)")
        if isinstance(values.get("prompts"), str):  # shorthand: prompts: advbench
            values["prompts"] = {"source": values["prompts"]}
        if not isinstance(values.get("params", {}), dict):
            raise GenerateConfigError(f"{path}: field 'params': expected a mapping of the strategy's options")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    prompt_overrides = overrides.pop("prompts", None) or {}
    values.update(overrides)
    if prompt_overrides:
        prompts = dict(values.get("prompts") or {})
        if "path" in prompt_overrides and "source" not in prompt_overrides:
            prompt_overrides["source"] = "file"  # --prompts-file implies --prompts file
        if prompt_overrides.get("source") not in (None, "file"):
            prompts.pop("path", None)
        prompts.update(prompt_overrides)
        values["prompts"] = prompts
    params = dict(values.get("params") or {})
    try:
        cfg = GenerateConfig.model_validate({**values, "params": params})
    except ValidationError as exc:
        raise GenerateConfigError(validation_messages(exc, source)) from None
    config_cls = get_strategy(cfg.strategy).Config
    for name, value in (param_overrides or {}).items():
        if value is None:
            continue
        if name not in config_cls.model_fields:
            raise GenerateConfigError(f"flags: --{name.replace('_', '-')} does not apply to strategy '{cfg.strategy}'")
        params[name] = value
    try:
        config_cls.model_validate(params)
    except ValidationError as exc:
        where = source if not param_overrides or not any(v is not None for v in param_overrides.values()) else f"{source} + flags"
        raise GenerateConfigError(validation_messages(exc, where, "params")) from None
    return cfg.model_copy(update={"params": params})
