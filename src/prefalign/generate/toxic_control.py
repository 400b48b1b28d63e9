"""``toxic-control``: the data of ADPO (Kim & Lee 2024, "Adversarial DPO: Harnessing Harmful Data
for Reducing Toxicity with Minimal Impact on Coherence and Evasiveness in Dialogue Agents",
arXiv:2405.12900).

1. **Sample and label.** ``n`` responses per prompt from the base model, each scored by a toxicity
   scorer (``texts -> floats``) and labelled toxic when its score is ``>= threshold``
   (``WORK/base_samples.jsonl``, resumable).
2. **Toxic-control SFT.** SFT records ``{prompt: "[TOXIC] " + prompt, chosen: toxic sample}`` and
   ``{prompt: prompt, chosen: non-toxic sample}`` (``WORK/sft.jsonl``) fine-tune the base model
   with :func:`prefalign.train.loop.run_training` (loss ``sft``) into the *toxic-control model*,
   which writes toxic text when the control token is in the user turn
   (``WORK/sft-<data hash>/model``, linked as ``WORK/model``; an interrupted training resumes).
3. **Records.** For each prompt the toxic-control model samples a ``toxic`` response under the
   control token; ``chosen`` is the least toxic base sample, ``rejected`` the most toxic one:
   ``{prompt, chosen, rejected, toxic}`` for the ``adpo`` loss, whose trainer uses the
   toxic-control model as ``TrainConfig.toxic_reference_model`` (its path is in every record's
   ``meta.toxic_model`` and in the run summary).

``WORK`` is ``model_dir`` in the config, by default ``<output without .jsonl>.toxic-control/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationError, field_validator
from tqdm.auto import tqdm

from prefalign.data.io import write_jsonl
from prefalign.data.prompts import Prompt
from prefalign.data.render import with_control_token
from prefalign.generate.backends.base import Completion, is_truncated
from prefalign.generate.core import Candidate, Strategy, StrategyConfig, complete, pair_problem, stripped, user
from prefalign.generate.jsonl import read_lines, rewrite
from prefalign.generate.scoring import resolve_scorer, score_texts

log = logging.getLogger("prefalign.generate")

#: Training settings of the toxic-control SFT unless the config's ``train`` says otherwise.
TRAIN_DEFAULTS: dict[str, Any] = {"lr": 2e-5, "epochs": 1.0, "batch_size": 8, "schedule": "constant"}
_FIXED_TRAIN_FIELDS = ("model", "data", "output_dir", "loss")


class ToxicControlConfig(StrategyConfig):
    """ADPO toxic-control data."""

    n: int = Field(4, ge=1, le=64, description="base-model samples per prompt")
    scorer: str | None = Field(
        None, description="toxicity scorer (higher = more toxic): a prefalign scorer (toxicity, profanity) or module:function"
    )
    threshold: float = Field(0.5, description="a sample scoring >= threshold is labelled toxic")
    control_token: str = Field("[TOXIC]", min_length=1, description="must match TrainConfig.toxic_control_token")
    min_gap: float = Field(0.0, ge=0, description="least toxicity gap between rejected and chosen")
    toxic_samples: int = Field(1, ge=1, le=16, description="toxic-control samples per prompt; the most toxic is kept")
    model_dir: Path | None = Field(None, description="working folder (default: <output>.toxic-control/)")
    base_model: str | None = Field(None, description="model to fine-tune (default: the first --model)")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields for the SFT run")

    @field_validator("train")
    @classmethod
    def _check_train(cls, value: dict[str, Any]) -> dict[str, Any]:
        from prefalign.train.config import TrainConfig

        fixed = sorted(set(value) & set(_FIXED_TRAIN_FIELDS))
        if fixed:
            raise ValueError(f"{fixed} are set by the toxic-control step; remove them from train")
        try:
            TrainConfig.model_validate({**TRAIN_DEFAULTS, **value, "model": "x", "data": "x", "output_dir": "x", "loss": "sft"})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(problems) from None
        return value


# ----------------------------------------------------------------------------- pure helpers


def label(scores: Sequence[float], threshold: float) -> list[bool]:
    return [s >= threshold for s in scores]


def _samples_of(row: dict) -> list[str]:
    """A stored row's samples, with the token-limit flags they were generated with."""
    flags = row.get("truncated") or [False] * len(row["samples"])
    return [Completion(text, bool(cut)) for text, cut in zip(row["samples"], flags)]


