"""Export a trained policy as a GGUF file that llama.cpp and Ollama load.

The source is a full HF folder or a LoRA adapter folder (merged into its base with peft's
``merge_and_unload``). Writing goes through the ``gguf`` package's ``GGUFWriter`` and
``TensorNameMap``; the metadata follows what llama.cpp's ``convert_hf_to_gguf.py`` writes for a
``LlamaForCausalLM`` with a gpt2-style byte-level BPE tokenizer. Everything a user can get wrong
(folder, type, output, architecture, tokenizer) is checked by :func:`check_export` from the json
files alone, before any weights load.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("prefalign.models")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
GGUF_TYPES = ("f32", "f16", "q8_0")
# llama.cpp applies RoPE to adjacent pairs; these are the frequency layouts it can reproduce from
# rope.freq_base (and a linear scale factor) alone.
SUPPORTED_ROPE_TYPES = ("default", "linear")
Q8_0_BLOCK = 32  # values per Q8_0 block: a row must be a multiple to be quantised


class ExportError(ValueError):
    """A bad export request; the message names the path or field."""


@dataclass(frozen=True)
class ExportSource:
    """What an export reads: the weights folder and, for a LoRA adapter, the base it merges into."""

    folder: Path  # the MODEL_DIR given
    config: dict  # config.json of the full model (the base's, for an adapter)
    tokenizer_folder: Path
    base_folder: Path | None = None  # set for a LoRA adapter

    @property
    def is_adapter(self) -> bool:
        return self.base_folder is not None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _adapter_base(folder: Path) -> Path:
    from prefalign.models.registry import resolve_model

    adapter_config = _read_json(folder / "adapter_config.json")
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{folder / 'adapter_config.json'}: base_model_name_or_path is missing")
    try:
        return resolve_model(base)
    except FileNotFoundError as exc:
        raise ExportError(f"{folder / 'adapter_config.json'}: base_model_name_or_path: {exc}") from None


def _check_architecture(config: dict, where: Path) -> None:
    architectures = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ExportError(f"{where}: architectures {architectures} not supported for GGUF export "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ExportError(f"{where}: {flag}: true is not supported for GGUF export")
    rope_type = rope_settings(config)["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ExportError(f"{where}: rope type {rope_type!r} not supported for GGUF export "
                          f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def rope_settings(config: dict) -> dict:
    """RoPE type, base and scale factor from either transformers 5's ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling`` fields."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return {"rope_type": rope_type, "theta": float(theta), "factor": float(params.get("factor", 1.0))}


def gguf_pre_tokenizer(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json``.

    llama.cpp does not read the HF pre-tokenizer; it picks a fixed regex set by this name, so an
    unknown structure is refused rather than exported to tokenize differently."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{where}: model.type {model.get('type')!r} not supported for GGUF export (byte-level BPE only)")
    if tokenizer_json.get("normalizer") is not None:
        raise ExportError(f"{where}: a normalizer is not supported for GGUF export (byte-level BPE without one only)")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    byte_level_with_gpt2_regex = bool(steps) and kinds[-1] == "ByteLevel" and steps[-1].get("use_regex", True) \
        and not steps[-1].get("add_prefix_space", False)
    if byte_level_with_gpt2_regex and kinds == ["ByteLevel"]:
        return "gpt-2"
    if byte_level_with_gpt2_regex and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
    raise ExportError(f"{where}: pre_tokenizer {json.dumps(pre)[:200]} not supported for GGUF export "
                      "(supported: GPT-2 byte-level, or single digits then byte-level)")


def find_source(model_dir: str | os.PathLike) -> ExportSource:
    """Read the json files of MODEL_DIR (a full HF folder or a LoRA adapter folder) and check them."""
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise ExportError(f"{folder}: model folder not found")
    base = None
    if (folder / "adapter_config.json").is_file():
        base = _adapter_base(folder)
        config_path = base / "config.json"
    else:
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ExportError(f"{folder}: neither config.json (a full model) nor adapter_config.json (a LoRA adapter)")
    config = _read_json(config_path)
    _check_architecture(config, config_path)
    tokenizer_folder = folder if (folder / "tokenizer.json").is_file() or base is None else base
    if not (tokenizer_folder / "tokenizer.json").is_file():
        raise ExportError(f"{tokenizer_folder}: tokenizer.json not found (GGUF export needs a fast tokenizer)")
    gguf_pre_tokenizer(_read_json(tokenizer_folder / "tokenizer.json"), tokenizer_folder / "tokenizer.json")
    return ExportSource(folder=folder, config=config, tokenizer_folder=tokenizer_folder, base_folder=base)


def check_export(model_dir: str | os.PathLike, output: str | os.PathLike, gguf_type: str, *, overwrite: bool = False) -> ExportSource:
    """Every check that needs no weights: raises :class:`ExportError` naming the path or field."""
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--type: unknown {gguf_type!r} (one of {', '.join(GGUF_TYPES)})")
    output = Path(output).expanduser()
    if output.is_dir():
        raise ExportError(f"{output}: is a folder; give a file name such as model.gguf")
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists (pass --overwrite to replace it)")
    return find_source(model_dir)


