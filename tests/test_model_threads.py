"""Per-layer thread tuning of a forward pass: each layer runs with the tuner's choice, the values
stay the model's, and the hooks and the thread count are gone afterwards."""

from __future__ import annotations

import pytest
import torch

from prefalign.models.threads import decoder_layers, fixed_threads, tuned_threads


@pytest.fixture(scope="module")
def model(tiny_model):
    from prefalign.models.loading import load_model

    return load_model(tiny_model).eval()


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test (the quick loop runs with one), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_tuned_threads_set_each_layer_and_restore(model, two_threads):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    seen: list[int] = []
    with tuned_threads(model) as tuner:
        assert tuner is not None
        # Hooks registered after the tuner's run after it: they see the count it chose for the layer.
        probes = [layer.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
                  for layer in decoder_layers(model)]
        with torch.no_grad():
            tuned = [model(input_ids=ids).logits for _ in range(3)]
        for probe in probes:
            probe.remove()
    # The first probe: the current choice (one thread) for two layers, then two threads.
    assert seen[:3] == [1, 1, 2]
    for logits in tuned:
        torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-4)  # float rounding differs by thread count
    assert torch.get_num_threads() == 2
    layer = decoder_layers(model)[0]
    assert not layer._forward_pre_hooks and not layer._forward_hooks


def test_tuned_threads_clean_up_after_an_error(model, two_threads):
    with pytest.raises(RuntimeError, match="stop"):
        with tuned_threads(model):
            torch.set_num_threads(1)  # as a layer's hook may leave it
            raise RuntimeError("stop")
    assert torch.get_num_threads() == 2
    assert not decoder_layers(model)[0]._forward_pre_hooks


def test_tuned_threads_leave_alone_what_has_no_choice(model):
    with tuned_threads(torch.nn.Linear(2, 2)) as tuner:  # no decoder layers to time
        assert tuner is None
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tuned_threads(model) as tuner:
            assert tuner is None
    finally:
        torch.set_num_threads(before)


def test_fixed_threads_set_and_restore(two_threads):
    with fixed_threads(1):
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)  # whatever the block sets, the count before comes back
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with fixed_threads(1):
            raise RuntimeError
    assert torch.get_num_threads() == 2
