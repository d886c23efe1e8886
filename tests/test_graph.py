"""Attribution graphs, shown exactly right three ways on tiny float64 checkpoints of all three families:

- a perturbation oracle: the model's own forward, with attention patterns, norm scales and MLP outputs frozen by
  hooks at the prompt's values, run with one source node pushed (a feature's activation scaled, an error vector
  or a token embedding added): every target's change must be the adjacency column;
- completeness: each target's incoming edges plus its bias terms sum to its value;
- with window 1, feature-to-feature edges through attention equal the per-layer circuit analysis of
  minisv/circuits.py for the same pair.
Plus pruning and scores against their definitions on a hand-made graph."""
import pytest
import torch

import minisv
from minisv.circuits import Circuit
from minisv.clt import CLTConfig, CrossLayerTranscoder
from minisv.graph import Graph, attribute, influence, normalized, prune, scores
from minisv.transcoder import Transcoder, TranscoderConfig

PROMPT = [0, 5, 17, 3, 42, 8, 91, 7]
CODERS = [("topk", 0, False), ("relu", 2, True), ("jumprelu", 1, False)]


@pytest.fixture(scope="module")
def model64(tiny):
    family, path, _ = tiny
    return family, minisv.load(str(path), device="cpu", dtype=torch.float64)


def random_clt(model, arch, window, skip, seed=1, F=24):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(model.cfg.n_layers, model.cfg.d_model, F, arch, 4, window, skip))
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.2)
        if arch == "jumprelu":
            clt.log_threshold.fill_(-2.0)
    return clt.double()


def frozen_targets(model, clt, graph, push):
    """Every target's value in the frozen model with `push` {hook name: [T, d] added there}: patterns, norm scales
    and MLP outputs held at the prompt's values (an MLP's skip path still reads its frozen-scale input)."""
    L, tokens = model.cfg.n_layers, torch.tensor([graph.tokens])
    names = [f"blocks.{l}.{h}" for l in range(L) for h in ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale",
                                                            "hook_mlp_out", "ln2.hook_normalized")] + \
        ["ln_final.hook_scale"]
    _, clean = model.run_with_cache(tokens, names=names)
    hooks, xhat = {}, {}
    for name in names:
        def frozen(x, n, name=name):
            if n.endswith("hook_normalized"):
                xhat[n] = x
                return None
            if n.endswith("hook_mlp_out"):
                l = int(n.split(".")[1])
                skip = 0
                if clt.W_skip is not None:      # the skip path is linear in the (frozen-scale) input
                    skip = (xhat[f"blocks.{l}.ln2.hook_normalized"] - clean[f"blocks.{l}.ln2.hook_normalized"]) \
                        @ clt.W_skip[l]
                return clean[n] + skip + push.get(n, 0)
            return clean[n]
        hooks[name] = frozen
    if "hook_embed" in push:
        hooks["hook_embed"] = lambda x, n: x + push["hook_embed"]
    with torch.no_grad(), model.hooks(hooks):
        logits, cache = model.run_with_cache(tokens, names=[f"blocks.{l}.ln2.hook_normalized" for l in range(L)])
    l_, p_, f_ = graph.features.unbind(1)
    xhat2 = torch.stack([cache[f"blocks.{l}.ln2.hook_normalized"][0] for l in range(L)])
    feats = (xhat2[l_, p_] * clt.W_enc[l_, f_]).sum(-1) + clt.b_enc[l_, f_]
    last = logits[0, -1]
    return torch.cat([feats, last[graph.logit_ids] - last.mean()])


def target_rows(graph):
    n = len(graph.adjacency)
    return list(range(graph.n_features)) + list(range(n - len(graph.logit_ids), n))


@pytest.mark.parametrize("arch, window, skip", CODERS)
def test_every_adjacency_column_is_the_frozen_models_response_to_its_node(model64, arch, window, skip):
    family, model = model64
    clt = random_clt(model, arch, window, skip)
    g = attribute(model, clt, PROMPT, dtype=torch.float64)
    rows, T = target_rows(g), len(PROMPT)
    base = frozen_targets(model, clt, g, {})
    torch.testing.assert_close(base, g.values[rows], rtol=0, atol=1e-10)       # the frozen model is the real one
    checks = []
    for j in torch.linspace(0, g.n_features - 1, 6).long().tolist():            # features: activation × 2
        l, p, f = g.features[j].tolist()
        push = {f"blocks.{t}.hook_mlp_out": torch.zeros(T, model.cfg.d_model, dtype=torch.float64)
                for t in range(l, model.cfg.n_layers) if l in clt.cfg.sources(t)}
        for t, delta in push.items():
            delta[p] = g.activations[j] * clt.decoder(l, f, int(t.split(".")[1]))
        checks.append((j, push))
    for l, p in ((0, 3), (1, 1), (2, T - 1)):                                    # errors: added once more
        delta = torch.zeros(T, model.cfg.d_model, dtype=torch.float64)
        delta[p] = _error(model, clt, l, p)
        checks.append((g.n_features + l * T + p, {f"blocks.{l}.hook_mlp_out": delta}))
    for p in (0, 4):                                                             # tokens: embedding once more
        delta = torch.zeros(T, model.cfg.d_model, dtype=torch.float64)
        delta[p] = model.embed.weight[PROMPT[p]]
        checks.append((g.n_features + g.n_errors + p, {"hook_embed": delta}))
    for column, push in checks:
        change = frozen_targets(model, clt, g, push) - base
        torch.testing.assert_close(change, g.adjacency[rows, column], rtol=1e-6, atol=1e-9,
                                   msg=f"{family} {arch}: column {column}")
    assert g.adjacency[rows].abs().sum() > 0


