"""Feature dashboards: what each transcoder feature reads and writes, gathered in one pass over a corpus
(`docs/methods.md` §2.6).

A dashboard shows, per feature, its top-activating contexts with per-token activations, contexts sampled from
quantile bands of its activation distribution (what it does at typical strength, not only at its peak), a
histogram of its activations, its firing frequency, the tokens whose embeddings activate it directly
(de-embedding, W_E·W_enc) and the logits its output promotes and suppresses (W_U·W_dec).

Memory does not grow with the corpus: per feature `_Running` keeps buffers, merged batch by batch with
`torch.topk`, of the k largest activations and of a uniform random sample of its firing tokens (a random key per
token, keep the largest keys), each with the feature's activations in a window around the token; and an exact
histogram whose range doubles when needed. `minisv.report.dashboards_html` draws the page.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import circuits
from .clt import CrossLayerTranscoder
from .errors import MinisvError
from .progress import progress

BINS = 32


@dataclass(frozen=True)
class DashboardConfig:
    features: tuple | None = None   # feature ids to report (None: every live one, or a sample of max_features)
    max_features: int | None = None  # report a seeded random sample of this many live features
    k: int = 10                     # top-activating contexts per feature
    samples: int = 24               # random firing tokens kept per feature ...
    bands: int = 4                  # ... split into this many activation-quantile bands ...
    per_band: int = 3               # ... of which this many are shown
    window: tuple = (12, 3)         # tokens shown before and after each context's token
    bos_id: int | None = None       # positions holding this token are skipped
    seed: int = 0
    batch_rows: int | None = None   # rows per forward (None: as many as keep [tokens, d_sae] near 16M numbers)


@torch.no_grad()
def collect_dashboards(model, tc, rows, cfg=DashboardConfig()) -> dict:
    """Dashboard data for transcoder `tc` over token rows [N, T]."""
    if not 0 <= tc.cfg.layer < model.cfg.n_layers or tc.cfg.d_in != model.cfg.d_model:
        raise MinisvError(f"this transcoder (layer {tc.cfg.layer}, d_in {tc.cfg.d_in}) does not fit the model "
                          f"({model.cfg.n_layers} layers, d_model {model.cfg.d_model})")
    device = model.embed.weight.device
    feats = torch.arange(tc.cfg.d_sae) if cfg.features is None else torch.as_tensor(cfg.features, dtype=torch.long)
    if len(feats) == 0 or feats.min() < 0 or feats.max() >= tc.cfg.d_sae:
        raise MinisvError(f"features must be ids in 0..{tc.cfg.d_sae - 1}")
    feats = feats.to(device)
    run = _Running(len(feats), cfg, device)
    hook, T = tc.sites(tc.cfg.layer)[0], rows.shape[1]
    batch_rows = cfg.batch_rows or max(1, 2 ** 24 // (T * tc.cfg.d_sae))
    for i in progress(range(0, len(rows), batch_rows), "dashboards", unit=" batches"):
        tokens = rows[i:i + batch_rows].to(device)
        _, cache = model.run_with_cache(tokens, names=[hook], stop_at_layer=tc.cfg.layer + 1)
        f = tc.dense(*tc.encode(cache[hook]))[..., feats].float()                # [R, T, n_feat]
        keep = tokens != cfg.bos_id if cfg.bos_id is not None else torch.ones_like(tokens, dtype=torch.bool)
        run.add(f * keep[..., None], i * T, int(keep.sum()))
    kept = _kept(feats, run.fired, cfg)
    out = run.features(rows, feats, kept)
    _add_weight_views(model, tc, out)
    return {"layer": tc.cfg.layer, "model": tc.cfg.model, "d_sae": tc.cfg.d_sae, "tokens": run.n_tokens,
            "live": int((run.fired > 0).sum()), "tracked": len(feats), "window": list(cfg.window), "features": out}


def _kept(feats, fired, cfg):
    """Positions in `feats` to report: all the requested ones, or the live ones (a seeded sample of them)."""
    if cfg.features is not None:
        return torch.arange(len(feats), device=feats.device)
    live = feats[fired > 0]
    if cfg.max_features is not None and len(live) > cfg.max_features:
        pick = torch.randperm(len(live), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_features]
        live = live[pick.sort().values.to(feats.device)]
    return torch.searchsorted(feats, live)


class _Running:
    """Everything a dashboard keeps while the corpus streams by, for n features."""

    def __init__(self, n, cfg, device):
        self.cfg, W = cfg, cfg.window[0] + 1 + cfg.window[1]
        self.top = (torch.zeros(cfg.k, n, device=device), torch.zeros(cfg.k, n, dtype=torch.long, device=device),
                    torch.zeros(cfg.k, n, W, device=device))          # (activation, global token, window activations)
        self.sample = (torch.full((cfg.samples, n), -1.0, device=device),
                       torch.zeros(cfg.samples, n, dtype=torch.long, device=device),
                       torch.zeros(cfg.samples, n, W, device=device))  # (random key, global token, window)
        self.fired, self.n_tokens = torch.zeros(n, device=device), 0
        self.hist, self.hist_top = torch.zeros(n, BINS, device=device), torch.zeros(n, device=device)
        self.gen = torch.Generator(device).manual_seed(cfg.seed)

    def add(self, f, first, n_tokens):
        """A batch's activations f [R, T, n] (0 where skipped); its first token is global token `first`."""
        (before, after), (R, T, n) = self.cfg.window, f.shape
        W = before + 1 + after
        flat = f.flatten(0, 1)                                                  # token m of the batch = row·T + pos
        self.n_tokens += n_tokens
        self.fired += (flat > 0).sum(0)
        _histogram(self.hist, self.hist_top, flat)
        padded = F.pad(f, (0, 0, before, after))                                # [R, T + W - 1, n]

        def windows(idx):    # batch token indices [m, n] -> each feature's activations around them [m, n, W]
            return padded[(idx // T)[..., None], (idx % T)[..., None] + torch.arange(W, device=f.device),
                          torch.arange(n, device=f.device)[None, :, None]]
        values, idx = flat.topk(min(self.cfg.k, len(flat)), dim=0)
        self.top = _merge(self.top, values, idx + first, windows(idx))
        keys = torch.rand(flat.shape, generator=self.gen, device=f.device).masked_fill(flat <= 0, -1.0)
        keys, idx = keys.topk(min(self.cfg.samples, len(flat)), dim=0)
        self.sample = _merge(self.sample, keys, idx + first, windows(idx))

    def features(self, rows, feats, kept):
        """One dict per kept feature: id, frequency, max, histogram, top contexts and quantile bands."""
        before, out = self.cfg.window[0], []
        top_keys, top_ex = _examples(rows, self.top, kept, self.cfg.window)
        sample_keys, sample_ex = _examples(rows, self.sample, kept, self.cfg.window)
        for j, count, h, h_top, tk, te, sk, se in zip(feats[kept].tolist(), self.fired[kept].tolist(),
                                                       self.hist[kept].long().tolist(), self.hist_top[kept].tolist(),
                                                       top_keys, top_ex, sample_keys, sample_ex):
            sampled = sorted((e for key, e in zip(sk, se) if key >= 0), key=lambda e: -e[1][before])
            out.append({"id": j, "freq": count / max(self.n_tokens, 1), "max": tk[0], "hist": h, "hist_top": h_top,
                        "top": [e for key, e in zip(tk, te) if key > 0],
                        "bands": _bands(sampled, self.cfg.bands, self.cfg.per_band, before)})
        return out


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




@torch.no_grad()
def graph_contexts(model, coder, rows, nodes, k=5, window=(8, 2)):
    """For an attribution graph's JSON `nodes`: the top-k activating contexts over token rows [N, T] of each feature
    node's feature, {"layer_feature": [[window token ids], [activations], row, position], ...}, the token strings
    they use, {id: str}, and where in a window its token sits ("before"). coder: what `minisv.graph.attribute`
    took (a CLT or a per-layer set)."""
    clt = coder if isinstance(coder, CrossLayerTranscoder) else \
        CrossLayerTranscoder.from_transcoders(coder, model.cfg.n_layers)
    feats = sorted({tuple(map(int, n["node_id"].split("_")[:2])) for n in nodes
                    if n["feature_type"] == "cross layer transcoder"})
    if not feats:
        return {"contexts": {}, "strings": {}, "before": window[0]}
    tok = model.tokenizer
    cfg = DashboardConfig(k=k, samples=0, window=window, bos_id=tok.bos_id if tok is not None else None)
    device, T = model.embed.weight.device, rows.shape[1]
    run, layers = _Running(len(feats), cfg, device), sorted({l for l, _ in feats})
    names = {l: f"blocks.{l}.{clt.cfg.hook_in}" for l in layers}
    for i in progress(range(0, len(rows), 8), "feature contexts", unit=" batches"):
        tokens = rows[i:i + 8].to(device)
        _, cache = model.run_with_cache(tokens, names=list(names.values()), stop_at_layer=max(layers) + 1)
        dense = {l: clt.dense(*clt.encode_layer(l, cache[names[l]].flatten(0, 1))).view(*tokens.shape, -1)
                 for l in layers}
        a = torch.stack([dense[l][..., f] for l, f in feats], -1).float()                     # [R, T, n]
        keep = tokens != cfg.bos_id if cfg.bos_id is not None else torch.ones_like(tokens, dtype=torch.bool)
        run.add(a * keep[..., None], i * T, int(keep.sum()))
    keys, examples = _examples(rows, run.top, torch.arange(len(feats), device=device), window)
    contexts = {f"{l}_{f}": [e for key, e in zip(ks, ex) if key > 0] for (l, f), ks, ex in zip(feats, keys, examples)}
    ids = {i for ex in contexts.values() for e in ex for i in e[0] if i >= 0}
    return {"contexts": contexts, "strings": {i: tok.token_str(i) if tok is not None else str(i) for i in ids},
            "before": window[0]}
