"""dtype: auto turns bf16 autocast on only where the hardware runs it natively."""

import pytest

from prefalign.train.config import TrainConfig
from prefalign.train.precision import AUTO_DTYPE_ENV, bf16_is_fast, resolve_dtype

PLAIN_AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw"})


@pytest.fixture
def auto_by_hardware(monkeypatch):
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)  # conftest pins auto to fp32 for the other tests


def test_cpu_without_native_bf16_stays_fp32(auto_by_hardware):
    fast, why = bf16_is_fast("cpu", PLAIN_AVX2)
    assert not fast and "emulated" in why
    assert resolve_dtype("auto", "cpu", PLAIN_AVX2) == "float32"


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_cpu_with_native_bf16_uses_bf16(flag, auto_by_hardware):
    assert resolve_dtype("auto", "cpu", PLAIN_AVX2 | {flag}) == "bfloat16"


def test_an_explicit_dtype_is_kept_whatever_the_hardware():
    assert resolve_dtype("bfloat16", "cpu", PLAIN_AVX2) == "bfloat16"
    assert resolve_dtype("float32", "cpu", PLAIN_AVX2 | {"amx_bf16"}) == "float32"


def test_config_defaults_to_auto_and_rejects_other_names(tmp_path):
    cfg = TrainConfig(data=tmp_path / "d.jsonl", output_dir=tmp_path / "o")
    assert cfg.dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(data=tmp_path / "d.jsonl", output_dir=tmp_path / "o", dtype="fp16")


def test_the_environment_decides_what_auto_means(monkeypatch):
    monkeypatch.setenv(AUTO_DTYPE_ENV, "float32")
    assert resolve_dtype("auto", "cpu", PLAIN_AVX2 | {"amx_bf16"}) == "float32"
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")
    assert resolve_dtype("auto", "cpu", PLAIN_AVX2) == "bfloat16"
    assert resolve_dtype("float32", "cpu", PLAIN_AVX2) == "float32"  # an explicit dtype still wins
    monkeypatch.setenv(AUTO_DTYPE_ENV, "fp16")
    with pytest.raises(ValueError, match="PREFALIGN_AUTO_DTYPE"):
        resolve_dtype("auto", "cpu", PLAIN_AVX2)


def test_bf16_training_runs_the_policy_under_autocast_and_fp32_does_not(tmp_path, tiny_model, pairs_file, monkeypatch):
    """The fused head path calls the decoder and the LM head apart, around the forward that
    accelerate wraps in autocast: the trainer must open autocast itself."""
    import torch

    import prefalign.train.sequences as sequences
    from prefalign.train.loop import Trainer

    seen = []
    real = sequences.linear_token_logps

    def spy(hidden, weight, targets):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(hidden, weight, targets)

    monkeypatch.setattr(sequences, "linear_token_logps", spy)
    for dtype in ("float32", "bfloat16", "float32"):  # and back: one process, two precisions
        config = TrainConfig(model=tiny_model, data=pairs_file, output_dir=tmp_path / dtype, max_steps=1, batch_size=4,
                             ref_cache_dir=tmp_path / "ref", max_length=64, max_prompt_length=32, dtype=dtype)
        trainer = Trainer(config, show_progress=False)
        trainer.setup()
        seen.clear()
        metrics = trainer.train_step()
        assert seen and all(on == (dtype == "bfloat16") for on, _ in seen)
        if dtype == "bfloat16":  # the head's matmuls then run in bf16 too (head._compute_dtype)
            assert all(d == torch.bfloat16 for _, d in seen)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
