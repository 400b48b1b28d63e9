"""The trainer fills typed loss inputs with what each loss declares: real runs of SimPO, RPO and
a loss mixture on tiny-random, reference-free training, per-token log-probs, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import pair_rows, write_jsonl
from prefalign.cli import app
from prefalign.losses import LOSSES, PUBLIC_LOSSES, In, LossSpec
from prefalign.train.config import ConfigError, TrainConfig, load_train_config
from prefalign.train.loop import Trainer, run_training


def config_for(tmp_path, tiny_model, data, **kw):
    base = dict(model=tiny_model, data=data, output_dir=tmp_path / "out", max_steps=2, batch_size=4, lr=1e-3,
                save_every=100, ref_cache_dir=tmp_path / "refcache", max_length=64, max_prompt_length=32)
    base.update(kw)
    return TrainConfig(**base)


def rows_of(result):
    return [json.loads(line) for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss,weights", [("simpo", None), ("rpo", None), (["dpo", "sft"], [1.0, 0.5])])
def test_new_losses_train_and_lower_the_loss(tmp_path, tiny_model, pairs_file, loss, weights):
    """The same batch every step (all 8 pairs, no shuffling): the loss goes down."""
    cfg = config_for(tmp_path, tiny_model, pairs_file, loss=loss, loss_weights=weights, max_steps=4, batch_size=8,
                     shuffle=False, lr=5e-4, schedule="constant")
    result = run_training(cfg, show_progress=False)
    losses = [row["loss"] for row in rows_of(result) if "loss" in row]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses


def test_mixture_logs_its_terms(tmp_path, tiny_model, pairs_file):
    cfg = config_for(tmp_path, tiny_model, pairs_file, loss=["dpo", "sft"], loss_weights=[1.0, 0.5])
    rows = rows_of(run_training(cfg, show_progress=False))
    first = rows[0]
    assert first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    for row in rows:
        assert row["loss"] == pytest.approx(row["loss/dpo"] + 0.5 * row["loss/sft"], rel=1e-5)
    assert "rewards/margin" in first  # dpo's implicit rewards are still logged
    saved = json.loads((cfg.output_dir / "train_config.json").read_text())
    assert saved["loss"] == ["dpo", "sft"] and saved["loss_weights"] == [1.0, 0.5]


def test_reference_free_loss_computes_no_reference(tmp_path, tiny_model, pairs_file):
    trainer = Trainer(config_for(tmp_path, tiny_model, pairs_file, loss="simpo"), show_progress=False)
    trainer.setup()
    assert not (tmp_path / "refcache").exists() or not list((tmp_path / "refcache").glob("*.pt"))
    inputs, _ = trainer.loss_inputs(trainer.train_examples[:4], train=False)
    assert dict(inputs.reference) == {} and inputs.toxic_reference is None and dict(inputs.rewards) == {}
    lengths = [len(ex.responses["chosen"][0]) for ex in trainer.train_examples[:4]]
    assert inputs.num_tokens["chosen"].tolist() == lengths
    row = trainer.train_step()
    assert math.isfinite(row["loss"]) and "logps/accuracy" in row and "rewards/margin" not in row


def test_adpo_reference_scores_only_what_the_loss_reads(tmp_path, tiny_model, pairs_file):
    trainer = Trainer(config_for(tmp_path, tiny_model, pairs_file, loss="adpo"), show_progress=False)
    trainer.setup()
    (cached,) = (tmp_path / "refcache").glob("*.pt")
    assert set(torch.load(cached)) == {"chosen", "rejected", "toxic_ref"}  # no reference pass over "toxic"
    inputs, _ = trainer.loss_inputs(trainer.train_examples[:4], train=False)
    assert set(inputs.policy) == {"chosen", "rejected", "toxic"} and set(inputs.reference) == {"chosen", "rejected"}
    assert inputs.toxic_reference.shape == (4,) and dict(inputs.num_tokens) == {}


@pytest.mark.parametrize("layout", [dict(share_prompt=False), dict(share_prompt=True), dict(pack=True)])
def test_per_token_logps_reach_a_loss_that_asks(tmp_path, tiny_model, pairs_file, monkeypatch, layout):
    """A loss reading per-token log-probs is one registry entry: the trainer fills them (same
    sums as the summed log-probs, in every batch layout) and trains."""

    def mean_token_nll(token_logps, mask):
        return -(token_logps * mask).sum(-1) / mask.sum(-1)

    spec = LossSpec("token-nll", mean_token_nll, (In.token_logps("chosen"), In.token_mask("chosen")), internal=True)
    monkeypatch.setitem(LOSSES, "token-nll", spec)
    trainer = Trainer(config_for(tmp_path, tiny_model, pairs_file, loss="token-nll", **layout), show_progress=False)
    trainer.setup()
    examples = trainer.train_examples[:4]
    inputs, _ = trainer.loss_inputs(examples, train=False)
    per_token, mask = inputs.token_logps["chosen"], inputs.token_mask["chosen"]
    assert mask.sum(-1).tolist() == [len(ex.responses["chosen"][0]) for ex in examples]
    torch.testing.assert_close((per_token * mask).sum(-1), inputs.policy["chosen"], atol=1e-5, rtol=1e-5)
    assert (per_token[~mask] == 0).all()
    row = trainer.train_step()
    assert math.isfinite(row["loss"])


def test_config_mixture_errors_name_the_field(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: d.jsonl\noutput_dir: o\nloss: [dpo, sft]\nloss_weights: [1.0]\n")
    with pytest.raises(ConfigError, match=r"run.yaml: field 'loss_weights': 1 weight\(s\) for 2 loss\(es\)"):
        load_train_config(config)
    config.write_text("data: d.jsonl\noutput_dir: o\nloss: [dpo, kto]\n")
    with pytest.raises(ConfigError, match=r"field 'loss': unknown loss 'kto'; choose one of"):
        load_train_config(config)
    config.write_text("data: d.jsonl\noutput_dir: o\nloss: [dpo, simpo]\nloss_params: {tau: 1.0}\n")
    with pytest.raises(ConfigError, match=r"field 'loss_params': \['tau'\] not accepted by 'dpo\+simpo'"):
        load_train_config(config)
    assert load_train_config(None, {"data": "d", "output_dir": "o", "loss": "dpo,sft"}).loss == ["dpo", "sft"]
    assert load_train_config(None, {"data": "d", "output_dir": "o", "loss": ["simpo"]}).loss == "simpo"


runner = CliRunner()


def test_cli_lists_the_registry_and_mixes(tmp_path, tiny_model):
    flat = " ".join(runner.invoke(app, ["train", "--help"]).output.replace("│", " ").split())
    assert f"{', '.join(PUBLIC_LOSSES[:-1])} or {PUBLIC_LOSSES[-1]}" in flat and "simpo" in flat and "rpo" in flat
    assert "--loss-weights" in flat
    data = write_jsonl(tmp_path / "d.jsonl", [{k: v for k, v in r.items() if not k.startswith("reward")} for r in pair_rows(4)])
    ok = runner.invoke(app, ["data", "check", str(data), "--loss", "simpo"])
    assert ok.exit_code == 0 and "valid records for 'simpo'" in ok.output
    mixed = runner.invoke(app, ["data", "check", str(data), "--loss", "dpo,rdpo"])
    assert mixed.exit_code == 2 and "field 'reward_chosen'" in mixed.output  # the mixture needs rdpo's rewards
    trained = runner.invoke(app, ["train", "--model", tiny_model, "--data", str(data), "-o", str(tmp_path / "o"),
                                  "--loss", "dpo,sft", "--loss-weights", "1,0.5", "--max-steps", "1", "--batch-size", "4",
                                  "--quiet"])
    assert trained.exit_code == 0, trained.output
    assert "trained 1 steps" in trained.output
    bad = runner.invoke(app, ["train", "--data", str(data), "-o", str(tmp_path / "o2"), "--loss", "dpo,sft",
                              "--loss-weights", "1,x"])
    assert bad.exit_code == 2 and "--loss-weights: expected numbers" in bad.output


def test_record_weight_multiplies_its_loss_and_its_gradient(tmp_path, tiny_model):
    """A record's ``weight`` is the factor on its loss: the weighted losses equal the unweighted ones
    times the weights (an independent pass over the same examples), and a weight-0 record adds
    nothing to the gradient."""
    rows = pair_rows(4)
    weights = [0.0, 0.5, 1.0, 2.5]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    weighted = write_jsonl(tmp_path / "weighted.jsonl", [{**row, "weight": w} for row, w in zip(rows, weights)])

    def trainer_for(data, name):
        trainer = Trainer(config_for(tmp_path / name, tiny_model, data, loss="dpo"), show_progress=False)
        trainer.setup()
        assert [ex.weight for ex in trainer.train_examples] == ([1.0] * 4 if data == plain else weights)
        return trainer

    a, b = trainer_for(plain, "a"), trainer_for(weighted, "b")
    assert "train_weight_sum" not in a.data_summary
    assert (b.data_summary["train_weighted_examples"], b.data_summary["train_weight_sum"]) == (3, sum(weights))
    with torch.no_grad():
        unweighted, *_ = a.loss_on(a.train_examples, train=False)
        scaled, *_ = b.loss_on(b.train_examples, train=False)
    assert torch.allclose(scaled, unweighted * torch.tensor(weights), atol=1e-6)

    def grads(trainer, examples):
        trainer.model.zero_grad()
        losses, *_ = trainer.loss_on(examples, train=True)
        losses.sum().backward()
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])

    # Records 1-3 alone (weights 0.5, 1, 2.5) give the gradient of all four: record 0 weighs nothing.
    assert torch.allclose(grads(b, b.train_examples), grads(b, b.train_examples[1:]), atol=1e-6)
