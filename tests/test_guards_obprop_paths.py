"""Path search beyond two steps, and which component may feed which, against transformers.

Scores: with one reference prompt, a found path's score is its contribution y·x̂ at its start times the attention
weight of *every* head on it. Oracle: the feature vector by frozen autograd on transformers' model
(test_obprop.FrozenOracle, which also hands back the x̂ it differentiated at) and the attention weights from
transformers' eager attention. Three steps are needed: a dropped weight of the first head only shows on the
third step's scores.

Edges: "A <- B" (A reads B) is a path exactly when B's output reaches the input of A's norm. Oracle: transformers'
data flow, probed by adding a vector to B's output and watching A's norm input; on NeoX's parallel blocks neither
MLP l nor attention l sees the other's output. Both parse_path and the edges search_paths proposes must agree."""
import copy
import re

import pytest
import torch

import minisv
from minisv import MinisvError
from minisv import obprop as ob
from test_obprop import OBSERVABLE, FrozenOracle

_PART = re.compile(r"(attn|mlp) (\d+)(?:\.(\d+))?(?:@(\d+))?")


def components(path):
    """"attn 2.1@3 <- mlp 1" -> [("attn", 2, 1, 3), ("mlp", 1, None, None)], parsed here, not by minisv."""
    return [(k, int(l), int(h) if h else None, int(s) if s else None)
            for k, l, h, s in _PART.findall(path)]


def body(family, hf):
    base = hf.transformer if family == "gpt2" else hf.gpt_neox if family == "neox" else hf.model
    return base.h if family == "gpt2" else base.layers


@pytest.fixture(scope="module")
def loaded(tiny, tmp_path_factory):
    """The conftest model with its attention weights scaled up (as in test_circuits), so that heads, not only
    MLPs, make the top paths; saved by transformers and loaded back by minisv."""
    family, _, hf = tiny
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in body(family, hf):
            attn = layer.attn if family == "gpt2" else layer.attention if family == "neox" else layer.self_attn
            for p in attn.parameters():
                if p.dim() == 2:
                    p.mul_(10)
    path = tmp_path_factory.mktemp(f"{family}_heads")
    hf.save_pretrained(path)
    return family, minisv.load(str(path), device="cpu"), hf


def test_three_step_scores_carry_every_heads_attention_weight(loaded):
    family, model, hf = loaded
    oracle = FrozenOracle(copy.deepcopy(hf).requires_grad_(False), family)
    eager = copy.deepcopy(hf)
    eager.set_attn_implementation("eager")
    tokens = torch.randint(2, 96, (7,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        attn = [a[0] for a in eager(tokens[None], output_attentions=True).attentions]     # [H, T, T] per layer
    obs = ob.observable(model, OBSERVABLE)
    n = torch.zeros(96)
    n[obs.ids] = obs.weights
    ref = ob.reference(model, tokens)
    levels = ob.search_paths(model, obs, ref, steps=3, width=6)
    assert len(levels) == 3 and all(levels)         # (paths ending in layer 0 have nothing left to extend)
    headed = 0
    for p in levels[2]:
        parts = components(p["path"])
        g, reads = oracle(tokens, n, parts)
        xhat = oracle.state["leaf"][0, reads[-1]].detach()      # transformers' x̂ at the path's start
        weight, t = 1.0, len(tokens) - 1
        for (kind, layer, head, _), s in zip(parts, reads):
            if kind == "attn":
                weight *= float(attn[layer][head, t, s])
            t = s
        headed += parts[0][0] == "attn" and len(parts) == 3
        assert p["score"] == pytest.approx(weight * float(g @ xhat), rel=1e-3, abs=1e-7), p["path"]
    assert headed, "no third-step path starts with a head: the first head's weight would go unchecked"


def dependence(family, hf):
    """{(reader, writer)}: component pairs ((kind, layer)) where the writer's output reaches the reader's norm
    input, measured on transformers' model by perturbing the writer."""
    layers, tokens = body(family, hf), torch.randint(2, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    norm = {"attn": lambda b: b.ln_1 if family == "gpt2" else b.input_layernorm,
            "mlp": lambda b: b.ln_2 if family == "gpt2" else b.post_attention_layernorm}
    module = {"attn": lambda b: b.attn if family == "gpt2" else b.attention if family == "neox" else b.self_attn,
              "mlp": lambda b: b.mlp}
    comps = [(k, l) for l in range(len(layers)) for k in ("attn", "mlp")]

    def inputs(writer=None):
        seen, handles = {}, []
        for k, l in comps:
            handles.append(norm[k](layers[l]).register_forward_pre_hook(
                lambda m, args, key=(k, l): seen.__setitem__(key, args[0].detach().clone())))
        if writer is not None:
            def bump(m, args, out):
                if isinstance(out, tuple):
                    return (out[0] + 0.5,) + out[1:]
                return out + 0.5
            handles.append(module[writer[0]](layers[writer[1]]).register_forward_hook(bump))
        with torch.no_grad():
            hf(tokens)
        for h in handles:
            h.remove()
        return seen
    clean = inputs()
    out = set()
    for writer in comps:
        moved = inputs(writer)
        out |= {(reader, writer) for reader in comps if not torch.equal(moved[reader], clean[reader])}
    return comps, out


def test_which_component_feeds_which_follows_the_data_flow(loaded):
    family, model, hf = loaded
    comps, feeds = dependence(family, hf)
    if family == "neox":        # the point of the test: parallel blocks, nothing flows within a layer
        assert not any(r[1] == w[1] for r, w in feeds)
    allowed = set()
    for reader in comps:
        for writer in comps:
            name = [f"{k} {l}.0" if k == "attn" else f"{k} {l}" for k, l in (reader, writer)]
            try:
                ob.parse_path(model, " <- ".join(name))
                allowed.add((reader, writer))
            except MinisvError as e:
                assert "out of order" in str(e)
    assert allowed == feeds
    # every edge the search proposes, with a beam wide enough to keep every one-step path
    obs = ob.observable(model, OBSERVABLE)
    ref = ob.reference(model, torch.randint(2, 96, (4,), generator=torch.Generator().manual_seed(1)))
    levels = ob.search_paths(model, obs, ref, steps=2, width=100_000)
    proposed = {tuple((k, l) for k, l, _, _ in components(p["path"])) for p in levels[1]}
    assert proposed == feeds
