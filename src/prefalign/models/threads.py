"""The intra-op thread count of a CPU forward pass, chosen per decoder layer by timing layers.

torch runs every op on an OpenMP pool as large as the machine's cores. When other processes hold
those cores, each op's barrier waits for a descheduled thread, and one thread is several times
faster than all of them: evaluation's log-prob pass over 32 chat prompts and their responses
took 46.0 s on torch's two threads and 11.7 s tuned, on the 2-core machine while two recipe runs
held it (``benchmarks/eval_stage.py``, ``benchmarks/README.md``). On an idle machine all cores
win. Which holds changes while a long stage runs, so the choice is measured, not configured:
:class:`ThreadTuner` decides, and the fast decode engine
(:mod:`prefalign.generate.backends.fast_decode`) and :func:`tuned_threads` (any HF model's
forward, through hooks on its decoder layers) time for it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch


class ThreadTuner:
    """Picks the intra-op thread count per decoder layer by timing layers, so a bad choice costs a
    few layers, not whole steps.

    On an idle machine all cores win; when other processes hold the cores, one thread wins by a
    wide margin (an OpenMP barrier waits for every thread of the pool, and a descheduled thread
    holds it up: 16 ms instead of 0.4 ms for a 16-row projection on a busy 2-core machine). The
    layers of a model have the same shapes, so a probe runs ``block`` layers with the current
    choice, then ``block`` layers with each other candidate (cut short once a candidate has taken
    twice as long), and keeps the fastest; a challenger must be 15% faster to take over. Probes
    repeat after ``hold`` layers, a hold that doubles (up to ``max_hold``) while the choice stands.
    It starts from one thread: wrongly using all threads on a busy machine costs far more than
    wrongly using one on an idle machine, and the first probe settles it within a few layers.
    """

    def __init__(self, max_threads: int, block: int = 2, hold: int = 256, max_hold: int = 16384):
        self.candidates = sorted({1, max(1, max_threads)})
        self.best = 1
        self.block, self.base_hold, self.max_hold = block, hold, max_hold
        self.hold = hold
        self._plan: list[int] = []
        self._times: dict[int, list[float]] = {}
        self._since = hold  # probe at the first layers
        self.switches = 0

    def next_threads(self) -> int:
        if len(self.candidates) == 1:
            return self.best
        if not self._plan and self._since >= self.hold:
            others = [c for c in self.candidates if c != self.best]
            self._plan = [c for c in (self.best, *others) for _ in range(self.block)]
            self._times = {c: [] for c in self.candidates}
            self._since = 0
        return self._plan[0] if self._plan else self.best

    def record(self, threads: int, seconds: float) -> None:
        if not self._plan:
            self._since += 1
            return
        self._plan.pop(0)
        self._times[threads].append(seconds)
        if threads != self.best and sum(self._times[threads]) > 2 * sum(self._times[self.best]):
            self._plan = [c for c in self._plan if c != threads]  # clearly slower: stop probing it
        if self._plan:
            return
        per_layer = {c: sum(t) / len(t) for c, t in self._times.items() if t}
        challenger = min(per_layer, key=per_layer.get)
        if challenger != self.best and per_layer[challenger] < 0.85 * per_layer[self.best]:
            self.best, self.hold = challenger, self.base_hold
            self.switches += 1
        else:
            self.hold = min(self.max_hold, self.hold * 2)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of an HF causal LM (``model.get_decoder().layers``), or ``[]`` when the
    model has no such list; they are what :func:`tuned_threads` times."""
    get_decoder = getattr(model, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


class _LayerTimer:
    """Forward hooks that let a :class:`ThreadTuner` set the thread count before each layer and
    see how long the layer took."""

    def __init__(self, tuner: ThreadTuner):
        self.tuner = tuner
        self._threads, self._start = tuner.best, 0.0

    def before(self, module, args) -> None:
        self._threads = self.tuner.next_threads()
        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)
        self._start = time.perf_counter()

    def after(self, module, args, output) -> None:
        self.tuner.record(self._threads, time.perf_counter() - self._start)


@contextlib.contextmanager
def fixed_threads(count: int) -> Iterator[None]:
    """Inside the block torch runs its ops on ``count`` intra-op threads; the count before is
    restored on exit (whatever the block set meanwhile)."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def tuned_threads(model) -> Iterator[ThreadTuner | None]:
    """Inside the block, every forward of ``model`` on a CPU runs each decoder layer with the thread
    count a :class:`ThreadTuner` picks from the layers' own timings (what follows the last layer,
    e.g. the LM head, keeps the last choice); the thread count is restored on exit. Yields the
    tuner, or ``None`` where there is nothing to choose (one thread, an accelerator, no layer
    list). The values computed are the same whatever the thread count, up to float rounding."""
    layers = decoder_layers(model)
    parameter = next(iter(model.parameters()), None)
    on_cpu = parameter is None or parameter.device.type == "cpu"
    threads = torch.get_num_threads()
    if threads == 1 or not on_cpu or not layers:
        yield None
        return
    timer = _LayerTimer(ThreadTuner(threads))
    hooks = [hook for layer in layers
             for hook in (layer.register_forward_pre_hook(timer.before), layer.register_forward_hook(timer.after))]
    try:
        with fixed_threads(threads):  # restores the count the layers' hooks changed
            yield timer.tuner
    finally:
        for hook in hooks:
            hook.remove()
