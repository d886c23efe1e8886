"""obprop.last_token_acts on ragged prompts (left-padded into one batch), against transformers' hidden states of
each prompt run alone: at the last token, and at a chosen position `at[b]` counted in the unpadded prompt."""
import pytest
import torch

import minisv
from minisv import obprop as ob


@pytest.fixture(scope="module")
def pair(tiny):
    family, path, ref = tiny
    return minisv.load(str(path), device="cpu"), ref


def test_ragged_prompts_at_the_last_token_and_at_given_positions(pair):
    model, ref = pair
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (4, 9, 6)]
    names = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    with torch.no_grad():
        hidden = [ref(torch.tensor([p]), output_hidden_states=True).hidden_states for p in prompts]
    last = ob.last_token_acts(model, prompts, names)
    at = [1, 7, 0]
    chosen = ob.last_token_acts(model, prompts, names, at=at)
    for b in range(len(prompts)):
        for name, layer in zip(names, (1, 2)):
            torch.testing.assert_close(last[name][b], hidden[b][layer][0, -1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(chosen[name][b], hidden[b][layer][0, at[b]], rtol=1e-4, atol=1e-5)


def test_reference_patterns_are_the_mean_of_the_two_prompts_attention(pair):
    """Two equal-length reference prompts: Reference.patterns [L, H, T, T] is the mean of transformers' attention
    weights on each (what picks a head's default source token)."""
    import copy
    model, ref = pair
    eager = copy.deepcopy(ref)
    eager.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(9)
    pos, neg = (torch.randint(2, 96, (7,), generator=g) for _ in range(2))
    with torch.no_grad():
        attn = [torch.stack(eager(p[None], output_attentions=True).attentions)[:, 0] for p in (pos, neg)]
    r = ob.reference(model, pos, neg)
    torch.testing.assert_close(r.patterns, (attn[0] + attn[1]) / 2, rtol=1e-4, atol=1e-5)
