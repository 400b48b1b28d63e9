"""Generation throughput on the CPU: prefalign's old path (HF ``model.generate``) against the new
default (the fast decode engine), and llama.cpp in-process on the same GGUF, at batch 1, 8 and 32,
each as tokens/s and as a share of the machine's compute limit for the model.

Two more rows split the gain: ``HF generate, 1 thread`` (the old path with the thread count the
new engine settles on when the machine is busy) and ``fast engine, fp32 matmuls`` (the new loop
without bf16).

Same prompts (AdvBench, as chat, fed to every engine as the same token ids), the same token
budget, temperature and seed everywhere (top-p 1, no top-k, no penalties). New tokens are counted
up to each response's end (EOS or the limit), so the padding a finished sequence carries in a
batch is not counted as work. Each row runs once after a warm-up; model loading is not timed. The
rows of one batch size run back to back, so their ratios hold even on a busy machine.

- compute limit: 2 x parameters FLOP per token at the best matmul rate measured in this run (fp32
  and, where the CPU runs it natively, bf16; one thread and all threads), the tokens/s that pure
  matmul arithmetic at that rate would give;
- llama.cpp (llama-cpp-python, the embedded model's own Q4_1 GGUF): batch 1 through
  ``Llama.create_completion``, one sequence at a time as a user would run it; batch 8 and 32
  through llama.cpp's batch API (one ``llama_decode`` per step for all sequences, a unified KV
  cache), sampled by the same inverse-CDF rule in numpy. Its thread count is chosen by a short
  probe (1 thread vs all), as prefalign's engine tunes its own.

    python benchmarks/generate.py                                    # SmolLM2-135M-Instruct, 32 prompts
    python benchmarks/generate.py --model tiny-random --prompts 8 --no-llama-cpp   # smoke run
    python benchmarks/generate.py --batch-sizes 32 --profile    # + the projections' share of the default's time
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, peak_rss_mib  # noqa: E402


def matmul_peak(dtype, threads: int, size: int = 1024, seconds: float = 1.0) -> float:
    """Best FLOP/s of a square ``dtype`` matmul with ``threads`` intra-op threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        torch.mm(a, b)
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(old)


