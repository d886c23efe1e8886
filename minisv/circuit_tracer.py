"""circuit-tracer's files: its transcoder layouts (a cross-layer transcoder, a per-layer set) and its graph JSON,
which the circuit-tracer and Neuronpedia frontends open (`docs/methods.md` §4.3).

    CLT            config.yaml (model_kind: cross_layer_transcoder, feature_input_hook, feature_output_hook)
                   W_enc_{l}.safetensors: W_enc_{l} [F, d], b_enc_{l} [F], b_dec_{l} [d], threshold_{l} [F] (JumpReLU)
                   W_dec_{l}.safetensors: W_dec_{l} [F, L − l, d], layer l's features into every layer from l on
                   (beyond a shorter window: zeros; minisv stores the same numbers by target layer)
    per-layer set  config.yaml (model_kind: transcoder_set, ...) + layer_{l}.safetensors: W_enc [F, d], b_enc,
                   W_dec [F, d], b_dec, activation_function.threshold [F] (JumpReLU), W_skip [d, d] (x W_skipᵀ)

circuit-tracer runs JumpReLU (with a threshold) or ReLU coders; its CLTs have no TopK and no skip path, and its
per-layer TopK takes the top k of the raw pre-activations where minisv's ReLUs them: such coders are refused in
one line rather than written as a different map. Its Llama coders read `mlp.hook_in`, the MLP input *after* the
norm's gain γ (and bias β), where minisv's read x̂ before it: with x_in = γ⊙x̂ + β, a read x̂·w + b is
x_in·(w/γ) + (b − β·(w/γ)), so the gain is divided out on writing and multiplied back on reading (a γ with a
zero refuses). A coder reading the residual before the norm (`hook_resid_mid`) has no such map and is refused.
"""
import os

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, write_text
from .clt import CLTConfig, CrossLayerTranscoder
from .errors import MinisvError
from .graph import prune

GAINED, NORMALIZED, OUTPUTS = "mlp.hook_in", "ln2.hook_normalized", ("mlp.hook_out", "hook_mlp_out")


# ------------------------------------------------------------------------- transcoders
def save(clt: CrossLayerTranscoder, path, model):
    """Write `clt` in circuit-tracer's layout into the directory `path`: a window-1 CLT as a per-layer set, any
    other as a CLT, reading `mlp.hook_in` (the gain of `model`'s MLP norms divided out)."""
    cfg = clt.cfg
    if cfg.architecture == "topk" or (cfg.skip and cfg.window != 1):
        raise MinisvError(f"circuit-tracer has no form of a {cfg.architecture} {'CLT' if cfg.window != 1 else 'set'}"
                          f"{' with a skip path' if cfg.skip else ''}: it runs JumpReLU and ReLU coders (per-layer "
                          f"sets may skip); train one with --arch jumprelu, or use minisv's own graphs")
    W_enc, b_enc, shift = _to_gained(clt, model)
    b_dec = clt.b_dec.detach().float().cpu() - shift
    os.makedirs(path, exist_ok=True)
    kind = "transcoder_set" if cfg.window == 1 else "cross_layer_transcoder"
    for l in range(cfg.n_layers):
        if kind == "transcoder_set":
            tensors = {"W_enc": W_enc[l], "b_enc": b_enc[l], "W_dec": clt.W_dec[l][0], "b_dec": b_dec[l]}
            if cfg.skip:
                tensors["W_skip"] = (clt.W_skip[l].detach().float().cpu() / _gain(model, l)[:, None]).T
            if cfg.architecture == "jumprelu":
                tensors["activation_function.threshold"] = clt.log_threshold[l].exp()
            _write(path, f"layer_{l}.safetensors", tensors)
            continue
        tensors = {f"W_enc_{l}": W_enc[l], f"b_enc_{l}": b_enc[l], f"b_dec_{l}": b_dec[l]}
        if cfg.architecture == "jumprelu":
            tensors[f"threshold_{l}"] = clt.log_threshold[l].exp()
        _write(path, f"W_enc_{l}.safetensors", tensors)
        W_dec = torch.stack([clt.decoder(l, slice(None), t) for t in range(l, cfg.n_layers)], 1)   # [F, L − l, d]
        _write(path, f"W_dec_{l}.safetensors", {f"W_dec_{l}": W_dec})
    write_text(os.path.join(path, "config.yaml"), f"model_kind: {kind}\nfeature_input_hook: {GAINED}\n"
                                                  f"feature_output_hook: mlp.hook_out\nscan: minisv/{cfg.model}\n")


