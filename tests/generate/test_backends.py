"""Generation backends on the tiny random model: batching, left padding, seeds, stops, templates, stats."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from prefalign.generate.backends import (
    BACKENDS,
    GenerationBackend,
    OpenAIBackend,
    SamplingParams,
    TransformersBackend,
    VLLMBackend,
    make_backend,
)
from prefalign.generate.backends.base import cut_at_stop, render_plain

from conftest import PROMPTS

CONVS = [[{"role": "user", "content": p}] for p in PROMPTS]
LONG = [{"role": "user", "content": "Please explain, in great detail and with examples, " * 12 + "why the sky is blue."}]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    """tiny-random with larger random weights: its stock init (std 0.02, tied embeddings) makes greedy
    decoding repeat the prompt's last token whatever the context, which would make the padding test
    vacuous. With std 0.5 the next token depends on the whole prompt."""
    from prefalign.models.loading import load_model, load_tokenizer

    model = load_model(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model, load_tokenizer(tiny_model)


@pytest.fixture(scope="module", params=["fast", "hf"])
def backend(model_and_tokenizer, request):
    """Both engines (fast: the default, at this CPU's default precision; hf: model.generate)."""
    model, tokenizer = model_and_tokenizer
    b = TransformersBackend(model, tokenizer, batch_size=4, show_progress=False, engine=request.param)
    assert b.engine == request.param
    return b


def test_protocol_and_registry(backend):
    assert isinstance(backend, GenerationBackend)
    assert set(BACKENDS) == {"transformers", "openai", "vllm", "llamacpp"}
    assert BACKENDS["transformers"] is TransformersBackend and BACKENDS["vllm"] is VLLMBackend
    with pytest.raises(ValueError, match="known: llamacpp, openai, transformers, vllm"):
        make_backend("nope")
    b = make_backend("openai", base_url="http://127.0.0.1:1/v1", model="m")
    assert isinstance(b, OpenAIBackend) and isinstance(b, GenerationBackend)


def test_make_backend_transformers_by_name(tiny_model):
    b = make_backend("transformers", model=tiny_model, batch_size=2, show_progress=False)
    assert b.model_id == tiny_model
    out = b.generate(CONVS[:1], SamplingParams(max_new_tokens=2, temperature=0))
    assert len(out) == 1 and len(out[0]) == 1 and isinstance(out[0][0], str)


def test_batches_keep_input_order_and_count(backend):
    convs = CONVS[:3] + [LONG] + CONVS[3:5]  # sorted by length inside, so LONG goes first
    params = SamplingParams(max_new_tokens=4, temperature=1.0, n=3, seed=7)
    out = backend.generate(convs, params)
    assert len(out) == len(convs) and all(len(texts) == 3 for texts in out)
    assert backend.last_stats.extra["batches"] == 6  # batch_size 4 // n 3 → one prompt per batch
    # A batch's seed comes from its contents, so a conversation generated alone gets the same
    # samples: each result was put back at its input position.
    for i in (0, 3, 5):
        assert backend.generate([convs[i]], params)[0] == out[i]
    # Greedy: n identical copies, several prompts per batch, input order restored.
    ids = backend.generate_token_ids(convs, SamplingParams(max_new_tokens=3, temperature=0, n=2))
    assert backend.last_stats.extra["batches"] == 2
    assert all(len(r) == 2 and r[0] == r[1] for r in ids)
    for i in (0, 3):
        assert backend.generate_token_ids([convs[i]], SamplingParams(max_new_tokens=3, temperature=0))[0][0] == ids[i][0]


def test_left_padding_greedy_matches_alone(backend):
    params = SamplingParams(max_new_tokens=8, temperature=0)
    short = CONVS[1]
    alone = backend.generate_token_ids([short], params)[0][0]
    lengths = [len(backend.encode(c)) for c in (short, LONG)]
    assert lengths[1] > 2 * lengths[0]  # the short prompt really is padded a lot
    batched = backend.generate_token_ids([LONG, short, LONG], params)
    assert batched[1][0] == alone
    assert len(alone) == 8
    # Sanity: the model's output depends on the prompt, so equality above is not a coincidence.
    others = backend.generate_token_ids(CONVS[:4], params)
    assert len({tuple(o[0]) for o in others}) == 4


def test_seed_determinism(backend):
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=50, n=2, seed=123)
    first = backend.generate(CONVS[:2], params)
    torch.manual_seed(999)  # the global RNG state does not matter...
    backend.generate(CONVS[3:5], params)  # ...nor what ran before
    assert backend.generate(CONVS[:2], params) == first
    assert first[0][0] != first[0][1]  # the n samples differ
    other = backend.generate(CONVS[:2], SamplingParams(**{**params.__dict__, "seed": 124}))
    assert other != first
    state = torch.random.get_rng_state()
    backend.generate(CONVS[:1], params)
    assert torch.equal(state, torch.random.get_rng_state())  # seeding left the global RNG alone


