"""Transcoder circuits: the attribution is exact on all three families, beam search finds a planted path, and the
input-invariant views (pullbacks, de-embeddings) point at the planted weights."""
import json

import pytest
import torch

import minisv
from minisv import MinisvError
from minisv.circuits import (Circuit, de_embed, feature_direction, format_tree, logit_direction, logit_effects,
                             pullback)
from minisv.model import Model, ModelConfig
from minisv import formats
from minisv.formats import import_released
from minisv.transcoder import Transcoder, TranscoderConfig

D_SAE = 48


def random_transcoder(layer, arch="relu", skip=False, centered=False, seed=0):
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(32, 32, D_SAE, arch, k=6, skip=skip, layer=layer, target_centered=centered))
    with torch.no_grad():       # TopK starts with a zero decoder: make every parameter matter
        for name, p in tc.named_parameters():
            p.normal_(0, 0.3 if name == "W_enc" else 0.1)
    return tc


def released_file(path, seed=1):
    """A file laid out like pchlenski/gpt2-transcoders (input pre-bias b_dec, output bias b_dec_out)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"W_enc": torch.randn(32, D_SAE, generator=g) * 0.3, "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
          "W_dec": torch.randn(D_SAE, 32, generator=g) * 0.1, "b_dec": torch.randn(32, generator=g) * 0.1,
          "b_dec_out": torch.randn(32, generator=g) * 0.1}
    file = path / "final_sparse_autoencoder_gpt2-small_blocks.1.ln2.hook_normalized_48.pt"
    torch.save({"cfg": None, "state_dict": sd}, file)
    return file


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """Every MLP replaced: ReLU, TopK with a skip path, and (LayerNorm models) a centered-output transcoder; GPT-2's
    layer 1 is an imported released-format file."""
    family, path, _ = tiny
    model = minisv.load(str(path), device="cpu")
    with torch.no_grad():       # the checkpoints' 0.02-std init makes attention outputs tiny: give heads weight
        for block in model.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.attn.o):
                lin.weight.mul_(10)
    layernorm = family != "llama"
    tcs = {0: random_transcoder(0), 1: random_transcoder(1, "topk", skip=True, seed=1),
           2: random_transcoder(2, centered=layernorm, seed=2)}
    if family == "gpt2":
        tcs[1] = import_released(str(released_file(tmp_path_factory.mktemp("released"))))
        assert tcs[1].cfg.target_centered
    tokens = torch.randint(2, 96, (14,), generator=torch.Generator().manual_seed(3))
    return family, model, tcs, tokens


def spliced(model, tcs):
    """Test-side splicing (written independently of the library): MLP outputs replaced by transcoder outputs."""
    x = {}
    hooks = {}
    for l, tc in tcs.items():
        hooks[f"blocks.{l}.ln2.hook_normalized"] = lambda a, n, l=l: x.__setitem__(l, a)
        hooks[f"blocks.{l}.hook_mlp_out"] = lambda a, n, l=l, tc=tc: tc(x[l])
    return model.hooks(hooks)


def assert_sums(terms, value, what):
    total = sum(t.value for t in terms)
    scale = sum(abs(t.value) for t in terms) + abs(value)
    assert abs(total - value) <= 1e-6 * scale + 1e-9, f"{what}: terms sum to {total}, value is {value}"


@pytest.mark.parametrize("splice", [False, True])
def test_attribution_is_complete(setup, splice):
    """Target = embeddings + heads × sources + earlier features + biases + errors, exactly, at the root and at
    every decomposable term below it; the roots equal the model's real logit difference / pre-activation."""
    family, model, tcs, tokens = setup
    c = Circuit(model, tcs, tokens, splice=splice)
    with torch.no_grad(), (spliced(model, tcs) if splice else model.hooks({})):
        logits, cache = model.run_with_cache(tokens[None], names=[f"blocks.{l}.ln2.hook_normalized" for l in tcs])
    root = c.logit(5, 7)
    assert abs(root.value - float(logits[0, -1, 5] - logits[0, -1, 7])) < 1e-4 * (1 + abs(root.value))
    kids = c.children(root)
    assert_sums(kids, root.value, "logit")
    kinds = {k.kind for k in kids}
    assert {"embed", "head", "feature", "bias", "error"} <= kinds and ("pos" in kinds) == (family == "gpt2")
    assert max(abs(k.value) for k in kids if k.kind == "head") > 0.01 * max(abs(k.value) for k in kids)
    errors = [abs(k.value) for k in kids if k.kind == "error"]
    assert (max(errors) < 1e-6) if splice else (max(errors) > 1e-3)

    with torch.no_grad():
        pre = tcs[2].preacts(cache["blocks.2.ln2.hook_normalized"][0])     # [T, d_sae], independent of circuits
    j = int(pre[9].argmax())
    feat = c.feature(2, j, 9)
    assert abs(feat.value - float(pre[9, j])) < 1e-4 * (1 + abs(feat.value))
    assert_sums(c.children(feat), feat.value, "feature root")

    # one level further down, through every kind of decomposable term
    for parent in (root, feat):
        kids = c.children(parent)
        chosen = [max((k for k in kids if k.kind == kind), key=lambda k: abs(k.value), default=None)
                  for kind in ("head", "feature", "skip")]
        for k in [k for k in chosen if k is not None] + [k for k in kids if k.kind == "head" and k.layer == 0][:3]:
            assert_sums(c.children(k), k.value, k.label)


