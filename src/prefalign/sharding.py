"""Work split over the processes of ``accelerate launch`` / ``torchrun``, one rule for every stage.

A stage cuts its work into batches exactly as one process would; batch ``k`` runs on process
``k mod N``, and the results are gathered and put back in batch order on every process. The
batches, and so each batch's seed and padding, do not depend on the number of processes, so N
processes give one process's results. Generation (:mod:`prefalign.generate.runner`), the
evaluation's sampling and log-prob passes (:mod:`prefalign.evaluate`), the training reference's
precompute (:mod:`prefalign.train.reference`) and D²O's online anchors
(:mod:`prefalign.train.online_anchors`) all shard through here.

Every process must make the same calls in the same order: each gather waits for all of them.
"""

from __future__ import annotations

import atexit
import functools
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

B = TypeVar("B")
R = TypeVar("R")


def longest_first_batches(sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices ``0 .. len(sizes)-1`` in batches of ``batch_size``, by size, largest first (ties in
    index order, so the batches do not depend on the sort's stability). Generation and the log-prob
    passes batch this way: similar lengths share a batch, so little is spent on padding."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def distributed_state():
    """accelerate's process state when this is one of several processes (``accelerate launch``,
    ``torchrun``); None in a plain single process, which then needs no process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    leave_process_group_at_exit()
    return state


@functools.cache
def leave_process_group_at_exit() -> None:
    """Destroys the process group when the interpreter exits (registered once per process).
    A gloo group left to the interpreter's teardown can abort the process after its work is done
    ("terminate called without an active exception"), and `accelerate launch` then reports the
    whole run as failed. No barrier: a process that exits on an error must not wait for the others."""
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _rank_and_size(state) -> tuple[int, int]:
    """``state``: accelerate's ``PartialState`` or ``Accelerator`` (both say these two), or None."""
    return (0, 1) if state is None else (state.process_index, state.num_processes)


def is_main(state) -> bool:
    return state is None or state.is_main_process


def _in_batch_order(parts: list[tuple[int, Any]], state) -> list[Any]:
    """``(batch number, result)`` pairs of this process → every process's results, in batch order."""
    if _rank_and_size(state)[1] > 1:
        # Looked up at call time, so a test can stand in for the collective.
        from accelerate.utils import gather_object

        parts = gather_object(parts)
    return [result for _, result in sorted(parts, key=lambda part: part[0])]


def sharded_map(batches: Sequence[B], work: Callable[[B], R], state=None,
                progress: Callable[[Iterable[int]], Iterable[int]] = iter) -> list[R]:
    """``[work(b) for b in batches]``, each process running every N-th batch, gathered once:
    every process gets all the results, in batch order. ``progress`` wraps this process's batch
    numbers (a progress bar)."""
    rank, size = _rank_and_size(state)
    return _in_batch_order([(k, work(batches[k])) for k in progress(range(rank, len(batches), size))], state)


def sharded_rounds(batches: Sequence[B], work: Callable[[B], R], state=None) -> Iterator[list[R]]:
    """The results of :func:`sharded_map` a round of N batches at a time (gathered after each
    round), for a writer that saves as it goes and so can resume."""
    rank, size = _rank_and_size(state)
    for first in range(0, len(batches), size):
        mine = first + rank
        yield _in_batch_order([(mine, work(batches[mine]))] if mine < len(batches) else [], state)


def from_main(compute: Callable[[], R], state=None) -> R:
    """``compute()`` run on the main process only, its result sent to the others (so a file that
    only the main process may see, e.g. without a shared filesystem, decides for all)."""
    if _rank_and_size(state)[1] == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([compute() if is_main(state) else None], from_process=0)[0]


@contextmanager
def main_writes(state=None):
    """The body runs its writes when this is the main process (``yield`` says so); every process
    then waits until it has, so none reads or moves on before the files exist."""
    try:
        yield is_main(state)
    finally:
        if _rank_and_size(state)[1] > 1:
            state.wait_for_everyone()
