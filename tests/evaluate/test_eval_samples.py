"""The KL estimate scores exactly the sampled tokens: no re-tokenization, no added end token."""

import torch

from prefalign.evaluate.samples import kl_to_reference, sampled_logps
from prefalign.models.loading import load_model, load_tokenizer


def manual_logp(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(logps[len(prompt) + t - 1, tok].item() for t, tok in enumerate(response))


def test_sampled_logps_score_exactly_the_given_tokens(tiny_model):
    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    prompts = [[11, 12, 13, 14], [21, 22], [31, 32, 33, 34, 35, 36, 37]]
    # The first response stopped at the token limit (no eos); the second ended with eos.
    responses = [[101, 102, 103], [201, tok.eos_token_id], [301]]
    # Batches of 2 are formed longest first (third, first | second): results come back in input order.
    logps, lengths = sampled_logps(model, tok.pad_token_id, prompts, responses, batch_size=2)
    assert lengths.tolist() == [3.0, 2.0, 1.0]
    for got, prompt, response in zip(logps.tolist(), prompts, responses):
        assert abs(got - manual_logp(model, prompt, response)) < 1e-4


def test_kl_of_a_model_to_itself_is_zero_and_to_another_is_positive(tiny_model):
    tok = load_tokenizer(tiny_model)
    policy = load_model(tiny_model).eval()
    torch.manual_seed(0)
    other = load_model(tiny_model).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [[11, 12, 13]] * 64
    # Samples drawn from the policy at temperature 1, so the estimate is of the true KL (>= 0).
    generator = torch.Generator().manual_seed(0)
    responses = []
    for _ in range(64):
        ids = list(prompts[0])
        for _ in range(4):
            with torch.no_grad():
                probs = policy(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
            ids.append(int(torch.multinomial(probs, 1, generator=generator)))
        responses.append(ids[3:])
    own, _ = sampled_logps(policy, tok.pad_token_id, prompts, responses)
    ref, _ = sampled_logps(other, tok.pad_token_id, prompts, responses)
    assert kl_to_reference(own, own).value == 0.0
    estimate = kl_to_reference(own, ref)
    assert estimate.n == 64 and estimate.low > 0  # a real divergence, detected with its interval