def test_each_family_has_its_own_data_flow(setup):
    """MLP l reads attention l in sequential blocks, but not in NeoX's parallel blocks."""
    family, model, tcs, tokens = setup
    c = Circuit(model, tcs, tokens)
    j = int(c.active[1][5][0][0])
    layers = {k.layer for k in c.children(c.feature(1, j, 5)) if k.kind == "head"}
    assert layers == ({0} if family == "neox" else {0, 1})
    assert {k.layer for k in c.children(c.logit(3)) if k.kind == "head"} == {0, 1, 2}


def test_graph_and_tree_are_consistent(setup):
    _, model, tcs, tokens = setup
    c = Circuit(model, tcs, tokens)
    root = c.target("logit: 5 - 7")
    paths = c.top_paths(root, rounds=3, branches=4, absolute=True)
    assert [len(p) for p in paths] == [2] * 4 + [3] * 4 + [4] * 4
    for p in paths:                                       # a path's last term is a term of the node before it
        assert any(k.label == p[-1].label and abs(k.value - p[-1].value) < 1e-12 for k in c.children(p[-2]))
    g = json.loads(json.dumps(c.to_json(root, paths)))["graph"]
    edges = {(e["parent"], e["child"]): e["value"] for e in g["edges"]}
    kids = c.children(root)
    shown = {p[1].label for p in paths}
    for kind in ("bias", "error"):
        assert abs(edges[root.label, f"{kind} of {root.label}"] - sum(k.value for k in kids if k.kind == kind)) < 1e-9
    for k in kids:
        if k.label in shown:
            assert edges[root.label, k.label] == k.value
    # the pruning error is exactly what the search left out
    pruned = sum(k.value for k in kids if k.label not in shown and k.kind not in ("bias", "error"))
    assert abs(edges[root.label, f"pruned of {root.label}"] - pruned) < 1e-6 * sum(abs(k.value) for k in kids)
    values = {n["id"]: n["value"] for n in g["nodes"]}
    out = {}
    for (parent, _), v in edges.items():
        out[parent] = out.get(parent, 0.0) + v
    assert abs(out[root.label] - root.value) < 1e-9 * (1 + abs(root.value))
    expanded = {n.label for p in paths for n in p if n.bias is not None}
    assert len(expanded) > 1 and all(abs(out[x] - values[x]) < 1e-9 * (1 + abs(values[x])) for x in expanded)
    tree = format_tree(paths)
    assert tree.splitlines()[0].startswith(f"{root.value:+.3f}  logit '5' - '7'") and tree.count("\n") >= 4


