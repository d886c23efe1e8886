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
    checked.write_text(text[:head.end()] + CATCHER + text[head.end():], encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                                 f"--screenshot={screenshot}", checked.as_uri()],
                                capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and result.stdout, result.stderr[-3000:]
    root = re.search(r"<html[^>]*>", result.stdout)[0]
    assert 'data-js-loaded="1"' in root, f"{page} never finished loading with scripts on: {root}"
    errors = re.search(r'data-js-errors="([^"]*)"', root)
    return result.stdout, json.loads(html.unescape(errors[1])) if errors else []


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
    main(["--model", str(chat_model_dir), "--prompt", "Tell me a joke.", "--promote", "No way.", "--layer", "0", "1", "2",
          "--max-iters", "2", "--seed", "0", "--eval-prompts", str(out / "eval.txt"), "--success", "No",
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


@pytest.fixture(scope="module")
def training_report(tiny_llama, token_file, tmp_path_factory):
    import train_transcoder
    out = tmp_path_factory.mktemp("training") / "run"
    train_transcoder.main(script_args(tiny_llama[0], token_file, out, "--eval-every", "3"))
    return out / "report.html"
