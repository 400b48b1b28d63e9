"""The reference factory: every kind answers ``logps(examples)`` with the starting weights' log-probs,
ADPO's toxic reference comes from the toxic model or the reference's own pass, and a new kind is
one builder and one registry line."""

import pytest
import torch

from prefalign.models.loading import load_model
from prefalign.train.config import TrainConfig
from prefalign.train.loop import Trainer
from prefalign.train.reference import (
    REFERENCE_KINDS, ModelScorer, NoReference, ReferenceKind, ScoredReference, score_examples, toxic_views,
)


def config_for(tmp_path, tiny_model, data, name="out", **kw):
    base = dict(model=tiny_model, data=data, output_dir=tmp_path / name, max_steps=1, batch_size=4, lr=1e-3,
                save_every=100, ref_cache_dir=tmp_path / "refcache", max_length=64, max_prompt_length=32)
    return TrainConfig(**{**base, **kw})


def reference_of(config):
    trainer = Trainer(config, show_progress=False)
    trainer.setup()
    return trainer, trainer.reference.logps(trainer.train_examples)


def plain_scores(model_name, examples, groups, pad_id):
    """The starting weights, scored directly: what every kind must give."""
    return score_examples(load_model(model_name), examples, groups, pad_id)


@pytest.mark.parametrize("kind, extra", [("precompute", {}), ("copy", {}), ("copy", {"lora": {"r": 4}}),
                                         ("disable-adapters", {"lora": {"r": 4}}), ("precompute", {"lora": {"r": 4}})])
def test_every_kind_scores_the_starting_weights(tmp_path, tiny_model, pairs_file, kind, extra):
    trainer, got = reference_of(config_for(tmp_path, tiny_model, pairs_file, reference=kind, **extra))
    expected = plain_scores(tiny_model, trainer.train_examples, ("chosen", "rejected"), trainer.pad_id)
    assert set(got) == {"chosen", "rejected"}
    for group in got:
        torch.testing.assert_close(got[group], expected[group], atol=1e-5, rtol=1e-5)


def test_a_reference_free_loss_gets_no_reference(tmp_path, tiny_model, pairs_file):
    trainer, got = reference_of(config_for(tmp_path, tiny_model, pairs_file, loss="sft"))
    assert isinstance(trainer.reference, NoReference) and got == {}


