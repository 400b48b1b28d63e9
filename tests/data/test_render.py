"""One prompt renderer (prefalign.data.render): generation, training, the reference, the reward
model and evaluation see the same prompt token ids, with and without a chat template."""

import copy

import pytest
import torch

from conftest import write_jsonl
from prefalign.data.records import PreferenceRecord
from prefalign.data.render import (as_conversation, encode_exchange, encode_prompt, render_plain, render_prompt,
                                   uses_chat_template, with_control_token)
from prefalign.data.tokenize import TokenizeSettings, tokenize_record
from prefalign.models.loading import load_model, load_tokenizer

SYSTEM = {"role": "system", "content": "Answer briefly."}
PROMPTS = [
    "What is 2+2?",
    [SYSTEM, {"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a fact."}],
]


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    chat = load_tokenizer(tiny_model)
    plain = copy.deepcopy(chat)
    plain.chat_template = None
    return {"chat": chat, "plain": plain}


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model).eval()


# ------------------------------------------------------------------------------- the renderer


def test_modes_with_and_without_a_template(tokenizers):
    chat, plain = tokenizers["chat"], tokenizers["plain"]
    assert render_prompt(chat, "Hi").endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(plain, "Hi") == "User: Hi\nAssistant:"
    assert render_prompt(chat, "Hi", "never") == "Hi"  # a plain string as written
    assert render_prompt(chat, [{"role": "user", "content": "Hi"}], "never") == "User: Hi\nAssistant:"
    assert render_prompt(plain, "Hi", "never", system="S") == "System: S\nUser: Hi\nAssistant:"
    assert encode_prompt(chat, "Hi", "never") == chat("Hi")["input_ids"]
    with pytest.raises(ValueError, match="'always' but the tokenizer has no chat template"):
        render_prompt(plain, "Hi", "always")
    with pytest.raises(ValueError, match="not one of auto, always, never"):
        uses_chat_template(chat, "sometimes")


