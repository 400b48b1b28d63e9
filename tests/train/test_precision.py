"""dtype: auto turns bf16 autocast on only where the hardware runs it natively."""

import pytest

from prefalign.train.config import TrainConfig
from prefalign.train.precision import bf16_is_fast, resolve_dtype

PLAIN_AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw"})


def test_cpu_without_native_bf16_stays_fp32():
    fast, why = bf16_is_fast("cpu", PLAIN_AVX2)
    assert not fast and "emulated" in why
    assert resolve_dtype("auto", "cpu", PLAIN_AVX2) == "float32"


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_cpu_with_native_bf16_uses_bf16(flag):
    assert resolve_dtype("auto", "cpu", PLAIN_AVX2 | {flag}) == "bfloat16"


def test_an_explicit_dtype_is_kept_whatever_the_hardware():
    assert resolve_dtype("bfloat16", "cpu", PLAIN_AVX2) == "bfloat16"
    assert resolve_dtype("float32", "cpu", PLAIN_AVX2 | {"amx_bf16"}) == "float32"


def test_config_defaults_to_auto_and_rejects_other_names(tmp_path):
    cfg = TrainConfig(data=tmp_path / "d.jsonl", output_dir=tmp_path / "o")
    assert cfg.dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(data=tmp_path / "d.jsonl", output_dir=tmp_path / "o", dtype="fp16")
