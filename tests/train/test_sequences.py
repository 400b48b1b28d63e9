"""The batched, completion-only log-prob path against a plain one-sequence-at-a-time computation."""

import torch

from prefalign.data.records import PreferenceRecord
from prefalign.data.tokenize import TokenizeSettings, tokenize_record, truncate
from prefalign.models.loading import load_model, load_tokenizer
from prefalign.train.reference import toxic_views
from prefalign.train.sequences import collate, sequence_logps, split_groups


def plain_logp(model, prompt_ids, response_ids):
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = logits.log_softmax(-1)
    start = len(prompt_ids)
    return sum(logps[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))


import pytest


LAYOUTS = {"pairs": dict(share_prompt=False), "shared": dict(share_prompt=True), "packed": dict(pack=True)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_logps_match_plain_per_sequence(tiny_model, layout):
    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    records = [
        PreferenceRecord(prompt="Hi", chosen="Hello there, friend.", rejected="Go away", anchors=["a", "b c d"]),
        PreferenceRecord(prompt=[{"role": "user", "content": "A much longer prompt with many more words in it " * 8}],
                         chosen="Ok", rejected="A long long rejected answer here", anchors=["x y", "z"]),
        PreferenceRecord(prompt="Yo", chosen="k", rejected="no", anchors=["m", "n"]),  # packs beside another block
    ]
    settings = TokenizeSettings()
    examples = [tokenize_record(r, i, tok, ("chosen", "rejected", "anchors"), settings) for i, r in enumerate(records)]
    batch = collate(examples, ("chosen", "rejected", "anchors"), tok.pad_token_id, **LAYOUTS[layout])
    if layout == "packed":
        assert batch.input_ids.shape[0] < len(records)  # two blocks share a row
    with torch.no_grad():
        got = split_groups(sequence_logps(model, batch), batch.rows)
    assert got["anchors"].shape == (3, 2)
    for i, ex in enumerate(examples):
        assert abs(got["chosen"][i].item() - plain_logp(model, ex.prompt_ids, ex.responses["chosen"][0])) < 1e-4
        assert abs(got["rejected"][i].item() - plain_logp(model, ex.prompt_ids, ex.responses["rejected"][0])) < 1e-4
        for k in range(2):
            assert abs(got["anchors"][i, k].item() - plain_logp(model, ex.prompt_ids, ex.responses["anchors"][k])) < 1e-4


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_fast_layouts_give_the_same_gradients(tiny_model, layout):
    tok = load_tokenizer(tiny_model)
    records = [
        PreferenceRecord(prompt="Tell me about the sea", chosen="It is big and blue.", rejected="No", anchors=["Wet.", "Salty water, mostly."]),
        PreferenceRecord(prompt="Hi", chosen="Hello!", rejected="Go away now please", anchors=["Hey", "Good day to you"]),
        PreferenceRecord(prompt="Yo", chosen="k", rejected="no", anchors=["m", "n"]),
    ]
    groups = ("rejected", "anchors", "chosen")
    examples = [tokenize_record(r, i, tok, groups, TokenizeSettings()) for i, r in enumerate(records)]
    grads = []
    for kwargs in (LAYOUTS["pairs"], LAYOUTS[layout]):
        model = load_model(tiny_model)
        batch = collate(examples, groups, tok.pad_token_id, **kwargs)
        out = split_groups(sequence_logps(model, batch), batch.rows)
        # A loss that weighs every group differently, so a mix-up of rows would show.
        (out["chosen"].sum() - 2 * out["rejected"].sum() + 0.5 * out["anchors"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-3), name


def test_shared_prompt_encodes_each_prompt_once(tiny_model):
    tok = load_tokenizer(tiny_model)
    rec = PreferenceRecord(prompt="A prompt of some length here", chosen="a", rejected="b", anchors=["c", "d", "e", "f"])
    ex = tokenize_record(rec, 0, tok, ("rejected", "anchors"), TokenizeSettings())
    pairs = collate([ex], ("rejected", "anchors"), tok.pad_token_id, share_prompt=False)
    shared = collate([ex], ("rejected", "anchors"), tok.pad_token_id, share_prompt=True)
    assert pairs.input_ids.shape[0] == 5 and shared.input_ids.shape[0] == 1
    assert shared.num_tokens == len(ex.prompt_ids) + sum(len(r) for g in ex.responses.values() for r in g)
    assert pairs.num_tokens == 5 * len(ex.prompt_ids) + sum(len(r) for g in ex.responses.values() for r in g)


def test_packing_leaves_no_padding_beyond_the_last_row(tiny_model):
    tok = load_tokenizer(tiny_model)
    texts = ["one two three four five six seven eight", "a b", "c d", "e f g h", "i"]
    records = [PreferenceRecord(prompt=t, chosen="yes " * (i + 1), rejected="no") for i, t in enumerate(texts)]
    examples = [tokenize_record(r, i, tok, ("chosen", "rejected"), TokenizeSettings()) for i, r in enumerate(records)]
    shared = collate(examples, ("chosen", "rejected"), tok.pad_token_id, share_prompt=True)
    packed = collate(examples, ("chosen", "rejected"), tok.pad_token_id, pack=True)
    assert packed.num_tokens == shared.num_tokens  # the same real tokens
    assert packed.input_ids.numel() < shared.input_ids.numel()  # in fewer cells
    assert packed.input_ids.shape[1] == max(len(e.prompt_ids) + len(e.responses["chosen"][0]) + len(e.responses["rejected"][0]) for e in examples)


def test_prompt_tokens_never_count(tiny_model):
    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    a = tokenize_record(PreferenceRecord(prompt="short", chosen="same answer", rejected="x"), 0, tok, ("chosen",), TokenizeSettings())
    batch = collate([a], ("chosen",), tok.pad_token_id)
    # Masking the response leaves nothing: a zero sum proves prompt positions contribute nothing.
    batch.response_mask[:] = False
    with torch.no_grad():
        assert sequence_logps(model, batch).abs().max().item() == 0.0


def test_truncation_keeps_prompt_end_and_response_start():
    settings = TokenizeSettings(max_length=10, max_prompt_length=4)
    prompt, responses = truncate(list(range(8)), [list(range(100, 108)), [200, 201]], settings)
    assert prompt == [4, 5, 6, 7]  # left-truncated: the end of the prompt stays
    assert responses[0] == list(range(100, 106))  # right-truncated to the budget
    assert responses[1] == [200, 201]
    short_prompt, short_responses = truncate([1, 2], [[3, 4]], settings)
    assert short_prompt == [1, 2] and short_responses == [[3, 4]]


def test_response_ends_with_eos_and_chat_template_is_used(tiny_model):
    tok = load_tokenizer(tiny_model)
    ex = tokenize_record(PreferenceRecord(prompt="Hi", chosen="Yes", rejected="No"), 0, tok, ("chosen", "rejected"), TokenizeSettings())
    assert ex.responses["chosen"][-1][-1] == tok.eos_token_id
    text = tok.decode(ex.prompt_ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")


def test_toxic_prompt_carries_control_token(tiny_model):
    tok = load_tokenizer(tiny_model)
    rec = PreferenceRecord(prompt="Say something", chosen="Sure.", rejected="No.", toxic="Bad words")
    ex = tokenize_record(rec, 0, tok, ("chosen", "rejected", "toxic"), TokenizeSettings(), with_toxic_prompt=True)
    assert "[TOXIC] Say something" in tok.decode(ex.toxic_prompt_ids)
    assert "[TOXIC]" not in tok.decode(ex.prompt_ids)
    # The reference scores the toxic response behind that prompt with the batch, in one pass.
    batch = collate([ex, *toxic_views([ex])], ("chosen", "rejected", "toxic", "toxic_ref"), tok.pad_token_id)
    assert set(batch.rows) == {"chosen", "rejected", "toxic", "toxic_ref"}
    assert batch.input_ids.shape[0] == 4 and batch.rows["toxic_ref"].tolist() == [3]
    width = batch.prompt_width
    assert batch.input_ids[3, width - len(ex.toxic_prompt_ids) : width].tolist() == ex.toxic_prompt_ids
