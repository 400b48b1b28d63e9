"""The fast decode engine against HF: same logits and greedy tokens in fp32, the same sampling
distribution as HF's warpers, rows independent of their batch, weights re-read after training."""

from __future__ import annotations

import copy

import pytest
import torch

from prefalign.generate.backends import SamplingParams, TransformersBackend
from prefalign.generate.backends.fast_decode import (
    FastDecoder,
    Sampler,
    ThreadTuner,
    row_seed,
    unsupported_reason,
)

from conftest import PROMPTS

CONVS = [[{"role": "user", "content": p}] for p in PROMPTS]
LONG = [{"role": "user", "content": "Please explain, in great detail and with examples, " * 12 + "why the sky is blue."}]
PREFILLED = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Sure, the colour is"}]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    """tiny-random with std-0.5 weights (as in test_backends): the next token depends on the whole
    prompt, so equal outputs are not a coincidence of a degenerate model."""
    from prefalign.models.loading import load_model, load_tokenizer

    model = load_model(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval(), load_tokenizer(tiny_model)


def backends(model, tokenizer, **kwargs):
    fast = TransformersBackend(model, tokenizer, show_progress=False, engine="fast", compute_dtype="float32", **kwargs)
    hf = TransformersBackend(model, tokenizer, show_progress=False, engine="hf", **kwargs)
    return fast, hf


def test_engine_choice(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    b = TransformersBackend(model, tokenizer, show_progress=False)
    assert b.engine == "fast" and b.compute_dtype in ("float32", "bfloat16")
    import prefalign.train.precision as precision

    monkeypatch.setattr(precision, "bf16_is_fast", lambda device=None, flags=None: (False, "no"))
    assert TransformersBackend(model, tokenizer, show_progress=False).compute_dtype == "float32"
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device=None, flags=None: (True, "yes"))
    assert TransformersBackend(model, tokenizer, show_progress=False).compute_dtype == "bfloat16"
    assert TransformersBackend(model, tokenizer, show_progress=False, engine="hf").engine == "hf"
    # A generation config that asks HF for more than temperature/top-k/top-p goes through HF.
    other = copy.deepcopy(model)
    other.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty" in unsupported_reason(other)
    assert TransformersBackend(other, tokenizer, show_progress=False).engine == "hf"
    with pytest.raises(ValueError, match="repetition_penalty"):
        TransformersBackend(other, tokenizer, show_progress=False, engine="fast")
    with pytest.raises(ValueError, match="engine must be one of"):
        TransformersBackend(model, tokenizer, engine="vllm")


def test_logits_match_hf_forward(model_and_tokenizer):
    """fp32 prefill of a left-padded batch: every real position's logits are HF's."""
    model, tokenizer = model_and_tokenizer
    dec = FastDecoder(model, torch.float32, threads=1)
    dec._refresh()
    seqs = [tokenizer(p)["input_ids"] for p in ("a b c d e f g h", "hello", "the sky is blue today")]
    width = max(map(len, seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    key_mask = torch.zeros((len(seqs), 1, 1, width))
    positions = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        key_mask[r, ..., : width - len(s)] = float("-inf")
        positions[r, width - len(s):] = torch.arange(len(s))
    cache = torch.zeros((len(dec._layers), 2, len(seqs), dec.n_kv, width, dec.head_dim))
    with torch.inference_mode():
        hidden = dec._forward(ids, positions, cache, 0, key_mask, all_positions=True)
        mine = dec._logits(hidden)
        for r, s in enumerate(seqs):
            ref = model(torch.tensor([s])).logits[0]
            torch.testing.assert_close(mine[r, width - len(s):], ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(dec.sequence_logits(s), ref, rtol=1e-4, atol=1e-4)


def test_greedy_matches_hf_generate_fp32(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    fast, hf = backends(model, tokenizer, batch_size=4)
    convs = [*CONVS[:5], LONG, PREFILLED]  # padding (LONG), a continued assistant turn
    params = SamplingParams(max_new_tokens=10, temperature=0, n=2)
    want = hf.generate_token_ids(convs, params)
    got = fast.generate_token_ids(convs, params)
    assert got == want
    assert all(len(r[0]) == 10 for r in got)
    assert fast.generate(convs, params) == hf.generate(convs, params)
    # One batch of everything, and each prompt alone: the same tokens.
    fast_one = TransformersBackend(model, tokenizer, show_progress=False, engine="fast", compute_dtype="float32")
    assert fast_one.generate_token_ids(convs, params) == want
    assert fast_one.last_stats.extra["batches"] == 1
    for i in (0, 5, 6):
        assert fast_one.generate_token_ids([convs[i]], params)[0] == want[i]


@pytest.mark.parametrize("n_convs", [4, 8])  # 1 of 4 ended: the batch is compacted; 1 of 8: the row stays
def test_greedy_rows_that_end_early_match_hf(model_and_tokenizer, n_convs):
    """A row that hits an end token stops (and leaves the batch once a quarter has ended); the
    others go on as in HF."""
    model, tokenizer = model_and_tokenizer
    _, hf = backends(model, tokenizer)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    convs = CONVS[:n_convs]
    first = hf.generate_token_ids(convs, params)
    end_token = first[0][0][3]  # make prompt 0's 4th token an end token
    ended = copy.deepcopy(model)
    ended.generation_config.eos_token_id = [tokenizer.eos_token_id, end_token]
    fast, hf = backends(ended, tokenizer)
    want = hf.generate_token_ids(convs, params)
    assert want[0][0] == first[0][0][:3]
    assert sum(len(r[0]) < 10 for r in want) * 4 <= n_convs
    assert fast.generate_token_ids(convs, params) == want
    texts = fast.generate(convs, params)
    assert [t[0].truncated for t in texts] == [len(r[0]) == 10 for r in want]


def test_sampling_rows_do_not_depend_on_their_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    fast, _ = backends(model, tokenizer)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, n=3, seed=11)
    convs = [*CONVS[:4], LONG]
    together = fast.generate_token_ids(convs, params)
    assert all(len(set(map(tuple, rows))) > 1 for rows in together)  # the n samples differ
    for i in (0, 4):
        assert fast.generate_token_ids([convs[i]], params)[0] == together[i]
    reordered = fast.generate_token_ids(convs[::-1], params)
    assert reordered[::-1] == together
    small = TransformersBackend(model, tokenizer, show_progress=False, engine="fast", compute_dtype="float32", batch_size=3)
    assert small.generate_token_ids(convs, params) == together
    # A larger n or token budget extends the same samples.
    more = fast.generate_token_ids(convs[:2], SamplingParams(**{**params.__dict__, "n": 4, "max_new_tokens": 9}))
    for i in range(2):
        assert [r[:6] for r in more[i][:3]] == together[i]


def test_stop_string_ends_the_row(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    fast, _ = backends(model, tokenizer)
    full_ids = fast.generate_token_ids(CONVS[:1], SamplingParams(max_new_tokens=12, temperature=0))[0][0]
    full = tokenizer.decode(full_ids, skip_special_tokens=True)
    stop = full[len(tokenizer.decode(full_ids[:5], skip_special_tokens=True)):][:2]
    assert stop and full.find(stop) >= 0
    params = SamplingParams(max_new_tokens=12, temperature=0, stop=(stop,))
    ids = fast.generate_token_ids(CONVS[:1], params)[0][0]
    assert ids == full_ids[: len(ids)] and len(ids) < 12  # generation stopped at the stop string
    assert stop in tokenizer.decode(ids, skip_special_tokens=True)
    assert stop not in tokenizer.decode(ids[:-1], skip_special_tokens=True)
    text = fast.generate(CONVS[:1], params)[0][0]
    assert text == full[: full.find(stop)] and not text.truncated


def test_weights_are_reread_after_an_update(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    trained = copy.deepcopy(model)
    fast, hf = backends(trained, tokenizer)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    before = fast.generate_token_ids(CONVS[:3], params)
    with torch.no_grad():  # an optimizer step updates parameters in place
        for p in trained.model.layers[0].mlp.parameters():
            p.mul_(-1.5)
    after = fast.generate_token_ids(CONVS[:3], params)
    assert after == hf.generate_token_ids(CONVS[:3], params)
    assert after != before


def test_bf16_engine_runs_and_is_deterministic(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    b = TransformersBackend(model, tokenizer, show_progress=False, engine="fast", compute_dtype="bfloat16")
    params = SamplingParams(max_new_tokens=5, temperature=0.7, n=2, seed=3)
    first = b.generate(CONVS[:3], params)
    assert b.generate(CONVS[:3], params) == first
    assert b.last_stats.extra["compute_dtype"] == "bfloat16"
    assert b.decoder._layers[0].wqkv.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------- sampler

def hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize(
    "scale,vocab,temperature,top_k,top_p",
    [
        (3.0, 1500, 0.7, 0, 1.0),  # plain temperature
        (6.0, 1500, 1.0, 0, 0.9),  # top-p, nucleus among the first 64 candidates
        pytest.param(3.0, 1500, 1.0, 0, 0.9, marks=pytest.mark.slow),  # top-p, nucleus of 89-140 tokens: among the first 1024
        pytest.param(0.05, 1500, 1.0, 0, 0.95, marks=pytest.mark.slow),  # top-p over a flat distribution: nucleus > 1024, full sort
        (3.0, 1500, 0.8, 40, 0.95),  # top-k then top-p
        (3.0, 1500, 1.3, 7, 1.0),  # top-k alone
    ],
)
def test_sampler_follows_hf_warpers(scale, vocab, temperature, top_k, top_p):
    """Stratified uniforms ((i + 0.5) / N) through an inverse CDF hit each token in proportion to its
    probability to within 1/N: the sampler's distribution is HF's, token by token."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, vocab, generator=gen) * scale
    n = 10000
    sampler = Sampler(temperature, top_p, top_k)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for r in range(3):
        picks = sampler.sample(logits[r : r + 1].expand(n, vocab), u)
        freq = torch.bincount(picks, minlength=vocab).double() / n
        ref = hf_probs(logits[r : r + 1], temperature, top_k, top_p)[0].double()
        assert freq[ref == 0].sum() == 0  # nothing outside HF's support
        assert (freq - ref).abs().max() <= 2.0 / n + 1e-4


