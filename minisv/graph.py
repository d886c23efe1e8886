"""Attribution graphs: a prompt's next-token prediction traced through the features of every layer (Ameisen et
al. 2025, "Circuit Tracing", as circuit-tracer computes it; `docs/methods.md` §4.2).

Take the prompt's forward pass and freeze its attention patterns and norm scales. With a cross-layer transcoder
(or a set of per-layer transcoders, the window-1 case) standing in for the MLPs, and each MLP's error
(mlp_out − reconstruction) kept as a constant, everything written into the residual stream is linear in the
*nodes* of the graph:

    features   (layer, position, feature): the active features, each worth a·clt.decoder(layer, f, t) to MLP t
    errors     (layer, position): mlp_out − reconstruction, one per layer and position
    tokens     (position): the token's embedding
    logits     the most likely next tokens (by probability until 0.95, at most 10), each read as its logit minus
               the mean logit: v_k = W_U[k] − mean_j W_U[j] along ln_final's output at the last position

An edge A[target, source] is the source's direct effect on the target: for a feature target its pre-activation's
linear part W_enc[f]·x̂ (x̂ the MLP input before the norm's gain; b_enc is a bias term), for a logit target
v_k·ln_final(x). Direct means through the frozen linear model only: residual additions, attention with frozen
patterns (the OV circuits, `pullbacks.ov`), frozen norm scales (`pullbacks.through_scale`) and skip paths — never
through another feature. `attribute` computes every edge exactly with one backward sweep of all targets at
once, top to bottom: at each layer the targets' gradient G [n, T, d] with respect to the residual stream gives
the edges from that layer's MLP output (G · a·W_dec for each feature writing there, G · error for the errors),
then is pulled through the layer's MLP skip path, its norm, and its attention. What no node carries (biases,
β of LayerNorms, decoder biases, everything at position 0) is the target's `bias`, so for every target
Σ_sources A[target, source] + bias[target] = value[target].

As in circuit-tracer, position 0 (BOS, the attention sink) has no feature nodes and a zero error; its MLP
outputs are part of the bias. Influence, pruning and the replacement / completeness scores follow
circuit-tracer's `graph.py`: with Ā the row-normalised |A| and w the logit probabilities, the influence of the
nodes on the logits is w·(Ā + Ā² + ...).
"""
from dataclasses import dataclass

import torch

from .clt import CrossLayerTranscoder
from .errors import MinisvError
from .progress import progress
from .pullbacks import centered, norm_scale, through_gain


@dataclass
class Graph:
    """Nodes in order [features | errors (layer-major: layer·T + position) | tokens | logits]; A's rows are
    targets, its columns sources."""
    tokens: list                 # the prompt's token ids [T]
    features: torch.Tensor       # [n_f, 3] (layer, position, feature id), sorted
    activations: torch.Tensor    # [n_f]
    logit_ids: torch.Tensor      # [n_l], most likely first
    logit_probs: torch.Tensor    # [n_l]
    adjacency: torch.Tensor      # [n, n]
    values: torch.Tensor         # [n] each target's value: pre-activation (features), demeaned logit (logits)
    bias: torch.Tensor           # [n] the part of each target's value that no node carries
    n_layers: int

    @property
    def n_features(self):
        return len(self.features)

    @property
    def n_errors(self):
        return self.n_layers * len(self.tokens)

    def logit_weights(self):
        """w [n]: the logit probabilities at the logit nodes, 0 elsewhere (influence starts from them)."""
        w = torch.zeros(len(self.adjacency), dtype=self.adjacency.dtype, device=self.adjacency.device)
        w[-len(self.logit_ids):] = self.logit_probs.to(w.dtype)
        return w


