"""Batching, an on-disk score cache and a progress bar around any :class:`Scorer`.

Scores are stored in one SQLite file, ``<prefalign cache>/scores/scores.sqlite3`` (the cache dir is
``prefalign.models.registry.cache_root()``, ``$PREFALIGN_CACHE`` wins), keyed by the sha256 of
``(scorer.cache_id, text, prompt)``; the prompt counts only for scorers that read it
(``uses_prompts``). ``cache_id`` holds the scorer's name, its full config and the identity of its
model (package version, or a fingerprint of the model folder's files), so a changed config or a
retrained model never reads stale scores. NaN (unparsed) scores are not stored: a
re-run retries them. A scorer whose ``cache_id`` is ``None`` is batched but not cached.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from .base import Prompt, canonical_json, check_inputs


def default_cache_path() -> Path:
    from prefalign.models.registry import cache_root

    return cache_root() / "scores" / "scores.sqlite3"


def cache_key(scorer_id: str, text: str, prompt: Prompt) -> str:
    return hashlib.sha256(canonical_json([scorer_id, text, prompt]).encode("utf-8")).hexdigest()


class ScoreCache:
    """A small key -> float store in SQLite (safe to share between processes)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value REAL NOT NULL)")
        return con

    def get_many(self, keys: Sequence[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        if not keys:
            return found
        con = self._connect()
        try:
            unique = list(dict.fromkeys(keys))
            for i in range(0, len(unique), 500):
                chunk = unique[i : i + 500]
                marks = ",".join("?" * len(chunk))
                found.update(con.execute(f"SELECT key, value FROM scores WHERE key IN ({marks})", chunk).fetchall())
        finally:
            con.close()
        return found

    def put_many(self, items: dict[str, float]) -> None:
        rows = [(k, float(v)) for k, v in items.items() if v is not None and math.isfinite(v)]
        if not rows:
            return
        con = self._connect()
        try:
            with con:
                con.executemany("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)", rows)
        finally:
            con.close()

    def __len__(self) -> int:
        if not self.path.exists():
            return 0
        con = self._connect()
        try:
            return con.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
        finally:
            con.close()


class BatchedScorer:
    """Wraps a scorer: looks scores up in the cache, scores the misses in batches with a progress
    bar, stores the new scores. Itself a :class:`Scorer`; ``inner`` is the wrapped one.

    ``hits``/``misses`` count cache lookups over this object's lifetime.
    """

    def __init__(
        self,
        inner,
        *,
        cache: ScoreCache | None = None,
        batch_size: int | None = None,
        show_progress: bool = True,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.cache_id = getattr(inner, "cache_id", None)
        # Scorers that ignore prompts share cache entries across prompts.
        self.uses_prompts = bool(getattr(inner, "uses_prompts", False))
        self.cache = cache if self.cache_id is not None else None
        self.batch_size = batch_size or getattr(inner, "batch_size", None) or 32
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.show_progress = show_progress
        self.hits = 0
        self.misses = 0

    def score(self, texts: Sequence[str], prompts: Sequence[Prompt] | None = None) -> list[float]:
        prompt_list = check_inputs(texts, prompts)
        passed_prompts = prompts is not None
        results: list[float | None] = [None] * len(texts)
        keys: list[str] = []
        if self.cache is not None:
            keys = [cache_key(self.cache_id, t, p if self.uses_prompts else None) for t, p in zip(texts, prompt_list)]
            found = self.cache.get_many(keys)
            for i, k in enumerate(keys):
                if k in found:
                    results[i] = found[k]
        todo = [i for i, r in enumerate(results) if r is None]
        self.hits += len(texts) - len(todo)
        self.misses += len(todo)
        if not todo:
            return [float(r) for r in results]
        bar = tqdm(total=len(todo), desc=f"scoring ({self.name})", unit="text", disable=not self.show_progress, leave=False)
        try:
            for start in range(0, len(todo), self.batch_size):
                idx = todo[start : start + self.batch_size]
                batch_texts = [texts[i] for i in idx]
                batch_prompts = [prompt_list[i] for i in idx] if passed_prompts else None
                scores = self.inner.score(batch_texts, batch_prompts)
                if len(scores) != len(idx):
                    raise RuntimeError(f"scorer '{self.name}' returned {len(scores)} scores for {len(idx)} texts")
                new = {}
                for i, s in zip(idx, scores):
                    results[i] = float(s)
                    if self.cache is not None:
                        new[keys[i]] = float(s)
                if self.cache is not None:
                    self.cache.put_many(new)  # per batch: an interrupted run keeps what it scored
                bar.update(len(idx))
        finally:
            bar.close()
        return [float(r) for r in results]