def load(path, model) -> CrossLayerTranscoder:
    """A circuit-tracer CLT or per-layer set (as a window-1 CLT) from the directory `path`, for `model`."""
    config = _read_config(path)
    kind, hook_in, hook_out = (config.get(k) for k in ("model_kind", "feature_input_hook", "feature_output_hook"))
    if kind not in ("cross_layer_transcoder", "transcoder_set") or hook_in not in (GAINED, NORMALIZED) or \
            hook_out not in OUTPUTS or config.get("activation") not in (None, "relu", "jumprelu"):
        raise MinisvError(f"{path}/config.yaml: a {kind} reading {hook_in} into {hook_out} with activation "
                          f"{config.get('activation')!r}; minisv reads CLTs and transcoder sets of {GAINED} or "
                          f"{NORMALIZED} into mlp.hook_out, JumpReLU or ReLU")
    L = model.cfg.n_layers
    tensors = [_per_layer(path, kind, l) for l in range(L)]
    W_enc = torch.stack([t["W_enc"] for t in tensors])
    F, d = W_enc.shape[1:]
    jump = "threshold" in tensors[0]
    skip = "W_skip" in tensors[0]
    clt = CrossLayerTranscoder(CLTConfig(L, d, F, "jumprelu" if jump else "relu", window=1 if kind == "transcoder_set"
                                         else 0, skip=skip, model=str(config.get("scan", ""))))
    gains = torch.stack([_gain(model, l) for l in range(L)]) if hook_in == GAINED else torch.ones(L, d)
    betas = torch.stack([_beta(model, l) for l in range(L)]) if hook_in == GAINED else torch.zeros(L, d)
    with torch.no_grad():         # x_in·w + b = x̂·(γ⊙w) + (b + β·w)
        clt.W_enc.copy_(W_enc * gains[:, None])
        clt.b_enc.copy_(torch.stack([t["b_enc"] for t in tensors]) + torch.einsum("lfd,ld->lf", W_enc, betas))
        b_dec = torch.stack([t["b_dec"] for t in tensors])
        for l, t in enumerate(tensors):
            clt.W_dec[l].copy_(torch.stack([tensors[s]["W_dec"][:, l - s] for s in clt.cfg.sources(l)]))
            if skip:              # x_in W_skipᵀ = x̂ (γ ⊙ W_skipᵀ) + β W_skipᵀ
                clt.W_skip[l].copy_(gains[l][:, None] * t["W_skip"].T)
                b_dec[l] += betas[l] @ t["W_skip"].T
        clt.b_dec.copy_(b_dec)
        if jump:
            clt.log_threshold.copy_(torch.stack([t["threshold"] for t in tensors]).clamp(min=1e-30).log())
    return clt


def _to_gained(clt, model):
    """(W_enc [L, F, d], b_enc [L, F], b_dec shift [L, d]) reading x_in = γ⊙x̂ + β instead of x̂."""
    gains = torch.stack([_gain(model, l) for l in range(clt.cfg.n_layers)])
    if (gains == 0).any():
        raise MinisvError("a norm gain is 0: a coder of the normalized MLP input has no form on the gained input "
                          "circuit-tracer reads")
    betas = torch.stack([_beta(model, l) for l in range(clt.cfg.n_layers)])
    W = clt.W_enc.detach().float() / gains[:, None]
    b = clt.b_enc.detach().float() - torch.einsum("lfd,ld->lf", W, betas)
    shift = torch.stack([betas[l] / gains[l] @ clt.W_skip[l].detach().float() if clt.W_skip is not None else
                         torch.zeros(clt.cfg.d_model) for l in range(clt.cfg.n_layers)])
    return W, b, shift


def _gain(model, layer):
    return model.blocks[layer].ln2.weight.detach().float().cpu()


def _beta(model, layer):
    ln = model.blocks[layer].ln2
    return ln.bias.detach().float().cpu() if ln.bias is not None else torch.zeros(model.cfg.d_model)


def _write(path, name, tensors):
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(os.path.join(path, name), lambda tmp: save_file(tensors, tmp))


