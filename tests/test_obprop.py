"""Observable propagation: the propagated feature vectors against an independent frozen-autograd oracle written on
transformers' own models, the coupling algebra against analytic results, path patching against brute-force
patches through the model, and the script end to end."""
import copy
import json
import re

import pytest
import torch

import minisv
from minisv import MinisvError
from minisv import obprop as ob
from minisv.model import Model, ModelConfig
from conftest import needs_smollm2


# ------------------------------------------------------------------------- the frozen-autograd oracle
class FrozenOracle:
    """Frozen autograd on a transformers model, sharing no code with minisv.obprop. Attention patterns and norm
    scales are detached (frozen at the prompt), and so is every attention and MLP output and the residual stream
    itself; only the path carries gradient: each path component's output reaches only the norm of the next path
    component (or the final norm), a path head only from its query token to its source token (with weight 1: a
    path's feature leaves the attention weight out), a path MLP only at the token it acts on. The gradient of the
    observable at the last token with respect to x̂ (the normalized input, before the gain) of the path's earliest
    component, at the token it reads, is then the path's feature vector."""
    def __init__(self, hf, family):
        self.hf, self.family = hf, family
        body = hf.transformer if family == "gpt2" else hf.gpt_neox if family == "neox" else hf.model
        self.layers = body.h if family == "gpt2" else body.layers
        self.final_norm = body.ln_f if family == "gpt2" else body.final_layer_norm if family == "neox" else body.norm
        # transformers' own modules: the norm each component reads through, and the component
        self.norms = {"attn": [b.ln_1 if family == "gpt2" else b.input_layernorm for b in self.layers],
                      "mlp": [b.ln_2 if family == "gpt2" else b.post_attention_layernorm for b in self.layers]}
        attns = [b.attn if family == "gpt2" else b.attention if family == "neox" else b.self_attn for b in self.layers]
        self.state = {}
        from transformers import AttentionInterface
        AttentionInterface.register("frozen_oracle", self.attention)
        hf.set_attn_implementation("frozen_oracle")
        for m in hf.modules():
            if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
                m.register_forward_hook(self.frozen_norm)
        for l, b in enumerate(self.layers):
            b.mlp.register_forward_hook(lambda m, inp, out, l=l: self.output(("mlp", l), out))
            attns[l].register_forward_hook(lambda m, inp, out, l=l: (self.output(("attn", l), out[0]), *out[1:]))

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        H, K, T = query.shape[1], key.shape[1], query.shape[2]
        key, value = (x.repeat_interleave(H // K, 1) for x in (key, value))
        scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        w = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1).detach()
        self.state.setdefault("patterns", {})[module.layer_idx] = w[0]
        out = w @ value.detach()
        select = self.state.get("select", {}).get(module.layer_idx)     # [H, T, T]: (head, query, source) of the path
        if select is not None:
            out = out + select[None] @ (value - value.detach())
        return out.transpose(1, 2), w

    def output(self, key, out):
        """A component's output: detached; a path component's gradient-carrying part, only at its token, is kept
        for the next path component's norm."""
        at = self.state.get("path", {}).get(key)
        if at is not None:
            mask = torch.zeros(out.shape[1], 1)
            mask[at] = 1
            self.state["delta"][key] = mask * (out - out.detach())
        return out.detach()

    def frozen_norm(self, m, inputs, _):
        h = inputs[0].detach().float()
        if m in self.state.get("feeds", {}):
            h = h + self.state["delta"][self.state["feeds"][m]]
        layer_norm = getattr(m, "bias", None) is not None
        if layer_norm:
            h = h - h.mean(-1, keepdim=True)
        eps = m.eps if hasattr(m, "eps") else m.variance_epsilon
        xhat = h * torch.rsqrt(h.detach().pow(2).mean(-1, keepdim=True) + eps)
        if m is self.state.get("leaf_norm"):
            xhat = self.state["leaf"] = xhat.detach().requires_grad_(True)
        return xhat * m.weight + m.bias if layer_norm else m.weight * xhat

    def __call__(self, tokens, n, components):
        """tokens: [T] ids; n: [V] observable; components: from the logits back, (kind, layer, head, source), a
        source None meaning the token the head attends to most. Returns (feature [D], positions read)."""
        tokens = torch.as_tensor(tokens)[None]
        T = tokens.shape[1]
        self.state = {}
        with torch.no_grad():
            self.hf(tokens)
        patterns, select, path, feeds, t, reads = self.state["patterns"], {}, {}, {}, T - 1, []
        reader = self.final_norm
        for kind, layer, head, source in components:
            path[kind, layer] = t
            feeds[reader] = (kind, layer)
            if kind == "attn":
                s = int(patterns[layer][head, t].argmax()) if source is None else source % T
                select.setdefault(layer, torch.zeros(patterns[layer].shape))[head, t, s] = 1
                t = s
            reads.append(t)
            reader = self.norms[kind][layer]
        self.state = dict(select=select, path=path, feeds=feeds, delta={}, leaf_norm=reader)
        with torch.enable_grad():
            value = self.hf(tokens).logits[0, -1].float() @ n
            grad = torch.autograd.grad(value, self.state["leaf"])[0][0, t]
        return (grad - grad.mean() if self.family != "llama" else grad), reads


def assert_same_vector(y, g):
    assert g.norm() > 0
    assert ob.cosine(y, g) >= 0.9999 and float((y - g).norm() / g.norm()) <= 1e-4


@pytest.fixture(scope="module")
def family_model(tiny):
    family, path, hf = tiny     # the oracle hooks its own copy: the session's reference model stays untouched
    return family, minisv.load(str(path), device="cpu"), FrozenOracle(copy.deepcopy(hf).requires_grad_(False), family)


def prompt(t=12, seed=1):
    return torch.randint(2, 96, (t,), generator=torch.Generator().manual_seed(seed))


OBSERVABLE = {5: 1.0, 7: -1.0, 11: 0.5}
# every path shape, with default, explicit and from-the-end source tokens; paths through NeoX's parallel blocks
# are the same strings on the neox model (where attn l and mlp l both read resid_pre)
PATHS = ["attn 2.3", "mlp 0", "attn 2.1 <- attn 1.0", "attn 2.1@4 <- attn 1.3@2", "attn 2.1 <- mlp 1",
         "attn 2.2@5 <- mlp 0", "attn 2.1@-3 <- attn 1.3 <- mlp 0", "mlp 2 <- attn 1.2", "mlp 2 <- attn 1.2@6",
         "mlp 2 <- mlp 1 <- attn 0.1", "attn 2.0@7 <- mlp 1 <- attn 0.3@2", "mlp 2 <- attn 1.1@3 <- mlp 0"]


@pytest.mark.parametrize("path", PATHS)
def test_feature_vector_equals_frozen_autograd_at_the_right_tokens(family_model, path):
    _, model, oracle = family_model
    n = torch.zeros(model.cfg.vocab_size)
    n[list(OBSERVABLE)] = torch.tensor(list(OBSERVABLE.values()))
    tokens = prompt()
    y, steps = ob.feature_vector(model, ob.observable(model, OBSERVABLE), path, ob.reference(model, tokens),
                                 trace=True)
    # the oracle's own reading of the path: kind, layer, head and an optional @position, nothing else
    components = [(m[1], int(m[2]), m[3] and int(m[3]), m[4] and int(m[4]))
                  for m in re.finditer(r"(attn|mlp) (\d+)(?:\.(\d+))?(?:@(-?\d+))?", path)]
    g, reads = oracle(tokens, n, components)
    assert [s["reads"] for s in steps] == reads
    assert_same_vector(y, g)


def test_exact_final_norm_jacobian_equals_autograd(family_model):
    family, model, _ = family_model
    obs = ob.observable(model, {5: 1.0, 7: -1.0})
    tokens = prompt(seed=2)
    resid = model(tokens[None], stop_at_layer=model.cfg.n_layers).detach().requires_grad_(True)
    grad = torch.autograd.grad(obs.value(model(resid, start_at_layer=model.cfg.n_layers)[0, -1]), resid)[0][0, -1]
    ref = ob.reference(model, tokens)
    exact, approx = ob.logit_feature(model, obs, ref, exact=True), ob.logit_feature(model, obs, ref)
    assert torch.allclose(exact, grad, rtol=1e-4, atol=1e-6 * grad.abs().max())
    # the frozen-scale approximation only drops the radial part: exact = approx − (approx·r)r, r = x̂/√d
    # (a unit vector up to ε, which matters here: this tiny llama's residual has an RMS of ~0.02)
    h = resid[0, -1].detach()
    h = h - h.mean() if family != "llama" else h
    r = h * torch.rsqrt(h.pow(2).mean() + model.cfg.norm_eps) / len(h) ** 0.5
    assert torch.allclose(exact, approx - (approx @ r) * r, atol=1e-5 * approx.abs().max())


def test_single_features_are_the_single_component_paths(family_model):
    _, model, _ = family_model
    obs = ob.observable(model, {5: 1.0, 7: -1.0})
    ref = ob.reference(model, prompt(seed=3), prompt(seed=4))
    feats = ob.single_features(model, obs, ref, exact=True)
    assert torch.allclose(ob.feature_vector(model, obs, "attn 2.1", ref, exact=True), feats["attn"][2, 1])
    assert torch.allclose(ob.feature_vector(model, obs, "mlp 1", ref, exact=True), feats["mlp"][1], atol=1e-6)


def test_mlp_is_linearized_halfway_between_the_examples(family_model):
    _, model, _ = family_model
    obs = ob.observable(model, {5: 1.0, 7: -1.0})
    ref = ob.reference(model, prompt(seed=5), prompt(seed=6))
    y = ob.logit_feature(model, obs, ref)
    block, name = model.blocks[1], "blocks.1.ln2.hook_normalized"
    beta = block.ln2.bias if block.ln2.bias is not None else 0
    f = lambda xhat: float(model.apply_mlp(1, xhat * block.ln2.weight + beta) @ y)
    _, t = ob.mlp_feature(model, 1, y, ref, return_t=True)
    a, b = ref.at(name, ref.length - 1)
    assert 0 <= t <= 1 and f(b + t * (a - b)) == pytest.approx((f(a) + f(b)) / 2, rel=1e-4, abs=1e-7)


def test_coupling_and_cosine_identities_and_the_empirical_slope():
    g = torch.Generator().manual_seed(0)
    y1, y2 = torch.randn(64, generator=g), torch.randn(64, generator=g)
    y2 = y2 + 0.8 * y1
    assert ob.coupling(y1, y1) == pytest.approx(1)
    assert ob.coupling(y1, 3 * y1) == pytest.approx(3)
    assert ob.coupling(2 * y1, y2) == pytest.approx(ob.coupling(y1, y2) / 2)
    assert ob.coupling(y1, 2 * y2) == pytest.approx(2 * ob.coupling(y1, y2))
    assert ob.cosine(y1, y2) == pytest.approx(ob.cosine(y2, 5 * y1))
    # for isotropic inputs x, the slope of y2·x on y1·x is C(y1, y2), and r² is cos²
    x = torch.randn(200_000, 64, generator=g)
    slope, r2 = ob.fit_slope(x @ y1, x @ y2)
    assert slope == pytest.approx(ob.coupling(y1, y2), abs=0.01)
    assert r2 == pytest.approx(ob.cosine(y1, y2) ** 2, abs=0.01)


def test_auc_and_ranking_agreement():
    assert ob.auc([2.0, 3.0], [0.0, 1.0]) == 1 and ob.auc([0.0, 1.0], [2.0, 3.0]) == 0
    assert ob.auc([1.0, 2.0], [1.0, 0.0]) == 0.875          # 3 wins and one tie out of 4
    a = torch.arange(12.0).view(3, 4)
    assert ob.ranking_agreement(a, 2 * a + 1, k=3) == {"top_k_overlap": 1.0, "spearman": pytest.approx(1.0)}
    reverse = ob.ranking_agreement(a, -a, k=3)
    assert reverse["top_k_overlap"] == 0 and reverse["spearman"] == pytest.approx(-1.0)


# ------------------------------------------------------------------------- a tiny llama with a planted head
class WordTokenizer:
    """A stand-in for a real tokenizer: each vocabulary word (with its leading space) or punctuation mark is one
    token; anything else is spelled out one character at a time (unknown characters -> id 2)."""
    bos_id, eos_id, add_bos = 0, 1, False

    def __init__(self, words):
        self.words = ["<s>", "</s>", "<unk>"] + words
        self.ids = {w: i for i, w in enumerate(self.words)}

    def encode(self, text, bos=False):
        pieces = re.findall(r" ?\w+| ?[^\w\s]|\s", text)
        spelled = [[self.ids[p]] if p in self.ids else [self.ids.get(c, 2) for c in p] for p in pieces]
        return [self.bos_id] * bos + [i for ids in spelled for i in ids]

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)

    def token_str(self, i):
        return self.words[i]


