"""The training loop, top to bottom: ``setup`` (data, model, reference, optimizer), ``train``
(steps, logging, checkpoints), ``finish`` (final save). The loss comes from the registry; nothing
here branches on its name."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from prefalign.data.errors import DataError
from prefalign.data.io import write_text_atomic
from prefalign.data.tokenize import TokenizedExample, TokenizeSettings, tokenize_record
from prefalign.data.validate import load_for_loss
from prefalign.data.sources import stable_split
from prefalign.losses import AnyLoss, LossInputs, implicit_rewards
from prefalign.models.loading import load_model, load_tokenizer
from prefalign.models.lora import apply_lora, merge_saved_adapter
from prefalign.train.checkpoint import (
    checkpoints_dir, commit_checkpoint, discard_pending, latest_checkpoint, read_state, write_pending,
)
from prefalign.train.config import ConfigError, TrainConfig
from prefalign.train.distributed import (
    RankSlice, ReadOnlyMetricsLogger, check_engine_supported, check_same_processes, fill_deepspeed_micro_batch, global_batch_line,
    is_sharded_engine, main_process_writes, make_accelerator, rank_slice, record_trained_rows, sum_over_processes,
    weight_norm, weights_for_generation,
)
from prefalign.train.logging import MetricsLogger
from prefalign.train.memory import PeakMemory
from prefalign.train.online_anchors import refresh_anchors
from prefalign.train.precision import resolve_dtype
from prefalign.train.reference import TOXIC_REF, ReferenceSetup, build_reference, score_through_engine
from prefalign.train.retain import load_retain_examples, retain_term
from prefalign.train.sequences import (collate, distributed_wrapper, sequence_logps, sequence_token_logps, split_groups,
                                       supports_packing, supports_shared_prompt)

log = logging.getLogger("prefalign.train")

#: Config fields that may change between a run and its resumption: how long it runs, how often
#: it saves and evaluates, and the optimiser's settings (a lower lr after a divergence). Changes
#: are logged and recorded in train_log.jsonl as a ``resumed`` event.
RESUMABLE_CHANGES = {
    "max_steps", "epochs", "save_every", "snapshot_steps", "eval_every", "log_every", "keep_checkpoints", "merge",
    "lr", "schedule", "warmup_steps", "weight_decay", "max_grad_norm",
}

#: What a run writes into its output dir; ``--overwrite`` removes these (and nothing else).
RUN_FILES = ("checkpoints", "train_log.jsonl", "train_summary.json", "train_config.json", "tensorboard", "model", "adapter")

# Divergence guards (besides a non-finite loss, gradient norm or weight): the trainable weights'
# norm grown past WEIGHT_EXPLOSION times its value at the start of the run, or a gradient norm past
# GRAD_EXPLOSION times the median of the run's first GRAD_BASELINE_STEPS steps.
WEIGHT_EXPLOSION = 10.0
GRAD_EXPLOSION = 1e4
GRAD_BASELINE_STEPS = 5


class TrainingDiverged(RuntimeError):
    """The loss, gradients or weights became non-finite or exploded. Training stops before the bad
    weights are saved; the message names the step, the cause and the last good checkpoint (one
    whose weights gave a finite loss)."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    model_dir: Path
    adapter_dir: Path | None = None
    history: list[dict] = field(default_factory=list)
    data_summary: dict = field(default_factory=dict)
    is_main_process: bool = True  # False on the other processes of a distributed run
    snapshots: dict[int, Path] = field(default_factory=dict)  # step -> model folder (snapshot_steps)


# ----------------------------------------------------------------------------------------- data


def prepare_examples(config: TrainConfig, spec: AnyLoss, tokenizer) -> tuple[list[TokenizedExample], list[TokenizedExample], dict]:
    """Validate and tokenise the training (and evaluation) data; returns a summary of skips."""
    summary: dict = {}

    def load(path: Path, name: str):
        # The same checks as `prefalign data check --loss` (one function), before any model loads.
        checked = load_for_loss(path, spec, skip_invalid=config.skip_invalid, strict=config.strict)
        summary.update(checked.counts(f"{name}_"))
        return checked.records

    train_records = load(config.data, "train")
    eval_records = load(config.eval_data, "eval") if config.eval_data else []
    if config.eval_fraction > 0:
        train_records, eval_records = stable_split(train_records, key=lambda r: str(r.meta.get("id", r.prompt)), eval_fraction=config.eval_fraction)
    settings = TokenizeSettings(config.max_length, config.max_prompt_length, config.chat_template, config.toxic_control_token)
    groups = spec.responses

    def tokenize(records, offset, name):
        examples = []
        prompts_cut = responses_cut = 0
        for i, r in enumerate(records):
            ex = tokenize_record(r, offset + i, tokenizer, groups, settings, with_toxic_prompt=spec.needs_toxic_reference)
            if ex.prompt_tokens_cut or ex.responses_cut:
                if config.strict:
                    raise _cut_error(r, ex, config)
                prompts_cut += bool(ex.prompt_tokens_cut)
                responses_cut += len(ex.responses_cut)
            examples.append(ex)
        summary[f"{name}_truncated_prompts"] = prompts_cut
        summary[f"{name}_truncated_responses"] = responses_cut
        if prompts_cut or responses_cut:
            log.warning("%s data: %d prompt(s) cut from the left to fit max_prompt_length=%d / max_length=%d, "
                        "%d response(s) cut from the right to fit max_length", name, prompts_cut,
                        config.max_prompt_length, config.max_length, responses_cut)
        return examples

    train = tokenize(train_records, 0, "train")
    evaluation = tokenize(eval_records, len(train), "eval")
    summary.update(train_examples=len(train), eval_examples=len(evaluation))
    weighted = sum(ex.weight != 1.0 for ex in train)
    if weighted:  # the summary says how much of the data counts less (or more) than one record each
        summary.update(train_weighted_examples=weighted, train_weight_sum=sum(ex.weight for ex in train))
        log.info("train data: %d of %d records carry a loss weight other than 1 (weights sum to %.1f)",
                 weighted, len(train), summary["train_weight_sum"])
    return train, evaluation, summary


