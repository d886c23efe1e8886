"""Generation details no other test pins down, each against an independent oracle: the EOS a row stops at is
returned (as transformers' generate returns it), per row of a batch; and temperature divides the logits (the
sampled frequencies follow softmax(logits / T), a hand formula)."""
from types import SimpleNamespace

import pytest
import torch

import minisv
from minisv.model import _sample


@pytest.fixture(scope="module")
def pair(tiny):
    family, path, ref = tiny
    return minisv.load(str(path), device="cpu"), ref


def _prompt(t, seed):
    return torch.randint(0, 96, (t,), generator=torch.Generator().manual_seed(seed))


def _last_new(ids):
    """The last position whose token has not appeared before it (random tiny models soon repeat one token): an
    EOS that stops generation exactly there."""
    return max(k for k in range(len(ids)) if ids[k] not in ids[:k])


def test_generation_stops_at_eos_and_returns_it_like_transformers(pair):
    model, ref = pair
    prompt = _prompt(5, seed=11)
    free = model.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    eos = free[_last_new(free)]
    saved, model.tokenizer = model.tokenizer, SimpleNamespace(vocab_size=model.cfg.vocab_size, eos_id=eos)
    try:
        ours = model.generate(prompt, max_new_tokens=12)
    finally:
        model.tokenizer = saved
    with torch.no_grad():
        theirs = ref.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)[0, 5:].tolist()
    assert theirs[-1] == eos and ours == theirs


def test_each_row_of_a_batch_keeps_its_own_eos(pair):
    """Two prompts whose greedy continuations hit the same EOS at different steps: each row is cut right after its
    own first EOS (transformers, one prompt at a time, is the oracle)."""
    model, ref = pair
    prompts = [_prompt(4, seed=12), _prompt(6, seed=13)]
    free = [model.generate(p, max_new_tokens=12, stop_at_eos=False) for p in prompts]
    eos = free[0][_last_new(free[0])]
    saved, model.tokenizer = model.tokenizer, SimpleNamespace(vocab_size=model.cfg.vocab_size, eos_id=eos)
    try:
        ours = model.generate([p.tolist() for p in prompts], max_new_tokens=12)
    finally:
        model.tokenizer = saved
    with torch.no_grad():
        theirs = [ref.generate(p[None], max_new_tokens=12, do_sample=False, eos_token_id=eos,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert ours == theirs and ours[0][-1] == eos and len(ours[0]) < 12


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    n = 40000
    draws = _sample(logits.expand(n, 4), temperature, None, None, torch.Generator().manual_seed(3))
    freq = torch.bincount(draws, minlength=4) / n
    expected = torch.exp(logits[0] / temperature) / torch.exp(logits[0] / temperature).sum()
    assert torch.allclose(freq, expected, atol=0.01)
    # top_k filters the tempered logits: the two survivors keep their tempered odds
    top2 = _sample(logits.expand(n, 4), temperature, 2, None, torch.Generator().manual_seed(4))
    share = float((top2 == 2).double().mean())
    assert set(top2.tolist()) == {1, 2}
    assert share == pytest.approx(1 / (1 + torch.exp(torch.tensor(-1.0 / temperature)).item()), abs=0.01)
