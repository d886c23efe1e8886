"""Circuit rules the other tests leave open. skip_first drops head terms that *read* the first token (the attention
sink), whatever their destination. And under LayerNorm, whose output ignores any multiple of the all-ones vector,
the input-invariant views must ignore it too: a feature's logit effects and read direction do not change when a
constant is added to its decoder / encoder row."""
import pytest
import torch

import minisv
from minisv.circuits import Circuit, feature_direction, logit_effects
from test_circuits import random_transcoder


@pytest.fixture(scope="module")
def loaded(tiny):
    family, path, _ = tiny
    model = minisv.load(str(path), device="cpu")
    with torch.no_grad():       # as in test_circuits: heads with weight, so head terms rank high
        for block in model.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.attn.o):
                lin.weight.mul_(10)
    return family, model


def test_skip_first_drops_heads_reading_the_first_token(loaded):
    _, model = loaded
    tcs = {l: random_transcoder(l, seed=l) for l in range(3)}
    tokens = torch.randint(2, 96, (8,), generator=torch.Generator().manual_seed(3))
    c = Circuit(model, tcs, tokens)
    root = c.logit(5, 7)
    kept = [n for p in c.top_paths(root, rounds=2, branches=40, absolute=True) for n in p if n.kind == "head"]
    assert kept and all(n.at != 0 for n in kept)
    every = [n for p in c.top_paths(root, rounds=2, branches=40, absolute=True, skip_first=False) for n in p
             if n.kind == "head"]
    assert any(n.at == 0 and n.token != 0 for n in every)     # the rule had something to drop


def test_layernorm_views_ignore_the_all_ones_direction(loaded):
    family, model = loaded
    if family == "llama":
        pytest.skip("RMSNorm sees the all-ones direction")
    tc = random_transcoder(1, seed=4)
    before = logit_effects(model, tc, 3), feature_direction(model, tc, 3)
    with torch.no_grad():
        tc.W_dec[3] += 0.7
        tc.W_enc[:, 3] += 0.7
    after = logit_effects(model, tc, 3), feature_direction(model, tc, 3)
    assert before[0].abs().max() > 0 and before[1].abs().max() > 0
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-6)