# ------------------------------------------------------------------------- a model with one planted path
def planted():
    """Llama-style, 2 layers, d_model 8, uniform-ish attention. Token 5's embedding is 3·e0; head 0.0 copies e0 of
    every source to e1; feature 3 of the layer-1 transcoder reads e1 and writes e2; logit 7 − logit 8 reads e2.
    Everything else is small noise. The one strong path: logit <- mlp1 #3 <- attn0.0 (from token 5) <- embed."""
    cfg = ModelConfig("llama", 2, 8, 2, 2, 4, 8, 12, 16, "silu", rotary_dim=4)
    torch.manual_seed(0)
    model = Model(cfg).eval()
    e = torch.eye(8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("ln1.weight") and not name.endswith("ln2.weight") and name != "ln_final.weight":
                p.copy_(0.03 * torch.randn_like(p))
        model.embed.weight[:, :3] = 0
        model.embed.weight[5] += 3 * e[0]
        model.blocks[0].attn.v.weight[:4] = 0
        model.blocks[0].attn.v.weight[0] = e[0]            # head 0 value dim 0 <- e0
        model.blocks[0].attn.o.weight[:3] = 0
        model.blocks[0].attn.o.weight[1, 0] = 1            # head 0 value dim 0 -> e1
        model.unembed.weight[:, 2] = 0
        model.unembed.weight[7] += e[2]
        model.unembed.weight[8] -= e[2]
    tcs = {}
    for l in range(2):
        tc = Transcoder(TranscoderConfig(8, 8, 6, "relu", layer=l))
        with torch.no_grad():
            tc.W_enc.copy_(0.1 * torch.randn(8, 6))
            tc.W_dec.copy_(0.03 * torch.randn(6, 8))
            tc.W_enc[:2] = 0                               # noise features ignore e0 / e1 and never write e1 / e2
            tc.W_dec[:, 1:3] = 0
        tcs[l] = tc
    with torch.no_grad():
        tcs[1].W_enc[:, 3] = 2 * e[1]
        tcs[1].W_dec[3] = 2 * e[2]
    return model, tcs


def test_beam_search_finds_the_planted_path():
    model, tcs = planted()
    c = Circuit(model, tcs, [1, 2, 5, 3, 4], splice=True)
    root = c.target("logit: 7 - 8")
    assert root.value > 3 and (c.target().layer, c.target().index) == (1, 3)    # default: the top last-token feature
    paths = c.top_paths(root, rounds=3, branches=3)
    best = max((p for p in paths if len(p) == 4), key=lambda p: p[-1].value)
    assert [(n.kind, n.layer, n.index, n.at) for n in best] == \
        [("logit", 2, 7, 4), ("feature", 1, 3, 4), ("head", 0, 0, 2), ("embed", -1, -1, 2)]
    assert paths[0][1].label == "mlp1 #3 @4 '4'" and best[-1].value > 0.5 * root.value
    # the same path in the input-invariant views: weights alone point at feature 3, head 0.0 and token 5
    y = logit_direction(model, 7, 8)
    assert int(pullback(tcs[1], y).argmax()) == 3
    assert int(de_embed(model, feature_direction(model, tcs[1], 3), head=0).argmax()) == 5
    effects = logit_effects(model, tcs[1], 3)
    assert int(effects.argmax()) == 7 and int(effects.argmin()) == 8


def test_de_embed_through_each_head_of_a_grouped_query_model(tmp_path):
    """Llama with 4 query heads sharing 2 key-value heads: head h reads values of group h // 2. Oracle: transformers
    itself, on one-token sequences (each head attends only to that token), head h's share of the attention output
    (its slice of o_proj), times the RMS the norm divided by, along y."""
    import transformers as tf
    from conftest import tiny_config
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(1.0, 0.1) if p.dim() == 1 else p.normal_(0, 0.2)
    ref.save_pretrained(tmp_path)
    model = minisv.load(str(tmp_path), device="cpu")
    H, K, E = ref.config.num_attention_heads, ref.config.num_key_value_heads, ref.config.head_dim
    assert (H, K) == (4, 2)
    seen = {}
    attn = ref.model.layers[0].self_attn
    hooks = [ref.model.layers[0].input_layernorm.register_forward_pre_hook(lambda m, a: seen.update(e=a[0][:, 0])),
             attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(z=a[0][:, 0]))]
    with torch.no_grad():
        ref(torch.arange(ref.config.vocab_size)[:, None])
    for h in hooks:
        h.remove()
    rms = (seen["e"].pow(2).mean(-1, keepdim=True) + ref.config.rms_norm_eps).sqrt()         # [vocab, 1]
    y = torch.randn(32, generator=torch.Generator().manual_seed(1))
    for head in range(H):
        out = seen["z"][:, head * E:(head + 1) * E] @ attn.o_proj.weight[:, head * E:(head + 1) * E].t()
        torch.testing.assert_close(de_embed(model, y, head=head), (out * rms).detach() @ y, rtol=1e-4, atol=1e-5,
                                   msg=f"head {head}")


# ------------------------------------------------------------------------- bad input
def test_bad_targets_and_transcoders_are_clear_errors(setup):
    family, model, tcs, tokens = setup
    c = Circuit(model, {0: tcs[0]}, tokens)
    for spec, message in [("1:3", "no transcoder for layer 1"), ("0:999", "does not exist"),
                          ("0:3@40", "outside the prompt"), ("logit: 500", "outside the vocabulary"),
                          ("logit: ' the'", "no tokenizer"), ("feature 3", "cannot read target")]:
        with pytest.raises(MinisvError, match=message):
            c.target(spec)
    assert c.target("0:3@-2").token == len(tokens) - 2
    with pytest.raises(MinisvError, match="leaf"):
        c.children(next(k for k in c.children(c.logit(3)) if k.kind == "embed"))
    wrong = Transcoder(TranscoderConfig(16, 16, 8, "relu"))
    with pytest.raises(MinisvError, match="d_model"):
        Circuit(model, {0: wrong}, tokens)
    with pytest.raises(MinisvError, match="transcoder layer 5 is out of range.*0..2"):
        Circuit(model, {5: tcs[0]}, tokens)
    if family == "llama":
        with pytest.raises(MinisvError, match="RMSNorm"):
            Circuit(model, {0: random_transcoder(0, centered=True)}, tokens)
