"""LoRA adapters through peft."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


def apply_lora(model, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(model, PeftModel)


def merge_saved_adapter(base: str | os.PathLike, adapter_dir: str | os.PathLike, *, trust_remote_code: bool = False):
    """A plain transformers model in float32: the base model with the LoRA adapter saved in
    ``adapter_dir`` merged into its weights. Merging from the saved folder, not the live model,
    works the same whatever holds the live model (one process, DDP, FSDP or ZeRO-3 shards, whose
    gathered weights the adapter folder was written from) and needs no second copy of it."""
    from peft import PeftModel

    from prefalign.models.loading import load_model

    model = load_model(base, dtype="float32", trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
