"""The data of ADPO (Kim & Lee 2024, "Adversarial DPO: Harnessing Harmful Data for Reducing
Toxicity with Minimal Impact on Coherence and Evasiveness in Dialogue Agents", arXiv:2405.12900),
in two strategies around a training run (``recipes/adpo-toxicity.yaml`` chains the three stages):

1. ``toxic-sft-data`` — **sample and label.** ``n`` responses per prompt from the base model, each
   scored by a toxicity scorer (``texts -> floats``) and labelled toxic when its score is
   ``>= threshold``; writes the toxic-control SFT records ``{prompt: "[TOXIC] " + prompt, chosen:
   toxic sample}`` and ``{prompt: prompt, chosen: non-toxic sample}``.
2. A ``train`` stage with ``loss: sft`` on those records fine-tunes the base model into the
   *toxic-control model*, which writes toxic text when the control token is in the user turn.
3. ``toxic-control`` — **records.** Given that model (``toxic_model``), for each prompt it samples a
   ``toxic`` response under the control token; ``chosen`` is the least toxic base sample,
   ``rejected`` the most toxic one: ``{prompt, chosen, rejected, toxic}`` for the ``adpo`` loss,
   whose trainer uses the same model as ``TrainConfig.toxic_reference_model``.

Both strategies sample the base model the same way (same prompts, seed and sampling settings give
the same samples) and keep the samples in ``work_dir/base_samples.jsonl`` (resumable): given the
same ``work_dir``, step 3 reads step 1's samples instead of sampling again. ``work_dir`` is by
default ``<output without .jsonl>.toxic-control/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from tqdm.auto import tqdm

from prefalign.data.io import read_resumable_lines, rewrite_lines, write_jsonl
from prefalign.data.prompts import Prompt
from prefalign.data.render import with_control_token
from prefalign.generate.backends.base import Completion, is_truncated
from prefalign.generate.core import Candidate, Strategy, StrategyConfig, complete, pair_problem, stripped, user
from prefalign.generate.scoring import resolve_scorer, score_texts
from prefalign.sharding import distributed_state, from_main, is_main, sharded_rounds

log = logging.getLogger("prefalign.generate")


class LabelledSamplesConfig(StrategyConfig):
    """How the base model's samples are drawn and labelled (the same in both ADPO strategies)."""

    n: int = Field(4, ge=1, le=64, description="base-model samples per prompt")
    scorer: str | None = Field(
        None, description="toxicity scorer (higher = more toxic): a prefalign scorer (toxicity, profanity) or module:function"
    )
    threshold: float = Field(0.5, description="a sample scoring >= threshold is labelled toxic")
    control_token: str = Field("[TOXIC]", min_length=1, description="must match TrainConfig.toxic_control_token")
    work_dir: Path | None = Field(None, description="where the base samples are kept (default: <output>.toxic-control/)")


class ToxicSftDataConfig(LabelledSamplesConfig):
    """ADPO toxic-control SFT data."""


class ToxicControlConfig(LabelledSamplesConfig):
    """ADPO records, sampled from a given toxic-control model."""

    toxic_model: str = Field(..., min_length=1, description="the toxic-control model (a train stage with loss sft on toxic-sft-data)")
    min_gap: float = Field(0.0, ge=0, description="least toxicity gap between rejected and chosen")
    toxic_samples: int = Field(1, ge=1, le=16, description="toxic-control samples per prompt; the most toxic is kept")


# ----------------------------------------------------------------------------- pure helpers


def label(scores: Sequence[float], threshold: float) -> list[bool]:
    return [s >= threshold for s in scores]


def _recover_base_samples(path: Path) -> dict[str, list]:
    """The base samples a run (perhaps killed) left in ``path``, by sample key; a torn last line is
    dropped from the file."""
    rows, torn = read_resumable_lines(path)
    if torn:
        log.warning("%s: dropping a torn last line left by an interrupted run", path)
        rewrite_lines(path, [raw for raw, _ in rows])
    return {obj["key"]: _samples_of(obj) for _, obj in rows if "key" in obj and isinstance(obj.get("samples"), list)}


def _samples_of(row: dict) -> list[str]:
    """A stored row's samples, with the token-limit flags they were generated with."""
    flags = row.get("truncated") or [False] * len(row["samples"])
    return [Completion(text, bool(cut)) for text, cut in zip(row["samples"], flags)]


def sft_candidates(prompt: Any, samples: Sequence[str], scores: Sequence[float], threshold: float, token: str,
                   tag: str = "toxic-sft-data") -> list[Candidate]:
    """The toxic-control SFT records of one prompt: toxic samples under the control token, the
    others under the plain prompt (empty samples are left out)."""
    records = []
    for text, toxic, score in zip(samples, label(scores, threshold), scores):
        if text.strip():
            meta = {"label": "toxic" if toxic else "non_toxic", "score": score}
            records.append(Candidate.keep(tag, meta, prompt=with_control_token(prompt, token) if toxic else prompt,
                                          chosen=stripped(text)))
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


# ----------------------------------------------------------------------------- strategies


