"""Load models and tokenizers from local folders only (the hub is never contacted)."""

from __future__ import annotations

import os
from pathlib import Path

from prefalign.models.registry import resolve_model

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out everywhere, so any id works; eos is always present.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | os.PathLike, *, dtype: str = "float32", trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, DTYPES[dtype]), local_files_only=True, trust_remote_code=trust_remote_code
    )
    return model


def model_folder(name_or_path: str | os.PathLike) -> Path:
    return resolve_model(name_or_path)