def _cut_error(record, example: TokenizedExample, config: TrainConfig) -> DataError:
    if example.prompt_tokens_cut:
        kept = len(example.prompt_ids)
        return DataError(f"prompt is {kept + example.prompt_tokens_cut} tokens; training would cut it to {kept} "
                         f"(max_prompt_length {config.max_prompt_length}, max_length {config.max_length}; --strict)",
                         path=record.source or None, field="prompt", kind="truncated_prompt")
    name = example.responses_cut[0]
    field_name = f"anchors[{name.split('.')[1]}]" if name.startswith("anchors.") else name
    return DataError(f"response would be cut to fit max_length {config.max_length} (--strict)",
                     path=record.source or None, field=field_name, kind="truncated_response")


def data_changes(summary: dict) -> list[str]:
    """The data changes a run made, in words (for the CLI and the log): empty when none."""
    words = {"skipped_invalid": "invalid row(s) skipped", "dropped_nonpositive_reward_gap": "pair(s) dropped for a reward gap <= 0",
             "identical_pairs": "pair(s) with chosen == rejected (no preference, kept)",
             "truncated_prompts": "prompt(s) cut to the length limit", "truncated_responses": "response(s) cut to max_length"}
    out = []
    for split in ("train", "eval"):
        for key, text in words.items():
            if summary.get(f"{split}_{key}"):
                out.append(f"{split}: {summary[f'{split}_{key}']} {text}")
    return out


LENGTH_WINDOW_BATCHES = 16


