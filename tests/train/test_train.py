"""The trainer end to end on tiny-random: every loss trains, references, caching, saving, NaN."""

import json

import pytest
import torch

from conftest import pair_rows, write_jsonl
from prefalign.losses import LOSSES
from prefalign.models.loading import load_model
from prefalign.train.config import ConfigError, TrainConfig, load_train_config
from prefalign.train.loop import Trainer, TrainingDiverged, run_training


def config_for(tmp_path, tiny_model, data, **kw):
    base = dict(model=tiny_model, data=data, output_dir=tmp_path / "out", max_steps=2, batch_size=4, lr=1e-3,
                save_every=100, ref_cache_dir=tmp_path / "refcache", max_length=64, max_prompt_length=32)
    base.update(kw)
    return TrainConfig(**base)


def params_of(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_and_changes_parameters(tmp_path, tiny_model, pairs_file, loss):
    result = run_training(config_for(tmp_path, tiny_model, pairs_file, loss=loss), show_progress=False)
    assert result.steps == 2
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    before, after = params_of(__import__("pathlib").Path(tiny_model)), params_of(result.model_dir)
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert changed, "no parameter moved"
    # The saved folder is a plain HF model.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert reloaded.config.num_hidden_layers == 2


def test_logged_metrics_per_step(tmp_path, tiny_model, pairs_file):
    result = run_training(config_for(tmp_path, tiny_model, pairs_file, max_steps=3), show_progress=False)
    rows = [json.loads(line) for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "grad_norm", "lr", "tokens_per_s"):
        assert key in rows[0]
    # At step 1 policy == reference, so implicit rewards are zero and DPO's loss is log 2.
    assert abs(rows[0]["loss"] - 0.6931) < 1e-3
    assert abs(rows[0]["rewards/margin"]) < 1e-4


def test_one_policy_forward_per_batch(tmp_path, tiny_model, pairs_file):
    trainer = Trainer(config_for(tmp_path, tiny_model, pairs_file, loss="adpo"), show_progress=False)
    trainer.setup()
    calls = []
    # The decoder runs in every path (alone, or inside the model's own forward).
    hook = trainer.model.get_decoder().register_forward_hook(lambda m, a, k: calls.append(1))
    trainer.train_step()
    hook.remove()
    assert len(calls) == 1  # chosen, rejected and toxic rows go through together


@pytest.mark.slow
def test_reference_cache_is_reused_and_matches_a_frozen_copy(tmp_path, tiny_model, pairs_file):
    cfg = config_for(tmp_path, tiny_model, pairs_file, max_steps=1)
    run_training(cfg, show_progress=False)
    cached = list((tmp_path / "refcache").glob("*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run_training(cfg.model_copy(update={"output_dir": tmp_path / "out2"}), show_progress=False)
    assert cached[0].stat().st_mtime_ns == stamp  # hit, not recomputed
    # A different max_length changes the tokens, hence the key.
    run_training(cfg.model_copy(update={"output_dir": tmp_path / "out3", "max_length": 48}), show_progress=False)
    assert len(list((tmp_path / "refcache").glob("*.pt"))) == 2

    table = torch.load(cached[0])
    copy_trainer = Trainer(cfg.model_copy(update={"reference": "copy", "output_dir": tmp_path / "out4"}), show_progress=False)
    copy_trainer.setup()
    examples = copy_trainer.train_examples
    from_copy = copy_trainer.reference.logps(examples)
    for group in ("chosen", "rejected"):
        assert torch.allclose(from_copy[group], table[group], atol=1e-4)


def test_lora_reference_is_the_policy_with_adapters_disabled(tmp_path, tiny_model, pairs_file):
    cfg = config_for(tmp_path, tiny_model, pairs_file, lora={"r": 4}, reference="disable-adapters", max_steps=3, lr=1e-2)
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    for _ in range(3):
        trainer.train_step()
    examples = trainer.train_examples[:4]
    ref = trainer.reference.logps(examples)
    base = Trainer(config_for(tmp_path, tiny_model, pairs_file, reference="copy", output_dir=tmp_path / "base"), show_progress=False)
    base.setup()
    expected = base.reference.logps(examples)
    assert torch.allclose(ref["chosen"], expected["chosen"], atol=1e-4)
    # ...while the policy itself has moved away from it.
    _, policy, _, _ = trainer.loss_on(examples, train=False)
    assert not torch.allclose(policy["chosen"], expected["chosen"], atol=1e-3)
    # No frozen copy was made: the reference runs the policy's own weights.
    assert trainer.reference.scorer.model is trainer.model


def test_lora_saves_adapters_and_merged_model(tmp_path, tiny_model, pairs_file):
    result = run_training(config_for(tmp_path, tiny_model, pairs_file, lora={"r": 4}, merge=True, lr=1e-2), show_progress=False)
    assert (result.adapter_dir / "adapter_config.json").exists()
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result.model_dir)
    with_adapter = AutoPeftModelForCausalLM.from_pretrained(result.adapter_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-4)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model, pairs_file, monkeypatch):
    cfg = config_for(tmp_path, tiny_model, pairs_file, max_steps=4, save_every=1)
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    real = trainer.loss_on

    def poisoned(examples, *, train):
        losses, *rest = real(examples, train=train)
        if trainer.step >= 2:
            losses = losses * float("nan")
        return (losses, *rest)

    monkeypatch.setattr(trainer, "loss_on", poisoned)
    # The weights saved after step 2 are the ones that gave the NaN at step 3: that checkpoint is
    # not kept, and the message names step 1's, whose weights gave a finite loss at step 2.
    with pytest.raises(TrainingDiverged, match=r"step 3: the loss is nan; last good checkpoint: .*step-00000001 .*--resume --lr"):
        trainer.train()
    assert (cfg.output_dir / "checkpoints" / "step-00000001" / "trainer_state.json").exists()
    assert not (cfg.output_dir / "checkpoints" / "step-00000002").exists()
    assert not list((cfg.output_dir / "checkpoints").glob(".partial-*"))  # the unproven one is gone


def test_grad_accumulation_matches_a_bigger_batch(tmp_path, tiny_model, pairs_file):
    def one_step(**kw):
        t = Trainer(config_for(tmp_path, tiny_model, pairs_file, output_dir=tmp_path / str(kw), max_steps=1, **kw), show_progress=False)
        t.setup()
        t.train_step()
        return {k: v.detach().clone() for k, v in t.model.named_parameters()}

    # In file order, 2 micro-batches of 2 hold the same 4 examples as 1 batch of 4.
    a = one_step(batch_size=4, grad_accum=1, shuffle=False, group_by_length=False)
    b = one_step(batch_size=2, grad_accum=2, shuffle=False, group_by_length=False)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_config_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("data: x.jsonl\noutput_dir: out\nloss: dpo\nbatch_size: -1\nlearning_rat: 3\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(bad)
    text = str(err.value)
    assert str(bad) in text and "batch_size" in text and "learning_rat" in text
    with pytest.raises(ConfigError, match="loss.*unknown loss 'dpp'"):
        load_train_config(None, {"data": "x", "output_dir": "o", "loss": "dpp"})
    with pytest.raises(ConfigError, match="tau"):
        load_train_config(None, {"data": "x", "output_dir": "o", "loss": "dpo", "loss_params": {"tau": 1.0}})


def test_odpo_drops_pairs_without_positive_gap(tmp_path, tiny_model):
    rows = pair_rows()
    rows[0]["reward_chosen"] = 0.0  # gap -0.2
    rows[1]["reward_chosen"] = rows[1]["reward_rejected"]  # gap 0
    data = write_jsonl(tmp_path / "odpo.jsonl", rows)
    result = run_training(config_for(tmp_path, tiny_model, data, loss="odpo", max_steps=1), show_progress=False)
    assert result.data_summary["train_dropped_nonpositive_reward_gap"] == 2
    assert result.data_summary["train_examples"] == 6


def test_bad_data_fails_before_any_model_loads(tmp_path, tiny_model, monkeypatch):
    rows = pair_rows()
    del rows[3]["rejected"]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    import prefalign.train.loop as loop

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    with pytest.raises(Exception, match=r"bad.jsonl:4: field 'rejected'"):
        run_training(config_for(tmp_path, tiny_model, data), show_progress=False)


def test_epoch_batches_cover_every_example_once_and_group_lengths():
    from prefalign.train.loop import epoch_batches

    lengths = [(i * 37) % 101 for i in range(200)]
    for kwargs in ({}, {"lengths": lengths}, {"shuffle": False}):
        batches = epoch_batches(200, 8, seed=3, epoch=1, **kwargs)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(200))
        assert batches == epoch_batches(200, 8, seed=3, epoch=1, **kwargs)  # deterministic
    assert epoch_batches(200, 8, 3, 1) != epoch_batches(200, 8, 3, 2)  # a new order each epoch

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(epoch_batches(200, 8, 3, 1, lengths=lengths)) < padding(epoch_batches(200, 8, 3, 1)) / 3


def test_d2o_online_anchors_are_resampled_from_the_policy(tmp_path, tiny_model, pairs_file):
    cfg = config_for(tmp_path, tiny_model, pairs_file, loss="d2o", reference="copy", anchor_refresh_every=1,
                     anchor_max_new_tokens=6, max_steps=2)
    trainer = Trainer(cfg, show_progress=False)
    trainer.setup()
    before = {ex.index: [list(a) for a in ex.responses["anchors"]] for ex in trainer.train_examples}
    upcoming = {ex.index for ex in trainer.upcoming_examples(1)}
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    changed = {i for i, ex in ((ex.index, ex) for ex in trainer.train_examples) if ex.responses["anchors"] != before[i]}
    assert changed == upcoming  # exactly the batch about to be used got new anchors
    for i in changed:
        anchors = trainer.train_examples[i].responses["anchors"]
        eos = trainer.tokenizer.eos_token_id
        assert len(anchors) == 2
        # Ended by the model (one end token, last) or cut at the 6-token limit (no end token added).
        assert all((a[-1] == eos and eos not in a[:-1] and len(a) <= 7) or (len(a) == 6 and eos not in a) for a in anchors)
    assert set(trainer._state()["refreshed_anchors"]) == {str(i) for i in changed}


def test_online_anchors_need_a_live_reference(tmp_path, tiny_model, pairs_file):
    with pytest.raises(ValueError, match="live reference"):
        config_for(tmp_path, tiny_model, pairs_file, loss="d2o", anchor_refresh_every=2)
    with pytest.raises(ValueError, match="uses no anchors"):
        config_for(tmp_path, tiny_model, pairs_file, loss="dpo", reference="copy", anchor_refresh_every=2)


def test_packed_training_takes_the_same_steps_as_the_plain_layout(tmp_path, tiny_model, pairs_file):
    losses = {}
    for name, extra in {"plain": {"share_prompt": False}, "packed": {"pack": True}}.items():
        cfg = TrainConfig(model=tiny_model, data=pairs_file, output_dir=tmp_path / name, loss="dpo", max_steps=3,
                          batch_size=4, lr=1e-4, save_every=100, ref_cache_dir=tmp_path / f"ref-{name}", **extra)
        trainer = Trainer(cfg, show_progress=False)
        trainer.setup()
        assert trainer.pack == (name == "packed")
        losses[name] = [trainer.train_step()["loss"] for _ in range(3)]
    assert losses["plain"][0] != losses["plain"][2]  # it trained
    for a, b in zip(losses["plain"], losses["packed"]):
        assert abs(a - b) < 1e-4


def test_a_snapshot_holds_the_weights_of_a_run_stopped_at_its_step(tmp_path, tiny_model, pairs_file):
    # Constant lr and file order: a 2-step run makes the same updates as the first 2 steps of a 4-step run.
    common = dict(schedule="constant", shuffle=False, group_by_length=False)
    long = run_training(config_for(tmp_path, tiny_model, pairs_file, max_steps=4, snapshot_steps=[2, 4], **common),
                        show_progress=False)
    short = run_training(config_for(tmp_path, tiny_model, pairs_file, max_steps=2, output_dir=tmp_path / "short", **common),
                         show_progress=False)
    assert long.snapshots == {2: long.output_dir / "model-step2", 4: long.output_dir / "model-step4"}
    at_2, at_4, final = params_of(long.snapshots[2]), params_of(long.snapshots[4]), params_of(long.model_dir)
    assert all(torch.allclose(at_2[k], v, atol=1e-6) for k, v in params_of(short.model_dir).items())
    assert all(torch.equal(at_4[k], v) for k, v in final.items())
    assert any(not torch.equal(at_2[k], v) for k, v in final.items())
    # Each snapshot folder is a plain HF model with its own card: its step and its logged loss.
    card = (long.snapshots[2] / "README.md").read_text()
    loss_2 = next(r["loss"] for r in long.history if r["step"] == 2)
    assert "- steps: 2\n" in card, card
    assert f"{loss_2:.4f}" in card
    summary = json.loads((long.output_dir / "train_summary.json").read_text())
    assert summary["snapshots"] == {"2": str(long.snapshots[2]), "4": str(long.snapshots[4])}


def test_a_lora_snapshot_is_merged_from_its_saved_adapter_and_training_goes_on(tmp_path, tiny_model, pairs_file):
    result = run_training(config_for(tmp_path, tiny_model, pairs_file, lora={"r": 4}, merge=True, lr=1e-2, max_steps=3,
                                     snapshot_steps=[1]), show_progress=False)
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logits = {}
    with torch.no_grad():
        for name in ("model-step1", "model"):
            logits[name] = AutoModelForCausalLM.from_pretrained(result.output_dir / name)(ids).logits
        snapshot_adapter = AutoPeftModelForCausalLM.from_pretrained(result.output_dir / "adapter-step1")(ids).logits
    assert result.snapshots == {1: result.output_dir / "model-step1"}
    assert torch.allclose(logits["model-step1"], snapshot_adapter, atol=1e-4)
    assert not torch.allclose(logits["model-step1"], logits["model"], atol=1e-4)  # steps 2 and 3 trained the adapters
    assert (result.output_dir / "adapter-step1" / "README.md").exists()


def test_a_snapshot_past_the_last_step_is_refused_before_training(tmp_path, tiny_model, pairs_file):
    with pytest.raises(ConfigError, match=r"snapshot_steps: \[5\] past the run's 2 steps"):
        run_training(config_for(tmp_path, tiny_model, pairs_file, snapshot_steps=[1, 5]), show_progress=False)
    assert not (tmp_path / "out" / "train_log.jsonl").exists()
    with pytest.raises(ValueError, match="snapshot_steps: steps count from 1"):
        config_for(tmp_path, tiny_model, pairs_file, snapshot_steps=[0])
