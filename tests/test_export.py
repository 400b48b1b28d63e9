"""`prefalign export --gguf`: a tiny random Llama written as GGUF reads back to the same weights
(gguf's own reader), gives transformers' logits and tokens in llama.cpp (llama-cpp-python, when
installed), merges a LoRA adapter, and refuses bad requests before any model loads."""

import functools
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import require_llama_cpp
from prefalign.cli import app
from prefalign.generate.backends.llamacpp_backend import llama_cpp_problem
from prefalign.models.card import ModelCard, write_card
from prefalign.models import export as export_module
from prefalign.models.export import export_gguf, permute_for_llama_cpp_rope


runner = CliRunner()

TEXTS = [
    "The capital of France is Paris, and the capital of Spain is Madrid.",
    "Numbers 2024, 3.14159 and 1,000,000; émigré naïve café 🙂 日本語",
    "  leading spaces\ttabs\n\nnew lines   trailing ",
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
]
# Logit tolerances against transformers in float32. f16 and q8_0 round the weights (and llama.cpp
# rounds activations to the same type), so they get looser bounds; f32 is the 1e-3.
LOGIT_TOLERANCE = {"f32": 1e-3, "f16": 5e-3, "q8_0": 5e-2}


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def peaky_model(tiny_model, tmp_path_factory):
    """tiny-random with q and k scaled up: its attention is far from uniform, so a wrong q/k row
    order changes the logits by ~0.5 instead of ~0.01 (measured), well past every tolerance."""
    model, tokenizer = _load(tiny_model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    folder = tmp_path_factory.mktemp("peaky")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_card(folder, ModelCard("peaky", {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
                                           "tags": ["prefalign", "dpo"]}))
    return folder


@pytest.fixture(scope="module")
def lora_adapter(peaky_model, tmp_path_factory):
    """A LoRA adapter on the peaky model with non-zero B (peft starts B at zero: a no-op merge)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = _load(peaky_model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(peaky_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(peaky_model, out / f"model-{t}.gguf", gguf_type=t) for t in ("f32", "f16", "q8_0")}


@functools.lru_cache(maxsize=None)
def _reader(path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)  # ~9 s for SmolLM's 49k tokens and merges: read each file once


def _tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantised to float32 in numpy's (rows, columns) order."""
    reader = _reader(path)
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(values, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
    return out


def _field(reader, key):
    return reader.fields[key].contents()


def _expected_gguf_weights(state_dict, config) -> dict[str, np.ndarray]:
    """HF weights under llama.cpp's names, q/k rows reordered (spelled out here, not via the map)."""
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    out = {"token_embd.weight": state_dict["model.embed_tokens.weight"], "output_norm.weight": state_dict["model.norm.weight"]}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(config.num_hidden_layers):
        for hf, name in parts.items():
            weight = state_dict[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                weight = permute_for_llama_cpp_rope(weight, n_heads if name == "attn_q" else n_kv)
            out[f"blk.{i}.{name}.weight"] = weight
    return {k: v.detach().float().numpy() for k, v in out.items()}


def test_permutation_puts_rotate_half_pairs_side_by_side():
    # One head of size 8: HF rotates dimension i with i + 4; llama.cpp rotates 2i with 2i + 1.
    rows = torch.arange(16.0).reshape(16, 1)  # two heads, row r holds r
    got = permute_for_llama_cpp_rope(rows, n_heads=2).flatten().tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.slow  # exports and reads back a GGUF with SmolLM's 49k-token vocabulary
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_tensors_read_back_as_the_hf_weights(exported, peaky_model, gguf_type):
    model, _ = _load(peaky_model)
    expected = _expected_gguf_weights(model.state_dict(), model.config)
    got = _tensors(exported[gguf_type])
    assert set(got) == set(expected)  # tied embeddings: no output.weight, llama.cpp reuses token_embd
    for name, want in expected.items():
        have = got[name]
        assert have.shape == want.shape, name
        if gguf_type == "f32" or want.ndim == 1:
            np.testing.assert_array_equal(have, want, err_msg=name)
        elif gguf_type == "f16":
            np.testing.assert_array_equal(have, want.astype(np.float16).astype(np.float32), err_msg=name)
        else:  # Q8_0: 32 values share one step (block max / 127, stored as f16): rounding to the
            # nearest step is off by half of it, the f16 step by at most 127 * 2^-11 more
            blocks = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True)
            error = np.abs(have - want).reshape(-1, 32)
            assert np.all(error <= blocks / 127 * (0.5 + 127 * 2**-11) + 1e-7), name


@pytest.mark.slow  # exports and reads back a GGUF with SmolLM's 49k-token vocabulary
def test_metadata_matches_config_and_tokenizer(exported, peaky_model):
    model, tokenizer = _load(peaky_model)
    config = model.config
    reader = _reader(exported["f32"])
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == config.num_hidden_layers
    assert _field(reader, "llama.embedding_length") == config.hidden_size
    assert _field(reader, "llama.feed_forward_length") == config.intermediate_size
    assert _field(reader, "llama.attention.head_count") == config.num_attention_heads
    assert _field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert _field(reader, "llama.context_length") == config.max_position_embeddings
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    assert _field(reader, "tokenizer.ggml.tokens") == [by_id[i] for i in range(config.vocab_size)]
    merges = json.loads((peaky_model / "tokenizer.json").read_text())["model"]["merges"]
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(merges)
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False  # SmolLM's tokenizer adds none
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    # The source folder's model card travels as general.* keys.
    assert _field(reader, "general.license") == "apache-2.0"
    assert _field(reader, "general.base_model.0.name") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _field(reader, "general.tags") == ["prefalign", "dpo"]


def _llama(path):
    llama_cpp = require_llama_cpp()
    problem = llama_cpp_problem(path)  # a crash here is a GGUF llama.cpp cannot run: a failure, not a kill
    assert problem is None, problem
    return llama_cpp.Llama(model_path=str(path), logits_all=True, vocab_only=False, n_ctx=256, n_threads=1, verbose=False)


def _llama_logits(path, ids) -> np.ndarray:
    llm = _llama(path)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.mark.slow  # exports and reads back a GGUF with SmolLM's 49k-token vocabulary
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_llama_cpp_logits_equal_transformers(exported, peaky_model, gguf_type):
    model, tokenizer = _load(peaky_model)
    ids = tokenizer(TEXTS[0] + TEXTS[3]).input_ids
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = _llama_logits(exported[gguf_type], ids)
    assert np.abs(got - want).max() <= LOGIT_TOLERANCE[gguf_type]


@pytest.mark.slow  # exports and reads back a GGUF with SmolLM's 49k-token vocabulary
def test_llama_cpp_tokenizes_like_hf(exported, peaky_model):
    _, tokenizer = _load(peaky_model)
    llm = _llama(exported["q8_0"])
    try:
        for text in TEXTS:
            want = tokenizer(text).input_ids
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == want, text
    finally:
        llm.close()


@pytest.fixture(scope="module")
def exported_adapter(lora_adapter, tmp_path_factory):
    return export_gguf(lora_adapter, tmp_path_factory.mktemp("merged") / "merged.gguf", gguf_type="f32")


@pytest.mark.slow  # exports and reads back a GGUF with SmolLM's 49k-token vocabulary
def test_lora_adapter_is_merged_into_its_base(exported_adapter, lora_adapter, peaky_model):
    from safetensors.torch import load_file

    base, _ = _load(peaky_model)
    adapter_config = json.loads((lora_adapter / "adapter_config.json").read_text())
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    lora = load_file(lora_adapter / "adapter_model.safetensors")
    got = _tensors(exported_adapter)
    for i in range(base.config.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{i}.mlp.down_proj"
        base_weight = base.state_dict()[f"model.layers.{i}.mlp.down_proj.weight"]
        want = base_weight + scale * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]  # W + (alpha/r) B A
        np.testing.assert_allclose(got[f"blk.{i}.ffn_down.weight"], want.numpy(), atol=1e-6)
        assert not np.allclose(got[f"blk.{i}.ffn_down.weight"], base_weight.numpy(), atol=1e-3)


@pytest.mark.slow  # exports a GGUF and loads it in llama.cpp
def test_merged_lora_logits_equal_the_unmerged_adapter(exported_adapter, lora_adapter, peaky_model):
    from peft import PeftModel

    base, tokenizer = _load(peaky_model)
    ids = tokenizer(TEXTS[0]).input_ids
    # The unmerged adapter's forward pass is the independent reference for the logits.
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(lora_adapter))(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(_llama_logits(exported_adapter, ids) - want).max() <= LOGIT_TOLERANCE["f32"]


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(source):
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr(export_module, "load_merged_model", refuse)


def _export(*args):
    return runner.invoke(app, ["export", *map(str, args)])


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_missing_folder_is_refused(tmp_path, no_model_loads):
    line = _one_error_line(_export(tmp_path / "nope", "--gguf", tmp_path / "o.gguf"))
    assert "nope" in line and "not found" in line


def test_unknown_type_is_refused(tiny_model, tmp_path, no_model_loads):
    line = _one_error_line(_export(tiny_model, "--gguf", tmp_path / "o.gguf", "--type", "q4_k"))
    assert "--type" in line and "q4_k" in line and "q8_0" in line


def test_existing_output_needs_overwrite(tiny_model, tmp_path, no_model_loads):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    line = _one_error_line(_export(tiny_model, "--gguf", out))
    assert str(out.name) in line and "--overwrite" in line
    assert out.read_bytes() == b"keep me"


def test_unsupported_architecture_is_refused(tiny_model, tmp_path, no_model_loads):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    line = _one_error_line(_export(folder, "--gguf", tmp_path / "o.gguf"))
    assert "config.json" in line and "GPT2LMHeadModel" in line and "LlamaForCausalLM" in line


def test_unsupported_pre_tokenizer_is_refused(tiny_model, tmp_path, no_model_loads):
    folder = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    line = _one_error_line(_export(folder, "--gguf", tmp_path / "o.gguf"))
    assert "tokenizer.json" in line and "pre_tokenizer" in line


@pytest.mark.slow  # exports a model (seconds)
def test_overwrite_replaces_and_a_failed_write_leaves_nothing(peaky_model, tmp_path, monkeypatch):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"old")
    result = _export(peaky_model, "--gguf", out, "--type", "q8_0", "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF"  # the magic of a GGUF file; its contents are tested above

    def broken(state_dict, config):
        yield from []
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "gguf_tensors", broken)
    failed = _export(peaky_model, "--gguf", tmp_path / "new.gguf")
    assert failed.exit_code == 2 and "disk full" in failed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf"]  # no partial file left
