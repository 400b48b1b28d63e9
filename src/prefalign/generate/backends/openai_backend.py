"""Generation through any OpenAI-compatible ``/chat/completions`` server (vLLM, llama.cpp, Ollama, hosted).

Standard library only (``urllib``). The API key is read from an environment variable at request
time and is never stored on the object, logged, or put in an exception message.

- Bounded concurrency: at most ``max_concurrency`` requests in flight (a thread pool).
- Retries with exponential backoff and jitter on 408/409/429/5xx, timeouts and connection errors;
  a ``Retry-After`` header (seconds or HTTP date) is respected.
- Any other 4xx raises :class:`OpenAIBackendError` naming the status and the server's message.
- Servers that ignore ``n > 1`` get repeated requests (``seed + k`` for the k-th) until each
  conversation has ``n`` texts.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from prefalign.generate.backends.base import (
    Completion,
    Conversation,
    GenerationStats,
    SamplingParams,
    check_conversations,
    cut_at_stop,
)

log = logging.getLogger("prefalign.generate")

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))
MAX_MESSAGE_CHARS = 500
_sleep = time.sleep  # module-level so tests can record backoff delays instead of waiting


class OpenAIBackendError(RuntimeError):
    """A request failed for good: a non-retryable status, or retries exhausted."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 4,
        timeout_s: float = 60,
        max_retries: int = 5,
        *,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        retry_after_max_s: float = 120.0,
        extra_body: dict | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.model_id = model
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.extra_body = dict(extra_body or {})
        self.last_stats = GenerationStats()
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the key, only where it comes from
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    # ------------------------------------------------------------------ public

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams) -> list[list[str]]:
        check_conversations(conversations)
        stats = GenerationStats(prompts=len(conversations))
        stats.extra = {"backend": self.name, "requests": 0, "retries": 0, "prompt_tokens": 0}
        start = time.perf_counter()
        if len(conversations) <= 1 or self.max_concurrency == 1:
            out = [self._complete(c, params, stats) for c in conversations]
        else:
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(conversations))) as pool:
                futures = [pool.submit(self._complete, c, params, stats) for c in conversations]
                try:
                    out = [f.result() for f in futures]
                except BaseException:
                    for f in futures:  # fail fast: drop the requests not yet started
                        f.cancel()
                    raise
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        log.info(
            "generated %d tokens for %d prompts in %.2fs (%.1f tokens/s, %d requests, %d retries)",
            stats.new_tokens, stats.prompts, stats.seconds, stats.tokens_per_s,
            stats.extra["requests"], stats.extra["retries"],
        )
        return out

    # ---------------------------------------------------------------- internals

    def _complete(self, conversation: Conversation, params: SamplingParams, stats: GenerationStats) -> list[str]:
        texts: list[str] = []
        k = 0
        # Each request must return at least one choice, so this loop ends after at most n requests.
        while len(texts) < params.n:
            want = params.n - len(texts)
            seed = None if params.seed is None else params.seed + k
            body = self._body(conversation, params, want, seed)
            data = self._post(body, stats)
            choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
            if not choices:
                raise OpenAIBackendError(f"POST {self.url}: the response has no choices")
            for choice in choices[:want]:
                message = choice.get("message") or {}
                content = message.get("content")
                if content is None:
                    content = choice.get("text") or ""
                texts.append(Completion(cut_at_stop(content, params.stop), choice.get("finish_reason") == "length"))
            usage = data.get("usage") or {}
            with self._lock:
                stats.new_tokens += int(usage.get("completion_tokens") or 0)
                stats.extra["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
            k += 1
        return texts

    def _body(self, conversation: Conversation, params: SamplingParams, n: int, seed: int | None) -> dict:
        body: dict = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in conversation],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if n > 1:
            body["n"] = n
        if params.top_k > 0:  # not in the OpenAI spec; vLLM, llama.cpp and Ollama accept it
            body["top_k"] = params.top_k
        if params.stop:
            body["stop"] = list(params.stop)
        if seed is not None:
            body["seed"] = seed
        body.update(self.extra_body)
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            text = text.replace(key, "***")
        return text

    def _post(self, body: dict, stats: GenerationStats) -> dict:
        payload = json.dumps(body).encode()
        attempt = 0
        while True:
            with self._lock:
                stats.extra["requests"] += 1
            try:
                return self._post_once(payload)
            except _Retryable as err:
                if attempt >= self.max_retries:
                    raise OpenAIBackendError(
                        f"POST {self.url} failed after {attempt + 1} attempts: {err.reason}", status=err.status
                    ) from None
                delay = self._delay(attempt, err.retry_after)
                log.warning(
                    "POST %s: %s; retry %d/%d in %.2fs", self.url, err.reason, attempt + 1, self.max_retries, delay
                )
                with self._lock:
                    stats.extra["retries"] += 1
                _sleep(delay)
                attempt += 1

    def _post_once(self, payload: bytes) -> dict:
        request = urllib.request.Request(self.url, data=payload, headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                raw_err = exc.read()
            except Exception:
                raw_err = b""
            finally:
                exc.close()
            message = self._scrub(_server_message(raw_err) or str(exc.reason or ""))
            if status in RETRY_STATUSES:
                raise _Retryable(f"HTTP {status}: {message}", _retry_after(exc.headers), status) from None
            raise OpenAIBackendError(f"POST {self.url} failed: HTTP {status}: {message}", status=status) from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, socket.timeout, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise _Retryable(self._scrub(f"connection error: {type(exc).__name__}: {reason}")) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise OpenAIBackendError(
                f"POST {self.url}: the response is not JSON: {self._scrub(raw[:200].decode('utf-8', 'replace'))}"
            ) from None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max_s)
        cap = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        return cap / 2 + random.uniform(0, cap / 2)  # "equal jitter": never zero, never above cap


def _server_message(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:MAX_MESSAGE_CHARS]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)
        else:
            msg = str(err)
        detail = data.get("detail")
        if not msg and detail:
            msg = str(detail)
        return str(msg)[:MAX_MESSAGE_CHARS]
    return text[:MAX_MESSAGE_CHARS]


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())
