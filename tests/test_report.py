"""Feature dashboards against a brute-force computation, and the HTML reports: they parse and escape every token
string. tests/test_browser.py opens them in a real browser."""
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from minisv import MinisvError
from minisv import formats
from minisv.circuits import Circuit, de_embed, feature_direction, format_tree, logit_effects
from minisv.model import Model, ModelConfig
from minisv.atomic import write_text
from minisv.dashboards import BINS, DashboardConfig, collect_dashboards
from minisv.report import MAX_INT_TICKS, circuit_html, dashboards_html, svg_chart
from minisv.transcoder import Transcoder, TranscoderConfig
from test_circuits import planted, released_file

WINDOW = (4, 2)
EVIL = "<script>alert(1)</script>"


def tiny_dashboards():
    """A tiny random GPT-2, a ReLU transcoder with rare to dense features, token rows and their dashboard data."""
    torch.manual_seed(0)
    model = Model(ModelConfig("gpt2", 2, 16, 2, 2, 8, 32, 40, 32, "gelu_new")).eval()
    tc = Transcoder(TranscoderConfig(16, 16, 24, "relu", layer=1, model="tiny"))
    with torch.no_grad():
        tc.W_enc.normal_(0, 0.5)
        tc.b_enc.copy_(torch.linspace(-4, 0.5, 24))      # from rarely firing to dense features
        tc.W_dec.normal_(0, 0.3)
    rows = torch.randint(1, 40, (23, 32), generator=torch.Generator().manual_seed(1))
    rows[:, 0] = 0                                        # BOS
    data = collect_dashboards(model, tc, rows, DashboardConfig(k=5, samples=8, bands=3, per_band=2, window=WINDOW,
                                                               bos_id=0, batch_rows=5))  # 5 batches, the last partial
    return model, tc, rows, data


@pytest.fixture(scope="module")
def setup():
    model, tc, rows, data = tiny_dashboards()
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names=["blocks.1.ln2.hook_normalized"])
        acts = tc.dense(*tc.encode(cache["blocks.1.ln2.hook_normalized"]))
    acts[rows == 0] = 0
    return model, tc, rows, data, acts


def window_of(acts, j, row, pos):
    T = acts.shape[1]
    return [float(acts[row, q, j]) if 0 <= q < T else 0.0 for q in range(pos - WINDOW[0], pos + WINDOW[1] + 1)]


def test_dashboards_match_brute_force(setup):
    model, tc, rows, data, acts = setup
    n = (rows != 0).sum()
    live = [j for j in range(24) if (acts[..., j] > 0).any()]
    assert data["tokens"] == n and [f["id"] for f in data["features"]] == live and data["live"] == len(live)
    assert 5 < len(live) < 24                             # some dead features are left out
    for f in data["features"]:
        a = acts[..., f["id"]]
        firing = a[a > 0]
        assert f["freq"] == pytest.approx(len(firing) / n) and f["max"] == pytest.approx(float(firing.max()))
        expected = firing.sort(descending=True).values[:5]
        assert [e[1][WINDOW[0]] for e in f["top"]] == pytest.approx(expected.tolist(), abs=1e-4)
        for ids, window, row, pos in f["top"] + [e for b in f["bands"] for e in b["examples"]]:
            assert window == pytest.approx(window_of(acts, f["id"], row, pos), abs=1e-4)
            assert ids[WINDOW[0]] == rows[row, pos] and window[WINDOW[0]] > 0
        # exact histogram over [0, hist_top), a power of two with hist_top / 2 < max <= hist_top
        assert f["hist_top"] / 2 < f["max"] <= f["hist_top"] and sum(f["hist"]) == len(firing)
        assert f["hist"] == torch.histc(firing, BINS, 0, f["hist_top"]).long().tolist()
        # quantile bands: high to low, each from the random sample of firing tokens
        centers = [e[1][WINDOW[0]] for b in f["bands"] for e in b["examples"]]
        assert centers == sorted(centers, reverse=True) and len(centers) == min(len(firing), 8, 6)
        assert [t for t, _ in f["de_embed"]] == \
            de_embed(model, feature_direction(model, tc, f["id"])).topk(8).indices.tolist()
        assert [t for t, _ in f["promote"]] == logit_effects(model, tc, f["id"]).topk(8).indices.tolist()
    some = collect_dashboards(model, tc, rows, DashboardConfig(max_features=3, k=2, samples=2, window=WINDOW, bos_id=0,
                                                               seed=1))
    assert len(some["features"]) == 3 and {f["id"] for f in some["features"]} <= set(live)
    with pytest.raises(MinisvError, match="features must be ids"):
        collect_dashboards(model, tc, rows, DashboardConfig(features=(99,)))