WORDS = ["So", "What", ",", "?", "'", "t"] + [" " + w for w in (
    "she he her him really is a great friend isn do I think about Well to be honest love the and of "
    "Mary Anna Lisa Emma Julia Rose Kate Jane John Mark Paul Tom Jack Bill Fred Sam").split()]
WORDS += list(" abcdefghijklmnopqrstuvwxyz")
PLANTED = (1, 2)


@pytest.fixture(scope="module")
def planted():
    """A random tiny llama (GQA: 4 heads, 2 kv heads) whose head 1.2 writes, scaled up, along the direction the
    observable ' she' − ' he' reads: it alone carries the observable from the name to the last token."""
    torch.manual_seed(0)
    cfg = ModelConfig("llama", 3, 32, 4, 2, 8, 64, 96, 64, "silu", rotary_dim=8)
    model = Model(cfg, WordTokenizer(WORDS)).eval().requires_grad_(False)
    for norm in [b.ln1 for b in model.blocks] + [b.ln2 for b in model.blocks] + [model.ln_final]:
        norm.weight.normal_(1.0, 0.1)
    obs = ob.observable(model, "' she' - ' he'")
    g = ob.logit_feature(model, obs)
    l, h = PLANTED
    o = model.blocks[l].attn.o.weight
    o[:, h * 8:(h + 1) * 8] = 30 * torch.outer(g / g.norm(), torch.randn(8))
    return model


