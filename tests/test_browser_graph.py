"""The attribution-graph viewer in headless chromium (the machinery of tests/test_browser.py): a graph of a tiny
chat llama drawn with every kept node and edge, the legend and the scores, the most influential feature's panel
open with its held-out contexts, token strings escaped; and a screenshot (graph.png)."""
import re

import torch

import minisv
from minisv import circuit_tracer as ct
from minisv.clt import CLTConfig, CrossLayerTranscoder
from minisv.dashboards import graph_contexts
from minisv.graph import attribute, prune, scores
from minisv.report import MAX_EDGES, graph_html
from test_browser import PAYLOAD, chromium, render, screenshots   # noqa: F401  (fixtures)
from test_steering import chat_model_dir                           # noqa: F401  (fixture)


def test_graph_viewer_renders_the_graph_and_a_features_contexts(chat_model_dir, chromium, screenshots, tmp_path):
    model = minisv.load(str(chat_model_dir), device="cpu")
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(3, 32, 24, "jumprelu", window=0))
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.3)
        clt.log_threshold.fill_(-1.0)
    tokens = model.tokenizer.encode("Say " + PAYLOAD, bos=True)[:24]
    graph = attribute(model, clt, tokens)
    data = ct.graph_json(graph, model.tokenizer)
    full, pruned = scores(graph), scores(graph, *prune(graph)[:2])
    data["metadata"] |= {"replacement_score": full[0], "completeness_score": full[1],
                         "pruned_replacement_score": pruned[0], "pruned_completeness_score": pruned[1]}
    rows = torch.tensor([model.tokenizer.encode("Hello there, general Kenobi. " * 3, bos=True)[:40]] * 4)
    contexts = graph_contexts(model, clt, rows, data["nodes"])
    page = tmp_path / "graph.html"
    page.write_text(graph_html(data, contexts, "Attribution graph"), encoding="utf-8")
    dom, errors = render(chromium, page, screenshots / "graph.png")
    assert errors == []
    svg = re.search(r'<div id="graph"[^>]*>(.*?)</svg>', dom, re.S)[1]
    assert svg.count('<g class="node') == len(data["nodes"]) and svg.count('<line class="edge"') == min(len(data["links"]), MAX_EDGES)
    assert "replacement score" in dom.lower() and "blue raises the target" in dom
    assert re.search(r'<div id="panel"[^>]*><h2>\d+_\d+_\d+</h2>.*top activating contexts.*<div class="ctx">', dom, re.S)
    assert ">&lt;</text>" in svg and "<img src=x" not in dom     # the prompt's "<" byte token, escaped