def test_stop_strings_cut_text(backend):
    params = SamplingParams(max_new_tokens=12, temperature=0)
    full = backend.generate(CONVS[:1], params)[0][0]
    assert len(full) > 6
    stop = full[4:6]
    cut = backend.generate(CONVS[:1], SamplingParams(max_new_tokens=12, temperature=0, stop=(stop,)))[0][0]
    assert cut == full[: full.find(stop)]
    assert stop not in cut
    assert not cut.truncated  # a stop string ended it, not the token limit
    assert cut_at_stop("abc STOP def END", ("END", "STOP")) == "abc "


def test_texts_cut_by_the_token_limit_are_marked(backend):
    params = SamplingParams(max_new_tokens=4, temperature=1.0, n=3, seed=5)
    ids = backend.generate_token_ids(CONVS, params)
    texts = backend.generate(CONVS, params)
    flags = [t.truncated for per_conv in texts for t in per_conv]
    # A row is cut when it used the whole budget without an end token (ids stop before the eos).
    assert flags == [len(row) == 4 for per_conv in ids for row in per_conv]
    assert any(flags)


def test_render_uses_chat_template(backend, monkeypatch):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = backend.render(conv)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    # What generate feeds the model is exactly the templated text.
    seen = []
    real = backend.tokenizer.apply_chat_template

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.tokenizer, "apply_chat_template", spy)
    fed = []
    real_batch = backend._generate_batch  # both engines get their prompt ids here

    def spy_batch(prompts, params, n_rows):
        fed.extend(prompts)
        return real_batch(prompts, params, n_rows)

    monkeypatch.setattr(backend, "_generate_batch", spy_batch)
    backend.generate([conv], SamplingParams(max_new_tokens=2, temperature=0))
    assert seen and seen[0][1]["add_generation_prompt"] is True
    assert backend.tokenizer.decode(fed[0]) == text
    # ...and model.generate (the hf engine) is fed the same ids.
    hf = TransformersBackend(backend.model, backend.tokenizer, show_progress=False, engine="hf")
    fed_hf = []
    real_generate = hf.model.generate

    def spy_generate(**kwargs):
        fed_hf.append(kwargs["input_ids"][0].tolist())
        return real_generate(**kwargs)

    monkeypatch.setattr(hf.model, "generate", spy_generate)
    hf.generate([conv], SamplingParams(max_new_tokens=2, temperature=0))
    assert fed_hf == fed


def test_stats_recorded(backend, caplog):
    with caplog.at_level(logging.INFO, logger="prefalign.generate"):
        backend.generate(CONVS[:5], SamplingParams(max_new_tokens=5, temperature=0))
    s = backend.last_stats
    assert s.prompts == 5 and s.new_tokens == 25 and s.seconds > 0 and s.tokens_per_s > 0
    assert s.extra["batches"] == 2 and s.extra["prompt_tokens"] > 0
    assert "tokens/s" in caplog.text


def test_no_chat_template_fallback(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    import copy

    plain_tok = copy.deepcopy(tokenizer)
    plain_tok.chat_template = None
    b = TransformersBackend(model, plain_tok, batch_size=2, show_progress=False)
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 2+2?"}]
    assert b.render(conv) == "System: S\nUser: What is 2+2?\nAssistant:"
    assert render_plain([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "User: a\nAssistant: b"
    out = b.generate([conv, CONVS[0]], SamplingParams(max_new_tokens=3, temperature=0))
    assert [len(o) for o in out] == [1, 1]


def test_bad_conversations_rejected(backend):
    with pytest.raises(ValueError, match="conversation 1, message 0"):
        backend.generate([CONVS[0], [{"content": "no role"}]], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError):
        SamplingParams(n=0)


def test_vllm_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    with pytest.raises(ImportError, match="pip install vllm"):
        VLLMBackend("tiny-random")
    with pytest.raises(ImportError, match="pip install vllm"):
        make_backend("vllm", model="tiny-random")


@pytest.mark.slow
def test_importing_backends_does_not_import_vllm():
    code = (
        "import sys; import prefalign.generate.backends.vllm_backend, prefalign.generate.backends; "
        "assert 'vllm' not in sys.modules, 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
