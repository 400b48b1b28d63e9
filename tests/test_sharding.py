"""The one sharding rule: batch k on process k mod N, results back in batch order on every process,
the main process alone decides from its files and writes (the collectives stood in for)."""

import accelerate.utils
import pytest
import torch

from prefalign.sharding import _destroy_process_group, from_main, main_writes, sharded_map, sharded_rounds


class SecondOfTwo:
    """What accelerate reports in the second of two processes."""

    num_processes, process_index, is_main_process = 2, 1, False

    def __init__(self):
        self.waits = 0

    def wait_for_everyone(self):
        self.waits += 1


@pytest.fixture
def first_process_sends(monkeypatch):
    """The gather hands back this process's parts and the first process's, batch numbers 0, 2, ...
    (in process order, as accelerate does); the broadcast hands back what the first process sent."""
    def gather(parts):
        theirs = [(k, f"batch {k} from process 0") for k in range(0, 2 * len(parts) + 1, 2) if k < 5]
        return theirs + parts

    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects, from_process: ["sent by process 0"])


def test_one_process_maps_in_order():
    assert sharded_map([3, 1, 2], lambda b: b * 10) == [30, 10, 20]
    assert list(sharded_rounds([3, 1, 2], lambda b: b * 10)) == [[30], [10], [20]]
    assert from_main(lambda: "mine") == "mine"


def test_second_process_runs_every_other_batch_and_gets_all_in_order(first_process_sends):
    ran = []

    def work(batch):
        ran.append(batch)
        return f"batch {batch} from process 1"

    results = sharded_map(list(range(5)), work, SecondOfTwo())
    assert ran == [1, 3]
    assert results == ["batch 0 from process 0", "batch 1 from process 1", "batch 2 from process 0",
                       "batch 3 from process 1", "batch 4 from process 0"]


def test_main_process_decides_and_writes(first_process_sends):
    state = SecondOfTwo()
    assert from_main(lambda: pytest.fail("only the main process computes"), state) == "sent by process 0"
    with main_writes(state) as main:
        assert not main
    assert state.waits == 1  # and it waited for the main process's writes


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="this torch has no gloo backend")
def test_process_group_is_destroyed_at_exit_and_a_missing_one_is_left_alone(tmp_path):
    """A gloo group left to the interpreter's teardown can abort a finished process, so the exit
    hook destroys it; with no group (a plain single process) the hook does nothing."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    assert dist.is_initialized()
    _destroy_process_group()
    assert not dist.is_initialized()
    _destroy_process_group()
    assert not dist.is_initialized()
