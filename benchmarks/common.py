"""Shared pieces of the benchmarks: synthetic pairs of fixed token lengths, a matmul peak, RSS."""

from __future__ import annotations

import json
import platform
import random
import resource
import time
from pathlib import Path

import torch

WORDS = (
    "the of and to in is was for on that with as by at from his her an which are be this had not but were "
    "one all they their has have been more when there who will would no out so up said what its about than "
    "into them can only other new some could time these two may first then do any like my now over such our "
    "man me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three"
).split()


def synthetic_pairs(tokenizer, n: int, prompt_tokens: int, response_tokens: int, seed: int) -> list[dict]:
    """Prompts of exactly ``prompt_tokens`` tokens and responses of exactly ``response_tokens``
    (before the end-of-sequence token), from plain English words so every tokenizer splits them the
    same way whether the text is encoded alone or after the prompt."""
    rng = random.Random(seed)

    def text(length: int, lead: str) -> str:
        words = []
        while True:
            words.append(rng.choice(WORDS))
            candidate = lead + " ".join(words)
            if len(tokenizer(candidate, add_special_tokens=False)["input_ids"]) >= length:
                return candidate

    return [
        {"id": f"b{i}", "prompt": text(prompt_tokens, "") + ".", "chosen": text(response_tokens, " "), "rejected": text(response_tokens, " ")}
        for i in range(n)
    ]


def matmul_peak_flops(size: int = 1024, seconds: float = 2.0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Best FLOP/s of a square ``dtype`` matmul on ``device`` (the roofline for the 'share' column).
    On a GPU the matrices are larger (8192: a 1024 product is too small to fill one) and each
    product is timed to its end (a CUDA synchronize), since kernels run asynchronously."""
    if device != "cpu":
        size = max(size, 8192)
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    torch.mm(a, b)
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return f"{gpu}{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.python_version()}"


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1))
