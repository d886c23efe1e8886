"""Every HTML report minisv writes, opened in a real browser (Debian's headless chromium): no JavaScript error,
nothing that fails to load, the content drawn, and a screenshot of each for people to look at ($SCREENSHOT_DIR,
default runs/screenshots/). Outside CI the test skips when chromium is missing; with CI=true it fails.

To add a report: a fixture that writes it and returns its path, and one line in PAGES."""
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import minisv
from minisv.atomic import write_text
from minisv.report import circuit_html, dashboards_html
from test_obprop import planted            # fixture: the tiny llama with a planted head (ObProp report)
from test_report import tiny_circuit, tiny_dashboards
from test_steering import chat_model_dir   # fixture: a tiny chat llama with a byte tokenizer (steering report)
from test_training import script_args, tiny_llama, token_file   # fixtures: a tiny llama and tokens (training report)

ROOT = Path(__file__).resolve().parent.parent
# A token string that runs code if a report ever inserts it unescaped: the error catcher then reports it.
PAYLOAD = "<img src=x onerror=\"throw new Error('a token string was inserted as HTML')\">"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--window-size=1280,1600", "--virtual-time-budget=3000"]
# Injected first thing in <head>: every uncaught error, unhandled rejection, console.error and failed resource
# load is recorded on <html data-js-errors>, and the load event sets data-js-loaded, so --dump-dom carries both.
CATCHER = """<script>(() => {
  const errors = [], root = document.documentElement;
  const record = text => { errors.push(String(text)); root.setAttribute("data-js-errors", JSON.stringify(errors)); };
  addEventListener("error", e => record(e.message || "could not load " + (e.target.src || e.target.href)), true);
  addEventListener("unhandledrejection", e => record("unhandled rejection: " + e.reason));
  const consoleError = console.error;
  console.error = (...args) => { record(args.join(" ")); consoleError(...args); };
  addEventListener("load", () => root.setAttribute("data-js-loaded", "1"));
})();</script>"""
# Injected after CATCHER: on load, what the browser actually drew in every <svg> goes on <html data-svgs> as JSON:
# each text's string and box, the tick labels and axis titles of charts (the <g class=...> groups of
# minisv.report._Axes) and each legend entry's marker shape, so that the checks below read the rendered layout.
INSPECTOR = """<script>addEventListener("load", () => {
  const own = t => [...t.childNodes].filter(n => n.nodeType === 3).map(n => n.data).join("").trim();
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const shape = m => m ? m.tagName + (m.getAttribute("points") || "").split(" ").length : "";
  const svgs = [...document.querySelectorAll("svg")].map(svg => ({
    box: box(svg),
    texts: [...svg.querySelectorAll("text")].map(t => ({text: own(t), box: box(t),
                                                         group: t.parentNode.getAttribute("class") || ""})),
    legend: [...svg.querySelectorAll("g.legend")].map(g => [shape(g.firstElementChild), own(g.lastElementChild)]),
    markers: svg.querySelectorAll("circle, rect[width='5.2'], polygon").length,
    paths: svg.querySelectorAll("path").length,
  }));
  document.documentElement.setAttribute("data-svgs", JSON.stringify(svgs));
});</script>"""
# The dashboard opens its first feature card on load: up to the next feature row, the card must hold top contexts.
FIRST_CARD = (r'^(?:(?!<details class="feat").)*<details class="feat" id="f\d+" open=""[^>]*>'
              r'(?:(?!<details class="feat").)*<h2>top activations</h2><div class="ctx"')

# The steering report's layer sweep (layers 0, 1, 2): a chart with markers and one x tick per layer.
SWEEP_CHART = (r'<h2>held-out success vs layer</h2><svg[^>]*>(?:(?!</svg>).)*'
               r'font-size="10">0</text><text [^>]*>1</text><text [^>]*>2</text>(?:(?!</svg>).)*<circle ')