def _error(model, clt, layer, position):
    """mlp_out − reconstruction at (layer, position), computed here from the model's own cache and the dense
    formula."""
    names = [f"blocks.{l}.{h}" for l in range(model.cfg.n_layers) for h in ("ln2.hook_normalized", "hook_mlp_out")]
    _, cache = model.run_with_cache(torch.tensor([PROMPT]), names=names)
    x = torch.stack([cache[f"blocks.{l}.ln2.hook_normalized"][0] for l in range(model.cfg.n_layers)], 1)
    with torch.no_grad():
        y_hat = clt(x)
    return cache[f"blocks.{layer}.hook_mlp_out"][0, position] - y_hat[position, layer]


@pytest.mark.parametrize("arch, window, skip", CODERS)
def test_incoming_edges_plus_bias_sum_to_each_targets_value(model64, arch, window, skip):
    _, model = model64
    clt = random_clt(model, arch, window, skip)
    g = attribute(model, clt, PROMPT, dtype=torch.float64)
    rows = target_rows(g)
    torch.testing.assert_close(g.adjacency[rows].sum(1) + g.bias[rows], g.values[rows], rtol=0, atol=1e-9)
    n = len(g.adjacency)
    assert not g.adjacency[g.n_features:n - len(g.logit_ids)].any()             # errors and tokens have no inputs
    assert (g.features[:, 1] > 0).all()                                          # no feature at position 0
    probs = model(torch.tensor([PROMPT]))[0, -1].float().softmax(-1)
    top = probs.topk(10)
    assert torch.equal(g.logit_ids, top.indices[:len(g.logit_ids)])
    assert top.values[:len(g.logit_ids) - 1].sum() < 0.95 <= top.values[:len(g.logit_ids)].sum() or \
        len(g.logit_ids) == 10


def test_window_1_edges_through_attention_equal_the_per_layer_circuit(model64):
    """A feature target's edge from a feature at another position runs only through attention (a window-1 coder
    writes nowhere else). From the layer just below the target's attention layer (sequential blocks: the previous
    layer; parallel NeoX blocks, whose MLP does not see its own layer's attention: two below) only one attention
    layer lies between them, so the edge is the sum of circuits.py's head terms for that pair: the source's
    activation times its decoder row read along each head's OV pullback of the target."""
    _, model = model64
    torch.manual_seed(2)
    tcs = {}
    for l in range(model.cfg.n_layers):
        tcs[l] = Transcoder(TranscoderConfig(32, 32, 24, "topk", 4, layer=l,
                                             hook_in=f"blocks.{l}.ln2.hook_normalized",
                                             hook_out=f"blocks.{l}.hook_mlp_out"))
        with torch.no_grad():
            for p in tcs[l].parameters():
                p.normal_(0, 0.2)
        tcs[l] = tcs[l].double()
    g = attribute(model, tcs, PROMPT, dtype=torch.float64)
    circuit = Circuit(model, tcs, PROMPT)
    target = next(j for j in range(g.n_features) if g.features[j, 0] == 2 and g.features[j, 1] == len(PROMPT) - 1)
    l_t, p_t, f_t = g.features[target].tolist()
    root = circuit.feature(l_t, f_t, p_t)
    compared = 0
    for j in range(g.n_features):
        l_s, p_s, f_s = g.features[j].tolist()
        if l_s != l_t - (2 if model.cfg.parallel else 1) or p_s == p_t:
            continue
        # circuits.py: every path root <- head (l, h, source p_s) <- feature (l_s, f_s) at p_s, summed over heads
        expected = 0.0
        for head in (k for k in circuit.children(root) if k.kind == "head" and k.at == p_s):
            expected += sum(c.value for c in circuit.children(head) if c.kind == "feature" and c.layer == l_s
                            and c.index == f_s)
        assert g.adjacency[target, j] == pytest.approx(expected, rel=1e-7, abs=1e-10)
        compared += 1
    assert compared >= 3


def test_pruning_and_scores_follow_their_definitions():
    """A 2-feature, 1-error, 1-token, 1-logit graph worked by hand: influence w·(Ā + Ā² + …), the pruned sets,
    and circuit-tracer's replacement and completeness scores."""
    # nodes: f0, f1 | e0 (1 layer × 1 position) | t0 | logit
    A = torch.zeros(5, 5, dtype=torch.float64)
    A[4, 0], A[4, 1], A[4, 2] = 3.0, -1.0, 0.5           # the logit reads f0, f1 and the error
    A[0, 3], A[1, 3], A[0, 2] = 2.0, 1.0, 2.0            # f0 reads the token and the error, f1 the token
    g = Graph([7], torch.tensor([[0, 0, 1], [0, 0, 2]]), torch.ones(2), torch.tensor([9]), torch.tensor([0.8]),
              A, torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), 1)
    w = torch.tensor([0, 0, 0, 0, 0.8], dtype=torch.float64)
    An = normalized(A)
    torch.testing.assert_close(An[4], torch.tensor([3, 1, 0.5, 0, 0], dtype=torch.float64) / 4.5)
    expected = w @ An + w @ An @ An
    torch.testing.assert_close(influence(An, w), expected)
    I = expected
    replacement, completeness = scores(g)
    assert replacement == pytest.approx(float(I[3] / (I[3] + I[2])))
    assert completeness == pytest.approx(float(((1 - An[:, 2]) * (I + w)).sum() / (I + w).sum()))
    nodes, edges, cumulative = prune(g, node_threshold=0.8, edge_threshold=0.98)
    assert nodes[3] and nodes[4]                           # tokens and logits are always kept
    assert cumulative.max() == pytest.approx(1.0)
