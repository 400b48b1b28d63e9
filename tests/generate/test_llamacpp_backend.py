"""The llamacpp backend: a GGUF from `prefalign export` sampled in-process by llama.cpp gives
transformers' greedy continuation, n samples per prompt within the token limit, and the same
samples for the same seed. Skips without llama-cpp-python (`make test` builds it)."""

import pytest

from conftest import require_llama_cpp

from prefalign.generate.backends import BACKENDS, LlamaCppBackend, SamplingParams, TransformersBackend

CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Name a prime number."}]]


def test_registered_and_refuses_a_non_gguf_model(tiny_model):
    assert BACKENDS["llamacpp"] is LlamaCppBackend
    with pytest.raises(ValueError, match="must be a .gguf file"):
        LlamaCppBackend(tiny_model)  # an HF folder: export it first


@pytest.fixture(scope="module")
def backend(tiny_model, tmp_path_factory):
    require_llama_cpp()
    from prefalign.models.export import export_gguf

    path = export_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", gguf_type="f32")
    llama = LlamaCppBackend(str(path), tokenizer=tiny_model, n_ctx=512, n_threads=1)
    yield llama
    llama.close()


@pytest.mark.slow  # exports a GGUF and loads it in llama.cpp
def test_greedy_continuation_equals_transformers(backend, tiny_model):
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    reference = TransformersBackend(tiny_model, batch_size=2)
    assert backend.generate(CHATS, params) == reference.generate(CHATS, params)


@pytest.mark.slow  # exports a GGUF and loads it in llama.cpp
def test_n_samples_within_the_limit_and_repeatable_by_seed(backend):
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=3, seed=7)
    first = backend.generate(CHATS, params)
    assert [len(samples) for samples in first] == [3, 3]
    # A sample cut by the limit has exactly 5 new tokens, one that ended has fewer.
    cut = sum(text.truncated for samples in first for text in samples)
    assert 5 * cut <= backend.last_stats.new_tokens <= 5 * cut + 4 * (6 - cut)
    assert backend.generate(CHATS, params) == first  # same seed, same samples
    assert len({s for samples in first for s in samples}) > 1  # seed + j: samples differ


def test_a_llama_cpp_that_crashes_stops_the_backend_in_one_line(tmp_path, monkeypatch):
    """A crash inside llama.cpp (its AMX kernels on some CPUs) happens in a probe process: the
    backend refuses in one line naming the file and the rebuild, and the caller survives."""
    import subprocess

    from prefalign.generate.backends import llamacpp_backend as lb

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def crashed(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, -11, "", "")

    monkeypatch.setattr(lb.subprocess, "run", crashed)
    monkeypatch.setattr(lb, "_llama_class", lambda: object)  # no llama-cpp-python needed
    with pytest.raises(RuntimeError) as err:
        LlamaCppBackend(str(gguf))
    message = str(err.value)
    assert "crashed (SIGSEGV)" in message and str(gguf.resolve()) in message and "-mno-amx-int8" in message
    assert "\n" not in message and calls[0][-1] == str(gguf.resolve())
    lb._probe.cache_clear()
    monkeypatch.setattr(lb.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "ok\n", ""))
    assert lb.llama_cpp_problem(gguf) is None
    lb._probe.cache_clear()
