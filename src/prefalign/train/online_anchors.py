"""D²O's online variant: re-sample the K anchor responses from the current policy every N steps.

Anchors are sampled straight from the prompt's token ids (the same ids the loss scores), so the
new anchors sit exactly where the loss reads them. Their reference log-probs cannot come from a
precomputed table, so this needs a live reference (``reference: copy`` or ``disable-adapters``).

The prompts are sampled in chunks of :data:`PROMPTS_PER_CALL`, each chunk seeded by its first
example, so the anchors do not depend on the number of processes; under N data-parallel processes
the chunks are split over them by :mod:`prefalign.sharding` (chunk k on process k mod N) and
gathered, so every process holds every anchor (the main process saves them in checkpoints).
"""

from __future__ import annotations

from typing import Sequence

import torch

from prefalign.data.tokenize import TokenizedExample
from prefalign.sharding import sharded_map

#: Prompts per sampling call (each samples K responses). Fixed, not the batch size: the chunks, and
#: so the seeds and the anchors, are then the same for any number of processes.
PROMPTS_PER_CALL = 4


@torch.no_grad()
def sample_anchor_ids(
    model, prompts: Sequence[list[int]], k: int, *, pad_id: int, eos_id: int, max_new_tokens: int,
    temperature: float, seed: int, max_response_tokens: int,
) -> list[list[list[int]]]:
    """For each prompt, ``k`` sampled responses as token ids, ending with ``eos_id`` where the model
    ended them."""
    was_training = model.training
    model.eval()
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(p)
        attention[row, width - len(p):] = 1
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # reproducible anchors without disturbing the training RNG
    try:
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=True,
            temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
            num_return_sequences=k, pad_token_id=pad_id, eos_token_id=eos_id,
        )
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    new = out[:, width:].tolist()
    responses = []
    for seq in new:
        # The end token only where the model ended the response within both limits; a sample cut
        # by a limit must not teach the policy to stop there.
        ended = eos_id in seq and seq.index(eos_id) < max_response_tokens
        responses.append([*seq[: seq.index(eos_id)], eos_id] if ended else seq[:max_response_tokens])
    return [responses[i * k : (i + 1) * k] for i in range(len(prompts))]


def refresh_anchors(model, examples: Sequence[TokenizedExample], *, pad_id: int, eos_id: int, max_new_tokens: int,
                    temperature: float, seed: int, max_length: int, batch_size: int = PROMPTS_PER_CALL,
                    state=None) -> dict[int, list[list[int]]]:
    """Replace each example's anchors in place; returns ``{example index: anchors}`` for checkpoints.
    ``state`` (an Accelerator or accelerate state, or None): the processes to split the chunks over;
    every process must call this with the same examples."""
    chunks = [list(examples[start : start + batch_size]) for start in range(0, len(examples), batch_size)]

    def sample(chunk: list[TokenizedExample]) -> list[list[list[int]]]:
        budget = max_length - max(len(ex.prompt_ids) for ex in chunk)
        return sample_anchor_ids(
            model, [ex.prompt_ids for ex in chunk], len(chunk[0].responses["anchors"]), pad_id=pad_id, eos_id=eos_id,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + chunk[0].index,
            max_response_tokens=max(2, budget),
        )

    refreshed = {}
    for chunk, sampled in zip(chunks, sharded_map(chunks, sample, state)):
        for ex, anchors in zip(chunk, sampled):
            ex.responses["anchors"] = anchors
            refreshed[ex.index] = anchors
    return refreshed