def test_observable_parsing_and_errors(planted):
    model = planted
    obs = ob.observable(model, "' she' - ' he' + 2e0*' her' - 5e-1 * ' him'")
    tok = model.tokenizer
    assert dict(zip(obs.ids.tolist(), obs.weights.tolist())) == {tok.ids[" she"]: 1, tok.ids[" he"]: -1,
                                                                  tok.ids[" her"]: 2, tok.ids[" him"]: -0.5}
    logits = torch.randn(3, 96)
    assert torch.allclose(obs.value(logits), logits[:, tok.ids[" she"]] - logits[:, tok.ids[" he"]]
                          + 2 * logits[:, tok.ids[" her"]] - 0.5 * logits[:, tok.ids[" him"]])
    with pytest.raises(MinisvError, match=r"' nurse' is not one token .*\[' ', 'n', 'u'"):
        ob.observable(model, "' nurse' - ' he'")
    for bad in ["' she' ' he'", "she - he", "' she' -"]:
        with pytest.raises(MinisvError, match="cannot read observable"):
            ob.observable(model, bad)
    with pytest.raises(MinisvError, match="is zero"):
        ob.observable(model, "' she' - ' she'")
    with pytest.raises(MinisvError, match="outside the vocabulary"):
        ob.observable(model, {500: 1})


