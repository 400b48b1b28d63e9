"""Data-parallel training for real: N processes × ``--batch-size b`` train the same model as one
process × ``N·b`` (TRL's invariant tests), each process on its own rows, one writer.

The runs go through `accelerate launch` on CPU (gloo). `--multi_gpu` is accelerate's flag for
"start N local processes with torchrun"; with no GPU visible the trainer's Accelerator joins them
over gloo (`--cpu` would start one process and expect mpirun to start the rest).
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import pair_rows, write_jsonl
from prefalign.train.distributed import TRAINED_ROWS_DIR_ENV, check_same_processes, rank_slice

_needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                 reason="this torch has no gloo backend")


def launches_processes(test):
    """Marks a test that starts training runs (several processes among them): distributed, slow."""
    return pytest.mark.distributed(pytest.mark.slow(_needs_gloo(test)))


# 13 rows, global batch 4: every epoch ends with a one-row batch, so the second process trains a
# stand-in row with weight 0 there, and the equality below covers that case too.
NUM_ROWS = 13
STEPS = 8
TIMEOUT = 600  # a busy shared machine must not fail these


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"


def train_cmd(processes: int, tiny_model, data, out, batch_size, *extra, launch_config: Path | None = None,
              torchrun: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "prefalign.cli"]
    if processes > 1 and torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                    str(free_port()), "-m", "prefalign.cli"]
    elif processes > 1:
        how = ["--config_file", str(launch_config)] if launch_config else [
            "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        launcher = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(processes),
                    "--main_process_port", str(free_port()), "-m", "prefalign.cli"]
    return [*launcher, "train", "--model", tiny_model, "--data", str(data), "--output-dir", str(out),
            "--max-steps", str(STEPS), "--batch-size", str(batch_size), "--lr", "1e-3", "--save-every", "3",
            "--seed", "7", "--dtype", "float32", "--quiet", *extra]


def run_env(tmp: Path, rows_dir: Path) -> dict:
    return {**os.environ, "PREFALIGN_CACHE": str(tmp / "cache"), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", TRAINED_ROWS_DIR_ENV: str(rows_dir)}


def train(processes, tiny_model, data, tmp: Path, name: str, *extra, launch_config: Path | None = None,
          torchrun: bool = False) -> dict:
    """One run in its own folder and reference cache; returns where things are and what it printed."""
    out, rows = tmp / name, tmp / f"{name}-rows"
    env = {**run_env(tmp, rows), "PREFALIGN_CACHE": str(tmp / f"{name}-cache")}
    cmd = train_cmd(processes, tiny_model, data, out, 4 // processes, *extra, launch_config=launch_config,
                    torchrun=torchrun)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "rows": rows, "cache": tmp / f"{name}-cache", "stdout": result.stdout, "stderr": result.stderr}


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log_rows(out) if "loss" in r}


def trained_rows(rows_dir: Path, rank: int, kind: str = "rank") -> list[dict]:
    return [json.loads(line) for line in (rows_dir / f"{kind}-{rank}.jsonl").read_text().splitlines()]


def weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / name))


def max_weight_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", pair_rows(NUM_ROWS))


# 9 eval rows in global eval batches of 8 (2 x batch size 2 per process x 2 processes): the
# first splits 4 + 4, the last, one-row batch leaves the second process a stand-in row.
EVAL_ROWS = 9
EVAL_EVERY = 4


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory, tiny_model) -> dict:
    """DPO with eval data evaluated every 4 steps and at the end: one process x 4, two x 2."""
    tmp = tmp_path_factory.mktemp("eval")
    rows = pair_rows(NUM_ROWS + EVAL_ROWS)
    train_data = write_jsonl(tmp / "train.jsonl", rows[:NUM_ROWS])
    eval_data = write_jsonl(tmp / "eval.jsonl", rows[NUM_ROWS:])
    config = tmp / "train.yaml"
    config.write_text(json.dumps({"eval_data": str(eval_data), "eval_every": EVAL_EVERY}))  # JSON is YAML
    return {name: train(processes, tiny_model, train_data, tmp, name, "--config", str(config))
            for name, processes in (("one", 1), ("two", 2))}


def eval_metrics(out: Path) -> list[dict]:
    """Each evaluation's metrics, in log order (every EVAL_EVERY steps, then the final one)."""
    return [{k: v for k, v in r.items() if k.startswith("eval/")} for r in log_rows(out) if "eval/loss" in r]


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, tiny_model, data) -> dict:
    """DPO with a precomputed reference: one process × 4 rows, two processes × 2 rows launched with
    the shipped DDP recipe (its num_processes overridden)."""
    tmp = tmp_path_factory.mktemp("dpo")
    two = train(2, tiny_model, data, tmp, "two", launch_config=RECIPES / "ddp.yaml")
    return {"one": train(1, tiny_model, data, tmp, "one"), "two": two, "tmp": tmp}