def _per_layer(path, kind, l):
    """Layer l's tensors under minisv's names: W_enc [F, d], b_enc, W_dec [F, n, d], b_dec, threshold, W_skip."""
    if kind == "transcoder_set":
        t = _read(path, f"layer_{l}.safetensors")
        out = {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"][:, None], "b_dec": t["b_dec"]}
        names = {"activation_function.threshold": "threshold", "W_skip": "W_skip"}
    else:
        t = _read(path, f"W_enc_{l}.safetensors") | _read(path, f"W_dec_{l}.safetensors")
        out = {"W_enc": t[f"W_enc_{l}"], "b_enc": t[f"b_enc_{l}"], "W_dec": t[f"W_dec_{l}"], "b_dec": t[f"b_dec_{l}"]}
        names = {f"threshold_{l}": "threshold"}
    return out | {new: t[old] for old, new in names.items() if old in t}


def _read(path, name):
    try:
        return {k: v.float() for k, v in load_file(os.path.join(path, name)).items()}
    except Exception as e:
        raise MinisvError(f"cannot read {os.path.join(path, name)} ({str(e).splitlines()[0][:160]}); is the "
                          f"directory a circuit-tracer transcoder for this model?") from None


def _read_config(path):
    """The flat `key: value` lines of circuit-tracer's config.yaml (lists, e.g. of transcoder files, are skipped)."""
    try:
        with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MinisvError(f"cannot read {path}/config.yaml ({e}); is it a circuit-tracer transcoder directory?") \
            from None
    pairs = (line.split(":", 1) for line in lines if ":" in line and not line.startswith((" ", "-", "#")))
    return {k.strip(): v.strip().strip("'\"") or None for k, v in pairs}


def is_layout(path):
    return os.path.isfile(os.path.join(str(path), "config.yaml"))


# ------------------------------------------------------------------------- graph JSON
def graph_json(graph, tokenizer, slug="graph", node_threshold=0.8, edge_threshold=0.98, scan="minisv"):
    """The graph pruned as circuit-tracer prunes it, in its JSON: {metadata, qParams, nodes, links}, node ids as
    circuit-tracer forms them (features "layer_feature_position", errors "0_layer_position", tokens
    "E_token_position", logits "{L+1}_token_{T−1}")."""
    nodes, edges, cumulative = prune(graph, node_threshold, edge_threshold)
    ids, out = _node_ids(graph), []
    text = [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in graph.tokens]
    for i in nodes.nonzero()[:, 0].tolist():
        out.append(_node(graph, i, ids[i], float(cumulative[i]), tokenizer))
    kept = {n["node_id"] for n in out}
    links = [{"source": ids[s], "target": ids[t], "weight": float(graph.adjacency[t, s])}
             for t, s in edges.nonzero().tolist() if ids[s] in kept and ids[t] in kept]
    used = {x for link in links for x in (link["source"], link["target"])}
    out = [n for n in out if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")]
    return {"metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": text,
                         "prompt": "".join(text), "node_threshold": node_threshold, "schema_version": 1},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": out, "links": links}


def _node_ids(graph):
    L, T = graph.n_layers, len(graph.tokens)
    ids = [f"{l}_{f}_{p}" for l, p, f in graph.features.tolist()]
    ids += [f"0_{l}_{p}" for l in range(L) for p in range(T)]
    ids += [f"E_{t}_{p}" for p, t in enumerate(graph.tokens)]
    return ids + [f"{L + 1}_{k}_{T - 1}" for k in graph.logit_ids.tolist()]


def _node(graph, i, node_id, influence, tokenizer):
    n_f, L, T = graph.n_features, graph.n_layers, len(graph.tokens)
    base = {"node_id": node_id, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "clerp": "", "influence": influence, "activation": None}
    if i < n_f:
        l, p, f = graph.features[i].tolist()
        return base | {"feature": (l + f) * (l + f + 1) // 2 + f, "layer": str(l), "ctx_idx": p,
                       "feature_type": "cross layer transcoder", "jsNodeId": f"{l}_{f}-0",
                       "activation": float(graph.activations[i])}
    if i < n_f + graph.n_errors:
        l, p = divmod(i - n_f, T)
        return base | {"feature": -1, "layer": str(l), "ctx_idx": p, "feature_type": "mlp reconstruction error",
                       "jsNodeId": f"{l}_{p}-0"}
    if i < n_f + graph.n_errors + T:
        p = i - n_f - graph.n_errors
        return base | {"feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding",
                       "jsNodeId": f"E_{graph.tokens[p]}-{p}"}
    rank = i - (len(graph.adjacency) - len(graph.logit_ids))
    k, prob = int(graph.logit_ids[rank]), float(graph.logit_probs[rank])
    word = tokenizer.decode([k]) if tokenizer is not None else str(k)
    return base | {"feature": k, "layer": str(L + 1), "ctx_idx": T - 1, "feature_type": "logit", "token_prob": prob,
                   "is_target_logit": rank == 0, "jsNodeId": f"L_{k}-{T - 1}", "influence": None,
                   "clerp": f'Output "{word}" (p={prob:.3f})'}