def read_bandwidth(threads: int, mib: int = 512, seconds: float = 1.0) -> float:
    """Best bytes/s of summing a ``mib`` MiB fp32 tensor (a read stream, as decoding reads weights)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mib * 2**20 // 4)
        x.sum()
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            x.sum()
            best = max(best, x.numel() * 4 / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(old)


def projection_rate(model, compute_dtype, rows: int, threads: int, repeats: int = 5) -> float:
    """FLOP/s of one decode step's matmuls alone, at ``rows`` rows: the fast engine's own fused,
    prepacked weights (q/k/v, output, gate/up and down of every layer, then the LM head) applied
    to ``rows`` inputs, best of ``repeats``. No attention, norms or sampling: the rate that bounds
    any decode loop built on these kernels at this batch size."""
    import torch

    from prefalign.generate.backends.fast_decode import FastDecoder

    decoder = FastDecoder(model, compute_dtype=getattr(torch, compute_dtype), threads=threads)
    decoder._refresh()
    x_hidden = torch.randn(rows, model.config.hidden_size).to(decoder.compute_dtype)
    x_inner = torch.randn(rows, model.config.intermediate_size).to(decoder.compute_dtype)  # the down projection's input
    steps = [(x, w) for layer in decoder._layers
             for x, w in ((x_hidden, layer.wqkv), (x_hidden, layer.wo), (x_hidden, layer.wgu), (x_inner, layer.wd))]
    steps.append((x_hidden, decoder._head))
    projections = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head]
    flop = 2 * rows * sum(m.weight.numel() for m in projections)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            best = float("inf")
            for _ in range(repeats + 1):  # the first pass warms oneDNN's kernel cache
                start = time.perf_counter()
                for x, w in steps:
                    decoder._linear(x, w, None)
                best = min(best, time.perf_counter() - start)
        return flop / best
    finally:
        torch.set_num_threads(old)


def profile_default(model, tokenizer, conversations, params, batch_size: int) -> tuple[int, int, float, float]:
    """One run of prefalign's default generation at ``batch_size`` under torch.profiler: (batch,
    new tokens, seconds in ops, seconds in the projections' matmuls: the oneDNN linear the fast
    engine calls, or ``aten::addmm``/``aten::mm`` on a path without it). Warmed up first."""
    from torch.profiler import ProfilerActivity, profile

    from prefalign.generate.backends import SamplingParams, TransformersBackend

    backend = TransformersBackend(model, tokenizer, batch_size=batch_size, show_progress=False)
    backend.generate(conversations[:2], SamplingParams(max_new_tokens=4))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.generate(conversations, params)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    matmul = sum(e.self_cpu_time_total for e in events
                 if e.key in ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm")) / 1e6
    return batch_size, backend.last_stats.new_tokens, total, matmul


# ------------------------------------------------------------------------------------ llama.cpp

def gguf_path(model: str) -> Path | None:
    from prefalign.models.registry import EMBEDDED, embedded_gguf

    if model.endswith(".gguf"):
        return Path(model)
    return embedded_gguf(model) if model in EMBEDDED else None


class LlamaCpp:
    """llama.cpp through llama-cpp-python: one sequence at a time, or batched with its batch API."""

    def __init__(self, path: Path, threads: int, max_tokens: int):
        from llama_cpp import Llama

        self.path, self.threads = path, threads
        self.llm = Llama(model_path=str(path), n_ctx=max_tokens, n_threads=threads, n_threads_batch=threads,
                         verbose=False, seed=0)

    def one_at_a_time(self, prompts, max_new_tokens: int, temperature: float, seed: int) -> int:
        new = 0
        for i, p in enumerate(prompts):
            out = self.llm.create_completion(prompt=list(p), max_tokens=max_new_tokens, temperature=temperature,
                                             top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, seed=seed + i)
            new += out["usage"]["completion_tokens"]
        return new

    def batched(self, prompts, max_new_tokens: int, temperature: float, seed: int, batch: int) -> int:
        import llama_cpp as lc

        model = self.llm._model.model
        vocab = lc.llama_model_get_vocab(model)
        new = 0
        for start in range(0, len(prompts), batch):
            group = prompts[start : start + batch]
            prompt_tokens = sum(len(p) for p in group)
            params = lc.llama_context_default_params()
            params.n_ctx = len(group) * (max(len(p) for p in group) + max_new_tokens + 16)
            params.n_batch = max(512, prompt_tokens)  # every prompt in one llama_decode
            params.n_ubatch = 512
            params.n_seq_max = len(group)
            params.kv_unified = False  # one KV stream per sequence: attention never spans the others
            params.n_threads = params.n_threads_batch = self.threads
            ctx = lc.llama_init_from_model(model, params)
            b = lc.llama_batch_init(max(prompt_tokens, len(group)), 0, 1)
            sampler = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            if temperature > 0:  # llama.cpp's own sampler: temperature, then a draw over the full vocabulary
                lc.llama_sampler_chain_add(sampler, lc.llama_sampler_init_temp(temperature))
                lc.llama_sampler_chain_add(sampler, lc.llama_sampler_init_dist(seed + start))
            else:
                lc.llama_sampler_chain_add(sampler, lc.llama_sampler_init_greedy())
            try:
                def decode(items):  # (token, position, sequence, wants logits)
                    b.n_tokens = len(items)
                    for i, (tok, pos, seq, logits) in enumerate(items):
                        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
                        b.seq_id[i][0] = seq
                    if lc.llama_decode(ctx, b) != 0:
                        raise RuntimeError("llama_decode failed")

                items = [(t, i, s, i == len(p) - 1) for s, p in enumerate(group) for i, t in enumerate(p)]
                decode(items)
                out_index = {s: k for k, (_, _, s, want) in enumerate(items) if want}
                pos = {s: len(p) for s, p in enumerate(group)}
                for step in range(max_new_tokens):
                    nxt = []
                    for s, k in out_index.items():
                        tok = lc.llama_sampler_sample(sampler, ctx, k)
                        if lc.llama_vocab_is_eog(vocab, tok):
                            continue
                        new += 1
                        nxt.append((tok, pos[s], s, True))
                        pos[s] += 1
                    if not nxt or step == max_new_tokens - 1:
                        break
                    decode(nxt)
                    out_index = {s: k for k, (_, _, s, _) in enumerate(nxt)}
            finally:
                lc.llama_sampler_free(sampler)
                lc.llama_batch_free(b)
                lc.llama_free(ctx)
        return new


def llama_threads(path: Path, prompt, max_threads: int) -> int:
    """The faster of 1 thread and ``max_threads`` on a short completion (llama.cpp spins its
    threads, so on a busy machine fewer threads win, as for torch)."""
    if max_threads <= 1:
        return 1
    times = {}
    for threads in (1, max_threads):
        engine = LlamaCpp(path, threads, 512)
        engine.one_at_a_time([prompt], 4, 0.0, 0)
        start = time.perf_counter()
        engine.one_at_a_time([prompt], 16, 0.0, 0)
        times[threads] = time.perf_counter() - start
    return min(times, key=times.get)


# ----------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--profile", action="store_true",
                        help="also profile prefalign's default at the largest batch size: the projections' share of its time")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]

    import torch

    from prefalign.data.prompts import load_prompts
    from prefalign.generate.backends import SamplingParams, TransformersBackend
    from prefalign.models.loading import load_model, load_tokenizer
    from prefalign.train.precision import bf16_is_fast

    max_threads = torch.get_num_threads()
    model, tokenizer = load_model(args.model).eval(), load_tokenizer(args.model)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    prompts = load_prompts("advbench", limit=args.prompts, split=None)
    conversations = [[{"role": "user", "content": p.prompt}] for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)

    peaks = {}
    dtypes = [torch.float32] + ([torch.bfloat16] if bf16_is_fast("cpu")[0] else [])
    for dtype in dtypes:
        peaks[str(dtype).removeprefix("torch.")] = max(matmul_peak(dtype, t) for t in sorted({1, max_threads}))
    best_dtype = max(peaks, key=peaks.get)
    limit = peaks[best_dtype] / (2 * n_params)  # tokens/s
    bandwidth = max(read_bandwidth(t) for t in sorted({1, max_threads}))

    # Warm-up: first calls pay for lazy initialisation that no row should be charged with.
    for engine in ("hf", "auto"):
        TransformersBackend(model, tokenizer, batch_size=2, show_progress=False, engine=engine).generate(
            conversations[:2], SamplingParams(max_new_tokens=4))
    new_default = TransformersBackend(model, tokenizer, show_progress=False)
    default_name = f"prefalign default ({new_default.engine}, {new_default.compute_dtype or 'model dtype'})"

    llama = None
    path = gguf_path(args.model)
    if not args.no_llama_cpp and path is not None and path.exists():
        try:
            import llama_cpp  # noqa: F401

            from prefalign.generate.backends.llamacpp_backend import llama_cpp_problem

            problem = llama_cpp_problem(path)  # a llama.cpp that crashes here would end the benchmark
            if problem:
                raise ImportError(problem)
            token_prompts = [new_default.encode(c) for c in conversations]
            threads = llama_threads(path, token_prompts[0], max_threads)
            llama = LlamaCpp(path, threads, 512)
            llama.one_at_a_time(token_prompts[:1], 4, args.temperature, args.seed)
        except ImportError as exc:
            print(f"llama.cpp rows left out: {exc} (pip install llama-cpp-python)")

    def run_backend(name: str, batch_size: int, engine: str, threads: int | None = None, **kwargs):
        b = TransformersBackend(model, tokenizer, batch_size=batch_size, show_progress=False, engine=engine, **kwargs)
        old_threads = torch.get_num_threads()
        if threads is not None and engine == "hf":
            torch.set_num_threads(threads)
        try:
            b.generate(conversations, params)
        finally:
            torch.set_num_threads(old_threads)
        s = b.last_stats
        used = s.extra.get("threads", threads or old_threads)
        return name, batch_size, s.new_tokens, s.seconds, f"threads {used}"

    rows = []

    def add(row) -> None:
        rows.append(row)
        name, batch_size, tokens, seconds, note = row
        print(f"  {name}, batch {batch_size}: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f}/s, {note})",
              flush=True)

    for batch_size in batches:
        add(run_backend("HF generate (old path)", batch_size, "hf"))
        if max_threads > 1:
            add(run_backend("HF generate, 1 thread", batch_size, "hf", threads=1))
        add(run_backend(default_name, batch_size, "auto"))
        if new_default.engine == "fast" and new_default.compute_dtype != "float32":
            add(run_backend("fast engine, fp32 matmuls", batch_size, "fast", compute_dtype="float32"))
        if llama is not None:
            start = time.perf_counter()
            if batch_size == 1:
                tokens = llama.one_at_a_time(token_prompts, args.max_new_tokens, args.temperature, args.seed)
                name = "llama.cpp in-process, one at a time"
            else:
                tokens = llama.batched(token_prompts, args.max_new_tokens, args.temperature, args.seed, batch_size)
                name = "llama.cpp in-process, batch API"
            add((name, batch_size, tokens, time.perf_counter() - start, f"threads {llama.threads}"))

    ceilings = {}
    if new_default.engine == "fast":
        dtype = new_default.compute_dtype
        for b in batches:
            ceilings[b] = max(projection_rate(model, dtype, b, t) for t in sorted({1, max_threads}))

    profiled = profile_default(model, tokenizer, conversations, params, max(batches)) if args.profile else None

    print(f"\nmachine: {machine()}")
    print(f"model {args.model} ({n_params / 1e6:.1f}M parameters); {len(prompts)} AdvBench prompts; "
          f"max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, top_p 1, seed {args.seed}")
    if llama is not None:
        print(f"llama.cpp: llama-cpp-python on {llama.path.name}")
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
          + f" (best of 1 and {max_threads} threads)")
    print(f"compute limit: 2 x {n_params / 1e6:.1f}M FLOP/token at the {best_dtype} peak = {limit:.0f} tokens/s"
          + (f" (fp32: {peaks['float32'] / (2 * n_params):.0f})" if best_dtype != "float32" else ""))
    for dtype, size in (("bfloat16", 2), ("float32", 4)):
        if dtype in peaks:
            caps = ", ".join(f"batch {b} {b * bandwidth / (size * n_params):.0f}" for b in batches)
            print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s: reading the {dtype} weights "
                  f"({size * n_params / 1e6:.0f} MB) once per step caps tokens/s at {caps}")
    for b, rate in ceilings.items():
        tokens_cap = rate / (2 * n_params)
        print(f"matmuls alone at batch {b} ({new_default.compute_dtype}, the engine's own prepacked projections, no "
              f"attention or sampling): {rate / 1e9:.0f} GFLOP/s = {100 * rate / peaks[best_dtype]:.0f}% of the "
              f"{best_dtype} peak: at most {tokens_cap:.0f} tokens/s, {100 * tokens_cap / limit:.0f}% of the limit")
    if profiled is not None:
        batch, tokens, seconds, matmul_seconds = profiled
        print(f"profile of prefalign's default at batch {batch} (torch.profiler): {tokens} new tokens in {seconds:.2f} s, "
              f"of which the projections (oneDNN linear) {matmul_seconds:.2f} s = {100 * matmul_seconds / seconds:.0f}% "
              f"(prefill included); with every other op free: at most {tokens / matmul_seconds:.0f} tokens/s, "
              f"{100 * tokens / matmul_seconds / limit:.0f}% of the limit")
    print(f"peak RSS {peak_rss_mib():.0f} MiB\n")
    header = f"{'run':<46} {'batch':>5} {'new tokens':>10} {'seconds':>8} {'tokens/s':>9} {'% limit':>8} {'vs old':>7}  notes"
    print(header)
    print("-" * len(header))
    old_rate = {}
    for name, batch_size, tokens, seconds, note in rows:
        rate = tokens / seconds
        if name == "HF generate (old path)":
            old_rate[batch_size] = rate
        ratio = rate / old_rate[batch_size] if batch_size in old_rate else float("nan")
        print(f"{name:<46} {batch_size:>5} {tokens:>10} {seconds:>8.1f} {rate:>9.1f} {100 * rate / limit:>7.1f}% "
              f"{ratio:>6.2f}x  {note}")
    if new_default.engine == "fast" and new_default.compute_dtype != "float32":
        checked = conversations[:8]
        kl, agree = precision_check(model, new_default, checked, args.temperature)
        print(f"\n{new_default.compute_dtype} vs fp32 (the model's own forward), teacher-forced on {len(checked)} prompts + "
              f"32 greedy tokens: next-token KL {kl:.1e} nats at temperature {args.temperature}, "
              f"argmax agrees at {100 * agree:.1f}% of positions")
    if llama is not None:
        llama.llm.close()


def precision_check(model, backend, conversations, temperature: float) -> tuple[float, float]:
    """Mean KL(fp32 || engine) of the next-token distribution at ``temperature`` and the share of
    positions whose argmax agrees, over prompts followed by their fp32 greedy continuations."""
    import torch

    from prefalign.generate.backends import SamplingParams, TransformersBackend

    reference = TransformersBackend(model, backend.tokenizer, show_progress=False, engine="hf")
    continuations = reference.generate_token_ids(conversations, SamplingParams(max_new_tokens=32, temperature=0))
    kls, agree, positions = 0.0, 0, 0
    t = temperature or 1.0
    for conversation, rows in zip(conversations, continuations):
        seq = backend.encode(conversation) + rows[0]
        with torch.inference_mode():
            ref = model(torch.tensor([seq])).logits[0].float()
        mine = backend.decoder.sequence_logits(seq)
        lp, lq = (ref / t).log_softmax(-1), (mine / t).log_softmax(-1)
        kls += (lp.exp() * (lp - lq)).sum().item()
        agree += (ref.argmax(-1) == mine.argmax(-1)).sum().item()
        positions += len(seq)
    return kls / positions, agree / positions


if __name__ == "__main__":
    main()