# -------------------------------------------------------------------------------- pure pieces


def test_rank_slices_partition_a_batch_and_weigh_it_as_one_mean():
    for size in range(1, 12):
        for processes in (1, 2, 3, 4):
            batch = list(range(100, 100 + size))
            shares = [rank_slice(batch, rank, processes) for rank in range(processes)]
            real = [s for s in shares if not s.is_stand_in]
            assert [i for s in real for i in s.indices] == batch  # contiguous, in order, each row once
            # Averaged over the processes, the weighted sums are the batch's mean: sum(w * n) / N == 1.
            assert sum(s.weight * len(s.indices) for s in real) / processes == pytest.approx(1.0)
            for s in shares:
                if s.is_stand_in:
                    assert s.weight == 0 and len(s.indices) == 1


def test_resuming_with_another_number_of_processes_is_refused():
    from prefalign.train.config import ConfigError

    check_same_processes({"num_processes": 2}, 2, Path("ckpt"))
    check_same_processes({}, 1, Path("ckpt"))  # checkpoints from before: one process
    with pytest.raises(ConfigError, match=r"saved by 2 process\(es\), this run has 1"):
        check_same_processes({"num_processes": 2}, 1, Path("ckpt"))


def test_what_sharded_engines_do_not_support_yet_is_refused_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from prefalign.train.config import ConfigError
    from prefalign.train.distributed import check_engine_supported

    def engine(kind):
        return SimpleNamespace(distributed_type=kind)

    check_engine_supported(engine(DistributedType.MULTI_GPU), grad_accum=4, retain=True)
    check_engine_supported(engine(DistributedType.FSDP), grad_accum=4, retain=True)
    check_engine_supported(engine(DistributedType.DEEPSPEED), grad_accum=1)
    with pytest.raises(ConfigError, match="--grad-accum above 1 is not supported with DeepSpeed"):
        check_engine_supported(engine(DistributedType.DEEPSPEED), grad_accum=2)
    with pytest.raises(ConfigError, match="retain_data is not supported with DeepSpeed"):
        check_engine_supported(engine(DistributedType.DEEPSPEED), grad_accum=1, retain=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
def test_an_fsdp_launch_on_a_machine_without_a_gpu_fails_in_one_line(tmp_path, tiny_model, data):
    """What `accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets, in one process: the
    train command stops before any model loads with exit 2 and one line naming the way out."""
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_SYNC_MODULE_STATES": "true", "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "prefalign.cli", "train", "--model", str(tiny_model), "--data", str(data),
           "--output-dir", str(tmp_path / "out"), "--max-steps", "1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "FSDP needs a GPU here" in errors[0] and "ddp.yaml" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
@pytest.mark.parametrize("asked", [{"ACCELERATE_USE_DEEPSPEED": "true"},
                                   {"ACCELERATE_USE_FSDP": "true", "FSDP_SYNC_MODULE_STATES": "false"}])
def test_a_sharded_launch_config_that_runs_unsharded_here_says_so(tmp_path, tiny_model, data, asked):
    """What the launcher sets for a DeepSpeed config (or FSDP without sync_module_states): with no
    GPU accelerate trains without sharding; the run goes on and says so in one warning. Without
    deepspeed installed, a DeepSpeed config stops in one line instead."""
    env = {**os.environ, **asked, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PREFALIGN_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "prefalign.cli", "train", "--model", str(tiny_model), "--data", str(data),
           "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--quiet"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    engine = "DEEPSPEED" if "ACCELERATE_USE_DEEPSPEED" in asked else "FSDP"
    if engine == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        # Not installed: one line that says so, exit 2, before any model loads.
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "asks for DeepSpeed" in errors[0] and "pip install deepspeed" in errors[0], result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
        return
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "the launch config asks for" in line]
    assert len(warnings) == 1 and f"asks for {engine}, but accelerate runs NO" in warnings[0], result.stderr[-2000:]


# ------------------------------------------------------------------------------------ runs


@launches_processes
def test_two_processes_train_the_same_model_as_one_with_the_same_global_batch(dpo_runs):
    one, two = dpo_runs["one"]["out"], dpo_runs["two"]["out"]
    a, b = losses(one), losses(two)
    assert sorted(b) == list(range(1, STEPS + 1))  # every step logged, once
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert max_weight_gap(weights(one / "model", "model.safetensors"), weights(two / "model", "model.safetensors")) < 1e-5
    # DDP over gloo ran (the DDP recipe with no GPU visible), not one process twice.
    assert "global batch 4 = batch size 2 per process x 2 process(es) x grad-accum 1 (MULTI_CPU)" in dpo_runs["two"]["stderr"]
    assert "global batch 4 = batch size 4 per process x 1 process(es) x grad-accum 1 (no distribution)" in dpo_runs["one"]["stderr"]


@launches_processes
def test_torchrun_trains_the_same_model_as_one_process(dpo_runs, tiny_model, data):
    """``torchrun`` (no accelerate launcher) starts the same data-parallel run: the processes join
    over gloo, and the losses and final weights are one process's with the same global batch."""
    run = train(2, tiny_model, data, dpo_runs["tmp"], "torchrun", torchrun=True)
    assert "x 2 process(es)" in run["stderr"]
    a, b = losses(dpo_runs["one"]["out"]), losses(run["out"])
    assert sorted(b) == list(range(1, STEPS + 1))
    assert max(abs(a[step] - b[step]) for step in a) < 1e-5
    model = "model.safetensors"
    assert max_weight_gap(weights(dpo_runs["one"]["out"] / "model", model), weights(run["out"] / "model", model)) < 1e-5


@launches_processes
def test_a_recipe_train_stage_under_two_processes_trains_one_process_model(tmp_path, tiny_model, data):
    """``prefalign run`` under 2 processes: the split stage on the main process, the train stage
    sharded; its model and losses are one process's with the same global batch, written once."""
    runs = {}
    for processes in (1, 2):
        recipe = tmp_path / f"recipe-{processes}.yaml"
        recipe.write_text(json.dumps({  # JSON is YAML
            "name": "tiny", "output_dir": str(tmp_path / "unused"), "model": tiny_model,
            "stages": {"data": {"kind": "split", "input": str(data), "eval_fraction": 0.25},
                       "train": {"kind": "train", "model": "${model}", "data": "${data.train}", "loss": "dpo",
                                 "batch_size": 4 // processes, "max_steps": 4, "lr": 1e-3, "seed": 7, "dtype": "float32"}}}))
        out = tmp_path / f"run-{processes}"
        launcher = [sys.executable, "-m", "prefalign.cli"] if processes == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "prefalign.cli"]
        result = subprocess.run([*launcher, "run", str(recipe), "-o", str(out)], env=run_env(tmp_path, tmp_path / f"rows-{processes}"),
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = (out, result.stdout)
    (one, _), (two, printed) = runs[1], runs[2]
    assert (two / "data" / "train.jsonl").read_bytes() == (one / "data" / "train.jsonl").read_bytes()
    a, b = losses(one / "train"), losses(two / "train")
    assert sorted(b) == [1, 2, 3, 4] and max(abs(a[step] - b[step]) for step in a) < 1e-5
    model = "model.safetensors"
    assert max_weight_gap(weights(one / "train" / "model", model), weights(two / "train" / "model", model)) < 1e-5
    assert printed.count("[train] done") == 1  # the stage reported once, by the main process
    assert len(log_rows(two / "train")) == len(log_rows(one / "train"))  # each log line written once
    first, second = trained_rows(tmp_path / "rows-2", 0), trained_rows(tmp_path / "rows-2", 1)
    assert [r["step"] for r in first] == [r["step"] for r in second] == [1, 2, 3, 4]
    for mine, theirs in zip(first, second):  # each process its own part of every global batch
        assert mine["rows"] and not set(mine["rows"]) & set(theirs["rows"])


@launches_processes
def test_each_process_trains_its_own_rows_and_together_they_cover_every_epoch(dpo_runs):
    single = trained_rows(dpo_runs["one"]["rows"], 0)
    ranks = [trained_rows(dpo_runs["two"]["rows"], rank) for rank in (0, 1)]
    assert not (dpo_runs["two"]["rows"] / "rank-2.jsonl").exists()
    assert [len(r) for r in ranks] == [STEPS, STEPS]
    by_epoch: dict[int, list[int]] = {}
    for first, second, alone in zip(*ranks, single):
        assert first["step"] == second["step"] == alone["step"] and first["epoch"] == second["epoch"]
        assert not set(first["rows"]) & set(second["rows"])
        # Together: exactly the global batch one process with 4 rows trains at that step.
        assert first["rows"] + second["rows"] == alone["rows"]
        by_epoch.setdefault(first["epoch"], []).extend(first["rows"] + second["rows"])
    assert len(by_epoch) == 2
    for epoch, rows in by_epoch.items():
        assert sorted(rows) == list(range(NUM_ROWS)), epoch  # a partition: every row once per epoch


@launches_processes
def test_the_sharded_reference_precompute_equals_one_process_and_is_written_once(dpo_runs):
    one_cache = list((dpo_runs["one"]["cache"] / "ref-logps").iterdir())
    two_cache = list((dpo_runs["two"]["cache"] / "ref-logps").iterdir())
    assert len(two_cache) == 1 and two_cache[0].suffix == ".pt"  # one file, no temporary left behind
    assert [p.name for p in one_cache] == [p.name for p in two_cache]  # the same key: same data, same model
    a, b = torch.load(one_cache[0]), torch.load(two_cache[0])
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].shape[0] == NUM_ROWS
        assert torch.allclose(a[group], b[group], atol=1e-5), group  # gathered in data order


@launches_processes
def test_only_the_main_process_writes(dpo_runs):
    run = dpo_runs["two"]
    out = run["out"]
    assert run["stdout"].count("trained 8 steps") == 1
    steps = [r["step"] for r in log_rows(out)]
    assert steps == sorted(set(steps))  # no line written twice
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == STEPS
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-00000006", "step-00000008"]  # kept ones only, nothing pending
    last = out / "checkpoints" / "step-00000008"
    # Weights and optimizer once (from the main process); one RNG state per process, as accelerate keeps them.
    assert sorted(p.name for p in last.iterdir()) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin", "trainer_state.json",
    ]
    assert json.loads((last / "trainer_state.json").read_text())["num_processes"] == 2


@launches_processes
@pytest.mark.parametrize("extra", [("--reference", "copy"), ("--lora",), ("--grad-accum", "2")],
                         ids=["frozen-copy", "lora", "grad-accum"])
def test_two_processes_equal_one_with_a_live_reference_lora_and_grad_accum(tmp_path, tiny_model, data, extra):
    one = train(1, tiny_model, data, tmp_path, "one", *extra)["out"]
    two = train(2, tiny_model, data, tmp_path, "two", *extra)["out"]
    a, b = losses(one), losses(two)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    folder, name = ("adapter", "adapter_model.safetensors") if "--lora" in extra else ("model", "model.safetensors")
    assert max_weight_gap(weights(one / folder, name), weights(two / folder, name)) < 1e-5


@launches_processes
@pytest.mark.parametrize("loss, settings", [
    ("d2o", {"reference": "copy", "anchor_refresh_every": 3, "anchor_max_new_tokens": 4}),
    ("adpo", {}),
    ("d2o", {"retain_data": "retain.jsonl", "retain_weight": 2.0}),
], ids=["d2o-online-anchors", "adpo-toxic-reference", "d2o-retain-term"])
def test_two_processes_equal_one_for_online_anchors_and_the_toxic_reference(tmp_path, tiny_model, data, loss, settings):
    if "retain_data" in settings:  # 5 answers: retain batches of 4 (2 per process) wrap around the file
        rows = [{"prompt": f"Question {i}?", "chosen": f"Answer number {i}, written out."} for i in range(5)]
        settings = {**settings, "retain_data": str(write_jsonl(tmp_path / settings["retain_data"], rows))}
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"loss": loss, **settings}))  # JSON is YAML
    one = train(1, tiny_model, data, tmp_path, "one", "--config", str(config))["out"]
    two = train(2, tiny_model, data, tmp_path, "two", "--config", str(config))["out"]
    a, b = losses(one), losses(two)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert max_weight_gap(weights(one / "model", "model.safetensors"), weights(two / "model", "model.safetensors")) < 1e-5


@launches_processes
def test_kill_and_resume_under_two_processes_matches_the_uninterrupted_run(dpo_runs, tiny_model, data):
    tmp = dpo_runs["tmp"]
    killed, rows = tmp / "killed", tmp / "killed-rows"
    env = {**run_env(tmp, rows), "PREFALIGN_CACHE": str(tmp / "killed-cache")}
    cmd = train_cmd(2, tiny_model, data, killed, 2)
    # Its own session: the kill reaches the launcher and both training processes.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + TIMEOUT
    log = killed / "train_log.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints" / "step-00000003").exists() and log.exists() and len(log.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(losses(killed)) < STEPS

    resumed = subprocess.run(train_cmd(2, tiny_model, data, killed, 2, "--resume"), env=env, capture_output=True, text=True,
                             timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(dpo_runs["two"]["out"]), losses(killed)
    assert sorted(b) == list(range(1, STEPS + 1))  # no step missing or logged twice
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


@launches_processes
def test_resuming_a_two_process_run_with_one_process_fails_in_one_line(dpo_runs, tiny_model, data):
    tmp = dpo_runs["tmp"]
    result = subprocess.run(train_cmd(1, tiny_model, data, dpo_runs["two"]["out"], 4, "--resume"),
                            env=run_env(tmp, tmp / "refused-rows"), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "process(es)" in line]
    assert len(errors) == 1 and "saved by 2 process(es), this run has 1" in errors[0], result.stderr[-2000:]
    assert not (tmp / "refused-rows").exists()  # refused before training a step


@launches_processes
def test_two_processes_log_the_eval_metrics_of_one(eval_runs):
    one, two = eval_runs["one"]["out"], eval_runs["two"]["out"]
    a, b = eval_metrics(one), eval_metrics(two)
    assert len(a) == len(b) == STEPS // EVAL_EVERY + 1  # logged once each, by the main process
    for first, second in zip(a, b):
        assert first.keys() == second.keys() and "eval/rewards/accuracy" in first
        for key in first:
            assert abs(first[key] - second[key]) < 1e-5, (key, first[key], second[key])
    summaries = [json.loads((out / "train_summary.json").read_text()) for out in (one, two)]
    assert all(abs(summaries[0][k] - summaries[1][k]) < 1e-5 for k in a[-1])


@launches_processes
def test_each_process_evaluates_its_own_slice_of_every_eval_batch(eval_runs):
    def evaluated(run, rank):
        return [r["rows"] for r in trained_rows(run["rows"], rank, kind="eval-rank")]

    single = evaluated(eval_runs["one"], 0)
    first, second = evaluated(eval_runs["two"], 0), evaluated(eval_runs["two"], 1)
    evaluations = STEPS // EVAL_EVERY + 1
    # One forward pass per eval batch on every process, the second one's last on a stand-in row.
    assert single == [list(range(8)), [8]] * evaluations
    assert first == [[0, 1, 2, 3], [8]] * evaluations
    assert second == [[4, 5, 6, 7], []] * evaluations


# Run under `accelerate launch --config_file recipes/accelerate/fsdp.yaml`: which engine prefalign's
# Accelerator gets there (or why it fails), and whether torch's own FSDP shards and runs on the
# process group. The main process prints one JSON line.
FSDP_PROBE = """
import gc, json, os, torch
from prefalign.train.distributed import make_accelerator

report = {"use_fsdp": os.environ.get("ACCELERATE_USE_FSDP")}
try:
    accelerator = make_accelerator("float32")
except Exception as exc:
    report["error"] = "%s: %s" % (type(exc).__name__, exc)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(report))
    raise SystemExit(0)
wrapped = accelerator.prepare(torch.nn.Linear(4, 4))
report.update(engine=accelerator.distributed_type.value, wrapper=type(wrapped).__name__)
try:
    from torch.distributed.fsdp import fully_shard

    module = fully_shard(torch.nn.Linear(4, 4))
    module(torch.ones(2, 4)).sum().backward()
    # Freed and synchronised here, not at interpreter teardown: a fully_shard module left to
    # teardown after the process group is gone aborts a gloo rank ("terminate called without an
    # active exception") in about 1 run of 4 on 2 cores; freed first, 0 of 40.
    del module
    gc.collect()
    torch.distributed.barrier()
    report["torch_fsdp"] = "runs (fully_shard forward and backward on cpu over %s)" % torch.distributed.get_backend()
except Exception as exc:
    report["torch_fsdp"] = "fails (%s: %s)" % (type(exc).__name__, exc)
if accelerator.is_main_process:
    print(json.dumps(report))
"""


def fsdp_engine(tmp: Path, *launch_options: str) -> dict:
    """What two processes launched with the shipped FSDP config (and ``launch_options``) run here."""
    probe = tmp / "fsdp_probe.py"
    probe.write_text(FSDP_PROBE)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / "fsdp.yaml"),
           "--num_processes", "2", "--main_process_port", str(free_port()), *launch_options, str(probe)]
    result = subprocess.run(cmd, env=run_env(tmp, tmp / "probe-rows"), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def skip_unless_fsdp(tmp: Path) -> None:
    """Skip, with what the probes saw, unless accelerate runs the shipped FSDP config as FSDP here:
    a torch and accelerate that shard on CPU run the test instead."""
    import accelerate

    shipped = fsdp_engine(tmp)
    if shipped.get("engine") == "FSDP":
        return
    # sync_module_states is what accelerate refuses on CPU: without it, which engine runs?
    unsynced = fsdp_engine(tmp, "--fsdp_sync_module_states", "false")
    saw = f"stops: {shipped['error'].rstrip('.')}" if "error" in shipped else f"runs as {shipped['engine']} ({shipped['wrapper']})"
    unsynced_saw = (f"fails too: {unsynced['error'].rstrip('.')}" if "error" in unsynced else
                    f"runs as {unsynced['engine']}, the model wrapped in {unsynced['wrapper']}, not FSDP; torch "
                    f"{torch.__version__}'s own FSDP {unsynced['torch_fsdp']}")
    pytest.skip(f"no FSDP on CPU with accelerate {accelerate.__version__}: fsdp.yaml (ACCELERATE_USE_FSDP="
                f"{shipped['use_fsdp']}) on this machine with no GPU {saw}; with --fsdp_sync_module_states false it {unsynced_saw}")


@launches_processes
def test_two_fsdp_processes_train_the_same_model_as_one(tmp_path, tiny_model, data):
    skip_unless_fsdp(tmp_path)
    one = train(1, tiny_model, data, tmp_path, "one")
    two = train(2, tiny_model, data, tmp_path, "two", launch_config=RECIPES / "fsdp.yaml")
    assert "x 2 process(es) x grad-accum 1 (FSDP)" in two["stderr"]
    a, b = losses(one["out"]), losses(two["out"])
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    # The full weights, gathered from the shards into one plain HF folder, written once.
    model = two["out"] / "model"
    assert sorted(p.name for p in model.glob("*.safetensors")) == ["model.safetensors"]
    assert max_weight_gap(weights(one["out"] / "model", "model.safetensors"), weights(model, "model.safetensors")) < 1e-5
    # The reference precompute ran before sharding: the same table as one process's.
    (ref_one,), (ref_two,) = ((run["cache"] / "ref-logps").iterdir() for run in (one, two))
    a_ref, b_ref = torch.load(ref_one), torch.load(ref_two)
    assert a_ref.keys() == b_ref.keys() and all(torch.allclose(a_ref[g], b_ref[g], atol=1e-5) for g in a_ref)
