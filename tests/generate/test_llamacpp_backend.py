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