def another_model(tmp_path, tiny_model) -> str:
    """tiny-random with other weights (a stand-in for the toxic-control model)."""
    from prefalign.models.loading import load_tokenizer

    model = load_model(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(tmp_path / "other")
    load_tokenizer(tiny_model).save_pretrained(tmp_path / "other")
    return str(tmp_path / "other")


def test_adpo_toxic_reference_is_the_toxic_model_behind_the_control_token(tmp_path, tiny_model, pairs_file):
    toxic_model = another_model(tmp_path, tiny_model)
    trainer, got = reference_of(config_for(tmp_path, tiny_model, pairs_file, loss="adpo", reference="copy",
                                           toxic_reference_model=toxic_model))
    examples = trainer.train_examples
    views = toxic_views(examples)
    assert [v.prompt_ids for v in views] == [ex.toxic_prompt_ids for ex in examples]
    expected = plain_scores(toxic_model, views, ("toxic_ref",), trainer.pad_id)
    torch.testing.assert_close(got["toxic_ref"], expected["toxic_ref"], atol=1e-5, rtol=1e-5)
    own = plain_scores(tiny_model, views, ("toxic_ref",), trainer.pad_id)
    assert not torch.allclose(got["toxic_ref"], own["toxic_ref"], atol=1e-3)  # not the reference's
    starting = plain_scores(tiny_model, examples, ("chosen", "rejected"), trainer.pad_id)
    torch.testing.assert_close(got["chosen"], starting["chosen"], atol=1e-5, rtol=1e-5)


def test_without_a_toxic_model_the_reference_scores_toxic_rows_in_its_own_pass(tmp_path, tiny_model, pairs_file):
    trainer, _ = reference_of(config_for(tmp_path, tiny_model, pairs_file, loss="adpo", reference="copy"))
    examples = trainer.train_examples[:4]
    calls = []
    reference = trainer.reference
    hook = reference.scorer.model.get_decoder().register_forward_hook(lambda m, a, k: calls.append(1))
    got = reference.logps(examples)
    hook.remove()
    assert len(calls) == 1 and set(got) == {"chosen", "rejected", "toxic_ref"}
    apart = plain_scores(tiny_model, toxic_views(examples), ("toxic_ref",), trainer.pad_id)["toxic_ref"]
    torch.testing.assert_close(got["toxic_ref"], apart, atol=1e-5, rtol=1e-5)


def test_precomputed_reference_serves_training_and_evaluation_examples(tmp_path, tiny_model, pairs_file):
    trainer, _ = reference_of(config_for(tmp_path, tiny_model, pairs_file, eval_fraction=0.25))
    assert trainer.eval_examples
    both = [*trainer.train_examples[:2], *trainer.eval_examples]
    expected = plain_scores(tiny_model, both, ("chosen", "rejected"), trainer.pad_id)
    got = trainer.reference.logps(both)
    for group in ("chosen", "rejected"):
        torch.testing.assert_close(got[group], expected[group], atol=1e-5, rtol=1e-5)
    assert len(list((tmp_path / "refcache").glob("*.pt"))) == 2  # one table per split


def test_a_new_kind_is_one_builder_and_one_registry_line(tmp_path, tiny_model, pairs_file, monkeypatch):
    """What a newcomer writes: a builder from the setup and its ReferenceKind line. The config
    accepts the name, its properties drive the checks, and the trainer asks it for log-probs."""
    built = []

    def halved(setup):  # e.g. a reference at half the starting weights' log-probs
        built.append(setup)
        inner = ScoredReference(ModelScorer(setup.policy, setup.pad_id), tuple(setup.spec.reference_groups))

        class Halved:
            def logps(self, examples):
                return {g: v / 2 for g, v in inner.logps(examples).items()}

        return Halved()

    monkeypatch.setitem(REFERENCE_KINDS, "halved", ReferenceKind("halved", halved, "half the log-probs", live=False))
    with pytest.raises(ValueError, match="live reference, not 'halved'"):
        config_for(tmp_path, tiny_model, pairs_file, reference="halved", loss="d2o", anchor_refresh_every=1)
    trainer, got = reference_of(config_for(tmp_path, tiny_model, pairs_file, reference="halved"))
    assert len(built) == 1 and built[0].spec is trainer.spec
    expected = plain_scores(tiny_model, trainer.train_examples, ("chosen", "rejected"), trainer.pad_id)
    torch.testing.assert_close(got["chosen"], expected["chosen"] / 2, atol=1e-5, rtol=1e-5)
    assert trainer.train_step()["loss"] > 0


def test_unknown_and_misplaced_kinds_are_config_errors(tmp_path, tiny_model, pairs_file):
    with pytest.raises(ValueError, match="unknown reference kind 'frozen'; choose one of auto, precompute, copy, disable-adapters"):
        config_for(tmp_path, tiny_model, pairs_file, reference="frozen")
    with pytest.raises(ValueError, match="'disable-adapters' needs LoRA"):
        config_for(tmp_path, tiny_model, pairs_file, reference="disable-adapters")


@pytest.mark.parametrize("kind, extra", [("precompute", {}), ("copy", {}), ("disable-adapters", {"lora": {"r": 4}})])
def test_every_kind_scores_in_the_policys_precision(tmp_path, tiny_model, pairs_file, kind, extra, monkeypatch):
    import prefalign.train.reference as reference

    seen = []
    real = reference.score_examples

    def recording(model, examples, groups, pad_id, **kw):
        with kw["context"]():  # the scorer's context: what the model computes under
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return real(model, examples, groups, pad_id, **kw)

    monkeypatch.setattr(reference, "score_examples", recording)
    for dtype in ("bfloat16", "float32"):
        seen.clear()
        trainer, got = reference_of(config_for(tmp_path, tiny_model, pairs_file, name=dtype, reference=kind, dtype=dtype, **extra))
        assert seen and set(seen) == {getattr(torch, dtype)}, (kind, dtype, seen)
    if kind == "precompute":  # one cache table per precision, not one overwritten by the other
        assert len(list((tmp_path / "refcache").iterdir())) == 2