# One line per report: the fixture that writes it, and regexes its DOM must match once its scripts have run.
PAGES = {
    "steering": ("steering_report", [r"<h1>One-shot steering vector</h1>", r"<td[^>]*>Say &lt;img src=x",
                                     r"(?:<tr>.*){4}", SWEEP_CHART]),
    "dashboards": ("dashboard_report", [FIRST_CARD, r"<h2>tokens that activate it", r'<span class="chip">&lt;img']),
    "circuit": ("circuit_report", [r"<svg[^>]*>.*<line .*<rect .*</svg>", r"<h2>path tree</h2><pre>\S",
                                   r"&lt;img src=x"]),
    "training": ("training_report", [r"<h2>metrics \(held out\)</h2><table>", r"<h2>training curves</h2>.*<svg[^>]*>.*<(?:polyline|path) ",
                                     r"<h2>firing frequencies</h2>.*<svg"]),
    "training_default": ("default_training_report", [r"<h2>training curves</h2>.*<svg[^>]*>.*<(?:polyline|path) "]),
    "obprop": ("obprop_report", [r"<h2>Coupling ", r'<div class="map"><h4>feature norm', r"<td>1\.2</td>"]),
}


@pytest.fixture(scope="session")
def chromium():
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but chromium is not installed: run .ci/run as root, or apt-get install -y chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); CI runs this test")
    return path


@pytest.fixture(scope="session")
def screenshots():
    folder = Path(os.environ.get("SCREENSHOT_DIR") or ROOT / "runs" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def render(chromium, page, screenshot):
    """Open `page` in headless chromium with CATCHER injected, write a screenshot -> (DOM after load, errors)."""
    text = page.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text, re.I)
    assert head, f"{page} has no <head>"
    checked = page.with_name(page.stem + ".checked.html")
    checked.write_text(text[:head.end()] + CATCHER + INSPECTOR + text[head.end():], encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                                 f"--screenshot={screenshot}", checked.as_uri()],
                                capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and result.stdout, result.stderr[-3000:]
    root = re.search(r"<html[^>]*>", result.stdout)[0]
    assert 'data-js-loaded="1"' in root, f"{page} never finished loading with scripts on: {root}"
    errors = re.search(r'data-js-errors="([^"]*)"', root)
    return result.stdout, json.loads(html.unescape(errors[1])) if errors else []


def drawn_svgs(dom):
    """What INSPECTOR recorded of every <svg> the browser drew."""
    found = re.search(r'<html[^>]*data-svgs="([^"]*)"', dom)
    assert found, "the page recorded no <svg> layout"
    return json.loads(html.unescape(found[1]))


@pytest.mark.parametrize("name", PAGES)
def test_report_renders_in_headless_chromium(name, request, chromium, screenshots):
    fixture, must_show = PAGES[name]
    screenshot = screenshots / f"{name}.png"
    screenshot.unlink(missing_ok=True)
    dom, errors = render(chromium, request.getfixturevalue(fixture), screenshot)
    assert errors == [], f"the {name} report raised JavaScript errors: {errors}"
    missing = [pattern for pattern in must_show if not re.search(pattern, dom, re.S)]
    assert not missing, f"the {name} report does not show {missing}"
    assert screenshot.stat().st_size > 5000      # a PNG of a drawn page, not an empty one
    svgs = drawn_svgs(dom)
    problems = unreadable(svgs) + PLOTS.get(name, lambda svgs, dom: [])(svgs, dom)
    assert not problems, f"the {name} report is hard to read:\n" + "\n".join(problems)


