"""Steering restricted by a slice *with a step* (every other token), against transformers: the same vector added by
a forward pre-hook on the reference model at exactly the positions Python's range(start, stop, step) selects."""
import pytest
import torch

import minisv
from minisv.steering import steer


@pytest.fixture(scope="module")
def pair(tiny):
    family, path, ref = tiny
    return family, minisv.load(str(path), device="cpu"), ref


def _reference_logits(family, ref, tokens, layer, vector, where):
    body = ref.transformer if family == "gpt2" else ref.gpt_neox if family == "neox" else ref.model
    block = (body.h if family == "gpt2" else body.layers)[layer]
    mask = torch.zeros(tokens.shape[-1], dtype=torch.bool)
    mask[list(where)] = True

    def add(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = torch.where(mask[:, None], x + vector, x)
        return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})
    handle = block.register_forward_pre_hook(add, with_kwargs=True)
    try:
        with torch.no_grad():
            return ref(tokens).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("positions", [slice(1, None, 2), slice(2, 11, 3), slice(None, None, 4)])
def test_slice_with_a_step_steers_exactly_those_positions(pair, positions):
    family, model, ref = pair
    tokens = torch.randint(0, 96, (1, 13), generator=torch.Generator().manual_seed(5))
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), steer(model, vector, 1, positions=positions):
        ours = model(tokens)
    theirs = _reference_logits(family, ref, tokens, 1, vector, range(13)[positions])
    assert (ours - theirs).abs().max() < 1e-4
    plain = _reference_logits(family, ref, tokens, 1, vector, [])
    assert (theirs - plain).abs().max() > 1e-2       # the steering changes something