class Checker(HTMLParser):
    """Records every start tag and checks that elements nest properly (a stack of open, non-void tags)."""
    VOID = {"meta", "input", "br", "img", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags, self.scripts, self.problems = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(tag)

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "script":
            self.scripts.append(data)


def parse(text):
    checker = Checker()
    checker.feed(text)
    checker.close()
    assert not checker.problems and checker.stack == [], (checker.problems, checker.stack)
    return checker


def evil_str(i):
    return EVIL if i == 3 else "a\nb" if i == 4 else f"tok{i}"


def test_dashboard_html_parses_and_escapes_tokens(setup, tmp_path):
    *_, data, _ = setup
    page = dashboards_html(data, evil_str, title="dash <u>")
    checker = parse(page)
    assert checker.tags.count("script") == 2 and EVIL not in page and "dash &lt;u&gt;" in page and "<u>" not in page
    strings = json.loads(checker.scripts[0])["strings"]
    assert strings["3"] == "&lt;script&gt;alert(1)&lt;/script&gt;" and strings["4"] == "a↵b"
    path = tmp_path / "dash.html"
    write_text(str(path), page)
    assert path.read_text(encoding="utf-8") == page and os.listdir(tmp_path) == ["dash.html"]


def tiny_circuit(token_str):
    """Circuit report data and path tree of a logit difference on the planted test model; token 2 is `token_str`."""
    model, tcs = planted()
    c = Circuit(model, tcs, [1, 2, 5, 3, 4], splice=True)
    c.token_strs[2] = token_str
    root = c.target("logit: 7 - 8")
    paths = c.top_paths(root, rounds=3, branches=3)
    return json.loads(json.dumps(c.to_json(root, paths))), format_tree(paths)


def test_circuit_html_draws_the_graph_and_escapes():
    data, tree = tiny_circuit(EVIL)
    page = circuit_html(data, tree)
    checker = parse(page)
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    graph = data["graph"]
    assert checker.tags.count("g") == len(graph["nodes"]) and checker.tags.count("line") == len(graph["edges"])
    assert json.loads(checker.scripts[0]) == data


def markers(page):
    """(center x, center y, hover text) of every marker with a hover text: circles, and squares 5.2 px wide."""
    found = [(float(cx), float(cy), t) for cx, cy, t in
             re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"[^>]*><title>(.*?)</title>', page)]
    return found + [(float(x) + 2.6, float(y) + 2.6, t) for x, y, t in
                    re.findall(r'<rect x="([\d.]+)" y="([\d.]+)" width="5.2"[^>]*><title>(.*?)</title>', page)]


def test_svg_chart_places_markers_on_the_axis_range():
    """Markers sit where the axes put them: x over the data, y over y_range (a fraction's 0..1) or the data, in
    the plot area 58..448 x 24..220 of a 460 x 260 chart; each marker's hover text gives its values."""
    series = {"a <b>": [(2, 0.2), (4, 0.4)], "c": [(3, float("nan")), (6, 0.3)]}
    for y_range, (low, high) in ((None, (0.2, 0.4)), ((0, 1), (0, 1))):
        page = svg_chart(series, "layer", "success", y_range=y_range)
        parse(page)
        got = markers(page)
        want = [(58 + (x - 2) / 4 * 390, 220 - (y - low) / (high - low) * 196, f"{name}: {x}, {y}")
                for name, xy in (("a &lt;b&gt;", series["a <b>"]), ("c", series["c"][1:])) for x, y in xy]
        assert [t for *_, t in got] == [t for *_, t in want] and "<b>" not in page
        assert [(round(x, 1), round(y, 1)) for x, y, _ in got] == [(round(x, 1), round(y, 1)) for x, y, _ in want]


def test_svg_chart_ticks_integer_x_at_the_data():
    """A few integer x values (layers 2, 5, 8, 9) get one tick each at their marker's x; float x, or more integers
    than MAX_INT_TICKS, keep 5 evenly spaced ticks over the data (x axis 58..448 of a 460-wide chart)."""
    def x_ticks(series):
        return [(round(float(x), 1), label) for x, label in
                re.findall(r'<text x="([\d.]+)" y="234" text-anchor="middle" font-size="10">([^<]*)</text>',
                           svg_chart(series, "layer", "success"))]
    layers = [2, 5, 8, 9]
    assert x_ticks({"a": [(l, 0.5) for l in layers]}) == [(round(58 + (l - 2) / 7 * 390, 1), str(l)) for l in layers]
    evenly = [(round(58 + i / 4 * 390, 1), f"{2 + 7 * i / 4:.3g}") for i in range(5)]
    assert x_ticks({"a": [(float(l), 0.5) for l in layers]}) == evenly
    many = range(2, 2 + MAX_INT_TICKS + 1)
    assert len(x_ticks({"a": [(l, 0.5) for l in many]})) == 5


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_report_script_is_valid_javascript(setup, tmp_path):
    """Without a browser, at least check that the inline script parses (a syntax error would blank the page)."""
    *_, data, _ = setup
    script = parse(dashboards_html(data, evil_str)).scripts[1]
    (tmp_path / "report.js").write_text(script, encoding="utf-8")
    result = subprocess.run(["node", "--check", str(tmp_path / "report.js")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------- the script
@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny random GPT-2 with a byte-level tokenizer (256 byte tokens, no merges, BOS 256), and a few documents."""
    import transformers as tf
    from minisv.tokenizer import _BYTE_OF_CHAR
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bytes")
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=257, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=256, eos_token_id=256)).save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps(dict(_BYTE_OF_CHAR)))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {"256": {"content": "<|endoftext|>"}}, "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>"}))
    data = path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"Document {i}: a <script> tag & {i * 7} more words."}) + "\n"
                            for i in range(60)))
    return path, data


def test_script_writes_dashboards_and_circuits(byte_model, tmp_path, capsys):
    from train_transcoder import main
    import minisv
    path, data = byte_model
    common = ["--model", str(path), "--data", str(data), "--ctx", "32", "--seed", "0"]
    main(common + ["--out", str(tmp_path / "run"), "--layer", "1", "--d-sae", "32", "--k", "4", "--tokens", "512",
                   "--batch-tokens", "64", "--eval-tokens", "64", "--dash-tokens", "256", "--prompt", "a <script> tag"])
    printed = capsys.readouterr().out
    assert "wrote" in printed and "direct terms by kind" in printed
    page = (tmp_path / "run" / "dashboards.html").read_text(encoding="utf-8")
    dash = json.loads(parse(page).scripts[0])
    assert dash["layer"] == 1 and len(dash["features"]) == dash["live"] > 0 and dash["strings"]["60"] == "&lt;"
    # the default target: the most active layer-1 feature at the last token, with its real pre-activation
    model, tc = minisv.load(str(path)), formats.load(tmp_path / "run")
    tokens = torch.tensor([256] + list(b"a <script> tag"))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None], names=["blocks.1.ln2.hook_normalized"])
        f = tc.dense(*tc.encode(cache["blocks.1.ln2.hook_normalized"][0, -1]))
    circuit = json.loads((tmp_path / "run" / "circuit.json").read_text())
    assert circuit["target"].startswith(f"mlp1 #{int(f.argmax())} @14")
    assert circuit["value"] == pytest.approx(float(f.max()))
    assert sum(circuit["direct"].values()) == pytest.approx(circuit["value"]) and circuit["paths"]
    parse((tmp_path / "run" / "circuit.html").read_text(encoding="utf-8"))
    # analysis only, on the saved transcoder: a logit difference, no dashboard
    main(common + ["--load", str(tmp_path / "run"), "--out", str(tmp_path / "again"), "--dash-features", "0",
                   "--prompt", "a <script> tag", "--target", "logit: 'a' - 'b'", "--rounds", "2"])
    circuit = json.loads((tmp_path / "again" / "circuit.json").read_text())
    assert circuit["value"] == pytest.approx(float(logits[0, -1, 97] - logits[0, -1, 98]), rel=1e-4)
    assert sorted(os.listdir(tmp_path / "again")) == ["circuit.html", "circuit.json"]
    # the released GPT-2 format (normalized input, centered output), as in the README's greater-than recipe
    released = released_file(tmp_path)
    main(common + ["--import-released", str(released), "--out", str(tmp_path / "released"), "--prompt", "a tag",
                   "--target", "logit: 'a' - 'b'", "--dash-tokens", "128"])
    circuit = json.loads((tmp_path / "released" / "circuit.json").read_text())
    assert "feature" in circuit["direct"] and sum(circuit["direct"].values()) == pytest.approx(circuit["value"])
    assert (tmp_path / "released" / "dashboards.html").exists()
    for bad, message in [(["--target", "logit: 'ab'"], "error: 'ab' is 2 tokens"),
                         (["--target", "5:1"], "error: no transcoder for layer 5")]:
        with pytest.raises(SystemExit) as e:
            main(common + ["--load", str(tmp_path / "run"), "--out", str(tmp_path / "bad"), "--dash-features", "0",
                           "--prompt", "a tag"] + bad)
        assert e.value.code == 2 and message in capsys.readouterr().err