def test_system_prefill_and_control_token(tokenizers):
    chat, plain = tokenizers["chat"], tokenizers["plain"]
    text = render_prompt(chat, "Q?", system="Be safe.", prefill="I can't", control_token="[TOXIC]")
    assert text == "<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\n[TOXIC] Q?<|im_end|>\n<|im_start|>assistant\nI can't"
    assert render_prompt(plain, "Q?", prefill="I can't") == "User: Q?\nAssistant: I can't"
    # An existing system message is kept, not doubled; the token goes into the last user turn.
    conv = as_conversation([SYSTEM, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}], system="other", control_token="[T]")
    assert [m["content"] for m in conv] == ["Answer briefly.", "a", "b", "[T] c"]
    assert with_control_token("Q?", "[TOXIC]") == "[TOXIC] Q?"
    assert render_plain([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "User: a\nAssistant: b"


# ----------------------------------------------------------------- every stage, the same ids


def _reference_prompt_ids(model, examples, pad_id):
    """The prompts the reference model really reads: its decoder's input rows (pair layout, ADPO's
    [TOXIC] rows included), without padding and responses."""
    from prefalign.train.reference import ModelScorer, ScoredReference

    seen = []
    hook = model.get_decoder().register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    try:
        ScoredReference(ModelScorer(model, pad_id, share_prompt=False), ("chosen",), toxic=True).logps(examples)
    finally:
        hook.remove()
    ids, mask = seen[0]["input_ids"], seen[0]["attention_mask"]
    return [ids[row][mask[row].bool()].tolist() for row in range(ids.shape[0])]


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_every_stage_sees_the_same_prompt_ids(tokenizers, model, tiny_model, tmp_path, kind):
    from prefalign.evaluate.runner import Evaluator, load_eval_config
    from prefalign.generate.backends import TransformersBackend
    from prefalign.generate.backends.base import encode_prompt as backend_encode
    from prefalign.generate.toxic_control import toxic_conversation
    from prefalign.losses import get_loss
    from prefalign.score.rm_model import encode_pairs
    from prefalign.train.config import TrainConfig
    from prefalign.train.loop import prepare_examples

    tok = tokenizers[kind]
    backend = TransformersBackend(model, tok, batch_size=4, show_progress=False)
    rows = [{"id": f"r{i}", "prompt": p, "chosen": "Four.", "rejected": "Five.", "toxic": "Rude words."}
            for i, p in enumerate(PROMPTS)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)

    # generation: what the backend feeds the model (and the vllm backend's encoder)
    conversations = [as_conversation(p) for p in PROMPTS]
    generated = [backend.encode(c) for c in conversations]
    assert generated == [backend_encode(tok, c) for c in conversations]
    if kind == "plain":
        assert tok.decode(generated[0]) == "User: What is 2+2?\nAssistant:"

    # training: the trainer's own data step (ADPO: the [TOXIC] prompt too)
    config = TrainConfig(model=tiny_model, data=data, output_dir=tmp_path / "out", loss="adpo", max_length=256,
                         max_prompt_length=128)
    train, _, _ = prepare_examples(config, get_loss("adpo"), tok)
    assert [ex.prompt_ids for ex in train] == generated
    # ADPO's toxic sample was generated under the control token: the reference scores it behind
    # exactly that prompt.
    toxic_generated = [backend.encode(toxic_conversation(p, "[TOXIC]")) for p in PROMPTS if isinstance(p, str)]
    assert [ex.toxic_prompt_ids for ex, p in zip(train, PROMPTS) if isinstance(p, str)] == toxic_generated

    # the reference model: the rows its decoder reads start with the same prompts
    read = _reference_prompt_ids(model, train, tok.pad_token_id)
    expected = [ex.prompt_ids for ex in train] + [ex.toxic_prompt_ids for ex in train]
    assert [r[: len(e)] for r, e in zip(read, expected)] == expected
    assert len(read) == 2 * len(train)

    # the reward model: the exchange starts with the same prompt ids
    records = [PreferenceRecord(prompt=p, chosen="Four.") for p in PROMPTS]
    batch = encode_pairs(tok, [r.prompt for r in records], ["Four."] * len(records), max_length=512)
    for row, mask, ids in zip(batch["input_ids"], batch["attention_mask"], generated):
        real = row[mask.bool()].tolist()
        assert real[: len(ids)] == ids and len(real) > len(ids)
    assert encode_exchange(tok, PROMPTS[0], "Four.")[: len(generated[0])] == generated[0]

    # evaluation: sampled prompts (kept for the KL), held-out pairs and reference text
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "p0", "prompt": PROMPTS[0], "reference_answer": "Four."}])
    eval_config = load_eval_config(None, {
        "output_dir": str(tmp_path / "eval"), "models": {"base": tiny_model},
        "prompt_sets": [{"name": "s", "source": "file", "path": str(prompts_file), "split": None, "limit": 1}],
        "reference_texts": [{"name": "t", "source": "file", "path": str(prompts_file), "split": None}],
        "sampling": {"max_new_tokens": 2, "batch_size": 1}, "toxicity_scorer": None, "refusal_scorer": None,
    })
    evaluator = Evaluator(eval_config, show_progress=False)
    prompt_set = eval_config.prompt_sets[0]
    prompts = evaluator.prompts(prompt_set)
    samples = evaluator.sample("base", model, tok, prompt_set, prompts)
    assert samples[0]["prompt_ids"] == generated[0]
    text_set = eval_config.reference_texts[0]
    text_examples = evaluator.reference_examples(tok, text_set, evaluator.prompts(text_set))
    assert text_examples[0].prompt_ids == generated[0]
    pairs = [tokenize_record(PreferenceRecord(prompt=p, chosen="a", rejected="b"), i, tok, ("chosen", "rejected"),
                             evaluator.settings) for i, p in enumerate(PROMPTS)]
    assert [ex.prompt_ids for ex in pairs] == generated


def test_training_renders_like_generation_without_a_template(tokenizers):
    """The bug this module fixed: a template-less tokenizer trained on the raw string while
    generation sampled behind ``User: ...\\nAssistant:``."""
    plain = tokenizers["plain"]
    ex = tokenize_record(PreferenceRecord(prompt="Hi", chosen="a", rejected="b"), 0, plain, ("chosen",), TokenizeSettings())
    assert plain.decode(ex.prompt_ids) == "User: Hi\nAssistant:"
    raw = tokenize_record(PreferenceRecord(prompt="Hi", chosen="a", rejected="b"), 0, plain, ("chosen",),
                          TokenizeSettings(chat_template="never"))
    assert raw.prompt_ids == plain("Hi")["input_ids"]


def test_reward_model_reads_the_same_text_as_before_with_a_template(tokenizers):
    """The rendered exchange is the chat template's text of [user, assistant] (what the reward
    model read before), tokenised as prompt ids + the rest."""
    chat = tokenizers["chat"]
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "An answer."}]
    ids = encode_exchange(chat, "Q?", "An answer.")
    assert chat.decode(ids) == chat.apply_chat_template(messages, tokenize=False)
    assert torch.equal(torch.tensor(ids[: len(encode_prompt(chat, "Q?"))]), torch.tensor(encode_prompt(chat, "Q?")))
