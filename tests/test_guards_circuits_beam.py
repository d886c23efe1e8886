"""Circuit views the other tests leave open, each against an oracle that shares no arithmetic with the code:

- `top_paths` with beam < branches keeps exactly `beam` paths a round, the best ones: a plain re-implementation
  of the beam search (on the same exact per-node terms, `children`) must pick the same paths;
- `logit_effects` goes through the final norm's gain: the derivative of transformers' own final norm and
  unembedding, by central differences, at a residual where the norm's scale is exactly 1 and its radial part
  does not move (the conftest checkpoints have random norm gains, so a missing gain shows)."""
import copy

import pytest
import torch

import minisv
from minisv.circuits import KEEP, Circuit, logit_effects
from test_circuits import random_transcoder


@pytest.fixture(scope="module")
def loaded(tiny):
    family, path, hf = tiny
    model = minisv.load(str(path), device="cpu")
    return family, model, hf


def _beam_by_hand(c, root, rounds, branches, beam):
    """The beam search written out: per round, every kept path's `branches` best terms, then the `beam` best."""
    frontier, kept = [[root]], []
    for _ in range(rounds):
        new = []
        for path in frontier:
            kids = [k for k in c.children(path[-1]) if k.kind in KEEP and not (k.kind == "head" and k.at == 0)]
            new += [path + [k] for k in sorted(kids, key=lambda k: k.value, reverse=True)[:branches]]
        frontier = sorted(new, key=lambda p: p[-1].value, reverse=True)[:beam]
        kept.append([[n.label for n in p] for p in frontier])
        frontier = [p for p in frontier if p[-1].read is not None]
    return kept


def test_a_narrow_beam_keeps_exactly_its_best_paths(loaded):
    family, model, _ = loaded
    with torch.no_grad():       # as in test_circuits: heads with weight, so head terms compete with features
        model = copy.deepcopy(model)
        for block in model.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.attn.o):
                lin.weight.mul_(10)
    tcs = {l: random_transcoder(l, seed=l) for l in range(3)}
    tokens = torch.randint(2, 96, (9,), generator=torch.Generator().manual_seed(2))
    c = Circuit(model, tcs, tokens)
    root = c.logit(5, 7)
    for beam, branches in [(2, 5), (3, 4)]:
        paths = c.top_paths(root, rounds=3, branches=branches, beam=beam)
        want = _beam_by_hand(c, root, 3, branches, beam)
        assert len(want[0]) == beam and all(len(r) <= beam for r in want)    # (leaves end some paths early)
        got = [[[n.label for n in p] for p in paths if len(p) == r + 2] for r in range(3)]
        assert got == want


def test_logit_effects_go_through_the_final_norms_gain(loaded):
    family, model, hf = loaded
    norm = copy.deepcopy(hf.transformer.ln_f if family == "gpt2" else hf.gpt_neox.final_layer_norm
                         if family == "neox" else hf.model.norm).double()
    unembed = copy.deepcopy(hf.get_output_embeddings()).double()
    gain = norm.weight
    assert (gain - 1).abs().max() > 0.05                    # the gain is not the identity
    layernorm = family != "llama"
    eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon
    tc = random_transcoder(1, seed=3)
    g = torch.Generator().manual_seed(0)
    for index in (0, 3, 17):
        d = tc.W_dec[index].detach().double()
        pd = d - d.mean() if layernorm else d
        r = torch.randn(32, generator=g, dtype=torch.float64)
        r = r - r.mean() if layernorm else r
        r = r - pd * (r @ pd) / (pd @ pd)                   # orthogonal to P d: no radial part
        r = r * ((1 - eps) / r.pow(2).mean()).sqrt()        # mean((P r)²) + ε = 1: the scale is exactly 1
        # r ± h·d both have scale 1/√(1 + h²·mean((P d)²)) (r ⟂ P d), so the central difference, undone of it, is
        # exact at any step: h = 1 keeps clear of the float32 that transformers' RMSNorm computes in
        h = 1.0
        with torch.no_grad():
            want = (unembed(norm(r + h * d)) - unembed(norm(r - h * d))) / (2 * h) * (1 + h * h * pd.pow(2).mean()).sqrt()
        got = logit_effects(model, tc, index).double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
