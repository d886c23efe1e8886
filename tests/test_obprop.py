"""Observable propagation: the propagated feature vectors against autograd, the coupling algebra against
analytic results, path patching against a brute-force patch through the model, and the script end to end."""
import json
import re

import pytest
import torch

import minisv
from minisv import MinisvError
from minisv import obprop as ob
from minisv.model import Model, ModelConfig
from conftest import needs_smollm2

# paths whose only head (if any) is the path's start: there the frozen-autograd gradient is exact (see
# frozen_gradient); heads 1.1 and 2.3 share a kv head with 1.0 / 2.2 in the GQA llama.
EXACT_PATHS = ["attn 2.3", "attn 1.1", "attn 0.0", "mlp 2", "mlp 0", "mlp 2 <- attn 1.2", "mlp 2 <- mlp 1 <- attn 0.1"]


@pytest.fixture(scope="module")
def family_model(tiny):
    family, path, _ = tiny
    return family, minisv.load(str(path), device="cpu")


def prompt(t=12, seed=1):
    return torch.randint(2, 96, (t,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", EXACT_PATHS)
def test_feature_vector_equals_frozen_autograd_gradient(family_model, path):
    _, model = family_model
    obs = ob.observable(model, {5: 1.0, 7: -1.0, 11: 0.5})
    tokens = prompt()
    y = ob.feature_vector(model, obs, path, ob.reference(model, tokens))
    g = ob.frozen_gradient(model, tokens, obs, path)
    assert g.norm() > 0
    assert torch.allclose(y, g, rtol=1e-4, atol=1e-5 * g.abs().max())


def test_exact_final_norm_jacobian_equals_autograd(family_model):
    family, model = family_model
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
    _, model = family_model
    obs = ob.observable(model, {5: 1.0, 7: -1.0})
    ref = ob.reference(model, prompt(seed=3), prompt(seed=4))
    feats = ob.single_features(model, obs, ref, exact=True)
    assert torch.allclose(ob.feature_vector(model, obs, "attn 2.1", ref, exact=True), feats["attn"][2, 1])
    assert torch.allclose(ob.feature_vector(model, obs, "mlp 1", ref, exact=True), feats["mlp"][1], atol=1e-6)


def test_mlp_is_linearized_halfway_between_the_examples(family_model):
    _, model = family_model
    obs = ob.observable(model, {5: 1.0, 7: -1.0})
    ref = ob.reference(model, prompt(seed=5), prompt(seed=6))
    y = ob.logit_feature(model, obs, ref)
    block, name = model.blocks[1], "blocks.1.ln2.hook_normalized"
    beta = block.ln2.bias if block.ln2.bias is not None else 0
    f = lambda xhat: float(model.apply_mlp(1, xhat * block.ln2.weight + beta) @ y)
    _, t = ob.mlp_feature(model, 1, y, ref, return_t=True)
    a, b = ref.pos[name], ref.neg[name]
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
    obs = ob.observable(model, "' she' - ' he' + 2*' her' - .5 * ' him'")
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
    ("head 1.1", "cannot read path"), ([("attn", 1, -1)], "head in 0..3"), ("", "cannot read path")])
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
    assert coupling["tokens"] == 38 * 15 and [h["head"] for h in coupling["heads"]] == subject["top_by_norm"]
    assert all(0 <= h["r2"] <= 1 + 1e-9 for h in coupling["heads"])
    page = (tmp_path / "r.html").read_text()
    assert "&#x27; she&#x27; - &#x27; he&#x27;" in page and "<script" not in page
    assert "coupling ' she' - ' he' -> ' her' - ' him'" in capsys.readouterr().out


def test_script_bad_input_exits_2_with_one_line(planted, monkeypatch, capsys):
    import obprop as script
    monkeypatch.setattr(minisv, "load", lambda spec, device=None: planted)
    for argv, message in [
            (["--observable", "' nurse' - ' he'", "--pos-prompt", "a", "--neg-prompt", "b"], "not one token"),
            (["--observable", "' she' - ' he'"], "give one --template"),
            (["--pos-prompt", "Mary is"], "--pos-prompt and 0 --neg-prompt"),
            (["--template", "So [NAME] is", "--pos-names", "Nobody"], "none of the names is a single token"),
            (["--path", "attn 9.0"], "out of range"), (["--top", "0"], "--top must be at least 1")]:
        with pytest.raises(SystemExit) as e:
            script.main(argv + ["--html", "/nonexistent/never.html"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


@needs_smollm2
def test_smollm2_top_head_by_feature_norm_is_the_top_head_by_patching():
    """The paper's claim on the real model: with no data, the feature norm finds the head that patching finds."""
    model = minisv.load("smollm2", device="cpu")
    spec, template = ob.PRONOUN_STUDY[0]
    obs = ob.observable(model, spec)
    female, pos, _ = ob.template_prompts(model, template, ob.FEMALE_NAMES)
    male, neg, _ = ob.template_prompts(model, template, ob.MALE_NAMES)
    assert len(female) >= 80 and len(male) >= 80
    norms = ob.single_features(model, obs)["attn"].norm(dim=-1)
    effects = ob.patch_heads(model, obs, pos[:8], neg[:8])
    assert int(norms.argmax()) == int(effects.abs().argmax())
    assert ob.ranking_agreement(norms, effects.abs(), k=5)["top_k_overlap"] >= 0.4