# --------------------------------------------------------------------------- weights


def load_merged_model(source: ExportSource):
    """The policy as a plain transformers model in float32 (a LoRA adapter merged into its base)."""
    from prefalign.models.loading import load_model

    if not source.is_adapter:
        return load_model(source.folder, dtype="float32")
    from prefalign.models.lora import merge_saved_adapter

    return merge_saved_adapter(source.base_folder, source.folder)


def permute_for_llama_cpp_rope(weight, n_heads: int):
    """Reorder the rows of a q or k projection from HF's rotate-half RoPE layout (dimension i
    pairs with i + d/2 in each head) to llama.cpp's adjacent-pairs layout (2i pairs with 2i + 1).
    ``n_heads``: the heads this projection produces (key/value heads for k)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(state_dict: dict, config: dict):
    """(gguf name, float32 numpy array) for each weight llama.cpp reads, q/k rows permuted."""
    import gguf

    n_layers = config["num_hidden_layers"]
    n_heads = config["num_attention_heads"]
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = config.get("tie_word_embeddings", False)
    for hf_name, tensor in state_dict.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor {hf_name!r} has no GGUF name for the llama architecture")
        data = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = permute_for_llama_cpp_rope(data, n_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = permute_for_llama_cpp_rope(data, n_kv_heads)
        yield name, data


def encode_tensor(data, gguf_type: str):
    """(array to write, its GGML type). Norms and other 1-D tensors stay float32, as llama.cpp's
    converter keeps them; a row that is not a whole number of Q8_0 blocks falls back to f16."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if data.ndim < 2 or gguf_type == "f32":
        return data.astype(np.float32), T.F32
    if gguf_type == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
        return gguf.quants.quantize(data, T.Q8_0), T.Q8_0
    return data.astype(np.float16), T.F16


# --------------------------------------------------------------------------- metadata


def add_hyperparameters(writer, config: dict, gguf_type: str) -> None:
    import gguf

    hidden = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // n_heads
    rope = rope_settings(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope["theta"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_vocab_size(config["vocab_size"])
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def vocab_entries(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp token types. Ids the tokenizer lacks (a padded
    embedding) become unused ``[PAD<id>]`` entries, as llama.cpp's converter writes them."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def adds_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether the HF tokenizer puts BOS first / EOS last when encoding plain text: llama.cpp must
    do the same for prompts to tokenize identically."""
    ids = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id is not None and len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(ids) > len(plain) and ids[-1] == tokenizer.eos_token_id
    return bos, eos


def add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokens, types = vocab_entries(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_tokenizer(_read_json(folder / "tokenizer.json"), folder / "tokenizer.json"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, special token ids and the chat template, read from the folder's tokenizer files.
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.add_special_token["bos"], special.add_special_token["eos"] = adds_special_tokens(tokenizer)
    special.add_to_gguf(writer, quiet=True)


def add_card_metadata(writer, folder: Path) -> None:
    """The source folder's model card (licence, base model, tags) as GGUF ``general.*`` keys, so
    the file says where it came from once it leaves the folder."""
    from prefalign.models.card import read_card

    card = read_card(folder)
    metadata = card[0] if card else {}
    if isinstance(metadata.get("license"), str):
        writer.add_license(metadata["license"])
    if isinstance(metadata.get("base_model"), str):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, metadata["base_model"])
    if isinstance(metadata.get("tags"), list):
        writer.add_tags([str(tag) for tag in metadata["tags"]])


# --------------------------------------------------------------------------- writing


def write_gguf(source: ExportSource, output: Path, gguf_type: str, state_dict: dict) -> Path:
    """Write to a hidden sibling and rename it into place: a kill never leaves a half file."""
    import gguf

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(source.folder.resolve().name)
        add_card_metadata(writer, source.folder)
        add_hyperparameters(writer, source.config, gguf_type)
        add_tokenizer(writer, source.tokenizer_folder, source.config["vocab_size"])
        for name, data in gguf_tensors(state_dict, source.config):
            encoded, ggml_type = encode_tensor(data, gguf_type)
            writer.add_tensor(name, encoded, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def export_gguf(model_dir: str | os.PathLike, output: str | os.PathLike, *, gguf_type: str = "f16", overwrite: bool = False) -> Path:
    """Export MODEL_DIR (full or LoRA adapter) as a GGUF file at ``output``; returns its path."""
    source = check_export(model_dir, output, gguf_type, overwrite=overwrite)
    model = load_merged_model(source)
    log.info("exporting %s as %s GGUF to %s", source.folder, gguf_type, output)
    return write_gguf(source, Path(output).expanduser(), gguf_type, model.state_dict())
