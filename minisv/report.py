"""Self-contained HTML reports: feature dashboards, circuit graphs, training curves, steering runs and ObProp
studies (`docs/methods.md` §2.6). One file each, inline CSS/SVG (and a little JavaScript for the dashboards), no
network. Every string from a model or a user is HTML-escaped in Python before it is embedded; data for scripts
goes in as JSON inside <script type="application/json">, where no string can close the tag.

The dashboard page keeps `minisv.dashboards.collect_dashboards` data as JSON and draws a feature's card only
when it is opened, so thousands of features load instantly.
"""
import html
import json
import math

from . import obprop


# ------------------------------------------------------------------------- HTML
def _tok_str(token_str, i):
    """An escaped, visible rendering of one token: newlines and tabs as symbols, then html.escape."""
    text = token_str(i).replace("\n", "↵").replace("\t", "→").replace("\r", "")
    return html.escape(text, quote=True)


def _json_script(data, element_id):
    """JSON inside <script type=application/json>: '<' is written as \\u003c so no string can close the tag."""
    text = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.1em;margin:1.2em 0 .4em}.meta{color:#666}
.t{white-space:pre;font-family:ui-monospace,monospace;font-size:12.5px;padding:1px 0;border-radius:2px}
.t.c{outline:1.5px solid #c60}.ctx{margin:2px 0;overflow-x:auto;white-space:nowrap}
.chip{display:inline-block;margin:1px 3px;padding:0 4px;border-radius:3px;background:#eef;white-space:pre;
  font:12px ui-monospace,monospace;max-width:20em;overflow:hidden;text-overflow:ellipsis;vertical-align:bottom}
.chip i{color:#777;font-style:normal;margin-left:4px}.neg{background:#fee}
details.feat{border-top:1px solid #ddd;padding:4px 0}details.feat>summary{cursor:pointer}
.card{display:grid;grid-template-columns:260px minmax(0,1fr);gap:14px;margin:8px 0 8px 18px}
.num{font-variant-numeric:tabular-nums}table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12.5px}
table.t{border-collapse:collapse;margin:.5em 0}table.t td,table.t th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
.map{display:inline-block;margin-right:2em;vertical-align:top}
"""

DASHBOARD_JS = """
const D = JSON.parse(document.getElementById("data").textContent), S = D.strings;
const fmt = x => Math.abs(x) >= 100 ? x.toFixed(0) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(2);
function ctx(ex, max) {   // one context: tokens shaded by activation, the example's token outlined
  const [ids, acts, row, pos] = ex;
  return `<div class="ctx" title="row ${row}, token ${pos}">` + ids.map((id, i) => id < 0 ? '' :
    `<span class="t${i === D.window[0] ? ' c' : ''}" title="${fmt(acts[i])}" ` +
    `style="background:rgba(255,140,0,${Math.min(1, Math.max(0, acts[i] / max)).toFixed(2)})">${S[id]}</span>`
  ).join('') + '</div>';
}
const chips = (pairs, cls) =>
  pairs.map(([id, v]) => `<span class="chip ${cls}" title="${S[id]}">${S[id]}<i>${fmt(v)}</i></span>`).join('');
function hist(f) {        // an inline SVG bar chart of the activation histogram over [0, hist_top)
  const top = Math.max(...f.hist, 1), w = 240, h = 70, bw = w / f.hist.length;
  const bars = f.hist.map((c, i) => `<rect x="${i * bw}" y="${h - h * c / top}" width="${bw - 1}" ` +
    `height="${h * c / top}" fill="#e80"><title>${fmt(i * f.hist_top / f.hist.length)}: ${c}</title></rect>`);
  return `<svg width="${w}" height="${h + 14}">${bars.join('')}<text x="0" y="${h + 12}" font-size="10">0</text>` +
    `<text x="${w}" y="${h + 12}" font-size="10" text-anchor="end">${fmt(f.hist_top)}</text></svg>`;
}
function card(f) {
  const bands = f.bands.map((b, i) => `<details ${i ? '' : 'open'}><summary>band ${i + 1}: activation ` +
    `${fmt(b.lo)}–${fmt(b.hi)}</summary>${b.examples.map(e => ctx(e, f.max)).join('')}</details>`).join('');
  return `<div class="card"><div>${hist(f)}<p>fires on <b>${(100 * f.freq).toPrecision(3)}%</b> of tokens, ` +
    `max <b>${fmt(f.max)}</b></p><h2>tokens that activate it (W_E·W_enc)</h2>${chips(f.de_embed, '')}` +
    `<h2>promoted logits</h2>${chips(f.promote, '')}<h2>suppressed logits</h2>${chips(f.suppress, 'neg')}</div>` +
    `<div><h2>top activations</h2>${f.top.map(e => ctx(e, f.max)).join('') || '<p>never fired</p>'}` +
    `<h2>random samples by activation quantile</h2>${bands || '<p>never fired</p>'}</div></div>`;
}
const list = document.getElementById("list"), more = document.getElementById("more");
let order = D.features.map((_, i) => i), shown = 0;
function summary(f) {
  const toks = f.top.slice(0, 4).map(e => S[e[0][D.window[0]]]).map(s => `<span class="chip">${s}</span>`).join('');
  return `<summary><b>#${f.id}</b> <span class="num">freq ${(100 * f.freq).toPrecision(2)}% · ` +
    `max ${fmt(f.max)}</span> ${toks}</summary>`;
}
function row(i) {
  const d = document.createElement("details");
  d.className = "feat"; d.id = "f" + D.features[i].id;
  d.innerHTML = summary(D.features[i]);
  d.addEventListener("toggle", () => {     // draw the card the first time it is opened
    if (d.open && !d.dataset.done) { d.dataset.done = 1; d.insertAdjacentHTML("beforeend", card(D.features[i])); }
  });
  return d;
}
function showMore(n = 100) {
  order.slice(shown, shown + n).forEach(i => list.appendChild(row(i)));
  shown = Math.min(order.length, shown + n);
  more.style.display = shown < order.length ? "" : "none";
}
document.getElementById("sort").addEventListener("change", e => {
  const key = e.target.value;
  order.sort((a, b) => key === "id" ? D.features[a].id - D.features[b].id : D.features[b][key] - D.features[a][key]);
  list.replaceChildren(); shown = 0; showMore();
});
document.getElementById("go").addEventListener("click", () => {
  const id = +document.getElementById("jump").value, i = D.features.findIndex(f => f.id === id);
  if (i < 0) { alert("feature " + id + " is not in this report"); return; }
  const d = document.getElementById("f" + id) || list.insertBefore(row(i), list.firstChild);
  d.open = true; d.scrollIntoView();
});
more.addEventListener("click", () => showMore());
showMore();
if (list.firstChild) list.firstChild.open = true;
"""


def dashboards_html(data, token_str, title="Transcoder feature dashboards") -> str:
    """The HTML page for `collect_dashboards` data; token_str(id) -> str names tokens (e.g. tokenizer.token_str)."""
    used = {i for f in data["features"] for part in ("top", "de_embed", "promote", "suppress")
            for i in (x for e in f[part] for x in (e[0] if part == "top" else [e[0]]))}
    used |= {i for f in data["features"] for b in f["bands"] for e in b["examples"] for i in e[0]}
    strings = {i: _tok_str(token_str, i) for i in sorted(used) if i >= 0}
    meta = (f"layer {data['layer']} transcoder of {html.escape(str(data['model']) or 'the model')} · "
            f"{data['d_sae']:,} features, {data['live']:,} of {data['tracked']:,} tracked fired on "
            f"{data['tokens']:,} tokens · {len(data['features']):,} shown")
    controls = ('<p>sort by <select id="sort"><option value="id">id</option><option value="freq">frequency</option>'
                '<option value="max">max activation</option></select> · feature <input id="jump" type="number" '
                'min="0" style="width:7em"> <button id="go">open</button></p>')
    return _page(title, f'<p class="meta">{meta}</p>{controls}<div id="list"></div>'
                        f'<button id="more">show more</button>' + _json_script({**data, "strings": strings}, "data") +
                 f"<script>{DASHBOARD_JS}</script><noscript>this report draws its cards with JavaScript</noscript>")


def _page(title, body):
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n')


# ------------------------------------------------------------------------- circuit report
LEVEL_GAP, NODE_W, NODE_H = 84, 104, 30


def circuit_html(data, tree="", title="Transcoder circuit") -> str:
    """The HTML page for `Circuit.to_json` data: prompt, target, direct attribution by kind, the path graph as
    SVG (blue edges push the target up, red down; width ∝ |value|, as its legend says) and the path tree as text."""
    prompt = "".join(f'<span class="t">{html.escape(s)}</span><sub>{i}</sub> ' for i, s in enumerate(data["tokens"]))
    direct = "".join(f"<tr><td>{html.escape(k)}</td><td class='num'>{v:+.4f}</td></tr>"
                     for k, v in data["direct"].items())
    body = (f"<h2>prompt</h2><p>{prompt}</p><h2>target</h2><p><b>{html.escape(data['target'])}</b> = "
            f"{data['value']:+.4f}</p><h2>direct attribution by kind (sums to the target)</h2><table>{direct}</table>"
            f"<h2>top paths as a graph</h2>{_graph_svg(data['graph'], data['tokens'])}"
            f"<h2>path tree</h2><pre>{html.escape(tree)}</pre>" + _json_script(data, "data"))
    return _page(title, body)


def _graph_svg(graph, tokens):
    """Layered layout: rows by depth in the model (embeddings at the bottom, logits on top), columns by the token
    each node reads; bias / error / pruning terms sit as small gray boxes just below their parent."""
    main = [n for n in graph["nodes"] if n["kind"] not in ("bias", "error", "pruned")]
    level = {k: i for i, k in enumerate(sorted({_level(n) for n in main}))}
    columns = sorted({n["at"] for n in main})
    cells = {}
    for n in sorted(main, key=lambda n: n["id"]):
        cells.setdefault((level[_level(n)], n["at"]), []).append(n)
    width = {c: max(len(v) for (lv, col), v in cells.items() if col == c) * (NODE_W + 10) + 20 for c in columns}
    x0, acc = {}, 20
    for c in columns:
        x0[c], acc = acc, acc + width[c]
    top = (len(level) - 1) * LEVEL_GAP + 20                          # y of the top row (logits)
    pos = {}
    for (lv, col), ns in cells.items():
        for i, n in enumerate(ns):
            pos[n["id"]] = (x0[col] + 10 + i * (NODE_W + 10), top - lv * LEVEL_GAP)
    by_id, aux = {n["id"]: n for n in graph["nodes"]}, {"bias": -34, "error": 0, "pruned": 34}
    for e in graph["edges"]:
        kind = by_id[e["child"]]["kind"]
        if kind in aux and e["parent"] in pos:
            px, py = pos[e["parent"]]
            pos[e["child"]] = (px + NODE_W / 2 - 17 + aux[kind], py + NODE_H + 14)
    vmax = max([abs(e["value"]) for e in graph["edges"]] + [1e-12])
    parts = []
    for e in graph["edges"]:
        if e["parent"] in pos and e["child"] in pos:
            (px, py), (cx, cy) = pos[e["parent"]], pos[e["child"]]
            small = by_id[e["child"]]["kind"] in aux
            parts.append(f'<line x1="{cx + (17 if small else NODE_W / 2)}" y1="{cy}" x2="{px + NODE_W / 2}" '
                         f'y2="{py + NODE_H}" stroke="{"#2a6fdb" if e["value"] >= 0 else "#d62728"}" '
                         f'stroke-width="{0.6 + 6 * abs(e["value"]) / vmax:.2f}" opacity="0.7">'
                         f'<title>{html.escape(e["child"])} → {html.escape(e["parent"])}: {e["value"]:+.4f}'
                         f'</title></line>')
    for n in graph["nodes"]:
        if n["id"] not in pos:
            continue
        x, y = pos[n["id"]]
        small = n["kind"] in aux
        w, h = (34, 18) if small else (NODE_W, NODE_H)
        name = {"bias": "bias", "error": "err", "pruned": "pruned"}.get(n["kind"]) or _short(n)
        parts.append(f'<g><rect x="{x}" y="{y}" width="{w}" height="{h}" rx="4" fill="{"#eee" if small else "#fff"}" '
                     f'stroke="#888"/><text x="{x + w / 2}" y="{y + 12}" font-size="{9 if small else 11}" '
                     f'text-anchor="middle">{html.escape(name)}</text>' +
                     ("" if small else f'<text x="{x + w / 2}" y="{y + 25}" font-size="10" text-anchor="middle" '
                                       f'fill="#555">{n["value"]:+.3f}</text>') +
                     f'<title>{html.escape(n["id"])}: {n["value"]:+.4f}</title></g>')
    for c in columns:      # token labels under their columns, cut to fit (the full token in a tooltip)
        token = tokens[c] if 0 <= c < len(tokens) else ""
        short = token if len(token) <= 16 else token[:15] + "…"
        parts.append(f'<text x="{x0[c] + width[c] / 2}" y="{top + NODE_H + 50}" font-size="11" text-anchor="middle">'
                     f'{c}: {html.escape(short)}<title>{c}: {html.escape(token)}</title></text>')
    return (_edge_legend(vmax) + f'<svg xmlns="http://www.w3.org/2000/svg" width="{acc + 20}" '
            f'height="{top + NODE_H + 64}" font-family="system-ui,sans-serif">{"".join(parts)}</svg>')


def _edge_legend(vmax):
    """What an edge's colour and width mean, drawn with the edges' own strokes (as paths, so that the graph's
    <line>s stay its edges): a line of HTML above the graph."""
    items = [("#2a6fdb", 3.6, "pushes the target up"), ("#d62728", 3.6, "pushes it down"),
             ("#888", 0.6, "|value| ≈ 0"), ("#888", 6.6, f"|value| = {vmax:.3g} (width ∝ |value|)")]
    return '<p class="legend">' + "".join(
        f'<span style="margin-right:1.5em"><svg width="26" height="10"><path d="M1,5H25" stroke="{color}" '
        f'stroke-width="{width}" opacity="0.7"/></svg> {html.escape(text)}</span>' for color, width, text in items) + \
        "</p>"


def _level(n):
    """Depth in the model: embeddings 0, attention l at 1 + 2l, MLP l at 2 + 2l, logits last."""
    return {"embed": 0, "pos": 0, "head": 1 + 2 * n["layer"], "logit": 10 ** 6}.get(n["kind"], 2 + 2 * n["layer"])


def _short(n):
    k, l, i = n["kind"], n["layer"], n["index"]
    return {"feature": f"mlp{l} #{i}", "head": f"attn{l}.{i} ←{n['at']}", "skip": f"mlp{l} skip",
            "logit": "logit"}.get(k, k)


# ------------------------------------------------------------------------- attribution-graph report
GRAPH_JS = """
const D = JSON.parse(document.getElementById("data").textContent), G = D.graph, S = D.strings;
const kinds = {"embedding": "token", "mlp reconstruction error": "error", "logit": "logit"};
const kind = n => kinds[n.feature_type] || "feature";
const row = n => n.layer === "E" ? 0 : +n.layer + 1;          // tokens at the bottom, logits above the last layer
const cells = {};
for (const n of G.nodes) (cells[row(n) + "," + n.ctx_idx] ||= []).push(n);
const T = G.metadata.prompt_tokens.length, rows = Math.max(...G.nodes.map(row)) + 1;
const colW = Array.from({length: T}, (_, p) => 40 + 16 * Math.max(1, ...Object.entries(cells)
  .filter(([k]) => +k.split(",")[1] === p).map(([, v]) => v.length)));
const colX = colW.map((_, p) => 60 + colW.slice(0, p).reduce((a, b) => a + b, 0));
const rowY = r => 30 + (rows - 1 - r) * 34, pos = {};
for (const [key, ns] of Object.entries(cells)) {
  const [r, p] = key.split(",").map(Number);
  ns.forEach((n, i) => pos[n.node_id] = [colX[p] + 20 + 16 * i, rowY(r)]);
}
const W = colX[T - 1] + colW[T - 1] + 20, H = rowY(0) + 60;
const peak = Math.max(...G.links.map(l => Math.abs(l.weight)), 1e-12);
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
let svg = "";
for (let r = 1; r < rows - 1; r++)
  svg += `<text x="8" y="${rowY(r) + 4}" font-size="10" fill="#888">L${r - 1}</text>`;
G.metadata.prompt_tokens.forEach((t, p) => svg += `<text x="${colX[p] + colW[p] / 2}" y="${H - 12}" font-size="11" ` +
  `text-anchor="middle">${esc(t)}</text>`);
// the strongest edges only: twenty thousand lines are a hairball, and slow to draw
for (const l of [...G.links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_EDGES)) {
  const [x1, y1] = pos[l.source], [x2, y2] = pos[l.target];
  svg += `<line class="edge" x1="${x1}" y1="${y1}" x2="${x2}" y2="${y2}" stroke="${l.weight >= 0 ? "#2a6fdb" : "#d62728"}" ` +
    `stroke-width="${(0.5 + 5 * Math.abs(l.weight) / peak).toFixed(2)}" opacity="0.45"><title>${esc(l.source)} → ` +
    `${esc(l.target)}: ${l.weight.toPrecision(3)}</title></line>`;
}
for (const n of G.nodes) {
  const [x, y] = pos[n.node_id], k = kind(n), tip = `${esc(n.node_id)} (${k})`;
  const shape = k === "error" ? `<rect x="${x - 5}" y="${y - 5}" width="10" height="10" fill="#bbb"/>` :
    k === "feature" ? `<circle cx="${x}" cy="${y}" r="6" fill="#f0a030"/>` :
    `<rect x="${x - 7}" y="${y - 7}" width="14" height="14" rx="3" fill="${k === "logit" ? "#6a3" : "#79c"}"/>`;
  svg += `<g class="node ${k}" data-id="${esc(n.node_id)}">${shape}<title>${tip}</title></g>`;
}
document.getElementById("graph").innerHTML = `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" ` +
  `font-family="system-ui,sans-serif">${svg}</svg>`;
function context(ex, max) {
  const [ids, acts] = ex;
  return '<div class="ctx">' + ids.map((id, i) => id < 0 ? "" : `<span class="t${i === D.before ? " c" : ""}" ` +
    `style="background:rgba(255,140,0,${Math.min(1, acts[i] / max).toFixed(2)})">${esc(S[id])}</span>`).join("") + "</div>";
}
function show(id) {
  const n = G.nodes.find(m => m.node_id === id), k = kind(n), panel = document.getElementById("panel");
  const into = G.links.filter(l => l.target === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
  let html = `<h2>${esc(id)}</h2><p>${k}` + (n.activation != null ? `, activation ${n.activation.toPrecision(3)}` : "") +
    (n.influence != null ? `, cumulative influence ${n.influence.toFixed(3)}` : "") + (n.clerp ? `: ${esc(n.clerp)}` : "") +
    "</p><h3>strongest inputs</h3>" + (into.map(l => `<div>${esc(l.source)} ${l.weight.toPrecision(3)}</div>`).join("") || "none");
  if (k === "feature") {
    const ex = D.contexts[id.split("_").slice(0, 2).join("_")] || [];
    const max = Math.max(...ex.map(e => e[1][D.before]), 1e-9);
    html += "<h3>top activating contexts (held out)</h3>" + (ex.map(e => context(e, max)).join("") || "never active");
  }
  panel.innerHTML = html;
}
for (const g of document.querySelectorAll("g.node")) g.addEventListener("click", () => show(g.dataset.id));
const first = G.nodes.filter(n => kind(n) === "feature").sort((a, b) => a.influence - b.influence)[0];
if (first) show(first.node_id);          // the most influential feature (lowest cumulative influence) to start with
"""


MAX_EDGES = 1500          # graph.html draws at most this many edges, the strongest


def graph_html(data, contexts, title="Attribution graph") -> str:
    """A self-contained viewer of an attribution graph in circuit-tracer's JSON (`minisv.circuit_tracer.graph_json`):
    layers bottom to top, token positions left to right, edges blue (raises the target) or red (lowers it) with
    width ∝ |weight|; clicking a node shows its strongest inputs and, for a feature, its top activating contexts
    (`minisv.dashboards.graph_contexts`); the scores in the header."""
    meta = data["metadata"]
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    header = (f'<p class="meta">{len(data["nodes"]):,} nodes and {len(data["links"]):,} edges kept (node threshold '
              f'{meta["node_threshold"]}; the {min(MAX_EDGES, len(data["links"])):,} strongest edges are drawn). '
              f'Replacement score {meta.get("replacement_score", float("nan")):.3f}, '
              f'completeness {meta.get("completeness_score", float("nan")):.3f}; pruned: '
              f'{meta.get("pruned_replacement_score", float("nan")):.3f}, '
              f'{meta.get("pruned_completeness_score", float("nan")):.3f}.</p><p>Next token: ' +
              ", ".join(html.escape(n["clerp"]) for n in logits) + "</p>")
    legend = ('<p class="meta legend"><svg width="400" height="16"><circle cx="8" cy="8" r="6" fill="#f0a030"/>'
              '<text x="18" y="12" font-size="11">feature</text><rect x="70" y="3" width="10" height="10" fill="#bbb"/>'
              '<text x="84" y="12" font-size="11">MLP error</text><rect x="150" y="1" width="14" height="14" rx="3" '
              'fill="#79c"/><text x="168" y="12" font-size="11">token</text><rect x="210" y="1" width="14" height="14" '
              'rx="3" fill="#6a3"/><text x="228" y="12" font-size="11">logit</text></svg><br>edges: '
              '<span style="color:#2a6fdb">blue raises the target</span>, <span style="color:#d62728">red lowers it'
              '</span>; width ∝ |direct effect|. Click a node for its inputs and contexts.</p>')
    payload = {"graph": data, **contexts}
    body = (header + legend + '<div style="display:flex;gap:16px"><div id="graph" style="overflow:auto;'
            'max-width:70%"></div><div id="panel" style="flex:1;min-width:18em"><p>click a node</p></div></div>' +
            _json_script(payload, "data") + f"<script>const MAX_EDGES = {MAX_EDGES};\n{GRAPH_JS}</script>")
    return _page(title, body)


# ------------------------------------------------------------------------- training report
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def training_html(metrics, title="Transcoder training") -> str:
    """report.html of a train_transcoder.py run, from its metrics.json dict: training curves (loss, FVU, L0,
    dead fraction vs tokens, with the held-out FVU measured during training), the held-out firing-frequency
    histogram per layer (log scale) and the metrics table. Inline SVG, no script, no external file."""
    train, ev = metrics["train"], metrics["eval"]
    h = train["history"]
    curve = lambda key: [(r["tokens"], r[key]) for r in h]
    evals = train.get("held_out", [])
    held = {f"held-out, layer {l}": [(r["tokens"], r["fvu"][l]) for r in evals]
            for l in (evals[0]["fvu"] if evals else {})}
    charts = [svg_chart({"training batch (mean over layers)": curve("fvu"), **held}, "training tokens", "FVU",
                        "FVU: unexplained fraction of the target's variance"),
              svg_chart({"loss": curve("loss")}, "training tokens", "loss", "training loss (sum over layers)"),
              svg_chart({"L0": curve("l0")}, "training tokens", "active latents per token", "L0"),
              svg_chart({"dead": [(t, 100 * v) for t, v in curve("dead")]}, "training tokens", "% of latents",
                        f"dead: no firing in the last {train['dead_window_tokens']:,} training tokens")]
    layers = sorted(int(k.split("_")[1]) for k in ev if k.startswith("layer_"))
    hists = [_freq_histogram_svg(ev[f"layer_{l}"]["freq_histogram"], f"layer {l}: live latents per firing "
                                 f"frequency (held out)") for l in layers if "freq_histogram" in ev[f"layer_{l}"]]
    cols = [("L0", "l0", "{:.1f}"), ("FVU", "fvu", "{:.3f}"), ("CE spliced", "ce_spliced", "{:.4f}"),
            ("CE zero-ablated", "ce_zero_ablated", "{:.4f}"), ("CE score", "ce_score", "{:.3f}"),
            ("KL (nats)", "kl", "{:.4f}")]
    rows = [(f"layer {l}", ev[f"layer_{l}"], train["dead"].get(str(l))) for l in layers] + \
        ([("all at once", ev["all"], None)] if "all" in ev else [])
    table = ("<table><tr><th></th>" + "".join(f"<th>{c}</th>" for c, _, _ in cols) + "<th>dead (training)</th></tr>" +
             "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(
                 f"<td class='num'>{fmt.format(r[k]) if k in r else '–'}</td>" for _, k, fmt in cols) +
                 f"<td class='num'>{'–' if dead is None else f'{dead:.1%}'}</td></tr>" for name, r, dead in rows) +
             "</table>")
    meta = (f"{html.escape(str(metrics['model']))}, layers {metrics['layers']}; {train['tokens']:,} training tokens "
            f"in {train['seconds']:,} s ({train['tok_per_s']:,} tok/s end to end); evaluated on {ev['tokens']:,} "
            f"held-out tokens, clean CE {ev['ce_clean']:.4f}")
    cfg = html.escape(json.dumps(metrics["train_config"], indent=1))
    return _page(title, f'<p class="meta">{meta}</p><h2>metrics (held out)</h2>{table}<h2>training curves</h2>'
                        f'{"".join(charts)}<h2>firing frequencies</h2>{"".join(hists)}'
                        f"<h2>configuration</h2><pre>{cfg}</pre>")


MAX_INT_TICKS = 12    # svg_chart: up to this many distinct integer x values get a tick each


def svg_chart(series, xlabel, ylabel, title="", *, log_x=False, log_y=False, y_range=None, size=(460, 260)) -> str:
    """A line chart with markers as inline SVG: series {name: [(x, y), ...]}, one color and marker shape each
    (so overlapping series stay apart), a legend, axes with 5 ticks (log10 axes tick at powers of ten; x values
    that are all Python ints, at most MAX_INT_TICKS of them, such as layer numbers, get one tick each), the y axis
    over the data or over y_range=(low, high); hovering a marker shows its values. Non-finite points are left
    out. size: (width, height) in pixels."""
    integers = all(isinstance(x, int) and not isinstance(x, bool) for p in series.values() for x, _ in p)
    plot = _Axes(series, (log_x, log_y), y_range, size, integers)
    parts = plot.frame(xlabel, ylabel, title)
    for i, (name, p) in enumerate(plot.points.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{plot.X(x):.1f},{plot.Y(y):.1f}" for j, (x, y) in enumerate(p))
        parts.append(f'<path d="{path}" stroke="{color}" fill="none" stroke-width="1.5"/>' if p else "")
        parts += [_marker(i, plot.X(x), plot.Y(y), color, f"{name}: {plot.label(x, 0)}, {plot.label(y, 1)}")
                  for x, y in p]
        parts.append(plot.legend(i, name, color))
    return plot.svg(parts)


def svg_scatter(points, xlabel, ylabel, title="", *, groups=("",), diagonal=False, size=(420, 380)) -> str:
    """A scatter plot as inline SVG: points [(x, y, hover text, group index)], each group (named in `groups`, for
    the legend) in its own color and marker, ticks on both axes, optionally the dashed line y = x."""
    series = {"all": [(x, y) for x, y, *_ in points]}
    lo, hi = (min(min(x, y) for x, y, *_ in points), max(max(x, y) for x, y, *_ in points)) if points else (0, 1)
    if diagonal:           # the y = x line must fit: the same range on both axes
        series["y = x"] = [(lo, lo), (hi, hi)]
    plot = _Axes(series, (False, False), None, size, False)
    parts = plot.frame(xlabel, ylabel, title)
    if diagonal:
        parts.append(f'<path d="M{plot.X(lo):.1f},{plot.Y(lo):.1f}L{plot.X(hi):.1f},{plot.Y(hi):.1f}" stroke="#999" '
                     f'stroke-dasharray="4 3"/>')
    parts += [_marker(g, plot.X(x), plot.Y(y), COLORS[g % len(COLORS)], text) for x, y, text, g in points]
    parts += [plot.legend(g, name, COLORS[g % len(COLORS)]) for g, name in enumerate(groups) if name]
    return plot.svg(parts)


class _Axes:
    """The frame of a chart: data ranges, the maps X, Y from data to pixels, ticks and labels, the legend."""
    TOP, BOTTOM = 24, 40
    FLAT = 0.1     # data varying by less than this fraction of its size is drawn as the flat line it is

    def __init__(self, series, logs, y_range, size, integer_x):
        self.logs, (self.width, self.height) = logs, size
        t = [(lambda v: math.log10(v)) if log else float for log in logs]
        self.points = {name: [(t[0](x), t[1](y)) for x, y in p if _plottable(x, logs[0]) and _plottable(y, logs[1])]
                       for name, p in series.items()}
        every = [q for p in self.points.values() for q in p] or [(0.0, 0.0)]
        (self.x0, self.x1), (self.y0, self.y1) = [_range(v, self.FLAT) for v in zip(*every)]
        if y_range is not None:
            self.y0, self.y1 = t[1](y_range[0]), t[1](y_range[1])
        xs = sorted({x for p in self.points.values() for x, _ in p})
        self.x_ticks = xs if integer_x and not logs[0] and 0 < len(xs) <= MAX_INT_TICKS and self._fit(xs) else \
            [self.x0 + (self.x1 - self.x0) * i / 4 for i in range(5)]
        self.y_ticks = [self.y0 + (self.y1 - self.y0) * i / 4 for i in range(5)]
        self.x_labels, self.y_labels = _labels(self.x_ticks, logs[0]), _labels(self.y_ticks, logs[1])
        # room for the widest y tick label (≈ 6 px a character) and the rotated y title left of it, and for half
        # of the last x tick label, centered on the axis' right end
        self.LEFT = max(58, 6 * max(map(len, self.y_labels)) + 26)
        self.RIGHT = max(12, 3 * len(self.x_labels[-1]) + 2)

    def _fit(self, xs):
        """Whether one label per x value fits side by side (≈ 6 px a character, 8 px apart) along the axis."""
        return len(xs) * (6 * max(len(_tick(x, False)) for x in xs) + 8) <= self.width - 70

    def X(self, v):
        return self.LEFT + (v - self.x0) / (self.x1 - self.x0) * (self.width - self.LEFT - self.RIGHT)

    def Y(self, v):
        return self.height - self.BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (self.height - self.TOP - self.BOTTOM)

    def label(self, v, axis):
        """A tick label in data units (10^v on a log axis): 16k, 327k, 1.2M rather than 1.64e+04."""
        return _tick(v, self.logs[axis])

    def frame(self, xlabel, ylabel, title):
        """Title, axes, tick labels (each group and axis title in a <g class=...> a test or a stylesheet can find)."""
        w, h, mid_y = self.width, self.height, (self.TOP + self.height - self.BOTTOM) / 2
        parts = [f'<text x="{w / 2}" y="15" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
                 f'<path d="M{self.LEFT},{self.TOP}V{h - self.BOTTOM}H{w - self.RIGHT}" stroke="#888" fill="none"/>']
        parts += ['<g class="ticks-x">'] + [
            f'<text x="{self.X(v):.1f}" y="{h - self.BOTTOM + 14}" text-anchor="middle" font-size="10">{label}</text>'
            for v, label in zip(self.x_ticks, self.x_labels)] + ['</g><g class="ticks-y">'] + [
            f'<text x="{self.LEFT - 4}" y="{self.Y(v) + 3:.1f}" text-anchor="end" font-size="10">{label}</text>'
            for v, label in zip(self.y_ticks, self.y_labels)] + ['</g>']
        parts.append(f'<g class="title-x"><text x="{(self.LEFT + w - self.RIGHT) / 2}" y="{h - 6}" '
                     f'text-anchor="middle" font-size="11">{html.escape(xlabel)}</text></g><g class="title-y"><text '
                     f'x="11" y="{mid_y}" font-size="11" text-anchor="middle" transform="rotate(-90 11 {mid_y})">'
                     f'{html.escape(ylabel)}</text></g>')
        return parts

    def legend(self, i, name, color):
        x, y = self.width - self.RIGHT - 4, self.TOP + 12 + 13 * i
        return (f'<g class="legend">{_marker(i, x - len(name) * 5.6 - 8, y - 3.5, color)}<text x="{x}" y="{y}" '
                f'text-anchor="end" font-size="10" fill="{color}">{html.escape(name)}</text></g>')

    def svg(self, parts):
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'font-family="system-ui,sans-serif">{"".join(parts)}</svg>')


def _range(values, flat):
    """(low, high) of an axis over `values`. Values that vary by less than `flat` of their size (an L0 that stays
    at 32, give or take 0.1) get that much room, so the line shows flat and 5 ticks get 5 different labels."""
    lo, hi = min(values), max(values)
    half = max((hi - lo) / 2, flat / 2 * max(abs(lo), abs(hi))) or 1.0
    return (lo + hi) / 2 - half, (lo + hi) / 2 + half


def _labels(ticks, log):
    """Tick labels with 3 significant digits, more where that would print two ticks alike."""
    for digits in range(3, 9):
        labels = [_tick(v, log, digits) for v in ticks]
        if len(set(labels)) == len(labels):
            break
    return labels


def _marker(i, x, y, color, text=None):
    """Marker shape i (circle, square, triangle, diamond, ...) at (x, y), with `text` on hover."""
    shape = ("circle", "square", "triangle", "diamond")[i % 4]
    title = f"<title>{html.escape(text)}</title>" if text is not None else ""
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.8" fill="{color}">{title}</circle>'
    if shape == "square":
        return f'<rect x="{x - 2.6:.1f}" y="{y - 2.6:.1f}" width="5.2" height="5.2" fill="{color}">{title}</rect>'
    points = [(0, -3.6), (3.3, 2.4), (-3.3, 2.4)] if shape == "triangle" else [(0, -3.6), (3.4, 0), (0, 3.6), (-3.4, 0)]
    return (f'<polygon points="{" ".join(f"{x + dx:.1f},{y + dy:.1f}" for dx, dy in points)}" fill="{color}">'
            f'{title}</polygon>')


def _plottable(v, log):
    return v is not None and math.isfinite(v) and (v > 0 or not log)


def _tick(v, log, digits=3):
    """`digits` significant digits, large numbers with k / M suffixes (16k, 327k, 1.2M), never in e-notation."""
    v = 10 ** v if log else v
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.{digits}g}{suffix}"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.{digits - 2}e}"


def _freq_histogram_svg(hist, title, width=460, height=200):
    """Bars: live latents per decade of firing frequency ([1e-8, 1e-7), ..., [0.1, 1]), a log10 x axis."""
    edges, counts = hist["log10_edges"], hist["counts"]
    left, bottom, top = 40, 36, 36          # the tallest bar's count sits below the title
    bar = (width - left - 12) / len(counts)
    peak = max(max(counts), 1)
    parts = [f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="12">{html.escape(title)}</text>']
    for i, c in enumerate(counts):
        h = c / peak * (height - top - bottom)
        x = left + i * bar
        parts.append(f'<rect x="{x + 1:.1f}" y="{height - bottom - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                     f'fill="{COLORS[0]}"><title>{c} latents fire on 1e{edges[i]}–1e{edges[i + 1]} of tokens</title>'
                     f'</rect><text x="{x + bar / 2:.1f}" y="{height - bottom - h - 3:.1f}" text-anchor="middle" '
                     f'font-size="9">{c}</text><text x="{x:.1f}" y="{height - bottom + 13}" text-anchor="middle" '
                     f'font-size="10">1e{edges[i]}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" font-size="11">firing frequency '
                 f'(fraction of held-out tokens, log scale)</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="system-ui,sans-serif">{"".join(parts)}</svg>')


# ------------------------------------------------------------------------- steering-vector report


def steering_html(run, title="One-shot steering vector") -> str:
    """The HTML page of an optimize_sv.py run. run: dict with
        about      [str] lines describing the run (model, settings, training data), plain text
        success    the regex a generation must match to count as a success, or None (for the page's text)
        n_eval     how many held-out prompts the rates count
        layers     [dict(layer, loss, iters, stop, norm, resid_norm, rates={column: fraction}, history=[loss per
                   evaluation, optional])], one per vector
        columns    [str] generation column names
        rows       [dict(prompt, texts=[(generation, success: bool) per column], note=str)]
    With more than one layer the page also plots held-out success against the layer, and with histories the
    optimization's loss curves (inline SVG)."""
    e = html.escape
    about = "".join(f"<p class='meta'>{e(line)}</p>" for line in run["about"])
    names = list(run["layers"][0]["rates"]) if run["layers"] and run["layers"][0]["rates"] else []
    head = "".join(f"<th>{e(h)}</th>" for h in ["layer", "final loss (nats)", "steps", "stop", "‖v‖",
                                                 "median ‖resid‖"] + [f"success {n}" for n in names])
    sweep = "".join(
        f"<tr><td>{r['layer']}</td><td class='num'>{r['loss']:.4f}</td><td>{r['iters']}</td><td>{e(r['stop'])}</td>"
        f"<td class='num'>{r['norm']:.2f}</td><td class='num'>{r['resid_norm']:.1f}</td>" +
        "".join(f"<td class='num'>{round(r['rates'][n] * run['n_eval'])}/{run['n_eval']}</td>" for n in names) +
        "</tr>" for r in run["layers"])
    plot = ""
    if len(run["layers"]) > 1 and names:          # success fraction of each generation column against the layer
        plot = "<h2>held-out success vs layer</h2>" + svg_chart(
            {n: [(r["layer"], r["rates"][n]) for r in run["layers"]] for n in names}, "layer", "held-out success",
            y_range=(0, 1))
    curves = {f"layer {r['layer']}": list(enumerate(r["history"])) for r in run["layers"] if r.get("history")}
    if curves:                                    # the optimization: summed training loss at each Adam step
        plot += "<h2>optimization</h2>" + svg_chart(curves, "Adam step", "loss (nats)", "training loss per step")
    rows = "".join(f"<tr><td class='gen'>{e(r['prompt'])}</td>" +
                   "".join(f"<td class='gen{' hit' if hit else ''}'>{e(t)}</td>" for t, hit in r["texts"]) +
                   f"<td class='num'>{e(r['note'])}</td></tr>" for r in run["rows"])
    rule_text = (f"success: the regex <code>{e(run['success'])}</code> matches (shaded)" if run["success"]
                 else "no success rule")
    body = (f"{about}<h2>vectors</h2><table><tr>{head}</tr>{sweep}</table>{plot}<h2>generations</h2><p>{rule_text}</p>"
            f"<table><tr><th>prompt</th>{''.join(f'<th>{e(c)}</th>' for c in run['columns'])}"
            f"<th>log p(promote) unsteered → steered</th></tr>{rows}</table>"
            "<style>.gen{white-space:pre-wrap;max-width:24em;vertical-align:top;border:1px solid #ddd}"
            ".hit{background:#fde2e2}</style>")
    return _page(title, body)


# ------------------------------------------------------------------------- ObProp report
def obprop_html(model_name, results, couplings, title=None) -> str:
    """The page of an obprop.py run, from its results and couplings (the dicts its --json writes): per observable
    the head rankings (feature norm, direct-path and total-effect patching) as tables and layer × head heatmaps,
    the MLPs, the classifiers, the paths and the path search; per coupling the predicted-vs-empirical scatter."""
    e, parts = html.escape, []
    for r in results:
        parts += _obprop_observable(r)
    for c in couplings:
        parts += [f"<h2>Coupling {e(c['source'])} → {e(c['target'])}</h2><p>Predicted C(y1, y2) = y1·y2/‖y1‖² of the "
                  f"norm-scaled features (= weights-only × {c['scale_ratio']:.3f}) vs the least-squares slope of the "
                  f"y2-scores on the y1-scores over {c['tokens']} corpus tokens, every head. Cosine of the two "
                  f"observables at the final residual: {c['observables_cosine']:.3f}.</p>",
                  _table(["heads", "n", "Pearson", "Spearman"],
                         [[s["bin"], str(s["heads"]), *(("–", "–") if s["pearson"] is None else
                                                        (s["pearson"], s["spearman"]))] for s in c["summary"]]),
                  svg_scatter([(x["predicted"], x["slope"], f"head {obprop.head_name(x['head'])}: predicted "
                                f"{x['predicted']:.3f}, slope {x['slope']:.3f}, cosine {x['cosine']:.3f}",
                                0 if abs(x["cosine"]) >= 0.9 else 1 if abs(x["cosine"]) >= 0.5 else 2)
                               for x in c["heads"]], "predicted coupling", "empirical slope",
                              "every head: predicted vs measured (dashed: y = x)", diagonal=True,
                              groups=("|cos| ≥ 0.9", "|cos| 0.5–0.9", "|cos| < 0.5")),
                  _table(["head", "predicted", "weights-only", "empirical slope", "r²", "cosine"],
                         [[obprop.head_name(x["head"]), x["predicted"], x["predicted_weights_only"], x["slope"],
                           x["r2"], x["cosine"]] for x in c["top_heads"]])]
    return _page(title or f"Observable propagation on {model_name}", "\n".join(parts))


def _obprop_observable(r):
    """The sections of one observable's results."""
    e, name = html.escape, obprop.head_name
    agreement = "; ".join(f"{k.replace('_', ' ')}: top-k overlap {a['top_k_overlap']:.0%}, Spearman "
                          f"{a['spearman']:.3f}" for k, a in r["agreement"].items())
    total = r["total_patching"] is not None
    rows = [[str(i + 1), name(a), r["feature_norms"][a[0]][a[1]], name(b), r["patching"][b[0]][b[1]]]
            + ([name(c), r["total_patching"][c[0]][c[1]]] if total else [])
            for i, (a, b, c) in enumerate(zip(r["top_by_norm"], r["top_by_patching"],
                                              r["top_by_total_patching"] or r["top_by_norm"]))]
    parts = [f"<h2>{e(r['observable'])}</h2><p>Heads ranked by feature norm (from the weights, no data), by "
             f"direct-path patching over {r['pairs']} pair(s)"
             + (f" and by total-effect activation patching over {r['total_pairs']} pair(s)" if total else "")
             + f". {e(agreement)} (over all heads).</p>",
             _table(["rank", "head by ‖y‖", "‖y‖", "head by direct patching", "effect"]
                    + (["head by total patching", "effect"] if total else []), rows),
             _table(["MLP by ‖y‖", "‖y‖"], [[f"mlp {m}", r["mlp_feature_norms"][m]] for m in r["top_mlps_by_norm"]]),
             _heatmap(r["feature_norms"], "feature norm ‖y‖"),
             _heatmap(r["patching"], "direct-path patching effect")]
    if total:
        parts.append(_heatmap(r["total_patching"], "total-effect patching effect"))
    if "classifier" in r:
        c = r["classifier"]
        parts += [f"<p>Classifying the class from x̂ at the name token (the last token without a template): the head's "
                  f"ObProp feature (no training data) vs the mean difference of {c['train_examples']} examples per "
                  f"class and template; AUC on {c['test_names'][0]} + {c['test_names'][1]} held-out prompts (below "
                  f"0.5: the head pushes the other way).</p>",
                  _table(["head", "AUC ObProp", "AUC mean difference"],
                         [[name(x["head"]), x["auc_obprop"], x["auc_mean_difference"]] for x in c["heads"]])]
    words = r["reference"]["text"][0]
    parts.append(f"<p>Reference prompts (norm scales, MLP linearizations, default source tokens): "
                 f"{' / '.join(e(repr(''.join(t))) for t in r['reference']['text'])}.</p>")
    if r["paths"]:
        parts.append(_table(["path", "‖y‖", "tokens read"], [
            [p, y["norm"], "; ".join(f"{obprop.step_name(s)}: {s['reads']} {words[s['reads']]!r}" for s in y["steps"])]
            for p, y in r["paths"].items()]))
    if "search" in r:
        parts.append("<h3>Path search</h3><pre>" + e("\n".join(obprop.format_search(r["search"]))) + "</pre>")
    return parts


HEATMAP_CELL = (16, 12)      # px per head (column) and per layer (row)


def _heatmap(values, title):
    """An [L, H] grid as inline SVG, layers as rows (0 at the top) and heads as columns, labelled; red for positive,
    blue for negative, opacity ∝ |value| against a colour scale; hovering a cell shows "layer.head: value"."""
    (cw, ch), L, H = HEATMAP_CELL, len(values), len(values[0])
    peak = max(abs(v) for row in values for v in row) or 1.0
    left, top = 46, 34
    color = lambda v: f"rgba({'200,40,40' if v >= 0 else '40,80,200'},{abs(v) / peak:.2f})"
    cells = "".join(f'<rect x="{left + h * cw}" y="{top + l * ch}" width="{cw - 1}" height="{ch - 1}" '
                    f'fill="{color(v)}"><title>{l}.{h}: {v:.4g}</title></rect>'
                    for l, row in enumerate(values) for h, v in enumerate(row))
    step = max(1, L // 10)
    labels = "".join(f'<text x="{left - 4}" y="{top + l * ch + ch - 2}" text-anchor="end" font-size="9">{l}</text>'
                     for l in range(0, L, step))
    labels += "".join(f'<text x="{left + h * cw + cw / 2}" y="{top - 4}" text-anchor="middle" font-size="9">{h}</text>'
                      for h in range(H))
    bar = max(L * ch, 120)                  # the colour scale: +peak at the top, 0 in the middle, −peak below
    width, height = left + H * cw + 90, top + max(L * ch, bar) + 10
    scale_x = left + H * cw + 16
    scale = "".join(f'<rect x="{scale_x}" y="{top + i * bar / 50:.1f}" width="12" height="{bar / 50 + 0.5:.1f}" '
                    f'fill="{color(peak * (1 - i / 25))}"/>' for i in range(50))
    scale += "".join(f'<text x="{scale_x + 16}" y="{top + y + 4:.1f}" font-size="9">{v:.3g}</text>'
                     for y, v in ((0, peak), (bar / 2, 0), (bar, -peak)))
    axes = (f'<text x="{left + H * cw / 2}" y="12" text-anchor="middle" font-size="11">head</text>'
            f'<text x="12" y="{top + L * ch / 2}" font-size="11" text-anchor="middle" '
            f'transform="rotate(-90 12 {top + L * ch / 2})">layer</text>')
    return (f'<div class="map"><h4>{html.escape(title)} (layer × head)</h4><svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{width}" height="{height}" font-family="system-ui,sans-serif">{axes}{labels}'
            f'{cells}{scale}</svg></div>')


def _table(header, rows, cell_class=None):
    """An HTML table; floats are shown with 3 decimals, everything else as text, all of it escaped."""
    attr = f" class={cell_class}" if cell_class else ""

    def cells(row, tag):
        return "".join(f"<{tag}{attr}>{html.escape(f'{c:.3f}' if isinstance(c, float) else str(c))}</{tag}>"
                       for c in row)
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return f"<table class=t><tr>{cells(header, 'th')}</tr>{body}</table>"


def steering_study_html(page) -> str:
    """The HTML page of an `optimize_sv.py --study` run. page: dict with
        title      the page title
        about      [str] lines on the setup, the first measurements and the verdicts
        sections   [dict(heading, table=dict(head, rows), charts=[dict(series, xlabel, ylabel, title, y_range=None)],
                   examples=dict(head, rows))]: text tables, and charts drawn with svg_chart
        notes      [str] what the judges are, what could not be reproduced
    Every text is HTML-escaped here; charts are inline SVG, so the page needs no network."""
    e = html.escape
    body = "".join(f"<p class='meta'>{e(line)}</p>" for line in page["about"])
    for s in page["sections"]:
        plots = "".join(svg_chart(c["series"], c["xlabel"], c["ylabel"], title=c["title"], y_range=c.get("y_range"))
                        for c in s["charts"])
        body += (f"<h2>{e(s['heading'])}</h2>" + _table(s["table"]["head"], s["table"]["rows"], "num") +
                 f"<div>{plots}</div><h2>examples: {e(s['heading'])}</h2>" +
                 _table(s["examples"]["head"], s["examples"]["rows"], "gen"))
    if not page["sections"]:
        body += "<p>no steering was run (see above)</p>"
    body += "".join(f"<p class='meta'>{e(line)}</p>" for line in page["notes"])
    return _page(page["title"], body + "<style>.gen{white-space:pre-wrap;max-width:22em;vertical-align:top;"
                                       "border:1px solid #ddd;font-size:12.5px}</style>")
