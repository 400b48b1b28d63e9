"""Reward models: the ``reward-model`` scorer on tiny random classifiers, ``train-rm`` (Bradley–Terry)
on tiny backbones, and the ``prefalign train-rm`` / ``prefalign score -s reward-model`` commands."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from prefalign.score import make_scorer
from prefalign.score.rm_model import MeanPoolRewardModel, load_reward_model

GOOD = ["thank", "you", "happy", "to", "help", "kindly", "gladly", "welcome"]
BAD = ["shut", "up", "idiot", "go", "away", "stupid", "never", "annoying"]
FILLER = ("the of and to in is was for on that with as by at from his her an which are be this had not but were one all "
          "they their has have been more when there who will would no out so up said what its about than into them can").split()


def separable_pairs(n: int = 48, seed: int = 0) -> list[dict]:
    """Random filler sentences; chosen ends with friendly words, rejected with rude ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        fill = lambda: " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 8)))  # noqa: E731
        rows.append({
            "id": f"q{i}",
            "prompt": f"Question {i}: {fill()}?",
            "chosen": f"{fill()} {' '.join(rng.sample(GOOD, 3))}",
            "rejected": f"{fill()} {' '.join(rng.sample(BAD, 3))}",
        })
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def classifier_folder(tiny_model, tmp_path_factory):
    """A randomly initialised LlamaForSequenceClassification (1 output) with SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("rm-classifier")
    config = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer random BERT with all-MiniLM-L6-v2's tokenizer (the mean-pool path, fast)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from prefalign.train_rm.loop import minilm_folder

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- scorer


def test_reward_model_scorer_on_random_classifier(classifier_folder):
    s = make_scorer("reward-model", {"model": str(classifier_folder), "batch_size": 3}, cache=False, show_progress=False)
    texts = ["Paris.", "The capital of France is Paris, a city on the Seine.", "No.", "I do not know, sorry."]
    prompts = ["Capital of France?"] * 4
    batch = s.score(texts, prompts)
    assert len(batch) == 4 and all(isinstance(x, float) for x in batch)
    alone = [s.score([t], [p])[0] for t, p in zip(texts, prompts)]
    assert batch == pytest.approx(alone, abs=1e-5)  # padding does not change a score
    assert s.score(["Paris."], ["Capital of Peru?"]) != pytest.approx(s.score(["Paris."], ["Capital of France?"]))
    chat = s.score(["Paris."], [[{"role": "user", "content": "Capital of France?"}]])
    assert chat == pytest.approx(batch[:1], abs=1e-5)  # a chat prompt renders like the same text prompt
    assert s.score(["Paris."])[0] == pytest.approx(s.score(["Paris."], [None])[0])


def test_reward_model_multi_label_needs_a_label(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model, num_labels=3, id2label={0: "bad", 1: "ok", 2: "good"},
                                        label2id={"bad": 0, "ok": 1, "good": 2})
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="3 outputs"):
        make_scorer("reward-model", {"model": str(tmp_path)}, cache=False, show_progress=False)
    by_name = make_scorer("reward-model", {"model": str(tmp_path), "label": "good"}, cache=False, show_progress=False)
    by_index = make_scorer("reward-model", {"model": str(tmp_path), "label": 2}, cache=False, show_progress=False)
    assert by_name.score(["hi"]) == by_index.score(["hi"])
    with pytest.raises(ValueError, match="not one of"):
        make_scorer("reward-model", {"model": str(tmp_path), "label": "great"}, cache=False, show_progress=False)


def test_reward_model_cache_id_follows_the_weights(classifier_folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(classifier_folder, copy)
    a = make_scorer("reward-model", {"model": str(copy)}, cache=False, show_progress=False)
    model, _, _ = load_reward_model(copy)
    with torch.no_grad():
        model.score.weight.add_(1.0)
    model.save_pretrained(copy)
    b = make_scorer("reward-model", {"model": str(copy)}, cache=False, show_progress=False)
    assert a.cache_id != b.cache_id


def test_mean_pool_save_and_load(tiny_bert, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    model = MeanPoolRewardModel(AutoModel.from_pretrained(tiny_bert)).eval()
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path)
    loaded, tokenizer, _ = load_reward_model(tmp_path)
    assert isinstance(loaded, MeanPoolRewardModel)
    enc = tokenizer(["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**enc), loaded(**enc))
    s = make_scorer("reward-model", {"model": str(tmp_path)}, cache=False, show_progress=False)
    pair = s.score(["an answer", "another, longer answer"], ["q", "q"])
    assert pair == pytest.approx([s.score(["an answer"], ["q"])[0], s.score(["another, longer answer"], ["q"])[0]], abs=1e-5)


# --------------------------------------------------------------------------- train-rm


def _train(tmp_path, model, **extra):
    from prefalign.train_rm import load_rm_config, train_reward_model

    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs())
    values = {"model": model, "data": data, "output_dir": tmp_path / "rm", "eval_fraction": 0.25,
              "batch_size": 8, "max_length": 64, **extra}
    return train_reward_model(load_rm_config(None, values), show_progress=False)


def test_train_rm_causal_backbone_learns(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_AUTO_DTYPE", "bfloat16")  # the default is fp32 whatever `auto` would pick
    result = _train(tmp_path, tiny_model, lr=2e-3, max_steps=8)
    assert result.head == "sequence-classification" and result.eval_pairs > 5
    assert result.eval_accuracy_after >= 0.9 and result.eval_accuracy_after > result.eval_accuracy_before
    assert (result.model_dir / "config.json").exists()
    log = [json.loads(line) for line in (tmp_path / "rm" / "train_rm_log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and log[-1]["loss"] < log[0]["loss"]
    summary = json.loads((tmp_path / "rm" / "train_rm_summary.json").read_text())
    assert summary["eval_accuracy_after"] == result.eval_accuracy_after and summary["config"]["dtype"] == "float32"

    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(result.model_dir).config.num_labels == 1
    s = make_scorer("reward-model", {"model": str(tmp_path / "rm")}, cache=False, show_progress=False)  # output dir works
    good, bad = s.score(["the one happy to help gladly", "the one shut up idiot"], ["Question?", "Question?"])
    assert good > bad


def test_train_rm_in_bf16_autocast_keeps_fp32_weights_and_learns(tiny_model, tmp_path, monkeypatch):
    import prefalign.train_rm.loop as loop

    seen = []
    real = loop.exchange_rewards

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "exchange_rewards", spy)
    monkeypatch.setenv("PREFALIGN_AUTO_DTYPE", "bfloat16")  # what `auto` picks on a CPU with AVX512-BF16
    result = _train(tmp_path, tiny_model, lr=2e-3, max_steps=8, dtype="auto")
    assert seen and all(seen)  # every training and held-out pass ran under bf16 autocast
    assert result.eval_accuracy_after >= 0.9
    summary = json.loads((tmp_path / "rm" / "train_rm_summary.json").read_text())
    assert summary["config"]["dtype"] == "bfloat16"  # what ran, not "auto"
    assert "bf16 autocast" in (result.model_dir / "README.md").read_text()
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(result.model_dir / "model.safetensors").values()} == {torch.float32}
    log = [json.loads(line) for line in (tmp_path / "rm" / "train_rm_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) for row in log)


def test_train_rm_mean_pool_backbone_learns(tiny_bert, tmp_path):
    result = _train(tmp_path, str(tiny_bert), lr=3e-3, max_steps=16)
    assert result.head == "mean-pool"
    assert result.eval_accuracy_after >= 0.9 and result.eval_accuracy_after > result.eval_accuracy_before
    assert (result.model_dir / "prefalign_reward.json").exists()
    loaded, _, _ = load_reward_model(result.model_dir)
    assert isinstance(loaded, MeanPoolRewardModel)


def test_train_rm_margin_field(tmp_path):
    from prefalign.data.errors import DataError
    from prefalign.data.records import PreferenceRecord
    from prefalign.train_rm.loop import _margins

    recs = [PreferenceRecord(prompt="p", chosen="a", rejected="b", meta={"margin": 2}),
            PreferenceRecord(prompt="p", chosen="a", rejected="b")]
    assert _margins(recs, "margin") == [2.0, 0.0]
    assert _margins(recs, None) == [0.0, 0.0]
    with pytest.raises(DataError, match="margin"):
        _margins([PreferenceRecord(prompt="p", chosen="a", rejected="b", meta={"margin": "big"}, source="f.jsonl:3")], "margin")


def test_train_rm_split_is_stable_by_id(tmp_path):
    from prefalign.train_rm import load_rm_config
    from prefalign.train_rm.loop import load_pairs

    rows = separable_pairs(40)
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", list(reversed(rows)))
    ids = lambda path: sorted(r.meta["id"] for r in load_pairs(load_rm_config(None, {"data": path, "output_dir": tmp_path, "eval_fraction": 0.3}))[1])  # noqa: E731
    assert ids(a) == ids(b) and 0 < len(ids(a)) < 40


# --------------------------------------------------------------------------- CLI


def test_cli_train_rm_then_score(tiny_model, tmp_path):
    from prefalign.cli import app

    data = write_jsonl(tmp_path / "pairs.jsonl", separable_pairs())
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(f"model: {tiny_model}\nlr: 0.002\nmax_length: 64\neval_fraction: 0.25\n")
    res = CliRunner().invoke(app, ["train-rm", "-c", str(cfg), "--data", str(data), "-o", str(tmp_path / "rm"),
                                   "--max-steps", "8", "-q"])
    assert res.exit_code == 0, res.output
    assert "held-out pair accuracy" in flat(res.output) and "sequence-classification" in flat(res.output)

    scfg = tmp_path / "score.yaml"
    scfg.write_text(f"model: {tmp_path / 'rm' / 'model'}\nbatch_size: 16\n")
    out = tmp_path / "scored.jsonl"
    res = CliRunner().invoke(app, ["score", str(data), "-s", "reward-model", "-c", str(scfg), "-o", str(out), "--no-cache", "-q"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["reward_chosen"] > r["reward_rejected"] for r in rows) >= 0.9 * len(rows)


def test_cli_train_rm_config_errors(tmp_path):
    from prefalign.cli import app

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: -1\nbogus: 3\n")
    res = CliRunner().invoke(app, ["train-rm", "-c", str(cfg), "--data", "x.jsonl", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "bad.yaml: field 'lr'" in flat(res.output) and "field 'bogus'" in flat(res.output)
    res = CliRunner().invoke(app, ["train-rm", "--data", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "file not found" in flat(res.output)


def test_reward_model_refuses_a_plain_causal_lm(tiny_model):
    with pytest.raises(ValueError, match="not a trained reward model"):
        make_scorer("reward-model", {"model": tiny_model}, cache=False, show_progress=False)


def test_response_lines_scores_only_the_first_lines(classifier_folder):
    from prefalign.score.reward_model import first_lines

    assert first_lines("(A) Agree\n\nBecause ...\nand more", 1) == "(A) Agree"
    assert first_lines("\n(A) Agree\n\nBecause ...\nand more", 2) == "(A) Agree\nBecause ..."
    assert first_lines("one line  ", None) == "one line  " and first_lines("one line  ", 3) == "one line"
    whole = make_scorer("reward-model", {"model": str(classifier_folder)}, cache=False, show_progress=False)
    cut = make_scorer("reward-model", {"model": str(classifier_folder), "response_lines": 1}, cache=False,
                      show_progress=False)
    texts, prompts = ["(A) Agree\n\nBecause it is true.", "(B) Disagree\nNo reason."], ["Q?", "Q?"]
    assert cut.score(texts, prompts) == pytest.approx(whole.score(["(A) Agree", "(B) Disagree"], prompts), abs=1e-6)
    assert cut.score(texts, prompts) != pytest.approx(whole.score(texts, prompts), abs=1e-6)
    assert cut.cache_id != whole.cache_id  # a cached whole-text score is never reused for a cut one
    with pytest.raises(Exception, match="response_lines"):
        make_scorer("reward-model", {"model": str(classifier_folder), "response_lines": 0}, cache=False, show_progress=False)


def test_option_order_both_averages_each_answer_over_the_two_orders(classifier_folder):
    from prefalign.data.options import swap_options

    question = "I think so. Agree?\n\nChoices:\n (A) Agree\n (B) Disagree\n\nAnswer:"
    plain = make_scorer("reward-model", {"model": str(classifier_folder)}, cache=False, show_progress=False)
    both = make_scorer("reward-model", {"model": str(classifier_folder), "option_order": "both"}, cache=False,
                       show_progress=False)
    assert both.cache_id != plain.cache_id
    texts = ["(A) Agree, because ...", "(B) Disagree", "No options here"]
    prompts = [question, [{"role": "user", "content": question}], "Say something."]
    # An independent computation: the plain scorer on the question as given and on its swapped twin.
    twin = swap_options(question)
    given = plain.score(texts, prompts)
    swapped = plain.score(["(B) Agree, because ...", "(A) Disagree"], [twin, [{"role": "user", "content": twin}]])
    expected = [(given[0] + swapped[0]) / 2, (given[1] + swapped[1]) / 2, given[2]]  # no options: as it is
    assert both.score(texts, prompts) == pytest.approx(expected, abs=1e-5)
    # The same answer in either order of its question gets the same score: no letter can lean.
    assert both.score(["(A) Agree"], [question]) == pytest.approx(both.score(["(B) Agree"], [twin]), abs=1e-5)


def test_shared_prompt_scores_equal_each_exchange_scored_alone(classifier_folder, monkeypatch):
    import prefalign.score.rm_model as rm

    model, tokenizer, _ = load_reward_model(classifier_folder)
    prompts = ["Capital of France?", "Capital of France?", "Name a colour.", [{"role": "user", "content": "Hi"}],
               "Name a colour.", "Capital of France?"]
    responses = ["Paris.", "It is Paris, on the Seine.", "Blue", "Hello there, how can I help?", "Red, or green.", "Lyon"]
    built = []
    real = rm._shared_prompt_batch
    monkeypatch.setattr(rm, "_shared_prompt_batch", lambda *a: built.append(real(*a)) or built[-1])
    with torch.no_grad():
        shared = rm.exchange_rewards(model, tokenizer, prompts, responses, max_length=128)
        # an independent computation: one padded row per exchange through the classifier's own forward
        alone = rm.reward_logits(model, rm.encode_pairs(tokenizer, prompts, responses, max_length=128))
        one_by_one = torch.cat([rm.reward_logits(model, rm.encode_pairs(tokenizer, [p], [r], max_length=128))
                                for p, r in zip(prompts, responses)])
    assert built[0] is not None and built[0][0].input_ids.shape[0] == 3  # three distinct prompts, three blocks
    assert shared.shape == (6, 1)
    assert torch.allclose(shared, alone, atol=1e-5) and torch.allclose(shared, one_by_one, atol=1e-5)
    # exchanges longer than max_length are cut from the left: those take the one-row layout, the rest
    # stay shared, and every score is still the one of its exchange alone
    lengths = [len(rm.encode_pairs(tokenizer, [p], [r], max_length=10**6)["input_ids"][0])
               for p, r in zip(prompts, responses)]
    width = sorted(lengths)[3]
    with torch.no_grad():
        cut = rm.exchange_rewards(model, tokenizer, prompts, responses, max_length=width)
        expected = torch.cat([rm.reward_logits(model, rm.encode_pairs(tokenizer, [p], [r], max_length=width))
                              for p, r in zip(prompts, responses)])
    too_long = [i for i, n in enumerate(lengths) if n > width]
    assert too_long and built[-1][3] == too_long and len(built[-1][1]) == 6 - len(too_long)
    assert torch.allclose(cut, expected, atol=1e-5)


def test_train_rm_weights_each_pairs_loss(tiny_model, tmp_path):
    """A record's ``weight`` multiplies its Bradley-Terry loss: at step 1 (the same model and batch),
    weights of 0.5 give half the loss of unweighted pairs, and weights of 0 a loss of 0 at every step."""
    from prefalign.train_rm import load_rm_config, train_reward_model

    def first_losses(weight, name):
        rows = [row if weight is None else {**row, "weight": weight} for row in separable_pairs()]
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        out = tmp_path / name
        train_reward_model(load_rm_config(None, {"model": tiny_model, "data": data, "output_dir": out, "eval_fraction": 0.25,
                                                 "batch_size": 8, "max_length": 64, "max_steps": 3}), show_progress=False)
        return [json.loads(line)["loss"] for line in (out / "train_rm_log.jsonl").read_text().splitlines()]

    plain, half, zero = first_losses(None, "plain"), first_losses(0.5, "half"), first_losses(0.0, "zero")
    assert half[0] == pytest.approx(0.5 * plain[0], rel=1e-4)
    assert zero == [0.0, 0.0, 0.0]