@pytest.mark.parametrize("path, message", [
    ("attn 3.0", "out of range"), ("attn 1", "needs 'attn LAYER.HEAD'"), ("mlp 1.2", "needs 'attn LAYER.HEAD'"),
    ("attn 1.4", "head in 0..3"), ("attn 0.1 <- attn 2.0", "out of order"), ("attn 1.1 <- mlp 1", "out of order"),
    ("head 1.1", "cannot read path"), ([("attn", 1, -1)], "head in 0..3"), ("", "cannot read path"),
    ([("attn", True, 1)], "needs 'attn LAYER.HEAD'"), ([("attn", 1, True)], "head in 0..3"),
    ([("attn", 1)], "head in 0..3"), ([("mlp", 1, None, 2)], "only a head takes a source"), ([5], "cannot read"),
    ("mlp 1@2", "only a head takes a source"), ("attn 1.1@x y", "cannot read path"),
    ([("attn", 1, 1, 2.5)], "only a head takes a source")])
def test_bad_paths_are_clear_errors(planted, path, message):
    with pytest.raises(MinisvError, match=message):
        ob.parse_path(planted, path)


def test_rules_that_need_a_reference_say_so(planted):
    obs = ob.observable(planted, "' she' - ' he'")
    with pytest.raises(MinisvError, match="linearized at a point"):
        ob.feature_vector(planted, obs, "mlp 1")
    with pytest.raises(MinisvError, match="needs a reference point"):
        ob.feature_vector(planted, obs, "attn 1.1", exact=True)
    with pytest.raises(MinisvError, match=r"\[NAME\]"):
        ob.template_prompts(planted, "no name here", ["Mary"])


def name_prompts(model, names):
    _, prompts, position = ob.template_prompts(model, "So, [NAME] really is a great friend, isn't", names)
    return prompts, position