class LabelledSamples(Strategy):
    """What both ADPO strategies do first (in ``setup``): sample the base model ``n`` times per
    prompt and score every sample; ``self.base[prompt id] = (samples, scores)``."""

    def __init__(self, config, ctx) -> None:
        super().__init__(config, ctx)
        self.scorer = ctx.scorer or resolve_scorer(self.config.scorer, default="toxicity", what=self.name)
        self.base: dict[str, tuple[list[str], list[float]]] = {}
        self.stats: dict[str, Any] = {}

    @property
    def work_dir(self) -> Path:
        if self.config.work_dir is not None:
            return Path(self.config.work_dir)
        if self.ctx.output is None:
            raise ValueError(f"{self.name}: set work_dir (no output file to put it next to)")
        out = Path(self.ctx.output)
        return out.with_name(out.name.removesuffix(".jsonl") + ".toxic-control")

    def _sample_key(self, prompt: Prompt) -> str:
        s = self.ctx.sampling
        return _hash([prompt.id, prompt.prompt, self.backend.model_id, self.ctx.seed, self.config.n,
                      s.max_new_tokens, s.temperature, s.top_p, s.top_k])[:20]

    def _base_samples(self, prompts: Sequence[Prompt]) -> dict[str, list[str]]:
        path = self.work_dir / "base_samples.jsonl"
        # Under several processes (accelerate launch, torchrun) the main process reads the file and
        # alone writes it; the batches are split over the processes as in the generation runner.
        state = distributed_state()
        main = is_main(state)
        done = from_main(lambda: _recover_base_samples(path), state)
        keys = {p.id: self._sample_key(p) for p in prompts}
        todo = [p for p in prompts if keys[p.id] not in done]
        # One seed for every batch (not the runner's per-batch seeds): the samples depend only on the
        # prompts and the settings, so both strategies draw the same ones, on any process.
        params = self.ctx.params(self.ctx.seed, "toxic-control/base", n=self.config.n)
        size = self.ctx.batch_size
        batches = [todo[start:start + size] for start in range(0, len(todo), size)]

        def sample(batch: list[Prompt]) -> list[dict]:
            samples = complete(self.backend, [[user(p.prompt)] for p in batch], params)
            return [{"key": keys[p.id], "prompt_id": p.id, "prompt": p.prompt, "samples": s,
                     "truncated": [is_truncated(t) for t in s]} for p, s in zip(batch, samples)]

        with tqdm(total=len(todo), desc=f"{self.name}: base samples", unit="prompt",
                  disable=not self.ctx.show_progress or not main) as bar:
            for rows in sharded_rounds(batches, sample, state):
                for new in rows:
                    if main:
                        write_jsonl(path, new, append=True)
                    done.update((r["key"], r["samples"]) for r in new)
                    bar.update(len(new))
        self.stats["base_samples_reused"] = len(prompts) - len(todo)
        return {p.id: done[keys[p.id]] for p in prompts}

    def setup(self, prompts: Sequence[Prompt]) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        samples = self._base_samples(prompts)
        flat = [t for p in prompts for t in samples[p.id]]
        scores = iter(score_texts(self.scorer, flat))
        self.base = {p.id: (samples[p.id], [next(scores) for _ in samples[p.id]]) for p in prompts}

    def info(self) -> dict:
        return dict(self.stats)


class ToxicSftData(LabelledSamples):
    name: ClassVar[str] = "toxic-sft-data"
    Config = ToxicSftDataConfig
    description = "ADPO: sample+label the base model, write the [TOXIC]-control SFT records (train them with loss sft)"

    def setup(self, prompts: Sequence[Prompt]) -> None:
        super().setup(prompts)
        cfg: ToxicSftDataConfig = self.config
        labels = [toxic for p in prompts for text, toxic in zip(self.base[p.id][0], label(self.base[p.id][1], cfg.threshold))
                  if text.strip()]
        self.stats.update(sft_records=len(labels), sft_toxic=sum(labels), sft_non_toxic=len(labels) - sum(labels))
        if not any(labels):
            # An SFT without a single toxic example would never see the control token.
            raise ValueError(
                f"{self.name}: no base sample scored >= threshold {cfg.threshold} "
                f"({len(labels)} samples); lower the threshold, sample more (n) or use more toxic prompts"
            )

    def generate(self, prompts: Sequence[Prompt], seed: int | None) -> list[list[Candidate]]:
        cfg: ToxicSftDataConfig = self.config
        return [sft_candidates(p.prompt, *self.base[p.id], cfg.threshold, cfg.control_token, self.name) for p in prompts]


class ToxicControl(LabelledSamples):
    name: ClassVar[str] = "toxic-control"
    Config = ToxicControlConfig
    description = "ADPO: with a [TOXIC]-control model (toxic_model), {prompt, chosen, rejected, toxic}"

    def __init__(self, config, ctx) -> None:
        super().__init__(config, ctx)
        self.toxic_backend = None

    def setup(self, prompts: Sequence[Prompt]) -> None:
        super().setup(prompts)
        if self.ctx.make_backend is None:
            raise ValueError("toxic-control needs a way to load the toxic-control model (make_backend)")
        self.toxic_backend = self.ctx.make_backend(self.config.toxic_model)

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
                    "threshold": cfg.threshold, "toxic_model": cfg.toxic_model, "control_token": cfg.control_token}
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
        return {"toxic_control_model": self.config.toxic_model,
                "for_adpo": f"train with loss adpo and toxic_reference_model: {self.config.toxic_model}", **self.stats}
