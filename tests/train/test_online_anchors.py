"""D²O's online anchors under N processes: fixed chunks of prompts, each process samples every N-th
chunk, and every process ends with every anchor (the collective stood in for; the 2-process run
against one process is in test_distributed.py)."""

import accelerate.utils

from prefalign.data.tokenize import TokenizedExample
from prefalign.train import online_anchors
from prefalign.train.online_anchors import PROMPTS_PER_CALL, refresh_anchors


class SecondOfTwo:
    num_processes, process_index, is_main_process = 2, 1, False


def examples(n: int) -> list[TokenizedExample]:
    return [TokenizedExample(index=i, prompt_ids=[1, 2, 3 + i], responses={"anchors": [[9], [9]]}) for i in range(n)]


def fake_sampler(calls: list):
    def sample(model, prompts, k, *, seed, **_):
        calls.append(seed)
        return [[[seed, j]] * k for j in range(len(prompts))]
    return sample


def test_each_process_samples_every_other_chunk_and_all_get_every_anchor(monkeypatch):
    n = 2 * PROMPTS_PER_CALL + 1  # three chunks: process 0 samples the first and last, process 1 the middle one
    one_calls, two_calls = [], []
    monkeypatch.setattr(online_anchors, "sample_anchor_ids", fake_sampler(one_calls))
    alone = examples(n)
    one = refresh_anchors(None, alone, pad_id=0, eos_id=9, max_new_tokens=4, temperature=1.0, seed=100, max_length=32)

    # What process 0 sends: its chunks (0 and 2), as the sampler draws them for those seeds.
    sample = fake_sampler([])
    sent = [(0, sample(None, [[1]] * PROMPTS_PER_CALL, 2, seed=100)), (2, sample(None, [[1]], 2, seed=100 + 2 * PROMPTS_PER_CALL))]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda parts: sent + parts)
    monkeypatch.setattr(online_anchors, "sample_anchor_ids", fake_sampler(two_calls))
    mine = examples(n)
    two = refresh_anchors(None, mine, pad_id=0, eos_id=9, max_new_tokens=4, temperature=1.0, seed=100, max_length=32,
                          state=SecondOfTwo())

    assert one_calls == [100, 100 + PROMPTS_PER_CALL, 100 + 2 * PROMPTS_PER_CALL]  # one seed per chunk: its first example
    assert two_calls == [100 + PROMPTS_PER_CALL]  # the second process sampled the middle chunk only
    assert two == one and [ex.responses["anchors"] for ex in mine] == [ex.responses["anchors"] for ex in alone]
