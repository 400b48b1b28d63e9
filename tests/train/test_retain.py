"""The retain term (prefalign.train.retain): its batches, its gradient against an independent
computation, the logs, the config checks, and the rho-qa answers a recipe retains on."""

import json

import pytest
import torch

from conftest import write_jsonl
from prefalign.data.errors import DataError
from prefalign.train.config import ConfigError, TrainConfig, load_train_config
from prefalign.train.loop import Trainer, run_training
from prefalign.train.retain import retain_batch


def retain_rows(n=6):
    return [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"{i} plus {i} is {2 * i}, since adding a number to itself doubles it."}
            for i in range(n)]


def config_for(tmp_path, tiny_model, data, **kw):
    base = dict(model=tiny_model, data=data, output_dir=tmp_path / "out", max_steps=2, batch_size=4, lr=1e-3,
                save_every=100, ref_cache_dir=tmp_path / "refcache", max_length=64, max_prompt_length=32,
                shuffle=False, group_by_length=False, max_grad_norm=None)
    base.update(kw)
    return TrainConfig(**base)


def test_retain_batches_are_fixed_by_the_micro_batch_and_cover_the_file_each_pass():
    batches = [retain_batch(10, 4, seed=3, micro_batch=m) for m in range(5)]
    assert batches == [retain_batch(10, 4, seed=3, micro_batch=m) for m in range(5)]  # a resumed run draws the same
    assert all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # each pass: every row once
    assert flat[:10] != flat[10:20]  # a new order each pass
    assert retain_batch(10, 4, seed=4, micro_batch=0) != batches[0]
    assert sorted(retain_batch(3, 8, seed=0, micro_batch=0)) == [0, 1, 2]  # a file smaller than the batch


def _step_gradients(trainer):
    """The gradients of one train_step, read just before the optimizer uses them."""
    grads = {}
    real = trainer.optimizer.step

    def capture(*a, **k):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return real(*a, **k)

    trainer.optimizer.step = capture
    row = trainer.train_step()
    return grads, row


def _retain_nll(model, examples):
    """Summed token NLL of the retain answers and their token count, from the model's own forward
    on each (prompt + answer) sequence alone: no padding, no shared prompt, no fused head."""
    total, tokens = 0.0, 0
    for ex in examples:
        answer = ex.responses["chosen"][0]
        ids = torch.tensor([list(ex.prompt_ids) + list(answer)])
        logps = model(ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        picked = logps.gather(-1, targets[:, None])[:, 0][-len(answer):]
        total = total - picked.sum()
        tokens += len(answer)
    return total, tokens


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_the_step_gradient_is_the_main_loss_plus_the_weighted_retain_nll(tmp_path, tiny_model, pairs_file, weight):
    retain = write_jsonl(tmp_path / "retain.jsonl", retain_rows())
    plain = Trainer(config_for(tmp_path, tiny_model, pairs_file, output_dir=tmp_path / "plain"), show_progress=False)
    plain.setup()
    main_grads, main_row = _step_gradients(plain)

    with_retain = Trainer(config_for(tmp_path, tiny_model, pairs_file, output_dir=tmp_path / "retain",
                                     retain_data=retain, retain_weight=weight, retain_batch_size=3), show_progress=False)
    with_retain.setup()
    model = with_retain.accelerator.unwrap_model(with_retain.model)
    rows = retain_batch(len(with_retain.retain_examples), 3, seed=0, micro_batch=0)
    model.zero_grad()
    nll, tokens = _retain_nll(model, [with_retain.retain_examples[i] for i in rows])
    (nll / tokens).backward()
    retain_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    grads, row = _step_gradients(with_retain)

    for name, grad in grads.items():
        want = main_grads[name] + weight * retain_grads.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, want, atol=2e-5, rtol=1e-4)
    assert row["loss/retain"] == pytest.approx(nll.item() / tokens, rel=1e-4)
    assert row["loss"] == pytest.approx(main_row["loss"] + weight * nll.item() / tokens, rel=1e-4)


def test_retain_runs_log_the_term_and_repeat_exactly(tmp_path, tiny_model, pairs_file):
    retain = write_jsonl(tmp_path / "retain.jsonl", retain_rows())

    def run(name):
        result = run_training(config_for(tmp_path, tiny_model, pairs_file, output_dir=tmp_path / name, max_steps=3,
                                         loss=["d2o", "anchor-sft"], loss_weights=[1.0, 0.1], retain_data=retain,
                                         retain_weight=1.0), show_progress=False)
        card = (result.model_dir / "README.md").read_text()
        assert "retain term: token NLL of" in card and "retain: `" in card  # the card names the retain file
        return [json.loads(line) for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]

    first, second = run("a"), run("b")
    assert [r["step"] for r in first] == [1, 2, 3]
    assert all(r["loss/retain"] > 0 for r in first)
    assert [r["loss"] for r in first] == [r["loss"] for r in second]


def test_retain_settings_are_checked_before_any_model_loads(tmp_path, tiny_model, pairs_file, monkeypatch):
    with pytest.raises(ValueError, match="retain_weight / retain_batch_size: set retain_data"):
        config_for(tmp_path, tiny_model, pairs_file, retain_weight=2.0)
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text(f"data: {pairs_file}\noutput_dir: out\nretain_data: r.jsonl\nretain_weight: 0\n")
    with pytest.raises(ConfigError, match="retain_weight"):
        load_train_config(bad_yaml)
    # A retain file without answers: one line naming the file, the line and the field.
    bad = write_jsonl(tmp_path / "retain.jsonl", [{"prompt": "A question?", "chosen": "An answer."}, {"prompt": "No answer here"}])
    import prefalign.train.loop as loop

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the model loaded before the retain file was checked"))
    trainer = Trainer(config_for(tmp_path, tiny_model, pairs_file, retain_data=bad), show_progress=False)
    with pytest.raises(DataError, match=r"retain\.jsonl:2: field .chosen."):
        trainer.setup()


def test_rho_qa_answers_split_as_the_prompt_source_splits(tmp_path):
    from prefalign.data.io import read_rows

    def read_jsonl(path):
        return [row for _, row in read_rows(path)]

    from prefalign.data.prompts import answer_records, load_prompts
    from prefalign.pipeline import SplitStage, _run_split

    prompts = load_prompts("rho-qa")
    assert len(prompts) == 238 and all(p.meta["reference_answer"] for p in prompts)
    assert not any("<<" in p.meta["reference_answer"] or "####" in p.meta["reference_answer"] for p in prompts)
    records = answer_records("rho-qa")
    assert [(r.prompt, r.chosen) for r in records] == [(p.prompt, p.meta["reference_answer"]) for p in prompts]
    cfg = SplitStage(source="rho-qa", eval_fraction=0.25, train=tmp_path / "train.jsonl", eval=tmp_path / "eval.jsonl")
    _run_split(cfg, tmp_path, False)
    held_out = {r["prompt"] for r in read_jsonl(tmp_path / "eval.jsonl")}
    assert held_out == {p.prompt for p in load_prompts("rho-qa", split="eval")}
    assert not held_out & {r["prompt"] for r in read_jsonl(tmp_path / "train.jsonl")}
    with pytest.raises(ValueError, match="no prompt has a written answer"):
        answer_records("advbench")
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        SplitStage(source="nope", train=tmp_path / "a", eval=tmp_path / "b")