def test_sampler_keeps_ties_at_the_kth_score_like_hf():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.5]])
    n = 6000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    picks = Sampler(1.0, 1.0, 2).sample(logits.expand(n, 6), u)
    freq = torch.bincount(picks, minlength=6).double() / n
    ref = hf_probs(logits, 1.0, 2, 1.0)[0].double()
    assert (ref[1:4] > 0).all()  # HF keeps every token tied with the 2nd score
    assert (freq - ref).abs().max() <= 2.0 / n + 1e-6


def test_sampler_greedy_and_seeds():
    logits = torch.randn(4, 100)
    assert torch.equal(Sampler(0).sample(logits, None), logits.argmax(-1))
    seeds = [row_seed(0, 0.7, 1.0, 0, [1, 2, 3], j) for j in range(3)]
    assert len(set(seeds)) == 3 and seeds[0] == row_seed(0, 0.7, 1.0, 0, [1, 2, 3], 0)
    assert row_seed(1, 0.7, 1.0, 0, [1, 2, 3], 0) != seeds[0]
    u = Sampler(0.7, row_seeds=seeds).uniforms(5)
    assert u.shape == (3, 5) and torch.equal(u[:, :3], Sampler(0.7, row_seeds=seeds).uniforms(3))


# ------------------------------------------------------------------------------ thread tuner