# ------------------------------------------------------------------------- readable plots, from the rendered layout
def _overlap(a, b):
    """Area (px²) where two boxes [left, top, right, bottom] overlap."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def unreadable(svgs):
    """What a reader of any drawn SVG would stumble on: texts drawn over each other (an axis title over its tick
    labels), text cut off at the picture's edge, one tick label twice on an axis, two series of a chart with the
    same marker shape (they could not be told apart where they overlap)."""
    problems = []
    for i, svg in enumerate(svgs):
        texts = [t for t in svg["texts"] if t["text"] and t["box"][2] > t["box"][0]]
        problems += [f"svg {i}: {a['text']!r} is drawn over {b['text']!r}" for j, a in enumerate(texts)
                     for b in texts[j + 1:] if _overlap(a["box"], b["box"]) > 4]
        edge = svg["box"]
        problems += [f"svg {i}: {t['text']!r} is cut off at the edge" for t in texts
                     if t["box"][0] < edge[0] - 1 or t["box"][2] > edge[2] + 1]
        for axis in ("ticks-x", "ticks-y"):
            labels = [t["text"] for t in svg["texts"] if t["group"] == axis]
            if len(set(labels)) < len(labels):
                problems.append(f"svg {i}: the {axis} labels repeat: {labels}")
        shapes = [shape for shape, _ in svg["legend"]]
        if len(set(shapes)) < len(shapes):
            problems.append(f"svg {i}: series share a marker shape: {svg['legend']}")
    return problems


def chart(svgs, title):
    """The chart whose title (its first text) is `title`; its texts by group: {group: [text, ...]}."""
    for svg in svgs:
        if svg["texts"] and svg["texts"][0]["text"] == title:
            groups = {}
            for t in svg["texts"]:
                groups.setdefault(t["group"], []).append(t["text"])
            return svg, groups
    raise AssertionError(f"no chart titled {title!r} among {[s['texts'][0]['text'] for s in svgs if s['texts']]}")


def steering_plots(svgs, dom):
    """Generations without the model's special tokens; the optimization's loss curve per layer."""
    problems = [f"a generation shows the special token {t}" for t in ("<|im_end|>", "&lt;|im_end|&gt;") if t in dom]
    svg, groups = chart(svgs, "training loss per step")
    if groups.get("title-x") != ["Adam step"] or svg["markers"] < 3 * 3 or len(svg["legend"]) != 3:
        problems.append(f"the loss chart should show 3 layers' curves against the Adam step: {groups}, {svg}")
    return problems


def obprop_plots(svgs, dom):
    """Every heatmap: axis titles "layer" and "head", a label per head, a colour scale from −peak to +peak, a hover
    title "layer.head: value" on each of the 3 × 4 cells. The coupling scatter: ticks on both axes, titled axes."""
    problems = []
    maps = [svg for svg in svgs if {"layer", "head"} <= {t["text"] for t in svg["texts"]}]
    if len(maps) < 4:       # feature norm and direct patching, for each of the 2 observables
        problems.append(f"{len(maps)} heatmaps have both axis titles, expected 4 or more")
    for svg in maps:
        numbers = [float(t["text"]) for t in svg["texts"] if re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?", t["text"])]
        if sorted(numbers[:7]) != [0, 0, 1, 1, 2, 2, 3] or len(numbers) != 7 + 3 or numbers[-1] != -numbers[-3]:
            problems.append(f"a heatmap lacks its layer / head labels or its ±peak colour scale: {numbers}")
    cells = re.findall(r'<rect [^>]*><title>(\d+)\.(\d+): [-\d.e+]+</title>', dom)
    if len(cells) < 12 * len(maps):
        problems.append(f"{len(cells)} heatmap cells have a hover title, expected {12 * len(maps)}")
    svg, groups = chart(svgs, "every head: predicted vs measured (dashed: y = x)")
    if len(groups.get("ticks-x", [])) < 3 or len(groups.get("ticks-y", [])) < 3 or \
            groups.get("title-x") != ["predicted coupling"] or groups.get("title-y") != ["empirical slope"]:
        problems.append(f"the coupling scatter lacks ticks or axis titles: {groups}")
    return problems


def training_plots(svgs, dom):
    """Two series in the FVU chart, told apart by their markers; L0 and token ticks readable."""
    svg, groups = chart(svgs, "FVU: unexplained fraction of the target's variance")
    return [] if len(svg["legend"]) == 2 else [f"the FVU chart should have 2 series: {svg['legend']}"]


def default_training_plots(svgs, dom):
    """The default run's curves: token ticks in k (16.4k ... 328k), an L0 that stays at ~32 drawn flat, with five
    different tick labels."""
    _, tokens = chart(svgs, "FVU: unexplained fraction of the target's variance")
    _, l0 = chart(svgs, "L0")
    problems = [] if all(re.fullmatch(r"\d+(\.\d+)?k", t) for t in tokens["ticks-x"]) else \
        [f"token ticks should read like 16.4k, 328k: {tokens['ticks-x']}"]
    values = [float(t) for t in l0["ticks-y"]]
    if len(values) != 5 or values[0] > 31.7 or values[-1] < 32.0 or values[-1] - values[0] < 2:
        problems.append(f"the flat L0 curve should get a wider, readable y range: {l0['ticks-y']}")
    return problems


def circuit_plots(svgs, dom):
    """The graph explains its edges: blue pushes the target up, red down, width ∝ |value|."""
    legend = re.search(r'<p class="legend">(.*?)</p>', dom, re.S)
    needed = ['stroke="#2a6fdb"', "pushes the target up", 'stroke="#d62728"', "pushes it down", "width ∝ |value|"]
    return [] if legend and all(n in legend[1] for n in needed) else [f"no edge legend: {legend and legend[1]}"]


PLOTS = {"steering": steering_plots, "obprop": obprop_plots, "training": training_plots,
         "training_default": default_training_plots, "circuit": circuit_plots}


def test_the_check_catches_errors(chromium, tmp_path):
    """A page with a syntax error, a runtime error and an unescaped token string: all three are reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset=utf-8></head><body><script>let x = ;</script>"
                    "<script>undefinedFunction()</script><div id=d></div>"
                    f"<script>document.getElementById('d').innerHTML = {json.dumps(PAYLOAD)}</script></body></html>")
    _, errors = render(chromium, page, tmp_path / "broken.png")
    assert len(errors) >= 3, errors
    assert any("SyntaxError" in e or "Unexpected" in e for e in errors) and any("undefinedFunction" in e for e in errors)
    assert any("inserted as HTML" in e for e in errors)