def test_patching_recovers_the_planted_head_and_matches_a_brute_force_patch(planted):
    model, L = planted, planted.cfg.n_layers
    obs = ob.observable(model, "' she' - ' he'")
    pos, _ = name_prompts(model, ["Mary", "Anna", "Lisa", "Emma"])
    neg, _ = name_prompts(model, ["John", "Mark", "Paul", "Tom"])
    effects = ob.patch_heads(model, obs, pos, neg)
    norms = ob.single_features(model, obs)["attn"].norm(dim=-1)
    assert divmod(int(effects.abs().argmax()), 4) == PLANTED == divmod(int(norms.argmax()), 4)
    assert ob.ranking_agreement(norms, effects.abs(), k=1)["top_k_overlap"] == 1
    # brute force, through the model's own final norm and unembedding: move head (l, h)'s output at the last
    # token from the positive run to the negative run's, in the residual entering ln_final
    heads, total = [PLANTED, (0, 3), (2, 1)], torch.zeros(3)
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    for p, n in zip(pos, neg):
        (_, clean), (_, dirty) = (model.run_with_cache(torch.tensor(x), names=names) for x in (p, n))
        resid = clean[names[-1]]
        for i, (l, h) in enumerate(heads):
            W_O = model.blocks[l].attn.o.weight[:, h * 8:(h + 1) * 8]
            patched = resid.clone()
            patched[0, -1] += W_O @ (dirty[names[l]][0, -1, h] - clean[names[l]][0, -1, h])
            total[i] += obs.value(model(resid, start_at_layer=L)[0, -1] - model(patched, start_at_layer=L)[0, -1])
    for (l, h), brute in zip(heads, total / len(pos)):
        assert float(effects[l, h]) == pytest.approx(float(brute), rel=1e-4, abs=1e-5)


def test_feature_scores_are_dot_products_with_the_cached_activations(planted):
    rows = torch.randint(3, 96, (5, 10), generator=torch.Generator().manual_seed(0))
    feats = {"blocks.1.ln1.hook_normalized": torch.randn(3, 32), "blocks.0.ln2.hook_normalized": torch.randn(2, 32)}
    scores = ob.feature_scores(planted, feats, rows, batch_size=2)
    _, cache = planted.run_with_cache(rows, names=list(feats))
    for name, y in feats.items():
        assert torch.allclose(scores[name], (cache[name][:, 1:].reshape(-1, 32) @ y.T).T, atol=1e-5)


def test_script_end_to_end_on_the_planted_model(planted, tmp_path, monkeypatch, capsys):
    import obprop as script
    monkeypatch.setattr(minisv, "load", lambda spec, device=None: planted)
    (tmp_path / "corpus.txt").write_text(" ".join(WORDS[:40] * 30))
    out = tmp_path / "r.json"
    script.main(["--model", "tiny", "--observable", "' she' - ' he'", "--observable", "' her' - ' him'",
                 "--template", "So, [NAME] really is a great friend, isn't", "--template",
                 "What do I think about [NAME]? Well, to be honest, I love",
                 "--pos-names", "Mary,Anna,Lisa,Emma,Julia,Rose,Kate,Jane",
                 "--neg-names", "John,Mark,Paul,Tom,Jack,Bill,Fred,Sam,Nobody",
                 "--pairs", "4", "--top", "3", "--train-examples", "2", "--corpus", str(tmp_path / "corpus.txt"),
                 "--corpus-tokens", "600", "--ctx", "16", "--path", "attn 2.0 <- mlp 1",
                 "--html", str(tmp_path / "r.html"), "--json", str(out)])
    res = json.loads(out.read_text())
    subject = res["observables"][0]
    assert subject["top_by_norm"][0] == subject["top_by_patching"][0] == list(PLANTED)
    obs = ob.observable(planted, "' she' - ' he'")
    pos, position = name_prompts(planted, ["Mary"])
    neg, _ = name_prompts(planted, ["John"])
    feats = ob.single_features(planted, obs, ob.reference(planted, pos[0], neg[0]))
    assert torch.allclose(torch.tensor(subject["feature_norms"]), feats["attn"].norm(dim=-1), rtol=1e-5)
    assert subject["classifier"]["test_names"] == [6, 6]      # "Nobody" is not one token, so it is dropped
    assert subject["paths"]["attn 2.0 <- mlp 1"]["norm"] > 0
    coupling = res["couplings"][0]
    assert coupling["tokens"] == 38 * 15 and [h["head"] for h in coupling["top_heads"]] == subject["top_by_norm"]
    assert len(coupling["heads"]) == 12 and all(0 <= h["r2"] <= 1 + 1e-9 for h in coupling["heads"])
    # the planted head carries both observables along one direction: its coupling is exact, and the slope finds it
    planted_head = coupling["heads"][PLANTED[0] * 4 + PLANTED[1]]
    assert planted_head["r2"] > 0.99 and planted_head["slope"] == pytest.approx(planted_head["predicted"], rel=0.02)
    assert planted_head["predicted"] == pytest.approx(planted_head["predicted_weights_only"] * coupling["scale_ratio"])
    # the classifier AUC of the planted head, recomputed from the model's own cache at the name token
    pos, position = name_prompts(planted, "Mary,Anna,Lisa,Emma,Julia,Rose,Kate,Jane".split(","))
    neg, _ = name_prompts(planted, "John,Mark,Paul,Tom,Jack,Bill,Fred,Sam".split(","))
    hook = f"blocks.{PLANTED[0]}.ln1.hook_normalized"
    scores = [[float(planted.run_with_cache(torch.tensor(p), names=[hook])[1][hook][0, position] @ y) for p in side[2:]]
              for side, y in ((pos, feats["attn"][PLANTED]), (neg, feats["attn"][PLANTED]))]
    wins = sum((a > b) + 0.5 * (a == b) for a in scores[0] for b in scores[1]) / 36
    auc = next(x["auc_obprop"] for x in subject["classifier"]["heads"] if x["head"] == list(PLANTED))
    assert auc == pytest.approx(wins)
    assert subject["total_pairs"] == 4 and subject["top_by_total_patching"][0] == list(PLANTED)
    assert len(subject["mlp_feature_norms"]) == 3 and len(subject["top_mlps_by_norm"]) == 3
    steps = subject["paths"]["attn 2.0 <- mlp 1"]["steps"]
    assert steps[0]["writes"] == len(subject["reference"]["tokens"][0]) - 1 and steps[1]["reads"] == steps[0]["reads"]
    assert subject["reference"]["slots"] == {"name": position}
    page = (tmp_path / "r.html").read_text()
    assert "&#x27; she&#x27; - &#x27; he&#x27;" in page and "<script" not in page
    assert "coupling ' she' - ' he' -> ' her' - ' him'" in capsys.readouterr().out