@torch.no_grad()
def attribute(model, coder, tokens, max_logits=10, logit_prob=0.95, dtype=torch.float32) -> Graph:
    """The attribution graph of `tokens` (ids, BOS first) for a CrossLayerTranscoder or {layer: Transcoder} set
    covering every layer, computed in `dtype` (float64 for exact checks)."""
    clt = coder if isinstance(coder, CrossLayerTranscoder) else \
        CrossLayerTranscoder.from_transcoders(coder, model.cfg.n_layers)
    if clt.cfg.hook_in != "ln2.hook_normalized" or clt.cfg.hook_out != "hook_mlp_out" or \
            clt.cfg.n_layers != model.cfg.n_layers or clt.cfg.d_model != model.cfg.d_model:
        raise MinisvError(f"attribution graphs need coders of every MLP ({model.cfg.n_layers} layers, d_model "
                          f"{model.cfg.d_model}) reading ln2.hook_normalized and writing hook_mlp_out; these read "
                          f"{clt.cfg.hook_in} of {clt.cfg.n_layers} layers, d_model {clt.cfg.d_model}")
    clt = clt.to(dtype)
    run = _Forward(model, clt, torch.as_tensor(tokens).flatten(), dtype)
    feats, acts, slots = run.active_features()
    logit_ids, probs = _logit_targets(run.logits, max_logits, logit_prob)
    n_f, n_e, T = len(feats), run.L * run.T, run.T
    n = n_f + n_e + T + len(logit_ids)
    A = torch.zeros(n, n, dtype=dtype)
    bias = torch.zeros(n, dtype=dtype)
    sweep = _Sweep(run, clt, feats, logit_ids, A, bias)
    for l in progress(reversed(range(run.L)), "attribution", total=run.L, unit=" layers"):
        sweep.layer(l, slots)
    sweep.embeddings(n_f + n_e)
    values = torch.zeros(n, dtype=dtype)
    l_, p_, f_ = feats.unbind(1) if n_f else (torch.empty(0, dtype=torch.long),) * 3
    values[:n_f] = (run.xhat2[l_, p_] * clt.W_enc[l_, f_]).sum(-1) + clt.b_enc[l_, f_]
    values[n - len(logit_ids):] = run.demeaned_logits(logit_ids)
    return Graph(run.tokens.tolist(), feats, acts, logit_ids, probs, A, values, bias, run.L)


class _Forward:
    """The prompt's clean forward, cached in `dtype`: per layer the MLP input x̂ (before the gain) and output, the
    residuals each norm reads (where its scale is frozen), the attention patterns; the final norm's input."""

    def __init__(self, model, clt, tokens, dtype):
        self.model, self.clt, self.tokens = model, clt, tokens.to(model.embed.weight.device)
        L, self.T, self.L = model.cfg.n_layers, len(tokens), model.cfg.n_layers
        mid = "hook_resid_pre" if model.cfg.parallel else "hook_resid_mid"
        names = ["hook_embed", f"blocks.{L - 1}.hook_resid_post"] + (["hook_pos_embed"] if model.pos_embed is not None
                                                                        else []) + \
            [f"blocks.{l}.{h}" for l in range(L) for h in ("hook_resid_pre", mid, "ln2.hook_normalized",
                                                          "hook_mlp_out", "attn.hook_pattern")]
        logits, cache = model.run_with_cache(self.tokens[None], names=names)
        c = {k: v[0].to(dtype) for k, v in cache.items()}
        self.logits = logits[0, -1].to(dtype)
        stack = lambda h: torch.stack([c[f"blocks.{l}.{h}"] for l in range(L)])
        self.embed, self.pos = c["hook_embed"], c.get("hook_pos_embed")
        self.resid_pre, self.resid_mid, self.xhat2 = stack("hook_resid_pre"), stack(mid), stack("ln2.hook_normalized")
        self.mlp_out, self.pattern = stack("hook_mlp_out"), stack("attn.hook_pattern")     # [L, T, d], [L, H, T, T]
        self.resid_final = c[f"blocks.{L - 1}.hook_resid_post"]

    def active_features(self):
        """(features [n_f, 3] sorted by (layer, position, feature), activations [n_f], slots): slots[l] holds
        layer l's code as (feature ids [T, m], activations [T, m], node index [T, m] or −1), padded with zeros.
        Position 0 has no features, as in circuit-tracer."""
        codes = [self.clt.dense(*self.clt.encode_layer(l, self.xhat2[l])) for l in range(self.L)]      # [T, F] each
        a = torch.stack(codes)                                                                         # [L, T, F]
        a[:, 0] = 0
        feats = (a > 0).nonzero()
        acts = a[tuple(feats.unbind(1))]
        node = torch.full(a.shape, -1, dtype=torch.long)
        node[tuple(feats.unbind(1))] = torch.arange(len(feats))
        m = max(1, int((a > 0).sum(-1).max()))
        slots = []
        for l in range(self.L):
            top = a[l].topk(m, dim=-1)
            slots.append((top.indices, top.values, node[l].gather(-1, top.indices)))
        self.skip = torch.einsum("ltd,lde->lte", self.xhat2, self.clt.W_skip) if self.clt.W_skip is not None \
            else torch.zeros_like(self.mlp_out)
        reconstruction = torch.stack([self.clt.decode_layer(t, codes, None) for t in range(self.L)]) + self.skip
        self.error = self.mlp_out - reconstruction
        self.error[:, 0] = 0
        return feats, acts, slots

    def demeaned_logits(self, ids):
        """v_k · ln_final(x) at the last position: logit k minus the mean logit (the unembedding has no bias)."""
        return self.logits[ids] - self.logits.mean()


