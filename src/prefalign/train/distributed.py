"""Data-parallel training on ``accelerate``: which rows each process trains, how per-process
numbers become the run's numbers, and who writes.

Every process builds the same global batches (``batch_size × processes`` rows, length-grouped as
in one process) and trains its own contiguous slice of each; accelerate (DDP, FSDP, DeepSpeed)
averages the gradients. Each process weighs its rows' losses by ``processes / global rows``, so
the averaged gradient is the gradient of the mean loss over the whole global batch — the same as
one process with ``--batch-size batch_size × processes``, also when an epoch's last batch does
not split evenly. Nothing here talks to the network itself: the collectives are accelerate's.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from prefalign.sharding import leave_process_group_at_exit
from prefalign.train.config import ConfigError
from prefalign.train.logging import LOG_FILE, MetricsLogger

log = logging.getLogger("prefalign.train")

#: Where each process appends the row ids it trained, one JSON line per micro-batch, and those it
#: evaluated, one line per eval batch (a debugging and test hook: it shows that the processes
#: partition every epoch and every evaluation). Unset: nothing is written.
TRAINED_ROWS_DIR_ENV = "PREFALIGN_TRAINED_ROWS_DIR"


@dataclass
class RankSlice:
    """This process's rows of one global batch. ``weight`` scales the sum of their losses so that
    averaging the processes' gradients gives the gradient of the global batch's mean loss; a
    process left without rows trains a stand-in row with weight 0 (every process must run the same
    forward and backward passes, or the gradient all-reduce would wait for it forever)."""

    indices: list[int]
    weight: float
    is_stand_in: bool = False


def rank_slice(global_batch: Sequence[int], process_index: int, num_processes: int) -> RankSlice:
    """Contiguous slices, the first ``len % num_processes`` processes one row longer: neighbours
    in a length-grouped batch have similar lengths, so each slice pads little."""
    size, extra = divmod(len(global_batch), num_processes)
    start = process_index * size + min(process_index, extra)
    indices = list(global_batch[start : start + size + (process_index < extra)])
    if not indices:
        return RankSlice([global_batch[0]], 0.0, is_stand_in=True)
    return RankSlice(indices, num_processes / len(global_batch))


def make_accelerator(dtype: str):
    """The trainer's Accelerator. Under `accelerate launch` / torchrun it joins the other processes
    (gloo when no GPU is visible); the engine (DDP, FSDP, DeepSpeed) comes from the launch config.
    The scheduler steps once per optimizer step: the trainer's step counts already count global batches."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed_precision = "bf16" if dtype == "bfloat16" else "no"
    # AcceleratorState is a process-wide singleton that refuses a second precision: a recipe with
    # an fp32 and a bf16 training stage (one process) would stop at the second. Its process-group
    # half (PartialState) is kept.
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    try:
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                                  step_scheduler_with_optimizer=False)
    except RuntimeError as err:
        # accelerate 1.16 refuses an FSDP config on a machine with no GPU with a traceback; a user
        # who launched recipes/accelerate/fsdp.yaml there gets one line that says what to do.
        if "sync_module_states" in str(err) and not torch.cuda.is_available():
            raise ConfigError("FSDP needs a GPU here: accelerate cannot shard on CPU (it stopped with: "
                              f"{str(err).strip()}); launch with recipes/accelerate/ddp.yaml, or "
                              "--fsdp_sync_module_states false to run as plain DDP") from err
        raise
    except ImportError as err:
        # A DeepSpeed launch config without deepspeed installed: accelerate stops with a traceback.
        if requested_engine() == "DEEPSPEED":
            raise ConfigError(f"the launch config asks for DeepSpeed: {str(err).strip()} (pip install deepspeed)") from err
        raise
    if accelerator.num_processes > 1:
        leave_process_group_at_exit()
    asked = requested_engine()
    if asked is not None and accelerator.distributed_type.value != asked:
        # accelerate runs a DeepSpeed config (and FSDP without sync_module_states) as plain data
        # parallelism on a machine with no GPU, saying nothing: the user planned on sharded memory.
        log.warning("the launch config asks for %s, but accelerate runs %s on this machine (no GPU): every process "
                    "holds the whole model and optimizer state", asked, accelerator.distributed_type.value)
    return accelerator