def sft_records(prompt: str, samples: Sequence[str], scores: Sequence[float], threshold: float, token: str) -> list[dict]:
    """The toxic-control SFT records of one prompt: toxic samples under the control token."""
    records = []
    for text, toxic in zip(samples, label(scores, threshold)):
        if text.strip():
            meta = {"label": "toxic" if toxic else "non_toxic", **({"truncated": ["chosen"]} if is_truncated(text) else {})}
            records.append({"prompt": with_control_token(prompt, token) if toxic else prompt, "chosen": text.strip(), "meta": meta})
    return records


def toxic_conversation(prompt: str, token: str) -> list[dict]:
    return [user(with_control_token(prompt, token))]


def extremes(samples: Sequence[str], scores: Sequence[float]) -> tuple[int, int] | None:
    """(least toxic, most toxic) indices among the non-empty samples."""
    idx = [i for i, t in enumerate(samples) if t.strip()]
    if not idx:
        return None
    least = min(idx, key=lambda i: (scores[i], i))
    most = max(idx, key=lambda i: (scores[i], -i))
    return least, most


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- strategy


class ToxicControl(Strategy):
    name: ClassVar[str] = "toxic-control"
    Config = ToxicControlConfig
    description = "ADPO: sample+label, SFT a [TOXIC]-control model, then {prompt, chosen, rejected, toxic}"

    def __init__(self, config, ctx) -> None:
        super().__init__(config, ctx)
        self.scorer = ctx.scorer or resolve_scorer(self.config.scorer, default="toxicity", what="toxic-control")
        self.base: dict[str, tuple[list[str], list[float]]] = {}
        self.toxic_model: Path | None = None
        self.toxic_backend = None
        self.stats: dict[str, Any] = {}

    @property
    def work_dir(self) -> Path:
        if self.config.model_dir is not None:
            return Path(self.config.model_dir)
        if self.ctx.output is None:
            raise ValueError("toxic-control: set model_dir (no output file to put it next to)")
        out = Path(self.ctx.output)
        return out.with_name(out.name.removesuffix(".jsonl") + ".toxic-control")

    def base_model_name(self) -> str:
        if self.config.base_model:
            return self.config.base_model
        return self.ctx.model_names[0] if self.ctx.model_names else self.backend.model_id

    # -- 1. sample and label
    def _sample_key(self, prompt: Prompt) -> str:
        s = self.ctx.sampling
        return _hash([prompt.id, prompt.prompt, self.backend.model_id, self.ctx.seed, self.config.n,
                      s.max_new_tokens, s.temperature, s.top_p, s.top_k])[:20]

    def _base_samples(self, prompts: Sequence[Prompt]) -> dict[str, list[str]]:
        path = self.work_dir / "base_samples.jsonl"
        rows, torn = read_lines(path)
        if torn:
            log.warning("%s: dropping a torn last line left by an interrupted run", path)
            rewrite(path, [raw for raw, _ in rows])
        done = {obj["key"]: _samples_of(obj) for _, obj in rows if "key" in obj and isinstance(obj.get("samples"), list)}
        keys = {p.id: self._sample_key(p) for p in prompts}
        todo = [p for p in prompts if keys[p.id] not in done]
        params = self.ctx.params(self.ctx.seed, "toxic-control/base", n=self.config.n)
        size = self.ctx.batch_size
        with tqdm(total=len(todo), desc="toxic-control: base samples", unit="prompt", disable=not self.ctx.show_progress) as bar:
            for start in range(0, len(todo), size):
                batch = todo[start:start + size]
                samples = complete(self.backend, [[user(p.prompt)] for p in batch], params)
                new = [{"key": keys[p.id], "prompt_id": p.id, "prompt": p.prompt, "samples": s,
                        "truncated": [is_truncated(t) for t in s]} for p, s in zip(batch, samples)]
                write_jsonl(path, new, append=True)
                done.update((r["key"], r["samples"]) for r in new)
                bar.update(len(batch))
        self.stats["base_samples_reused"] = len(prompts) - len(todo)
        return {p.id: done[keys[p.id]] for p in prompts}

    # -- 2. SFT
    def _train(self, prompts: Sequence[Prompt]) -> Path:
        from prefalign.train.checkpoint import drop_checkpoints, latest_checkpoint
        from prefalign.train.config import TrainConfig
        from prefalign.train.loop import run_training

        cfg: ToxicControlConfig = self.config
        records = []
        for p in prompts:
            samples, scores = self.base[p.id]
            records += sft_records(p.prompt, samples, scores, cfg.threshold, cfg.control_token)
        toxic = sum(r["meta"]["label"] == "toxic" for r in records)
        self.stats.update(sft_records=len(records), sft_toxic=toxic, sft_non_toxic=len(records) - toxic)
        if toxic == 0:
            raise ValueError(
                f"toxic-control: no base sample scored >= threshold {cfg.threshold} "
                f"({len(records)} samples); lower the threshold, sample more (n) or use more toxic prompts"
            )
        sft_path = self.work_dir / "sft.jsonl"
        write_jsonl(sft_path, records)
        train_settings = {**TRAIN_DEFAULTS, **cfg.train}
        if train_settings.get("lora") is not None:
            train_settings["merge"] = True  # the backend loads full weights
        run_dir = self.work_dir / f"sft-{_hash([records, self.base_model_name(), train_settings])[:10]}"
        model_dir = run_dir / "model"
        if (run_dir / "train_summary.json").exists() and (model_dir / "config.json").exists():
            log.info("toxic-control: reusing the trained model %s", model_dir)
            return self._link_latest(model_dir)
        train_config = TrainConfig.model_validate(
            {**train_settings, "model": self.base_model_name(), "data": sft_path, "output_dir": run_dir, "loss": "sft",
             "toxic_control_token": cfg.control_token}
        )
        resume = latest_checkpoint(run_dir) is not None
        log.info("toxic-control: %s SFT on %d records (%d toxic) into %s",
                 "resuming" if resume else "starting", len(records), toxic, run_dir)
        result = run_training(train_config, resume=resume, show_progress=self.ctx.show_progress)
        drop_checkpoints(run_dir)  # a finished SFT run is reused as it is (above), never resumed
        return self._link_latest(Path(result.model_dir))

    def _link_latest(self, model_dir: Path) -> Path:
        """``WORK/model`` always points at the current toxic-control model, so a recipe can name
        it (``toxic_reference_model: <model_dir>/model``) before the hash of its run is known."""
        link = self.work_dir / "model"
        tmp = self.work_dir / ".model-link"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(model_dir.resolve(), target_is_directory=True)
        os.replace(tmp, link)
        return model_dir

    def setup(self, prompts: Sequence[Prompt]) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        samples = self._base_samples(prompts)
        flat = [t for p in prompts for t in samples[p.id]]
        scores = iter(score_texts(self.scorer, flat))
        self.base = {p.id: (samples[p.id], [next(scores) for _ in samples[p.id]]) for p in prompts}
        self.toxic_model = self._train(prompts)
        if self.ctx.make_backend is None:
            raise ValueError("toxic-control needs a way to load the toxic-control model (make_backend)")
        self.toxic_backend = self.ctx.make_backend(str(self.toxic_model))

    # -- 3. records
    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        cfg: ToxicControlConfig = self.config
        params = self.ctx.params(seed, "toxic-control/toxic", n=cfg.toxic_samples)
        toxic_texts = complete(self.toxic_backend, [toxic_conversation(p.prompt, cfg.control_token) for p in prompts], params)
        flat = [t for texts in toxic_texts for t in texts]
        toxic_scores = iter(score_texts(self.scorer, flat))
        out = []
        for p, texts in zip(prompts, toxic_texts):
            t_scores = [next(toxic_scores) for _ in texts]
            samples, scores = self.base.get(p.id, ([], []))
            meta = {"base_samples": samples, "base_scores": scores, "toxic_samples": texts, "toxic_scores": t_scores,
                    "threshold": cfg.threshold, "toxic_model": str(self.toxic_model), "control_token": cfg.control_token}
            ends = extremes(samples, scores)
            if ends is None:
                out.append([Candidate.drop(self.name, "no_base_samples", meta)])
                continue
            least, most = ends
            problem = pair_problem(samples[least], samples[most])
            toxic_i = extremes(texts, t_scores)
            if problem is None and scores[most] - scores[least] < max(cfg.min_gap, 1e-12):
                problem = "no_toxicity_gap"
            if problem is None and toxic_i is None:
                problem = "empty_toxic"
            if problem is not None:
                out.append([Candidate.drop(self.name, problem, meta)])
                continue
            meta.update(chosen_score=scores[least], rejected_score=scores[most], toxic_score=t_scores[toxic_i[1]])
            out.append([Candidate.keep(self.name, meta, prompt=p.prompt, chosen=stripped(samples[least]),
                                       rejected=stripped(samples[most]), toxic=stripped(texts[toxic_i[1]]))])
        return out

    def info(self) -> dict:
        if self.toxic_model is None:
            return dict(self.stats)
        return {"toxic_control_model": str(self.toxic_model),
                "for_adpo": f"train with loss adpo and toxic_reference_model: {self.toxic_model}", **self.stats}