def _logit_targets(logits, max_logits, logit_prob):
    """The most likely next tokens until their probability reaches logit_prob, at most max_logits (circuit-tracer's
    rule: the smallest prefix whose cumulative probability reaches it); probabilities not renormalised."""
    probs = logits.float().softmax(-1)
    top = probs.topk(min(max_logits, len(probs)))
    cut = int(torch.searchsorted(top.values.cumsum(0), torch.tensor(logit_prob))) + 1
    return top.indices[:cut], top.values[:cut]


class _Sweep:
    """The backward sweep of `attribute`: G [n_alive, T, d] is the gradient of the alive targets (those that read
    above the current layer, and the logits) with respect to the residual stream, carried from the top down."""

    def __init__(self, run, clt, feats, logit_ids, A, bias):
        self.run, self.clt, self.model, self.A, self.bias = run, clt, run.model, A, bias
        self.feats, self.n_f = feats, len(feats)
        self.n_targets = self.n_f + len(logit_ids)
        d, dtype = run.model.cfg.d_model, A.dtype
        # targets are rows [features sorted by layer | logits]; row i of G is target rows[lo + i]
        self.rows = torch.cat([torch.arange(self.n_f), torch.arange(len(A) - len(logit_ids), len(A))])
        self.G = torch.zeros(len(logit_ids), run.T, d, dtype=dtype)
        self.lo = self.n_f                      # G holds the targets rows[lo:]
        ln_f, model = run.model.ln_final, run.model
        v = model.unembed.weight[logit_ids].to(dtype) - model.unembed.weight.to(dtype).mean(0)      # [n_l, d]
        self.G[:, -1] = self._through_norm(through_gain(model, ln_f, v), run.resid_final[-1:])
        if ln_f.bias is not None:
            bias[len(A) - len(logit_ids):] += v @ ln_f.bias.to(dtype)

    def _through_norm(self, u, resid):
        """Reads u [..., T', d] of a norm's x̂ at positions with residuals resid [T', d], as reads of the residuals."""
        return centered(self.model, u) * norm_scale(self.model, resid)[..., None]

    def layer(self, l, slots):
        """Going down through block l: edges from MLP l's output, then the MLP's readers and the attention."""
        run, clt, G = self.run, self.clt, self.G
        self._edges_from_mlp(l, slots)
        block = self.model.blocks[l]
        xhat_read = G @ clt.W_skip[l].T if clt.W_skip is not None else torch.zeros_like(G)
        first = self.lo - int((self.feats[:self.lo, 0] == l).sum()) if self.n_f else self.lo
        if first < self.lo:                     # the features of layer l start reading here
            new = torch.zeros(self.lo - first, run.T, G.shape[-1], dtype=G.dtype)
            f = self.feats[first:self.lo]
            new[torch.arange(len(f)), f[:, 1]] = clt.W_enc[l, f[:, 2]]
            self.bias[first:self.lo] += clt.b_enc[l, f[:, 2]]
            xhat_read, G = torch.cat([new, xhat_read]), torch.cat([torch.zeros_like(new), G])
            self.lo = first
        ln2_input = run.resid_pre[l] if self.model.cfg.parallel else run.resid_mid[l]
        G_mid = G + self._through_norm(xhat_read, ln2_input)
        attn_input = G if self.model.cfg.parallel else G_mid        # parallel blocks: the MLP does not see attention
        self.G = G_mid + self._attention(l, block, attn_input)

    def _edges_from_mlp(self, l, slots):
        """A[alive, ·] for the nodes writing into MLP l's output: features of layers s ≤ l that reach l, and the
        error of layer l; position 0's whole MLP output and every decoder bias are bias terms."""
        run, clt, G, rows = self.run, self.clt, self.G, self.rows[self.lo:]
        for j, s in enumerate(clt.cfg.sources(l)):
            ids, acts, node = slots[s]                                               # [T, m]
            W = clt.W_dec[l][j][ids] * acts[..., None]                               # [T, m, d]
            edges = torch.einsum("ntd,tmd->ntm", G, W)                               # [n, T, m]
            keep = node >= 0
            self.A[rows[:, None], node[keep][None]] += edges[:, keep]
        errors = self.n_f + l * run.T + torch.arange(run.T)
        self.A[rows[:, None], errors[None]] = torch.einsum("ntd,td->nt", G, run.error[l])
        # position 0: all of the MLP output but its skip path (which the sweep carries through), a bias
        self.bias[rows] += G[:, 0] @ (run.mlp_out[l, 0] - run.skip[l, 0]) + G[:, 1:].sum(1) @ clt.b_dec[l]

    def _attention(self, l, block, G):
        """Reads G [n, T, d] of the attention output at each query, as reads of the residual stream the attention
        read (ln1's input), through the frozen pattern; the per-query constant (b_O, b_V, ln1's β through the
        pattern, whose rows sum to 1) goes to the bias."""
        cfg, attn, dtype = self.model.cfg, block.attn, G.dtype
        H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        w = torch.einsum("ntd,dhe->nthe", G, attn.o.weight.to(dtype).view(-1, H, E))          # W_O^hᵀ G
        z = torch.einsum("hqs,nqhe->nshe", self.run.pattern[l], w)                           # moved to sources
        W_V = attn.v.weight.to(dtype).view(K, E, -1).repeat_interleave(H // K, 0)             # [H, E, d]
        u = torch.einsum("nshe,hed->nsd", z, W_V)                                             # reads of ln1's output
        rows = self.rows[self.lo:]
        const = attn.o.bias.to(dtype) if attn.o.bias is not None else torch.zeros(cfg.d_model, dtype=dtype)
        if attn.v.bias is not None:
            const = const + attn.o.weight.to(dtype) @ attn.v.bias.to(dtype).view(K, E).repeat_interleave(H // K, 0) \
                .flatten()
        if block.ln1.bias is not None:        # β1 through each head's OV circuit; the pattern's rows sum to 1
            const = const + torch.einsum("dhe,hef,f->d", attn.o.weight.to(dtype).view(-1, H, E), W_V,
                                         block.ln1.bias.to(dtype))
        self.bias[rows] += G.sum(1) @ const
        return self._through_norm(through_gain(self.model, block.ln1, u), self.run.resid_pre[l])

    def embeddings(self, first_token):
        """Edges from the token embeddings (G is now the gradient at the stream entering block 0); learned
        positions (GPT-2) are a bias term."""
        rows, T = self.rows[self.lo:], self.run.T
        embeddings = (first_token + torch.arange(T))[None]
        self.A[rows[:, None], embeddings] = torch.einsum("ntd,td->nt", self.G, self.run.embed)
        if self.run.pos is not None:
            self.bias[rows] += torch.einsum("ntd,td->n", self.G, self.run.pos)


# ------------------------------------------------------------------------- influence, pruning, scores
def normalized(A):
    """|A| with each row divided by its sum (rows that sum to 0 stay 0)."""
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(A, w, max_iter=1000):
    """w·(A + A² + A³ + ...) for a nilpotent A (a graph without cycles): every node's total influence on the
    weighted targets w, summed over paths of every length."""
    current = total = w @ A
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ A
        total = total + current
    raise MinisvError("influence did not converge: the graph has a cycle")


def _threshold(scores, fraction):
    """The score above which the largest scores hold `fraction` of the total."""
    s = scores.flatten().sort(descending=True).values
    c = s.cumsum(0) / s.sum()
    return s[min(int(torch.searchsorted(c, torch.tensor(fraction, dtype=c.dtype))), len(c) - 1)]


def prune(graph, node_threshold=0.8, edge_threshold=0.98):
    """(node mask [n], edge mask [n, n], cumulative influence [n]) as circuit-tracer prunes: keep the nodes holding
    node_threshold of the influence on the logits (tokens and logits always), then the edges holding
    edge_threshold of the influence left; features and errors need an outgoing edge, features an incoming one,
    until nothing changes."""
    A, w = graph.adjacency, graph.logit_weights()
    n_io = len(graph.tokens) + len(graph.logit_ids)                   # tokens and logits: the last n_io nodes
    score = influence(normalized(A), w)
    nodes = score >= _threshold(score, node_threshold)
    nodes[-n_io:] = True
    P = A.clone()
    P[~nodes] = 0
    P[:, ~nodes] = 0
    Pn = normalized(P)
    edge_score = Pn * (influence(Pn, w) + w)[:, None]
    edges = edge_score >= _threshold(edge_score, edge_threshold)
    n_f = graph.n_features
    while True:
        before = nodes.clone()
        edges[~nodes] = False
        edges[:, ~nodes] = False
        nodes[:-n_io] &= edges[:, :-n_io].any(0)                      # an outgoing edge (a column entry)
        nodes[:n_f] &= edges[:n_f].any(1)                             # features: an incoming edge
        if torch.equal(nodes, before):
            break
    order = score.argsort(descending=True)
    cumulative = torch.empty_like(score)
    cumulative[order] = score[order].cumsum(0) / score.sum()
    return nodes, edges, cumulative


def scores(graph, nodes=None, edges=None):
    """(replacement score, completeness score), as circuit-tracer defines them: the share of the influence on the
    logits that reaches them from tokens rather than errors, and the influence-weighted share of each node's
    inputs that does not come from errors. With `prune`'s node and edge masks: of the pruned graph."""
    A = graph.adjacency if edges is None else graph.adjacency * (edges & nodes[:, None] & nodes[None])
    A, w = normalized(A), graph.logit_weights()
    I = influence(A, w)
    n_f, n_e, T = graph.n_features, graph.n_errors, len(graph.tokens)
    errors, tokens = slice(n_f, n_f + n_e), slice(n_f + n_e, n_f + n_e + T)
    replacement = I[tokens].sum() / (I[tokens].sum() + I[errors].sum())
    completeness = ((1 - A[:, errors].sum(1)) * (I + w)).sum() / (I + w).sum()
    return float(replacement), float(completeness)