# ------------------------------------------------------------------------- the reports, from tiny models
@pytest.fixture(scope="module")
def steering_report(chat_model_dir, tmp_path_factory):
    """A sweep over the tiny model's 3 layers, so that the page has its success-vs-layer chart."""
    from optimize_sv import main
    out = tmp_path_factory.mktemp("steering")
    (out / "eval.txt").write_text(f"Say {PAYLOAD}\nWhat is 2+2?\n")
    generate = minisv.Model.generate

    def ends_its_turn(model, *args, **kwargs):    # as a chat model does: every answer ends with <|im_end|> (id 258)
        return [ids + [258] for ids in generate(model, *args, **kwargs)]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(minisv.Model, "generate", ends_its_turn)
        main(["--model", str(chat_model_dir), "--prompt", "Tell me a joke.", "--promote", "No way.", "--layer", "0",
              "1", "2", "--max-iters", "2", "--seed", "0", "--eval-prompts", str(out / "eval.txt"), "--success", "No",
              "--out", str(out / "v.safetensors"), "--max-new-tokens", "4"])
    return out / "v.html"


@pytest.fixture(scope="module")
def dashboard_report(tmp_path_factory):
    *_, data = tiny_dashboards()
    path = tmp_path_factory.mktemp("dashboards") / "dashboards.html"
    write_text(str(path), dashboards_html(data, lambda i: PAYLOAD if i == 3 else f"tok{i}"))
    return path


@pytest.fixture(scope="module")
def circuit_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("circuit") / "circuit.html"
    write_text(str(path), circuit_html(*tiny_circuit(PAYLOAD)))
    return path


