"""Self-contained HTML reports: transcoder feature dashboards and circuit graphs (`docs/methods.md` §2.6).

A dashboard shows, per feature, what it reads and writes: its top-activating contexts with per-token
highlighting, contexts sampled from quantile bands of its activation distribution (what it does at typical
strength, not only at its peak), a histogram of its activations, its firing frequency, the tokens whose
embeddings activate it directly (de-embedding, W_E·W_enc) and the logits its output promotes and
suppresses (W_U·W_dec).

`collect_dashboards` gathers all of this for every feature in one pass over a corpus, in memory independent of
the corpus size: per feature it keeps running buffers, merged batch by batch with `torch.topk`, of the k
largest activations and of a uniform random sample of its firing tokens (a random key per token, keep the
largest keys), each with the feature's activations in a window around the token; and an exact histogram whose
range doubles when needed. The HTML keeps the data as JSON and draws a feature's card only when it is opened,
so thousands of features load instantly. Every token string is HTML-escaped in Python before it is embedded.
"""
import html
import json
import math

import torch
import torch.nn.functional as F

from . import circuits
from .errors import MinisvError

BINS = 32


# ------------------------------------------------------------------------- collecting dashboard data
@torch.no_grad()
def collect_dashboards(model, tc, rows, features=None, max_features=None, k=10, samples=24, bands=4, per_band=3,
                       window=(12, 3), bos_id=None, seed=0, batch_rows=None, log=None) -> dict:
    """Dashboard data for transcoder `tc` over token rows [N, T]. features: the feature ids to report (default:
    every live one, or a seeded random sample of `max_features` of them). k top contexts; `samples` random
    firing tokens per feature, split into `bands` activation-quantile bands of which `per_band` are shown;
    window = (tokens before, tokens after) each context. Positions holding `bos_id` are skipped. batch_rows:
    rows per forward (default: as many as keep the dense [tokens, d_sae] encoding near 16M numbers)."""
    if not 0 <= tc.cfg.layer < model.cfg.n_layers or tc.cfg.d_in != model.cfg.d_model:
        raise MinisvError(f"this transcoder (layer {tc.cfg.layer}, d_in {tc.cfg.d_in}) does not fit the model "
                          f"({model.cfg.n_layers} layers, d_model {model.cfg.d_model})")
    device = model.embed.weight.device
    feats = torch.arange(tc.cfg.d_sae) if features is None else torch.as_tensor(features, dtype=torch.long)
    if len(feats) == 0 or feats.min() < 0 or feats.max() >= tc.cfg.d_sae:
        raise MinisvError(f"features must be ids in 0..{tc.cfg.d_sae - 1}")
    feats = feats.to(device)
    n_feat, T = len(feats), rows.shape[1]
    before, after = window
    W = before + 1 + after
    hook = f"blocks.{tc.cfg.layer}.ln2.hook_normalized"
    top = (torch.zeros(k, n_feat, device=device), torch.zeros(k, n_feat, dtype=torch.long, device=device),
           torch.zeros(k, n_feat, W, device=device))               # (activation, global token, window activations)
    sample = (torch.full((samples, n_feat), -1.0, device=device),
              torch.zeros(samples, n_feat, dtype=torch.long, device=device),
              torch.zeros(samples, n_feat, W, device=device))      # (random key, global token, window)
    fired = torch.zeros(n_feat, device=device)
    hist, hist_top = torch.zeros(n_feat, BINS, device=device), torch.zeros(n_feat, device=device)
    gen = torch.Generator(device).manual_seed(seed)
    batch_rows, n_tokens = batch_rows or max(1, 2 ** 24 // (T * tc.cfg.d_sae)), 0
    for i in range(0, len(rows), batch_rows):
        tokens = rows[i:i + batch_rows].to(device)
        _, cache = model.run_with_cache(tokens, names=[hook], stop_at_layer=tc.cfg.layer + 1)
        f = tc.dense(*tc.encode(cache[hook]))[..., feats].float()                # [R, T, n_feat]
        if bos_id is not None:
            f[tokens == bos_id] = 0
        n_tokens += int((tokens != bos_id).sum()) if bos_id is not None else tokens.numel()
        flat = f.flatten(0, 1)                                                  # token n of the batch = row·T + pos
        fired += (flat > 0).sum(0)
        _histogram(hist, hist_top, flat)
        padded = F.pad(f, (0, 0, before, after))                                # [R, T + W - 1, n_feat]

        def windows(idx):    # batch token indices [m, n_feat] -> each feature's activations around them [m, n_feat, W]
            return padded[(idx // T)[..., None], (idx % T)[..., None] + torch.arange(W, device=device),
                          torch.arange(n_feat, device=device)[None, :, None]]
        values, idx = flat.topk(min(k, len(flat)), dim=0)
        top = _merge(top, values, idx + i * T, windows(idx))
        keys = torch.rand(flat.shape, generator=gen, device=device).masked_fill(flat <= 0, -1.0)
        keys, idx = keys.topk(min(samples, len(flat)), dim=0)
        sample = _merge(sample, keys, idx + i * T, windows(idx))
        if log is not None:
            log(f"dashboards: {min(i + batch_rows, len(rows))}/{len(rows)} rows")
    if features is None:
        live = feats[fired > 0]
        if max_features is not None and len(live) > max_features:
            pick = torch.randperm(len(live), generator=torch.Generator().manual_seed(seed))[:max_features]
            live = live[pick.sort().values.to(device)]
        keep = torch.searchsorted(feats, live)
    else:
        keep = torch.arange(n_feat, device=device)
    out = []
    top_keys, top_ex = _examples(rows, top, keep, window)
    sample_keys, sample_ex = _examples(rows, sample, keep, window)
    for j, count, h, h_top, tk, te, sk, se in zip(feats[keep].tolist(), fired[keep].tolist(),
                                                   hist[keep].long().tolist(), hist_top[keep].tolist(),
                                                   top_keys, top_ex, sample_keys, sample_ex):
        sampled = sorted((e for key, e in zip(sk, se) if key >= 0), key=lambda e: -e[1][before])
        out.append({"id": j, "freq": count / max(n_tokens, 1), "max": tk[0], "hist": h, "hist_top": h_top,
                    "top": [e for key, e in zip(tk, te) if key > 0],
                    "bands": _bands(sampled, bands, per_band, before)})
    _add_weight_views(model, tc, out)
    return {"layer": tc.cfg.layer, "model": tc.cfg.model, "d_sae": tc.cfg.d_sae, "tokens": n_tokens,
            "live": int((fired > 0).sum()), "tracked": n_feat, "window": [before, after], "features": out}


def _merge(buffer, keys, tokens, windows):
    """Keep, per feature (column), the len(buffer) largest keys of the buffer and a batch's candidates."""
    keys_all = torch.cat([buffer[0], keys])
    order = keys_all.topk(len(buffer[0]), dim=0).indices
    return (keys_all.gather(0, order), torch.cat([buffer[1], tokens]).gather(0, order),
            torch.cat([buffer[2], windows]).gather(0, order[..., None].expand(-1, -1, windows.shape[-1])))


def _histogram(counts, top, acts):
    """Add the positive activations acts [N, n_feat] to per-feature histograms counts [n_feat, BINS] over
    [0, top). top is a power of two; when a larger activation arrives, neighbouring bins merge pairwise and top
    doubles, so the histogram stays exact with a range that adapts to each feature."""
    batch_max = acts.max(0).values
    new = (top == 0) & (batch_max > 0)
    top[new] = 2.0 ** torch.ceil(torch.log2(batch_max[new]))
    while (grow := batch_max > top).any():
        c = counts[grow]
        counts[grow] = torch.cat([c[:, 0::2] + c[:, 1::2], torch.zeros_like(c[:, :BINS // 2])], 1)
        top[grow] *= 2
    token, feat = (acts > 0).nonzero(as_tuple=True)
    bins = (acts[token, feat] / top[feat] * BINS).long().clamp(max=BINS - 1)
    counts.view(-1).index_add_(0, feat * BINS + bins, torch.ones_like(bins, dtype=counts.dtype))


def _examples(rows, buffer, keep, window):
    """A buffer's entries for the kept features as nested lists: keys [n][m], and examples [n][m], each
    [token ids of the window (−1 outside the row), activations, row, position]."""
    keys, tokens, acts = (b[:, keep].transpose(0, 1) for b in buffer)                 # [n, m], [n, m], [n, m, W]
    before, after = window
    T = rows.shape[1]
    r, p = tokens // T, tokens % T
    padded = F.pad(rows.to(tokens.device), (before, after), value=-1)
    ids = padded[r[..., None], p[..., None] + torch.arange(before + 1 + after, device=tokens.device)]
    rows_of = zip(ids.tolist(), acts.round(decimals=4).tolist(), r.tolist(), p.tolist())
    return keys.tolist(), [[list(e) for e in zip(*per_feature)] for per_feature in rows_of]


def _bands(sampled, bands, per_band, center):
    """Split the random firing examples (sorted by activation, high to low) into `bands` equal-count groups, i.e.
    quantile bands of the activation distribution, and keep `per_band` evenly spaced ones from each."""
    out, n = [], len(sampled)
    bands = min(bands, n)
    for b in range(bands):
        group = sampled[b * n // bands:(b + 1) * n // bands]
        out.append({"lo": group[-1][1][center], "hi": group[0][1][center],
                    "examples": [group[i * len(group) // per_band] for i in range(min(per_band, len(group)))]})
    return out


def _add_weight_views(model, tc, features, n=8, chunk=256):
    """The input-invariant part: top de-embedded tokens, and the logits each feature promotes / suppresses."""
    vocab = model.tokenizer.vocab_size if model.tokenizer is not None else model.cfg.vocab_size
    for i in range(0, len(features), chunk):
        part = features[i:i + chunk]
        ids = torch.tensor([f["id"] for f in part], device=tc.W_enc.device)
        de = circuits.de_embed(model, circuits.feature_direction(model, tc, ids))[:, :vocab]
        logits = circuits.logit_effects(model, tc, ids)[:, :vocab]
        for key, (values, tokens) in (("de_embed", de.topk(n)), ("promote", logits.topk(n)),
                                      ("suppress", (-logits).topk(n))):
            sign = -1 if key == "suppress" else 1
            for f, v, t in zip(part, values.tolist(), tokens.tolist()):
                f[key] = [[a, round(sign * b, 4)] for a, b in zip(t, v)]


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
    SVG (blue edges push the target up, red down; width ∝ |value|) and the path tree as text."""
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
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{acc + 20}" height="{top + NODE_H + 64}" '
            f'font-family="system-ui,sans-serif">{"".join(parts)}</svg>')


def _level(n):
    """Depth in the model: embeddings 0, attention l at 1 + 2l, MLP l at 2 + 2l, logits last."""
    return {"embed": 0, "pos": 0, "head": 1 + 2 * n["layer"], "logit": 10 ** 6}.get(n["kind"], 2 + 2 * n["layer"])


def _short(n):
    k, l, i = n["kind"], n["layer"], n["index"]
    return {"feature": f"mlp{l} #{i}", "head": f"attn{l}.{i} ←{n['at']}", "skip": f"mlp{l} skip",
            "logit": "logit"}.get(k, k)


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


def svg_chart(series, xlabel, ylabel, title="", log_x=False, log_y=False, y_range=None, width=460, height=260) -> str:
    """A line chart with markers as inline SVG: series {name: [(x, y), ...]}, one color each, axes with 5 ticks
    (log10 axes tick at powers of ten; x values that are all Python ints, at most MAX_INT_TICKS of them, such as
    layer numbers, get one tick each), the y axis over the data or over y_range=(low, high); hovering a marker
    shows its values. Non-finite points are left out."""
    tx = (lambda v: math.log10(v)) if log_x else float
    ty = (lambda v: math.log10(v)) if log_y else float
    pts = {name: [(tx(x), ty(y)) for x, y in p if _plottable(x, log_x) and _plottable(y, log_y)]
           for name, p in series.items()}
    every = [q for p in pts.values() for q in p] or [(0.0, 0.0)]
    (x0, x1), (y0, y1) = [(min(v), max(v)) if max(v) > min(v) else (min(v) - 1, max(v) + 1) for v in zip(*every)]
    if y_range is not None:
        y0, y1 = ty(y_range[0]), ty(y_range[1])
    left, right, top, bottom = 58, 12, 24, 40
    X = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)
    Y = lambda v: height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)
    parts = [f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
             f'<path d="M{left},{top}V{height - bottom}H{width - right}" stroke="#888" fill="none"/>']
    # ticks: value labels in data units (10^v on log axes). x given as a few integers (layers): one tick at
    # each, not at 2, 3.5, 5, ...; otherwise 5 evenly spaced, as on the y axis.
    xs = sorted({x for p in pts.values() for x, _ in p})
    integers = all(isinstance(x, int) and not isinstance(x, bool) for p in series.values() for x, _ in p)
    evenly = [x0 + (x1 - x0) * i / 4 for i in range(5)]
    x_ticks = xs if integers and not log_x and 0 < len(xs) <= MAX_INT_TICKS else evenly
    parts += [f'<text x="{X(vx):.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="10">'
              f'{_tick(vx, log_x)}</text>' for vx in x_ticks]
    parts += [f'<text x="{left - 4}" y="{Y(vy) + 3:.1f}" text-anchor="end" font-size="10">{_tick(vy, log_y)}</text>'
              for vy in (y0 + (y1 - y0) * i / 4 for i in range(5))]
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle" font-size="11">'
                 f'{html.escape(xlabel)}</text><text x="12" y="{(top + height - bottom) / 2}" font-size="11" '
                 f'text-anchor="middle" transform="rotate(-90 12 {(top + height - bottom) / 2})">'
                 f'{html.escape(ylabel)}</text>')
    for i, (name, p) in enumerate(pts.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{X(x):.1f},{Y(y):.1f}" for j, (x, y) in enumerate(p))
        parts.append(f'<path d="{path}" stroke="{color}" fill="none" stroke-width="1.5"/>' if p else "")
        parts += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.5" fill="{color}"><title>{html.escape(name)}: '
                  f'{_tick(x, log_x)}, {_tick(y, log_y)}</title></circle>' for x, y in p]
        parts.append(f'<text x="{width - right - 4}" y="{top + 12 + 13 * i}" text-anchor="end" font-size="10" '
                     f'fill="{color}">{html.escape(name)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="system-ui,sans-serif">{"".join(parts)}</svg>')


def _plottable(v, log):
    return v is not None and math.isfinite(v) and (v > 0 or not log)


def _tick(v, log):
    return f"{10 ** v:.3g}" if log else f"{v:.3g}"


def _freq_histogram_svg(hist, title, width=460, height=200):
    """Bars: live latents per decade of firing frequency ([1e-8, 1e-7), ..., [0.1, 1]), a log10 x axis."""
    edges, counts = hist["log10_edges"], hist["counts"]
    left, bottom, top = 40, 36, 24
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
        layers     [dict(layer, loss, iters, stop, norm, resid_norm, rates={column: fraction})], one per vector
        columns    [str] generation column names
        rows       [dict(prompt, texts=[(generation, success: bool) per column], note=str)]
    With more than one layer the page also plots held-out success against the layer (inline SVG)."""
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


def steering_study_html(page) -> str:
    """The HTML page of an `optimize_sv.py --study` run. page: dict with
        title      the page title
        about      [str] lines on the setup, the first measurements and the verdicts
        sections   [dict(heading, table=dict(head, rows), charts=[dict(series, xlabel, ylabel, title, y_range=None)],
                   examples=dict(head, rows))]: text tables, and charts drawn with svg_chart
        notes      [str] what the judges are, what could not be reproduced
    Every text is HTML-escaped here; charts are inline SVG, so the page needs no network."""
    e = html.escape

    def table(t, cls=""):
        head = "".join(f"<th>{e(str(h))}</th>" for h in t["head"])
        rows = "".join("<tr>" + "".join(f"<td{cls}>{e(str(c))}</td>" for c in row) + "</tr>" for row in t["rows"])
        return f"<table><tr>{head}</tr>{rows}</table>"
    body = "".join(f"<p class='meta'>{e(line)}</p>" for line in page["about"])
    for s in page["sections"]:
        plots = "".join(svg_chart(c["series"], c["xlabel"], c["ylabel"], title=c["title"], y_range=c.get("y_range"))
                        for c in s["charts"])
        body += (f"<h2>{e(s['heading'])}</h2>" + table(s["table"], " class='num'") + f"<div>{plots}</div>" +
                 f"<h2>examples: {e(s['heading'])}</h2>" + table(s["examples"], " class='gen'"))
    if not page["sections"]:
        body += "<p>no steering was run (see above)</p>"
    body += "".join(f"<p class='meta'>{e(line)}</p>" for line in page["notes"])
    return _page(page["title"], body + "<style>.gen{white-space:pre-wrap;max-width:22em;vertical-align:top;"
                                       "border:1px solid #ddd;font-size:12.5px}</style>")