def requested_engine() -> str | None:
    """The sharded engine an ``accelerate launch`` config asked for (``DEEPSPEED``, ``FSDP``), from
    the variables the launcher sets; None for DDP, torchrun and one process."""
    for variable, engine in (("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(variable, "false").lower() == "true":
            return engine
    return None


def global_batch_line(batch_size: int, num_processes: int, grad_accum: int, engine: str) -> str:
    """The engine too: with no GPU, accelerate 1.16 runs an FSDP config (with
    fsdp_sync_module_states false) as plain DDP (MULTI_CPU), and this line is where a user sees
    which one ran."""
    return (f"global batch {batch_size * num_processes * grad_accum} = batch size {batch_size} per process "
            f"x {num_processes} process(es) x grad-accum {grad_accum} ({'no distribution' if engine == 'NO' else engine})")


def sum_over_processes(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Each key summed over the processes (one all-reduce; the keys must be the same everywhere).
    Float64, so that the global loss is as exact as one process's."""
    if accelerator.num_processes == 1:
        return dict(values)
    keys = sorted(values)
    # gloo and NCCL both reduce float64; the tensor sits on the process's device for NCCL.
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    summed = accelerator.reduce(tensor, reduction="sum")
    return dict(zip(keys, summed.tolist()))


def check_same_processes(saved: dict, num_processes: int, checkpoint: Path) -> None:
    """A checkpoint holds one RNG state per process and the data position of N slices: resuming
    it with another number of processes would silently change the data order."""
    before = int(saved.get("num_processes", 1))
    if before != num_processes:
        raise ConfigError(f"--resume: {checkpoint} was saved by {before} process(es), this run has {num_processes}; "
                          f"resume with {before} processes (accelerate launch --num_processes {before}), or start a new output dir")


@contextmanager
def main_process_writes(accelerator):
    """Run the body on the main process only, then wait until it has: the other processes read
    what it wrote only after that."""
    try:
        yield accelerator.is_main_process
    finally:
        accelerator.wait_for_everyone()


class ReadOnlyMetricsLogger(MetricsLogger):
    """The logger of the processes other than the main one: reads the main process's log (for the
    run's result) and writes nothing, so every line is written once."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOG_FILE
        self._tb = None

    def log(self, metrics: dict) -> None:
        pass

    def _append(self, row: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


def record_trained_rows(process_index: int, row: dict, kind: str = "rank") -> None:
    """``kind``: the file's prefix, ``rank`` for trained rows, ``eval-rank`` for evaluated ones."""
    folder = os.environ.get(TRAINED_ROWS_DIR_ENV)
    if not folder:
        return
    path = Path(folder) / f"{kind}-{process_index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def check_engine_supported(accelerator, *, grad_accum: int, retain: bool = False) -> None:
    """Refuse, in one line, what prefalign does not yet do right on a sharded engine."""
    from accelerate.utils import DistributedType

    engine = accelerator.distributed_type
    if engine == DistributedType.DEEPSPEED and grad_accum > 1:
        # DeepSpeed accumulates and steps inside its engine; the trainer's own accumulation would
        # scale the loss twice.
        raise ConfigError("--grad-accum above 1 is not supported with DeepSpeed yet: use a larger --batch-size, or DDP/FSDP")
    if engine == DistributedType.DEEPSPEED and retain:
        # The retain term is a second backward pass per micro-batch; DeepSpeed's engine counts each
        # backward as a micro-step of its own accumulation.
        raise ConfigError("retain_data is not supported with DeepSpeed yet: use DDP or FSDP")


def is_sharded_engine(accelerator) -> bool:
    """FSDP or DeepSpeed: the weights may be sharded (FSDP, ZeRO-3), so saving takes a state dict
    the engine gathers, with every process taking part."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


@contextmanager
def weights_for_generation(accelerator, model):
    """The policy as a plain module whose ``generate`` sees whole weights, for sampling inside a
    training run (D²O's online anchors). Every process must enter it together under FSDP and
    ZeRO-3, as their forward passes do.

    - FSDP (``FullyShardedDataParallel``): the root unit's weights (embeddings, final norm, LM head)
      are gathered for the block (``summon_full_params(recurse=False)``, read-only); the decoder
      layers, FSDP units of their own, gather theirs in their forward as in training. TRL's
      GRPOTrainer samples under FSDP the same way.
    - DeepSpeed ZeRO-3: every parameter is gathered for the block (``GatheredParameters``), as
      TRL's ``unwrap_model_for_generation`` does.
    - FSDP2 (``fully_shard``) gathers in each module's forward hooks, DDP and one process hold
      whole weights: the model as it is.
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and _zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield unwrapped
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=False):
            yield unwrapped
        return
    yield unwrapped


def _zero_stage(accelerator) -> int | None:
    # As accelerate's own get_state_dict reads it: from the config DeepSpeed runs with.
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.deepspeed_config.get("zero_optimization", {}).get("stage")


def fill_deepspeed_micro_batch(deepspeed_config: dict, batch_size: int) -> None:
    """Write the per-process batch into a DeepSpeed config that leaves it to accelerate
    (``"auto"``, as accelerate's own config files do). accelerate fills "auto" from a dataloader
    passed to ``prepare``; the trainer batches rows itself and passes none, so without this
    ``prepare`` stops ("requires you to pass at least one of training or evaluation dataloaders").
    A number the user set stays."""
    if deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size


def weights_are_sharded(accelerator) -> bool:
    """Whether each process holds only a shard of every weight between steps: FSDP (but for its
    NO_SHARD strategy, which keeps whole copies) and DeepSpeed ZeRO-3. DDP and ZeRO-1/2 hold whole
    weights everywhere."""
    from accelerate.utils import DistributedType

    engine = accelerator.distributed_type
    if engine == DistributedType.DEEPSPEED:
        return _zero_stage(accelerator) == 3
    if engine == DistributedType.FSDP:
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        strategy = f"{getattr(plugin, 'reshard_after_forward', '')} {getattr(plugin, 'sharding_strategy', '')}"
        return "NO_SHARD" not in strategy
    return False


def weight_norm(parameters: Sequence[torch.Tensor], accelerator) -> float:
    """The L2 norm of ``parameters`` as whole weights, the same number on every process: where the
    weights are sharded, the squares of this process's shards (a DTensor's local part, a ZeRO-3
    partition) are summed over the processes. The trainer's divergence check decides from it, and
    a decision that differed between processes would leave the others waiting for ever."""
    sharded = weights_are_sharded(accelerator)
    norms = [torch.linalg.vector_norm(_local_shard(p) if sharded else p.detach(), dtype=torch.float32) for p in parameters]
    norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0  # one device sync
    if sharded:
        norm = sum_over_processes(accelerator, {"squares": norm ** 2})["squares"] ** 0.5
    return norm


def _local_shard(p: torch.Tensor) -> torch.Tensor:
    """The part of a sharded parameter this process holds: ZeRO-3's partition, a DTensor's local
    tensor (FSDP2), or the tensor itself (FSDP's flat-parameter views)."""
    local = p.ds_tensor if getattr(p, "ds_tensor", None) is not None else p.detach()
    return local.to_local() if hasattr(local, "to_local") else local
