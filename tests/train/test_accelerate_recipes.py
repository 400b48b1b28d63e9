"""The shipped accelerate configs (recipes/accelerate/) load the way `accelerate launch` loads
them: no unknown key at the top, every engine key one the launcher reads, and the engine each file
promises; where deepspeed is installed, DeepSpeed's own config checker accepts the DeepSpeed files.
Schema only: the GPU runs are not CPU tests."""

from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"
EXPECTED = {
    "ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed-zero2.yaml": "DEEPSPEED",
    "deepspeed-zero3.yaml": "DEEPSPEED",
    "multi-node.yaml": "MULTI_GPU",
}


def launcher_options() -> set[str]:
    """What `accelerate launch` accepts as options: an fsdp_config/deepspeed_config key becomes one."""
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


def test_every_shipped_config_is_listed_here():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_as_accelerate_loads_it(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(RECIPES / name))  # unknown top-level keys raise
    assert config.distributed_type.value == EXPECTED[name]
    assert config.num_processes >= config.num_machines >= 1
    assert str(config.mixed_precision) == "no"  # prefalign's --dtype decides precision
    raw = yaml.safe_load((RECIPES / name).read_text())
    options = launcher_options()
    for block in ("fsdp_config", "deepspeed_config"):
        unknown = sorted(set(raw.get(block, {})) - options)
        assert not unknown, f"{name}: {block} keys accelerate launch does not read: {unknown}"


def test_fsdp_config_shards_everything_and_keeps_lora_trainable():
    fsdp = yaml.safe_load((RECIPES / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_use_orig_params"] is True  # frozen and trained weights in one FSDP unit


@pytest.mark.parametrize("name, stage", [("deepspeed-zero2.yaml", 2), ("deepspeed-zero3.yaml", 3)])
def test_deepspeed_configs_name_their_stage_and_do_not_accumulate_twice(name, stage):
    ds = yaml.safe_load((RECIPES / name).read_text())["deepspeed_config"]
    assert ds["zero_stage"] == stage
    assert ds["gradient_accumulation_steps"] == 1  # the trainer refuses --grad-accum > 1 with DeepSpeed
    # The whole model is loaded (and scores the reference) before DeepSpeed partitions it.
    assert ds["zero3_init_flag"] is False
    if stage == 3:
        assert ds["zero3_save_16bit_model"] is True  # the final model gathered into one folder


def test_multi_node_config_names_the_main_node():
    config = yaml.safe_load((RECIPES / "multi-node.yaml").read_text())
    assert config["num_machines"] > 1 and config["num_processes"] % config["num_machines"] == 0
    assert config["main_process_ip"] and config["main_process_port"]


@pytest.mark.parametrize("name, stage", [("deepspeed-zero2.yaml", 2), ("deepspeed-zero3.yaml", 3)])
def test_deepspeed_accepts_the_config_accelerate_builds_from_the_file(name, stage):
    """DeepSpeed's own config checker on what it would receive: accelerate's plugin built from the
    file's deepspeed_config, its "auto" batch sizes filled as prefalign and accelerate fill them
    (--batch-size 4, one process). Runs where deepspeed is installed (it is not a dependency)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed runs this check)")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    from prefalign.train.distributed import fill_deepspeed_micro_batch

    raw = yaml.safe_load((RECIPES / name).read_text())["deepspeed_config"]
    config = DeepSpeedPlugin(**raw).deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # left to accelerate, which needs a dataloader for it
    fill_deepspeed_micro_batch(config, 4)
    config["train_batch_size"] = 4 * config["gradient_accumulation_steps"]  # accelerate: micro x accumulation x processes
    checked = DeepSpeedConfig(config)  # raises on an unknown value or inconsistent batch sizes
    assert checked.zero_optimization_stage == stage
    assert checked.train_micro_batch_size_per_gpu == 4 and checked.gradient_clipping == raw["gradient_clipping"]