def test_script_bad_input_exits_2_with_one_line(planted, monkeypatch, capsys, tmp_path):
    import obprop as script
    monkeypatch.setattr(minisv, "load", lambda spec, device=None: planted)
    for argv, message in [
            (["--observable", "' nurse' - ' he'", "--pos-prompt", "a", "--neg-prompt", "b"], "not one token"),
            (["--observable", "' she' - ' he'"], "give one --template"),
            (["--observable", "' she' - ' he'", "--pos-prompt", "Mary is"], "--pos-prompt and 0 --neg-prompt"),
            (["--pos-prompt", "Mary is", "--neg-prompt", "John is"], "need --observable"),
            (["--study", "party", "--observable", "' she' - ' he'"], "--study party sets the observables"),
            (["--study", "gender"], "argument --study: invalid choice"),
            (["--observable", "' she' - ' he'", "--template", "So [NAME] is", "--pos-names", "Nobody"],
             "none of the names is a single token"),
            (["--path", "attn 9.0"], "out of range"), (["--path", "attn 2.0@title"], "no template slot 'title'"),
            (["--ctx", "65"], "--ctx 65 is longer than the model's context of 64"),
            (["--top", "0"], "argument --top: '0' must be a positive integer"),
            (["--pairs", "-1"], "argument --pairs"), (["--corpus-tokens", "nan"], "argument --corpus-tokens"),
            (["--total-pairs", "x"], "'x' is not an integer"), (["--search-paths", "-2"], "--search-paths"),
            (["--train-examples", "1.5"], "--train-examples"), (["--ctx", "1"], "--ctx 1 is too short"),
            (["--device", "tpu"], "device 'tpu'"), (["--json", str(tmp_path)], "is a directory"),
            (["--observable", "' she' - ' he'", "--pos-prompt", "Mary is", "--neg-prompt", "John is", "--observable",
              "' her' - ' him'", "--corpus", str(tmp_path / "missing.npy")], "missing.npy: no such file"),
            (["--top", "13"], "more than the model's 12 heads")]:
        with pytest.raises(SystemExit) as e:
            script.main(argv + ["--html", "/nonexistent/never.html"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error: " in line]
        assert e.value.code == 2 and len(errors) == 1 and message in errors[0] and err.strip().endswith(errors[0])
        assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [(["--ctx", "0"], "argument --ctx: '0' must be a positive integer"),
                                           (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
                                           (["--model"], "argument --model: expected one argument")])
def test_script_flag_errors_read_like_the_other_scripts(argv, message, capsys):
    """A flag argparse rejects: its usage, then one `PROG: error: ...` line and exit status 2, exactly as
    train_transcoder.py (and optimize_sv.py) report it."""
    import obprop
    import train_transcoder
    for script in (obprop, train_transcoder):
        with pytest.raises(SystemExit) as e:
            script.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[0].startswith("usage: "), (script.__name__, err)
        assert re.fullmatch(rf"\S+: error: {re.escape(message)}", err[-1]), (script.__name__, err[-1])


# ------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    """minisv's SmolLM2, its pronoun-study prompts, and the oracle on a transformers Llama holding the same
    weights (minisv's GGUF loading is checked against transformers' own in test_smollm2.py)."""
    import transformers as tf
    model = minisv.load("smollm2", device="cpu")
    c = model.cfg
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.d_head, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_base, max_position_embeddings=c.n_ctx, tie_word_embeddings=c.tie_embeddings)).eval()
    weights = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.ln_final.weight,
               "lm_head.weight": model.unembed.weight}
    for l, b in enumerate(model.blocks):
        weights.update({f"model.layers.{l}.{name}.weight": p for name, p in [
            ("input_layernorm", b.ln1), ("post_attention_layernorm", b.ln2), ("self_attn.q_proj", b.attn.q),
            ("self_attn.k_proj", b.attn.k), ("self_attn.v_proj", b.attn.v), ("self_attn.o_proj", b.attn.o),
            ("mlp.gate_proj", b.mlp.gate), ("mlp.up_proj", b.mlp.up), ("mlp.down_proj", b.mlp.proj)]
            for p in [p.weight]})
    hf.load_state_dict({k: v.detach().clone() for k, v in weights.items()})
    spec, (template, *_) = ob.STUDIES["pronouns"][0]
    obs = ob.observable(model, spec)
    _, pos, name = ob.template_prompts(model, template, ob.FEMALE_NAMES)
    _, neg, _ = ob.template_prompts(model, template, ob.MALE_NAMES)
    n = torch.zeros(c.vocab_size)
    n[obs.ids] = obs.weights
    return dict(model=model, oracle=FrozenOracle(hf.requires_grad_(False), "llama"), obs=obs, n=n, pos=pos, neg=neg,
                name=name)


@needs_smollm2
def test_smollm2_paths_equal_frozen_autograd_at_the_right_tokens(smollm2):
    s = smollm2
    ref = ob.reference(s["model"], s["pos"][0], slots={"name": s["name"]})
    for path, components in [
            ("attn 26.2 <- mlp 20", [("attn", 26, 2, None), ("mlp", 20, None, None)]),
            ("mlp 29 <- attn 27.5@name <- attn 20.1", [("mlp", 29, None, None), ("attn", 27, 5, s["name"]),
                                                     ("attn", 20, 1, None)])]:
        y, steps = ob.feature_vector(s["model"], s["obs"], path, ref, trace=True)
        g, reads = s["oracle"](s["pos"][0], s["n"], components)
        assert [x["reads"] for x in steps] == reads
        assert_same_vector(y, g)


@needs_smollm2
def test_smollm2_script_path_vector_matches_frozen_autograd(smollm2):
    """What `python obprop.py --path "attn 26.2 <- mlp 20"` reports: MLP 20 linearized and norm scales taken
    between the positive and the negative reference prompt, at the token head 26.2 reads. Frozen autograd on
    the positive prompt, at the tokens the JSON records, agrees to cosine 0.99 (0.997 measured)."""
    import obprop as script
    s = smollm2
    ref = ob.reference(s["model"], s["pos"][0], s["neg"][0], {"name": s["name"]})
    result = script.path_results(s["model"], s["obs"], ["attn 26.2 <- mlp 20"], ref, exact=False)
    y, steps = torch.tensor(result["attn 26.2 <- mlp 20"]["vector"]), result["attn 26.2 <- mlp 20"]["steps"]
    g, _ = s["oracle"](s["pos"][0], s["n"], [("attn", 26, 2, steps[0]["reads"]), ("mlp", 20, None, None)])
    assert ob.cosine(y, g) >= 0.99


@needs_smollm2
def test_smollm2_top_head_by_feature_norm_is_the_top_head_by_patching(smollm2):
    """The paper's claim on the real model: with no data, the feature norm finds the head that patching finds."""
    model, obs, pos, neg = (smollm2[k] for k in ("model", "obs", "pos", "neg"))
    assert len(pos) >= 80 and len(neg) >= 80
    norms = ob.single_features(model, obs)["attn"].norm(dim=-1)
    effects = ob.patch_heads(model, obs, pos[:8], neg[:8])
    assert int(norms.argmax()) == int(effects.abs().argmax())
    assert ob.ranking_agreement(norms, effects.abs(), k=5)["top_k_overlap"] >= 0.4


def test_total_effect_patching_matches_one_patch_at_a_time(planted):
    model = planted
    obs = ob.observable(model, "' she' - ' he'")
    pos, _ = name_prompts(model, ["Mary", "Anna", "Lisa"])
    neg, _ = name_prompts(model, ["John", "Mark", "Paul"])
    effects = ob.patch_heads_total(model, obs, pos, neg)
    for l, h in [PLANTED, (0, 3), (2, 1), (1, 0)]:
        total = 0.0
        for p, n in zip(pos, neg):
            _, cache = model.run_with_cache(torch.tensor(n), names=[f"blocks.{l}.attn.hook_z"])

            def swap(z, name):
                z = z.clone()
                z[:, :, h] = cache[name][:, :, h]
                return z
            with model.hooks({f"blocks.{l}.attn.hook_z": swap}):
                patched = obs.value(model(torch.tensor(p))[0, -1])
            total += float(obs.value(model(torch.tensor(p))[0, -1]) - patched) / len(pos)
        assert float(effects[l, h]) == pytest.approx(total, rel=1e-4, abs=1e-5)
    assert divmod(int(effects.abs().argmax()), 4) == PLANTED
    with pytest.raises(MinisvError, match="same length"):
        ob.patch_heads_total(model, obs, [pos[0]], [pos[0][:-1]])


def test_path_search_scores_are_the_found_paths_contributions(planted):
    model = planted
    obs = ob.observable(model, "' she' - ' he'")
    (pos, neg), position = name_prompts(model, ["Mary", "John"])
    ref = ob.reference(model, pos, neg, {"name": position})
    levels = ob.search_paths(model, obs, ref, steps=2, width=3)
    assert [len(level) for level in levels] == [3, 3] and levels[0][0]["path"].startswith("attn 1.2@")
    for level in levels:
        assert all(abs(a["score"]) >= abs(b["score"]) for a, b in zip(level, level[1:]))
        for p in level:
            y, steps = ob.feature_vector(model, obs, p["path"], ref, trace=True)
            weight, start = 1.0, steps[-1]
            for s in steps:
                if s["kind"] == "attn":
                    weight *= float(ref.patterns[s["layer"], s["head"], s["writes"], s["reads"]])
            hook = f"blocks.{start['layer']}.{'ln1' if start['kind'] == 'attn' else 'ln2'}.hook_normalized"
            delta = ref.acts[0][hook][start["reads"]] - ref.acts[1][hook][start["reads"]]
            assert p["score"] == pytest.approx(weight * float(y @ delta), rel=1e-4, abs=1e-6)


def test_script_averages_several_templates_and_falls_back_to_first_tokens(planted, tmp_path, monkeypatch):
    import obprop as script
    monkeypatch.setattr(minisv, "load", lambda spec, device=None: planted)
    templates = ["So, [NAME] really is a great friend, isn't",
                 "What do I think about [NAME]? Well, to be honest, I love"]
    out = tmp_path / "r.json"
    script.main(["--observable", "' she' - ' he'", "--template", " | ".join(templates), "--pos-names",
                 "Mary,Anna,Lisa,Emma", "--neg-names", "John,Mark,Paul,Tom", "--pairs", "6", "--train-examples", "1",
                 "--total-pairs", "0", "--top", "2", "--html", str(tmp_path / "r.html"), "--json", str(out)])
    res = json.loads(out.read_text())["observables"][0]
    assert res["reference"]["templates"] == templates and res["pairs"] == 6 and res["total_patching"] is None
    assert res["classifier"]["test_names"] == [6, 6]           # 3 test names per class in each of 2 templates
    pos, position = name_prompts(planted, ["Mary"])
    assert res["reference"]["tokens"][0] == pos[0] and res["reference"]["slots"] == {"name": position}
    obs = ob.observable(planted, "' she' - 'xy'", first_token=True)
    assert obs.ids.tolist() == [planted.tokenizer.ids[" she"], planted.tokenizer.ids["x"]]
    assert "'xy' is 2 tokens" in obs.warnings[0]