def test_thread_tuner_picks_the_faster_count_and_backs_off():
    tuner = ThreadTuner(2, block=2, hold=4, max_hold=16)
    cost = {1: 1.0, 2: 0.5}  # an idle machine: two threads are faster

    def run(layers):
        used = []
        for _ in range(layers):
            t = tuner.next_threads()
            used.append(t)
            tuner.record(t, cost[t])
        return used

    assert run(4) == [1, 1, 2, 2]  # the probe: one thread first, then the challenger
    assert tuner.best == 2 and tuner.switches == 1
    assert run(4) == [2, 2, 2, 2]  # held
    assert run(4) == [2, 2, 1, 1]  # probed again; 2 stays, so the hold doubles
    assert tuner.best == 2 and tuner.hold == 8
    cost = {1: 0.45, 2: 0.5}  # a challenger must be clearly faster to take over
    run(8 + 4)
    assert tuner.best == 2 and tuner.hold == 16
    cost = {1: 1.0, 2: 5.0}  # the machine got busy
    run(16)
    assert run(4) == [2, 2, 1, 1] and tuner.best == 1 and tuner.hold == 4
    # Held for 4 layers, then probed: 5 s > 2 x (1 + 1) s, so the probe of 2 stops after one layer.
    assert run(7) == [1, 1, 1, 1, 1, 1, 2]
    assert tuner.best == 1 and tuner.hold == 8 and tuner.next_threads() == 1
    assert ThreadTuner(1).next_threads() == 1