def epoch_batches(
    num_examples: int, batch_size: int, seed: int, epoch: int, *, shuffle: bool = True, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """The batches of one epoch, fixed by (seed, epoch) so that resuming needs only the epoch and
    the batch position. With ``lengths``, each window of ``LENGTH_WINDOW_BATCHES`` batches of the
    shuffled order is sorted by length before it is cut into batches, and the batches are then
    shuffled again: similar lengths share a batch (little padding) while the order stays random."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist() if shuffle else list(range(num_examples))
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]
    window = batch_size * LENGTH_WINDOW_BATCHES
    batches = []
    for start in range(0, num_examples, window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


# ------------------------------------------------------------------------------------- metrics


def batch_metrics(spec: AnyLoss, policy: dict, reference: dict, beta: float) -> dict[str, float]:
    if spec.positive not in reference or spec.negative not in reference:
        # Reference-free (SFT, SimPO): no implicit rewards; the policy's own log-probs instead.
        with torch.no_grad():
            chosen = policy[spec.positive].detach().float()
            out = {"logps/chosen": chosen.mean().item()}
            if spec.negative != spec.positive and spec.negative in policy:
                rejected = policy[spec.negative].detach().float()
                out["logps/rejected"] = rejected.mean().item()
                if chosen.shape == rejected.shape:
                    out["logps/accuracy"] = (chosen > rejected).float().mean().item()
            return out
    with torch.no_grad():
        chosen = implicit_rewards(policy[spec.positive].detach(), reference[spec.positive], beta)
        rejected = implicit_rewards(policy[spec.negative].detach(), reference[spec.negative], beta)
        return {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/margin": (chosen - rejected).mean().item(),
            "rewards/accuracy": (chosen > rejected).float().mean().item(),
            "logps/chosen": policy[spec.positive].detach().float().mean().item(),
            "logps/rejected": policy[spec.negative].detach().float().mean().item(),
        }


def rewards_of(examples: Sequence[TokenizedExample], device=None) -> dict[str, torch.Tensor]:
    """Rewards in float64: a gap that validation saw as positive (e.g. 1.0 + 1e-9 vs 1.0) must not
    round to a tie in float32, where ODPO's log of the gap would fail mid-training."""
    names = examples[0].rewards.keys()
    return {n: torch.tensor([ex.rewards[n] for ex in examples], dtype=torch.float64, device=device) for n in names}


def token_counts(examples: Sequence[TokenizedExample], groups: Sequence[str], device=None) -> dict[str, torch.Tensor]:
    """Response lengths in tokens per group ([B], or [B, K] for anchors): the tokens each summed
    log-prob adds up (after truncation, the end-of-sequence token included)."""
    out = {}
    for g in groups:
        lengths = [[len(r) for r in ex.responses[g]] for ex in examples]
        tensor = torch.tensor(lengths, dtype=torch.float32, device=device)
        out[g] = tensor if g == "anchors" else tensor[:, 0]
    return out


# -------------------------------------------------------------------------------------- trainer


def make_adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where this torch and device have it: the same update, one pass
    over the parameters instead of a loop of small ops."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        log.info("fused AdamW unavailable (%s); using the default implementation", exc)
        return torch.optim.AdamW(params, **kwargs)


class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False, show_progress: bool = True):
        self.config, self.resume, self.overwrite, self.show_progress = config, resume, overwrite, show_progress
        self.spec = config.loss_spec()
        # Only the values the config sets: a mixture's terms keep their own defaults for the rest.
        self.params = config.loss_overrides()
        self.metric_beta = config.resolved_loss_params().get("beta", 0.1)  # implicit rewards in the logs
        self.last_inputs: LossInputs | None = None
        self.output_dir = Path(config.output_dir)
        self.pending: Path | None = None  # a checkpoint written but not yet shown to give a finite loss
        self.resume_changes: dict[str, list] = {}
        self.grad_norms: list[float] = []  # the first GRAD_BASELINE_STEPS steps' gradient norms
        self.start_weight_norm: float | None = None

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed

        config = self.config
        self.dtype = resolve_dtype(config.dtype)
        self.accelerator = make_accelerator(self.dtype)
        check_engine_supported(self.accelerator, grad_accum=config.grad_accum, retain=config.retain_data is not None)
        # The output dir's state, then the data: a conflict or a bad file fails in seconds,
        # before any model is loaded.
        self._check_output_dir()
        self._check_resume_compatible()
        self.tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.train_examples, self.eval_examples, self.data_summary = prepare_examples(config, self.spec, self.tokenizer)
        self.retain_examples = load_retain_examples(config, self.tokenizer) if config.retain_data else []
        if self.retain_examples:
            self.data_summary["retain_examples"] = len(self.retain_examples)
        self.pad_id = self.tokenizer.pad_token_id

        self.accelerator.wait_for_everyone()  # every process has checked the output dir before it changes
        with main_process_writes(self.accelerator) as main:
            if main:
                self._clear_output_dir()
                self.output_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.output_dir / "train_config.json", config.model_dump_json(indent=1))
                log.info(global_batch_line(config.batch_size, self.accelerator.num_processes, config.grad_accum,
                                           self.accelerator.distributed_type.value))
        set_seed(config.seed)
        # On this process's device now, not at prepare(): the reference is scored (precomputed or
        # copied) before the engine wraps the model, and on a GPU machine that belongs on the GPU.
        model = load_model(config.model, trust_remote_code=config.trust_remote_code).to(self.accelerator.device)
        if config.lora is not None:
            model = apply_lora(model, config.lora)
        self.total_steps = self._total_steps()
        late = [step for step in config.snapshot_steps if step > self.total_steps]
        if late:
            raise ConfigError(f"snapshot_steps: {late} past the run's {self.total_steps} steps")
        started = time.perf_counter()
        # Before any update: the policy is at its starting weights (a LoRA policy's adapters are zero).
        self.reference = build_reference(ReferenceSetup(config, self.spec, model, self.pad_id, self.train_examples,
                                                        self.eval_examples, self.accelerator))
        self.reference_seconds = time.perf_counter() - started  # the precompute, when it ran
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_adamw(trainable, lr=config.lr, weight_decay=config.weight_decay)
        from transformers import get_scheduler

        scheduler = get_scheduler(config.schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=self.total_steps)
        self.share_prompt = config.share_prompt and supports_shared_prompt(model)
        self.pack = config.pack and self.share_prompt and supports_packing(model)
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if deepspeed is not None:
            fill_deepspeed_micro_batch(deepspeed.deepspeed_config, config.batch_size)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        if is_sharded_engine(self.accelerator):
            self.reference = score_through_engine(self.reference, model, self.model)
        # FSDP2 shards the model in place (unwrap_model returns it as it is), so ask what wraps or
        # shards it: packing calls the decoder alone, which would bypass the engine's gathering.
        engine = distributed_wrapper(self.model)
        if self.pack and engine is not None:
            log.info("packing off: the model is wrapped by %s, and packing calls its decoder alone", engine)
            self.pack = False
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.refreshed_anchors: dict[int, list[list[int]]] = {}
        # One writer: the other processes read the main process's log and write nothing.
        self.logger = (MetricsLogger if self.accelerator.is_main_process else ReadOnlyMetricsLogger)(self.output_dir)
        self.memory = PeakMemory(self.accelerator.device)
        self.start_weight_norm = self._weight_norm()
        if self.resume:
            self._load_checkpoint()

    def _total_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        per_epoch = math.ceil(len(self.train_examples) / (self.global_batch_size() * self.config.grad_accum))
        return max(1, math.ceil(per_epoch * self.config.epochs))

    def global_batch_size(self) -> int:
        """Rows per micro-batch over all processes (``--batch-size`` is per process)."""
        return self.config.batch_size * self.accelerator.num_processes

    # -- output dir and checkpoints -------------------------------------------------------------
    def _check_output_dir(self) -> None:
        """Refuse, before any work, to mix two runs in one output dir."""
        out = self.output_dir
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite: give one (continue the run in the output dir, or replace it)")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir {out}: exists and is not a folder")
        if self.overwrite:
            return
        has_checkpoint = latest_checkpoint(out) is not None
        finished = (out / "train_summary.json").exists()
        if not self.resume and has_checkpoint:
            raise ConfigError(f"checkpoints at {checkpoints_dir(out)}: pass --resume, or --overwrite")
        if finished and not has_checkpoint:
            raise ConfigError(f"{out} holds a finished run (train_summary.json) and no checkpoint to resume from: "
                              "pass --overwrite, or another --output-dir")

    def _clear_output_dir(self) -> None:
        """``--overwrite``: remove the earlier run's files. A fresh run whose output dir holds only
        the log of a run that saved no checkpoint (nothing to resume) starts a new log."""
        import shutil

        out = self.output_dir
        if self.overwrite:
            removed = [name for name in RUN_FILES if (out / name).exists()]
            for name in removed:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            if removed:
                log.info("--overwrite: removed the earlier run's %s from %s", ", ".join(removed), out)
        elif not self.resume and (out / "train_log.jsonl").exists():
            log.info("%s: the earlier run saved no checkpoint; starting a new train_log.jsonl", out)
            (out / "train_log.jsonl").unlink()

    def _check_resume_compatible(self) -> None:
        saved = self.output_dir / "train_config.json"
        if not (self.resume and saved.exists() and latest_checkpoint(self.output_dir) is not None):
            return
        before = json.loads(saved.read_text())
        now = json.loads(self.config.model_dump_json())
        # A field added since that run started counts as its default there.
        defaults = json.loads(type(self.config)(data=self.config.data, output_dir=self.config.output_dir).model_dump_json())

        def old(k):
            return before.get(k, defaults.get(k))

        checkpoint = latest_checkpoint(self.output_dir)
        check_same_processes(read_state(checkpoint), self.accelerator.num_processes, checkpoint)
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and old(k) != now[k])
        if changed:
            raise ConfigError(
                f"--resume: {self.output_dir} was trained with different settings for {changed}; only "
                f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume: use a new output dir, or --overwrite"
            )
        self.resume_changes = {k: [old(k), now[k]] for k in sorted(RESUMABLE_CHANGES) if k in now and old(k) != now[k]}

    def _state(self) -> dict:
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "loss": self.config.loss,
                 "start_weight_norm": self.start_weight_norm, "grad_norms": self.grad_norms,
                 "num_processes": self.accelerator.num_processes}
        if self.refreshed_anchors:
            state["refreshed_anchors"] = {str(k): v for k, v in self.refreshed_anchors.items()}
        return state

    def _load_checkpoint(self) -> None:
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", self.output_dir)
            self.logger.truncate_after(0)
            return
        self.accelerator.load_state(str(checkpoint))
        state = read_state(checkpoint)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.start_weight_norm = state.get("start_weight_norm") or self.start_weight_norm
        self.grad_norms = list(state.get("grad_norms", []))
        by_index = {ex.index: ex for ex in self.train_examples}
        for index, anchors in state.get("refreshed_anchors", {}).items():
            by_index[int(index)].responses["anchors"] = anchors
            self.refreshed_anchors[int(index)] = anchors
        if self.resume_changes:
            self._apply_optimizer_settings()
            log.warning("--resume: from step %d with changed settings: %s", self.step,
                        "; ".join(f"{k} {a} -> {b}" for k, (a, b) in self.resume_changes.items()))
        # Steps the killed run logged after its last checkpoint are run again: drop their lines.
        self.logger.truncate_after(self.step)
        self.logger.event({"step": self.step, "event": "resumed", "checkpoint": checkpoint.name,
                           "changed": self.resume_changes})
        log.info("resumed from %s (step %d)", checkpoint, self.step)

    def _apply_optimizer_settings(self) -> None:
        """After loading a checkpoint: the config's lr, schedule, warmup and weight decay replace the
        saved ones (the scheduler keeps its position; its lambdas already come from the config)."""
        config = self.config
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        scheduler = getattr(self.scheduler, "scheduler", self.scheduler)
        for group in optimizer.param_groups:
            group["initial_lr"] = config.lr
            group["weight_decay"] = config.weight_decay
        if hasattr(scheduler, "lr_lambdas"):
            scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
            lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs

    def save_checkpoint(self) -> Path:
        self._save_pending()
        pending, self.pending = self.pending, None
        with main_process_writes(self.accelerator) as main:
            if main:
                commit_checkpoint(self.output_dir, pending, self.config.keep_checkpoints)
        return checkpoints_dir(self.output_dir) / f"step-{self.step:08d}"

    def _save_pending(self) -> None:
        with main_process_writes(self.accelerator) as main:
            if main:
                discard_pending(self.pending)
        # Every process takes part (each saves its RNG state; FSDP/ZeRO gather their shards);
        # accelerate writes the weights and optimizer from the main process only.
        self.pending = write_pending(self.accelerator, self.output_dir, self._state())

    def _settle_pending(self, loss_is_finite: bool) -> None:
        """The pending checkpoint's weights just gave a loss: keep the checkpoint only if it is finite."""
        if self.pending is None:
            return
        with main_process_writes(self.accelerator) as main:
            if main and loss_is_finite:
                commit_checkpoint(self.output_dir, self.pending, self.config.keep_checkpoints)
            elif main:
                discard_pending(self.pending)
        self.pending = None

    def _verify_final_weights(self) -> None:
        """The last checkpoint has no next step to test it: one forward pass without gradients."""
        if self.pending is None:
            return
        saved = (self.epoch, self.batch_in_epoch)
        examples, share = self.next_batch()
        self.epoch, self.batch_in_epoch = saved
        losses, *_ = self.loss_on(examples, train=False)
        loss = self._global_mean_loss(losses, share)
        finite = math.isfinite(loss)
        self._settle_pending(finite)
        if not finite:
            self._diverged(f"the loss at the final weights is {loss}", step=self.step)

    # -- divergence -----------------------------------------------------------------------------
    def _trainable(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _weight_norm(self) -> float:
        return weight_norm([p for _, p in self._trainable()], self.accelerator)

    def _diverged(self, cause: str, *, step: int | None = None):
        step = self.step + 1 if step is None else step
        if self.accelerator.is_main_process:
            discard_pending(self.pending)
        self.pending = None
        self.optimizer.zero_grad(set_to_none=True)
        last = latest_checkpoint(self.output_dir)
        lower = f"{self.config.lr / 10:g}"
        if last is not None:
            advice = (f"last good checkpoint: {last} (step {read_state(last)['step']}: finite loss and weights); to go on "
                      f"from it with a lower learning rate, run the same command with --resume --lr {lower}")
        else:
            advice = f"no checkpoint was kept; run again with a lower learning rate (e.g. --lr {lower})"
        raise TrainingDiverged(f"training stopped at step {step}: {cause}; {advice}")

    def _check_gradients(self, grad_norm: float) -> None:
        if not math.isfinite(grad_norm):
            self._diverged(f"the gradient norm is {grad_norm}")
        if len(self.grad_norms) >= GRAD_BASELINE_STEPS:
            baseline = sorted(self.grad_norms)[len(self.grad_norms) // 2]
            if baseline > 0 and grad_norm > GRAD_EXPLOSION * baseline:
                self._diverged(f"the gradient norm exploded to {grad_norm:.3g}, over {GRAD_EXPLOSION:g}x the median "
                               f"{baseline:.3g} of the first {GRAD_BASELINE_STEPS} steps")
        else:
            self.grad_norms.append(grad_norm)

    def _check_weights(self) -> None:
        norm = self._weight_norm()
        if not math.isfinite(norm):
            bad = [n for n, p in self._trainable() if not bool(torch.isfinite(p).all())]
            if bad:
                shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                self._diverged(f"the update made weights non-finite (nan/inf in {shown})")
        start = self.start_weight_norm or 0.0
        if not math.isfinite(norm) or (start > 0 and norm > WEIGHT_EXPLOSION * start):
            self._diverged(f"the weights exploded: the trainable weights' norm grew from {start:.3g} to {norm:.3g} "
                           f"(over {WEIGHT_EXPLOSION:g}x its value at the start of the run)")

    # -- steps ---------------------------------------------------------------------------------
    def loss_inputs(self, examples: Sequence[TokenizedExample], *, train: bool):
        """One policy forward pass, then a :class:`LossInputs` with what the loss reads: the
        reference values only for a loss that compares with a reference, token counts, per-token
        log-probs and rewards only where its registry entry names them."""
        spec = self.spec
        batch = collate(examples, spec.responses, self.pad_id, share_prompt=self.share_prompt,
                        pack=self.pack).to(self.accelerator.device)
        context = torch.enable_grad() if train else torch.no_grad()
        token_logps, token_mask = {}, {}
        # accelerate puts bf16 autocast around the wrapped model's forward, but the fused head path
        # calls the decoder and the LM head apart (sequences.py): without this the policy ran fp32
        with context, self.accelerator.autocast():
            if spec.token_logp_groups:
                summed, per_token, mask = sequence_token_logps(self.model, batch)
                rows = {g: batch.rows[g] for g in spec.token_logp_groups}
                token_logps, token_mask = split_groups(per_token, rows), split_groups(mask, rows)
            else:
                summed = sequence_logps(self.model, batch)
            policy = split_groups(summed, batch.rows)
        device = summed.device
        reference = {k: v.to(device) for k, v in self.reference.logps(examples).items()}
        inputs = LossInputs(
            policy=policy,
            reference={g: reference[g] for g in spec.reference_groups if g in reference},
            toxic_reference=reference.get(TOXIC_REF),
            rewards=rewards_of(examples, device) if spec.reward_fields else {},
            num_tokens=token_counts(examples, spec.token_count_groups, device),
            token_logps=token_logps,
            token_mask=token_mask,
        )
        return inputs, batch.num_tokens

    def loss_on(self, examples: Sequence[TokenizedExample], *, train: bool):
        inputs, num_tokens = self.loss_inputs(examples, train=train)
        self.last_inputs = inputs
        losses = self.spec(inputs, **self.params)
        weights = [ex.weight for ex in examples]
        if any(w != 1.0 for w in weights):
            losses = losses * torch.tensor(weights, dtype=losses.dtype, device=losses.device)
        return losses, dict(inputs.policy), dict(inputs.reference), num_tokens

    def term_metrics(self, prefix: str = "") -> dict[str, float]:
        """A mixture's terms, each unweighted (``loss/dpo``, ``loss/sft``), for the logs."""
        if len(self.spec.components) < 2 or self.last_inputs is None:
            return {}
        with torch.no_grad():
            terms = self.spec.terms(self.last_inputs, **self.params)
        return {f"{prefix}loss/{name}": value.mean().item() for name, value in terms.items()}

    def _epoch_batches(self) -> list[list[int]]:
        """The epoch's global batches, the same on every process (and the same as one process
        with the global batch size): each process then trains its slice of each."""
        config = self.config
        lengths = [ex.num_tokens() for ex in self.train_examples] if config.group_by_length else None
        return epoch_batches(len(self.train_examples), self.global_batch_size(), config.seed, self.epoch,
                             shuffle=config.shuffle, lengths=lengths)

    def next_global_batch(self) -> list[int]:
        batches = self._epoch_batches()
        if self.batch_in_epoch >= len(batches):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            batches = self._epoch_batches()
        indices = batches[self.batch_in_epoch]
        self.batch_in_epoch += 1
        return indices

    def next_batch(self) -> tuple[list[TokenizedExample], RankSlice]:
        """This process's examples of the next global batch, and their share of it."""
        share = rank_slice(self.next_global_batch(), self.accelerator.process_index, self.accelerator.num_processes)
        return [self.train_examples[i] for i in share.indices], share

    def upcoming_examples(self, num_batches: int) -> list[TokenizedExample]:
        """The examples of the next ``num_batches`` global batches (every process's rows), without
        moving the data position."""
        saved = (self.epoch, self.batch_in_epoch)
        try:
            return [self.train_examples[i] for _ in range(num_batches) for i in self.next_global_batch()]
        finally:
            self.epoch, self.batch_in_epoch = saved

    def _global_mean_loss(self, losses: torch.Tensor, share: RankSlice) -> float:
        """The mean loss over the global batch, the same number on every process."""
        rows = 0 if share.is_stand_in else len(share.indices)
        local = losses.detach().double().sum().item() if rows else 0.0
        total = sum_over_processes(self.accelerator, {"loss": local, "rows": rows})
        return total["loss"] / total["rows"]

    def maybe_refresh_anchors(self) -> None:
        every = self.config.anchor_refresh_every
        if not every or self.step % every:
            return
        examples = self.upcoming_examples(every * self.config.grad_accum)
        tokenizer = self.tokenizer
        with weights_for_generation(self.accelerator, self.model) as policy:
            refreshed = refresh_anchors(
                policy, list({ex.index: ex for ex in examples}.values()),
                pad_id=self.pad_id, eos_id=tokenizer.eos_token_id, max_new_tokens=self.config.anchor_max_new_tokens,
                temperature=self.config.anchor_temperature, seed=self.config.seed * 1_000_003 + self.step,
                max_length=self.config.max_length,
                # Data-parallel processes split the chunks and gather the anchors (the same chunks and
                # seeds as one process). Under FSDP/DeepSpeed every process samples them all: a sharded
                # model's forward passes must run in step on every process.
                state=None if is_sharded_engine(self.accelerator) else self.accelerator,
            )
        self.refreshed_anchors.update(refreshed)

    def train_step(self) -> dict[str, float]:
        config, accelerator = self.config, self.accelerator
        self.maybe_refresh_anchors()
        started = time.perf_counter()
        totals: dict[str, float] = {}
        tokens, loss_sum = 0, 0.0
        for micro in range(config.grad_accum):
            examples, share = self.next_batch()
            record_trained_rows(accelerator.process_index, {"step": self.step + 1, "epoch": self.epoch, "micro": micro,
                                                            "rows": [] if share.is_stand_in else share.indices})
            sync = micro == config.grad_accum - 1
            ctx = accelerator.no_sync(self.model) if not sync else _null()
            retain_nll = None
            if self.retain_examples:
                # Its own backward, never synced (the main loss's backward below all-reduces the
                # accumulated gradients), so its graph is freed before the main forward.
                with accelerator.no_sync(self.model):
                    term = retain_term(self, self.retain_examples, self.step * config.grad_accum + micro)
                    accelerator.backward(term.backward / config.grad_accum)
                retain_nll = term.nll_per_token
                if not math.isfinite(retain_nll):
                    self._diverged(f"the retain term's NLL is {retain_nll}")
            with ctx:
                losses, policy, reference, n_tokens = self.loss_on(examples, train=True)
                loss = self._global_mean_loss(losses, share)
                finite = math.isfinite(loss)
                if micro == 0:  # the weights of the pending checkpoint just gave this loss
                    self._settle_pending(finite)
                if not finite:
                    self._diverged(f"the loss is {loss}")
                # Averaged over the processes by accelerate, this is the gradient of the global mean.
                accelerator.backward(losses.sum() * share.weight / config.grad_accum)
            loss_sum += loss / config.grad_accum
            metrics = {**batch_metrics(self.spec, policy, reference, self.metric_beta), **self.term_metrics()}
            for k, v in self._global_means(metrics, share).items():
                totals[k] = totals.get(k, 0.0) + v / config.grad_accum
            if retain_nll is not None:  # already a global mean; the step's loss counts it weighted
                totals["loss/retain"] = totals.get("loss/retain", 0.0) + retain_nll / config.grad_accum
                loss_sum += config.retain_weight * retain_nll / config.grad_accum
            tokens += int(sum_over_processes(accelerator, {"tokens": n_tokens})["tokens"])
        grad_norm = float(accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm or float("inf")))
        self._check_gradients(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._check_weights()  # before anything is saved from these weights
        self.step += 1
        elapsed = time.perf_counter() - started
        return {
            "step": self.step, "epoch": self.epoch, "loss": loss_sum, **totals,
            "grad_norm": grad_norm, "lr": lr,
            "tokens_per_s": tokens / elapsed, "samples_per_s": self.global_batch_size() * config.grad_accum / elapsed,
            "step_time_s": elapsed,
        }

    def _global_means(self, means: dict[str, float], share: RankSlice) -> dict[str, float]:
        """Per-process means of this micro-batch's rows -> means over the global batch."""
        if self.accelerator.num_processes == 1:
            return means
        rows = 0 if share.is_stand_in else len(share.indices)
        # "_rows": no metric name starts with an underscore.
        totals = sum_over_processes(self.accelerator, {**{k: v * rows for k, v in means.items()}, "_rows": rows})
        count = totals.pop("_rows")
        return {k: v / count for k, v in totals.items()}

    def _eval_batches(self) -> list[list[int]]:
        """The eval data in order, in global batches of ``2 x --batch-size`` rows per process: one
        process cuts the same batches as before, N processes each score a slice of every batch."""
        size = self.config.batch_size * 2 * self.accelerator.num_processes
        n = len(self.eval_examples)
        return [list(range(start, min(start + size, n))) for start in range(0, n, size)]

    def evaluate(self) -> dict[str, float]:
        """Metrics over the whole eval data, each process scoring its slice of every eval batch.
        Row-weighted sums and the row count are added up over the processes once at the end, so the
        numbers are one process's, and every process returns them (the main one logs them)."""
        if not self.eval_examples:
            return {}
        accelerator = self.accelerator
        totals: dict[str, float] = {"_rows": 0.0}  # no metric name starts with an underscore
        was_training = self.model.training
        self.model.eval()
        for global_batch in self._eval_batches():
            # Every process runs one forward pass per batch (a stand-in row when its slice is
            # empty): a sharded engine gathers weights in each forward, with every process taking part.
            share = rank_slice(global_batch, accelerator.process_index, accelerator.num_processes)
            rows = 0 if share.is_stand_in else len(share.indices)
            record_trained_rows(accelerator.process_index, {"step": self.step, "rows": share.indices if rows else []},
                                kind="eval-rank")
            losses, policy, reference, _ = self.loss_on([self.eval_examples[i] for i in share.indices], train=False)
            metrics = {"loss": losses.mean().item(), **batch_metrics(self.spec, policy, reference, self.metric_beta),
                       **self.term_metrics()}
            for k, v in {**metrics, "_rows": 1.0}.items():
                # Every key on every process, a stand-in adding 0: the sum needs the same keys everywhere.
                totals[k] = totals.get(k, 0.0) + (v * rows if rows else 0.0)
        self.model.train(was_training)
        totals = sum_over_processes(accelerator, totals)
        n = totals.pop("_rows")
        return {f"eval/{k}": v / n for k, v in totals.items()}

    # -- run -----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        config = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.spec.name}", unit="step", disable=not self.show_progress or not self.accelerator.is_main_process)
        last: dict = {}
        while self.step < self.total_steps:
            metrics = {**self.train_step(), **self.memory.metrics()}
            if config.eval_every and self.step % config.eval_every == 0:
                metrics.update(self.evaluate())
            if self.step % config.log_every == 0 or self.step == self.total_steps:
                self.logger.log(metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('rewards/accuracy', metrics.get('logps/accuracy', float('nan'))):.2f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if self.step % config.save_every == 0 or self.step == self.total_steps:
                self._save_pending()  # kept once the next forward pass gives a finite loss
            if self.step in config.snapshot_steps:
                self._save_model(f"-step{self.step}")
        bar.close()
        self._verify_final_weights()
        final_eval = self.evaluate()
        if final_eval:
            self.logger.log({"step": self.step, **final_eval})
        return self.finish(last.get("loss"), final_eval)

    def _save_model(self, suffix: str = "") -> tuple[Path, Path | None]:
        """Write the policy as it is now to ``model{suffix}/`` (with LoRA: ``adapter{suffix}/``, and
        the merged model unless ``merge`` is off); returns (the folder a model loads from, adapter
        folder or None)."""
        model = self.accelerator.unwrap_model(self.model)
        # FSDP and ZeRO-3 hold shards: every process takes part in gathering the full weights.
        state_dict = self.accelerator.get_state_dict(self.model) if is_sharded_engine(self.accelerator) else None
        main = self.accelerator.is_main_process
        if self.config.lora is None:
            if main:
                self._save_folder(self._model_dir(suffix), model, state_dict)
            return self._model_dir(suffix), None
        adapter_dir = self.output_dir / f"adapter{suffix}"
        if main:
            self._save_folder(adapter_dir, model, state_dict)
            if self.config.merge:
                # From the adapter just written: the live model may be sharded, and training goes on
                # with its adapters.
                merged = merge_saved_adapter(self.config.model, adapter_dir, trust_remote_code=self.config.trust_remote_code)
                self._save_folder(self._model_dir(suffix), merged)
        return self._model_dir(suffix), adapter_dir

    def _model_dir(self, suffix: str = "") -> Path:
        """The folder a model loads from: the merged model, or the adapter when ``merge`` is off."""
        merged = self.config.lora is None or self.config.merge
        return self.output_dir / f"{'model' if merged else 'adapter'}{suffix}"

    def finish(self, final_loss, final_eval) -> TrainResult:
        model_dir, adapter_dir = self._save_model()
        # From the config, not from this process's saves: a resumed run saved the early ones before.
        snapshots = {step: self._model_dir(f"-step{step}") for step in self.config.snapshot_steps if step <= self.step}
        self.logger.close()
        summary = {
            "steps": self.step, "final_loss": final_loss, "model_dir": str(model_dir),
            "adapter_dir": str(adapter_dir) if adapter_dir else None, "data": self.data_summary,
            "peak_memory": self.memory.summary(), **final_eval,
            "snapshots": {str(step): str(folder) for step, folder in snapshots.items()},
        }
        with main_process_writes(self.accelerator) as main:
            if main:
                write_text_atomic(self.output_dir / "train_summary.json", json.dumps(summary, indent=1))
        return TrainResult(self.output_dir, self.step, final_loss, model_dir, adapter_dir, self.logger.history(), self.data_summary,
                           is_main_process=self.accelerator.is_main_process, snapshots=snapshots)


    def _save_folder(self, final: Path, model, state_dict: dict | None = None) -> None:
        """Save into a hidden folder, then swap it in: a kill never leaves a half-written model.
        ``state_dict``: the full weights gathered from FSDP/ZeRO shards (None: the model's own)."""
        import shutil

        tmp = final.with_name(f".{final.name}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        if state_dict is None:
            model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
        self.tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_training(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, show_progress: bool = True) -> TrainResult:
    """Train. An output dir holding an earlier run's checkpoints needs ``resume`` (continue it;
    only RESUMABLE_CHANGES may differ) or ``overwrite`` (remove it and start again)."""
    trainer = Trainer(config, resume=resume, overwrite=overwrite, show_progress=show_progress)
    trainer.setup()
    result = trainer.train()
    if result.is_main_process:
        from prefalign.models.card import write_training_cards

        write_training_cards(config, result)  # README.md in each saved model folder
    return result