@pytest.fixture(scope="module")
def obprop_report(planted, tmp_path_factory):
    import obprop as script
    from test_obprop import WORDS
    out = tmp_path_factory.mktemp("obprop")
    (out / "corpus.txt").write_text(" ".join(WORDS[:40] * 10))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(minisv, "load", lambda spec, device=None: planted)
        script.main(["--model", "tiny", "--observable", "' she' - ' he'", "--observable", "' her' - ' him'",
                     "--template", "So, [NAME] really is a great friend, isn't", "--template",
                     "What do I think about [NAME]? Well, to be honest, I love",
                     "--pos-names", "Mary,Anna,Lisa,Emma,Julia,Rose", "--neg-names", "John,Mark,Paul,Tom,Jack,Bill",
                     "--pairs", "3", "--top", "3", "--train-examples", "2", "--corpus", str(out / "corpus.txt"),
                     "--corpus-tokens", "200", "--ctx", "16", "--html", str(out / "report.html")])
    return out / "report.html"


# The default run's curves (SmolLM2 layer 6, 327,680 tokens, logged every 16 steps), as its metrics.json recorded
# them: the L0 of a TopK transcoder stays at 31.7-32.0, the case that gave five identical "32" tick labels.
DEFAULT_L0 = [32.0, 32.0, 32.0, 32.0, 32.0, 32.0, 32.0, 31.98, 31.94, 31.96, 31.93, 31.87, 31.74, 31.76, 31.85, 31.78,
              31.77, 31.81, 31.86, 31.86]
DEFAULT_FVU = [0.642, 0.538, 0.471, 0.432, 0.418, 0.394, 0.376, 0.356, 0.354, 0.36, 0.33, 0.337, 0.325, 0.329, 0.327,
               0.303, 0.324, 0.312, 0.292, 0.285]
DEFAULT_HELD_OUT = [0.587, 0.487, 0.443, 0.413, 0.393, 0.379, 0.376, 0.368, 0.352, 0.336]


@pytest.fixture(scope="module")
def default_training_report(tmp_path_factory):
    from minisv.report import training_html
    history = [{"step": 16 * (i + 1), "tokens": 16384 * (i + 1), "loss": f, "fvu": f, "l0": l0, "dead": 0.01 * i}
               for i, (l0, f) in enumerate(zip(DEFAULT_L0, DEFAULT_FVU))]
    held_out = [{"step": 32 * (i + 1), "tokens": 32768 * (i + 1), "fvu": {"6": f}}
                for i, f in enumerate(DEFAULT_HELD_OUT)]
    layer = {"l0": 31.85, "fvu": 0.336, "dead": 0.36, "dense": 0.0025, "ce_spliced": 2.9325, "ce_zero_ablated": 3.0808,
             "ce_score": 1.037, "kl": 0.0398, "freq_histogram": {"log10_edges": list(range(-8, 1)),
                                                                  "counts": [0, 0, 0, 0, 2365, 2833, 678, 23]}}
    metrics = {"model": "smollm2", "layers": [6], "train_config": {"d_sae": 9216, "k": 32},
               "train": {"tokens": 327680, "seconds": 180.0, "tok_per_s": 1820, "history": history,
                         "held_out": held_out, "dead": {"6": 0.158}, "dead_window_tokens": 32768},
               "eval": {"tokens": 4064, "ce_clean": 2.9378, "layer_6": layer}}
    path = tmp_path_factory.mktemp("training_default") / "report.html"
    write_text(str(path), training_html(metrics, "transcoder(s) of smollm2"))
    return path


@pytest.fixture(scope="module")
def training_report(tiny_llama, token_file, tmp_path_factory):
    import train_transcoder
    out = tmp_path_factory.mktemp("training") / "run"
    train_transcoder.main(script_args(tiny_llama[0], token_file, out, "--eval-every", "3"))
    return out / "report.html"
