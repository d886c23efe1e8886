"""Transcoder circuits (`docs/methods.md` §2.5): why does a feature fire, or the model prefer one token, on a prompt?

Freeze the prompt's attention patterns A and norm scales s, and let transcoders stand in for the MLPs. Then
everything written into the residual stream is linear in an *earlier* residual or in a sparse feature
activation, and any target that reads the stream r_t along a vector y splits exactly into direct terms:

    y·r_t = embed[t]·y (+ pos[t]·y, GPT-2)                               embeddings
          + Σ_{MLP l before} Σ_{active j} f_j^l[t]·(W_dec^l[j]·y)          feature × input-invariant weight
          + Σ_{attn l before} Σ_h Σ_{s≤t} A^{l,h}[t,s]·x̂1_l[s]·(γ1 ⊙ W_V^hᵀW_O^hᵀ y)    head h moving token s
          + biases·y (b_dec, b_O, b_V, ln1's β) + Σ_l (mlp_out_l[t] − ŷ_l[t])·y    biases, transcoder errors

A norm turns its input r into x̂ = s·P r (P subtracts the mean for LayerNorm, is the identity for RMSNorm;
s = 1/√(mean((Pr)²)+ε) is frozen), so reading x̂ along w is reading r along s·P w: the *pullback*. Every
feature and head term is such a read, of the residual at its own site and token, so it splits again the same
way; chains of these are computational paths. A feature term f_j·c with c = W_dec[j]·y reads x̂2 along
c·W_enc[:, j] (plus c·b_enc[j]); a head term reads the source token's x̂1 along A·γ1⊙W_V^hᵀW_O^hᵀy.

Which residual each reader sees is the model's data flow: sequential blocks (GPT-2, Llama) feed MLP l the
stream after attention l (resid_mid); parallel blocks (NeoX/Pythia) feed it resid_pre, so attention l never
reaches MLP l. Tokens are sequence positions; heads have a destination `token` and a source `at`.

Transcoder conventions: inputs are the norm's output before its gain (`input_convention` "normalized");
a `target_centered` transcoder (the released GPT-2 ones) predicts mlp_out minus its mean over d_model, and its
error term is measured against that. Under LayerNorm every pullback has zero mean, so the dropped mean of
mlp_out contributes exactly nothing and the decomposition stays exact.
"""
import copy
import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from .errors import MinisvError
from .pullbacks import centered, ov, splice_hooks, through_gain, through_scale, unembed_read

KEEP = ("feature", "head", "skip", "embed", "pos")   # terms a path can go through (not bias / error)


@dataclass(eq=False)
class Node:
    """One term of a decomposition: `value` is its contribution to its parent (for a root, the target itself).
    Terms that read the residual stream (logit, feature, head, skip) decompose further: their value is
    coef·x̂·read + const, with x̂ the output of norm `site` at token `at`, before the norm's gain."""
    kind: str                  # logit | feature | head | skip | embed | pos | bias | error
    layer: int                 # -1 for embeddings, n_layers for logits
    token: int                 # the token whose residual receives this term (a head's destination)
    value: float
    label: str                 # a readable, unique name, also the node's id in graphs
    index: int = -1            # feature id, head, or logit token id
    at: int = -1               # the token read (a head's source; = token for the others)
    read: torch.Tensor | None = None
    coef: float = 1.0
    site: tuple | None = None  # ("ln1" | "ln2", layer) or ("ln_final", n_layers)
    const: float = 0.0
    bias: float | None = None  # set when expanded by top_paths: the sums of its bias and error children
    error: float | None = None


class Circuit:
    """One prompt's forward pass, frozen, with transcoders {layer: Transcoder} standing in for MLPs (an MLP without
    one stays whole, as an error term). `children(node)` is the exact direct attribution of a target, `top_paths`
    beam-searches computational paths, `graph` sums them per edge.

    splice=False runs the real model, so each error term holds what its transcoder misses; splice=True runs the
    replacement model (transcoder outputs in place of the MLPs), whose error terms are zero."""

    @torch.no_grad()
    def __init__(self, model, transcoders: dict, tokens, splice=False):
        cfg = self.cfg = model.cfg
        for l, tc in transcoders.items():
            _check_fits(model, l, tc)
        # float64 copies: every identity below then holds to ~1e-12, and the replacement model (splice=True) runs
        # the very same copies, so its active features are the ones decomposed here
        self.model, self.transcoders = model, {l: copy.deepcopy(tc).double() for l, tc in transcoders.items()}
        self.tokens = torch.as_tensor(tokens, dtype=torch.long).flatten().to(model.embed.weight.device)
        if len(self.tokens) == 0:
            raise MinisvError("empty prompt; give at least one token")
        tok = model.tokenizer
        self.token_strs = [tok.token_str(i) if tok is not None else str(i) for i in self.tokens.tolist()]
        n, p = cfg.n_layers, "blocks.{}."
        names = ["hook_embed", "ln_final.hook_normalized", p.format(n - 1) + "hook_resid_post"] + \
            (["hook_pos_embed"] if model.pos_embed is not None else []) + \
            [p.format(l) + h for l in range(n) for h in ("hook_resid_pre", "ln1.hook_normalized", "attn.hook_pattern",
                                                        "ln2.hook_normalized", "hook_mlp_out")] + \
            ([] if cfg.parallel else [p.format(l) + "hook_resid_mid" for l in range(n)])
        with model.hooks(splice_hooks(self.transcoders) if splice else {}):
            logits, cache = model.run_with_cache(self.tokens[None], names=names)
        self.logits = logits[0]
        c = {k: v[0].double() for k, v in cache.items()}                   # [T, D] each, patterns [H, T, T]
        self.embed, self.pos = c["hook_embed"], c.get("hook_pos_embed")
        self.xhat1 = [c[p.format(l) + "ln1.hook_normalized"] for l in range(n)]
        self.xhat2 = [c[p.format(l) + "ln2.hook_normalized"] for l in range(n)]
        self.xhat_final = c["ln_final.hook_normalized"]
        self.pattern = [c[p.format(l) + "attn.hook_pattern"] for l in range(n)]
        # the residual each norm reads, where its frozen scale is taken: {("ln1" | "ln2", l) or ("ln_final", n): [T, D]}
        self.resid = {("ln_final", n): c[p.format(n - 1) + "hook_resid_post"]}
        for l in range(n):
            self.resid["ln1", l] = c[p.format(l) + "hook_resid_pre"]
            self.resid["ln2", l] = c[p.format(l) + ("hook_resid_pre" if cfg.parallel else "hook_resid_mid")]
        # per MLP: the active features at each token (ids, activations in float64) and the error term [T, D]
        self.active, self.error = {}, {}
        for l in range(n):
            mlp_out = c[p.format(l) + "hook_mlp_out"]
            if l not in self.transcoders:
                self.error[l] = mlp_out
                continue
            tc = self.transcoders[l]
            y_hat, values, indices = tc.reconstruct(self.xhat2[l])
            f = tc.dense(values, indices)
            self.error[l] = tc.target(mlp_out) - y_hat
            self.active[l] = [(row.nonzero()[:, 0], row[row > 0]) for row in f]

    # ------------------------------------------------------------------------- targets
    @torch.no_grad()
    def feature(self, layer, index, token=-1) -> Node:
        """Target: the pre-activation of feature `index` of the layer-`layer` transcoder at `token`."""
        tc = self.transcoders.get(layer)
        if tc is None:
            raise MinisvError(f"no transcoder for layer {layer}; this circuit has transcoders for layers "
                              f"{sorted(self.transcoders)}")
        if not 0 <= index < tc.cfg.d_sae:
            raise MinisvError(f"feature {index} does not exist; the layer-{layer} transcoder has features "
                              f"0..{tc.cfg.d_sae - 1}")
        t = self._token(token)
        value = float(self.xhat2[layer][t] @ tc.W_enc[:, index] + tc.b_enc[index])
        return self._feature_node(layer, t, index, value=value, coef=1.0)

    @torch.no_grad()
    def logit(self, a, b=None, token=-1) -> Node:
        """Target: the logit of token id `a` minus that of `b` (or the logit of `a` alone) at `token`."""
        V = self.cfg.vocab_size
        for i in (a, b):
            if i is not None and not 0 <= i < V:
                raise MinisvError(f"token id {i} is outside the vocabulary [0, {V})")
        t, ln = self._token(token), self.model.ln_final
        u = unembed_read(self.model, [a] if b is None else [a, b], [1.0] if b is None else [1.0, -1.0], torch.float64)
        read = through_gain(self.model, ln, u)                            # logits = (γ ⊙ x̂ + β) · W_U
        const = float(ln.bias.double() @ u) if ln.bias is not None else 0.0
        name = repr(self._str(a)) + (f" - {self._str(b)!r}" if b is not None else "")
        return Node("logit", self.cfg.n_layers, t, value=float(self.xhat_final[t] @ read) + const,
                    label=f"logit {name} @{t}", index=a, at=t, read=read, site=("ln_final", self.cfg.n_layers),
                    const=const)

    def target(self, spec=None) -> Node:
        """Parse a target: "L:F@T" (feature F of the layer-L transcoder at token T, default the last; negative T
        counts from the end) or "logit: ' 40' - ' 20'" (quoted strings that are single tokens, or token ids;
        the "- B" part and "@T" are optional). None: the most active feature of the deepest transcoder at the
        last token."""
        if spec is None:
            layer = max(self.transcoders, default=None)
            ids, acts = self.active[layer][-1] if layer is not None else ((), ())
            if not len(ids):
                raise MinisvError("no transcoder feature is active at the last token; give a target")
            return self.feature(layer, int(ids[acts.argmax()]), -1)
        tok = r"""('[^']*'|"[^"]*"|\d+)"""
        if m := re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*(?:@\s*(-?\d+))?\s*", spec):
            return self.feature(int(m[1]), int(m[2]), int(m[3]) if m[3] else -1)
        if m := re.fullmatch(rf"\s*logit\s*:\s*{tok}\s*(?:-\s*{tok})?\s*(?:@\s*(-?\d+))?\s*", spec):
            return self.logit(self._id(m[1]), self._id(m[2]) if m[2] else None, int(m[3]) if m[3] else -1)
        raise MinisvError(f"cannot read target {spec!r}; write \"LAYER:FEATURE@TOKEN\" (e.g. \"6:1234@-1\") or "
                          f"\"logit: ' 40' - ' 20'\"")

    # ------------------------------------------------------------------------- one step of attribution
    def vector(self, node) -> torch.Tensor:
        """The node's pullback: the direction y [D] (float64) in the residual stream at `node.site`, token `node.at`,
        with value = resid·y + const."""
        return through_scale(self.model, node.read.double() * node.coef, self.resid[node.site][node.at])

    @torch.no_grad()
    def children(self, node) -> list:
        """The direct terms of `node` (a logit, feature, head or skip node); their values sum to node.value."""
        if node.read is None:
            raise MinisvError(f"{node.label} is a leaf (embedding, bias or error term); it has no further terms")
        y, t = self.vector(node), node.at
        site, l_site = node.site
        n_attn = l_site + (site == "ln2" and not self.cfg.parallel)     # sequential MLPs see their own attention
        kids = [Node("embed", -1, t, float(self.embed[t] @ y), f"embed @{t} {self.token_strs[t]!r}", at=t)]
        if self.pos is not None:
            kids.append(Node("pos", -1, t, float(self.pos[t] @ y), f"pos @{t}", at=t))
        for l in range(l_site):                                           # MLPs before the site
            kids += self._mlp_terms(l, t, y)
        for l in range(n_attn):                                           # attention layers the site sees
            kids += self._attn_terms(l, t, y)
        if node.const:
            kids.append(Node("bias", node.layer, t, node.const, f"{node.label}: " +
                             ("b_enc" if node.kind == "feature" else "ln_final bias"), at=t))
        return kids

    def _mlp_terms(self, l, t, y):
        tc = self.transcoders.get(l)
        if tc is None:
            return [Node("error", l, t, float(self.error[l][t] @ y), f"mlp{l} @{t} (no transcoder)", at=t)]
        ids, acts = self.active[l][t]
        weights = tc.W_dec[ids] @ y                        # input-invariant: what one unit of feature j adds to y
        # feature j's term is activation × weight, and it reads x̂2 along weight·W_enc[:, j] (see _feature_node)
        kids = [self._feature_node(l, t, j, value=act * weight, coef=weight)
                for j, act, weight in zip(ids.tolist(), acts.tolist(), weights.tolist())]
        if tc.W_skip is not None:
            w = tc.W_skip @ y
            kids.append(Node("skip", l, t, float(self.xhat2[l][t] @ w), f"mlp{l} skip @{t}", at=t, read=w,
                             site=("ln2", l)))
        return kids + [Node("bias", l, t, float(tc.b_dec @ y), f"mlp{l} b_dec @{t}", at=t),
                       Node("error", l, t, float(self.error[l][t] @ y), f"mlp{l} error @{t}", at=t)]

    def _attn_terms(self, l, t, y):
        model, block = self.model, self.model.blocks[l]
        H, K = self.cfg.n_heads, self.cfg.n_kv_heads
        u = ov(model, l, y)                                 # [H, D]  W_V^hᵀ W_O^hᵀ y, a read of ln1's output
        g = through_gain(model, block.ln1, u)               # ... and of x̂1 (before the gain γ1)
        A = self.pattern[l][:, t, :t + 1]                   # [H, t+1]
        values = A * (g @ self.xhat1[l][:t + 1].t())        # [H, t+1]
        # each head's attention sums to 1 over sources, so the parts of v that do not depend on the source
        # (b_V and ln1's β) arrive once per head, like b_O: together they are the layer's bias term
        bias = float(block.attn.o.bias.double() @ y) if block.attn.o.bias is not None else 0.0
        if block.attn.v.bias is not None:                   # W_O (b_V of each head's kv group) · y
            b_V = block.attn.v.bias.double().view(K, -1).repeat_interleave(H // K, 0).flatten()
            bias += float(block.attn.o.weight.double() @ b_V @ y)
        if block.ln1.bias is not None:
            bias += float((u @ block.ln1.bias.double()).sum())
        A_list, v_list, g_rows = A.tolist(), values.tolist(), g.unbind(0)
        # head h at destination t, source s: reads the source's x̂1 along g[h], weighted by the frozen A[h, s]
        kids = [Node("head", l, t, value=v_list[h][s], label=f"attn{l}.{h} {t}←{s} {self.token_strs[s]!r}",
                     index=h, at=s, read=g_rows[h], coef=A_list[h][s], site=("ln1", l))
                for h in range(H) for s in range(t + 1)]
        return kids + [Node("bias", l, t, bias, f"attn{l} biases @{t}", at=t)]

    # ------------------------------------------------------------------------- paths and graphs
    @torch.no_grad()
    def top_paths(self, root, rounds=3, branches=5, beam=None, absolute=False, skip_first=True) -> list:
        """Beam search (`docs/methods.md` §2.5): each round extends every kept path by the `branches` largest terms of
        its last node, then keeps the `beam` (default: `branches`) best new paths overall, ranked by the last term's
        contribution, which is the product of the edge factors along the path. Ranked by signed value (what pushes
        the target up, as in the reference code) unless absolute=True. skip_first: terms of heads reading
        the first token (the attention sink, nearly the same residual on every prompt) are not followed.
        Returns the kept paths of every round, each a list of Nodes from the root; expanded nodes remember
        their bias and error sums for `graph`."""
        score = abs if absolute else (lambda v: v)
        beam = beam or branches
        paths, frontier = [], [[root]]
        for _ in range(rounds):
            new = []
            for path in frontier:
                kids = self.children(path[-1])
                path[-1].bias = sum(k.value for k in kids if k.kind == "bias")
                path[-1].error = sum(k.value for k in kids if k.kind == "error")
                kids = [k for k in kids if k.kind in KEEP and not (skip_first and k.kind == "head" and k.at == 0)]
                new += [path + [k] for k in sorted(kids, key=lambda k: -score(k.value))[:branches]]
            frontier = sorted(new, key=lambda p: -score(p[-1].value))[:beam]
            paths += frontier
            frontier = [p for p in frontier if p[-1].read is not None]
        return paths

    def graph(self, paths) -> dict:
        """Sum the paths per edge into a graph: {"nodes": [...], "edges": [{"parent", "child", "value"}]}, where a
        node's value is the sum of its incoming edges (the root's: the target). Every expanded node also gets its
        bias and transcoder-error terms, and a pruning error (its value minus every term shown, including its
        share reached along paths that stopped at it), so the edges out of an expanded node sum to its value."""
        root = paths[0][0]
        nodes, edges, seen, expanded = {root.label: _node_json(root)}, defaultdict(float), set(), {}
        for node in (n for p in paths for n in p if n.bias is not None):
            expanded[id(node)] = node
        for path in paths:
            for parent, child in zip(path, path[1:]):
                if id(child) not in seen:    # Node objects are search-tree nodes: each tree edge counts once
                    seen.add(id(child))
                    nodes.setdefault(child.label, _node_json(child))
                    edges[parent.label, child.label] += child.value
        for node in expanded.values():
            for kind, value in (("bias", node.bias), ("error", node.error)):
                edges[node.label, f"{kind} of {node.label}"] += value
        value = defaultdict(float, {root.label: root.value})
        for (_, child), v in edges.items():
            value[child] += v
        out = defaultdict(float)
        for (parent, _), v in edges.items():
            out[parent] += v
        for label in {n.label for n in expanded.values()}:
            edges[label, f"pruned of {label}"] = value[label] - out[label]
            value[f"pruned of {label}"] = value[label] - out[label]
        for (parent, child) in edges:
            if child not in nodes:       # bias, error, pruned: attached to their parent's place
                p = nodes[parent]
                nodes[child] = {**p, "id": child, "kind": child.split(" of ")[0], "index": -1}
        for n in nodes.values():
            n["value"] = value[n["id"]]
        return {"nodes": list(nodes.values()),
                "edges": [{"parent": p, "child": c, "value": v} for (p, c), v in edges.items()]}

    def to_json(self, root, paths) -> dict:
        """Everything a report needs: the prompt, the target, the direct attribution by kind, paths and graph."""
        by_kind = defaultdict(float)
        for k in self.children(root):
            by_kind[k.kind] += k.value
        return {"tokens": self.token_strs, "target": root.label, "value": root.value, "direct": dict(by_kind),
                "paths": [[{"label": n.label, "value": n.value} for n in p] for p in paths],
                "graph": self.graph(paths)}

    # ------------------------------------------------------------------------- helpers
    def _token(self, token):
        T = len(self.tokens)
        if not -T <= token < T:
            raise MinisvError(f"token {token} is outside the prompt of {T} tokens; use 0..{T - 1}, or negative "
                              f"numbers to count from the end")
        return token % T

    def _str(self, i):
        tok = self.model.tokenizer
        return tok.token_str(i) if tok is not None else str(i)

    def _id(self, text):
        if text.isdigit():
            return int(text)
        tok = self.model.tokenizer
        if tok is None:
            raise MinisvError("this model has no tokenizer; give logit targets as token ids, e.g. \"logit: 12 - 7\"")
        ids = tok.encode(text[1:-1])
        if len(ids) != 1:
            raise MinisvError(f"{text} is {len(ids)} tokens {ids} for this tokenizer; pick a single-token string or "
                              f"give a token id")
        return ids[0]

    def _feature_node(self, layer, t, index, value, coef):
        """Feature `index` of the layer-`layer` transcoder at token t, as a term worth `value` to its parent: it
        reads x̂2 at t along coef·W_enc[:, index], plus the constant coef·b_enc[index]."""
        tc = self.transcoders[layer]
        return Node("feature", layer, t, value=value, label=f"mlp{layer} #{index} @{t} {self.token_strs[t]!r}",
                    index=index, at=t, read=tc.W_enc[:, index], coef=coef, site=("ln2", layer),
                    const=coef * float(tc.b_enc[index]))


def _check_fits(model, layer, tc):
    cfg = tc.cfg
    model.check_layer(layer, "transcoder layer")
    if cfg.d_in != model.cfg.d_model or cfg.d_out != model.cfg.d_model:
        raise MinisvError(f"the layer-{layer} transcoder maps {cfg.d_in} -> {cfg.d_out} dims but the model's d_model "
                          f"is {model.cfg.d_model}; it was trained for another model")
    if cfg.input_convention != "normalized":
        raise MinisvError(f"the layer-{layer} transcoder reads {cfg.input_convention!r} inputs; circuits need "
                          f"'normalized' ones (blocks.L.ln2.hook_normalized, the norm's output before its gain)")
    if cfg.target_centered and model.ln_final.bias is None:
        raise MinisvError(f"the layer-{layer} transcoder predicts a mean-centered MLP output, which is only exact "
                          f"for LayerNorm models; this model uses RMSNorm")


def _node_json(node):
    return {"id": node.label, "kind": node.kind, "layer": node.layer, "token": node.token, "at": node.at,
            "index": node.index}


def format_tree(paths, digits=3) -> str:
    """The search tree of `top_paths` as indented text, largest terms first; expanded nodes show their bias and
    transcoder-error terms in brackets."""
    root, kids, seen = paths[0][0], defaultdict(list), set()
    for path in paths:
        for parent, child in zip(path, path[1:]):
            if id(child) not in seen:
                seen.add(id(child))
                kids[id(parent)].append(child)

    def line(node):
        extra = f"   [bias {node.bias:+.{digits}f}, error {node.error:+.{digits}f}]" if node.bias is not None else ""
        return f"{node.value:+.{digits}f}  {node.label}{extra}"

    lines = [line(root)]

    def walk(node, indent):
        children = sorted(kids[id(node)], key=lambda c: -abs(c.value))
        for i, child in enumerate(children):
            last = i == len(children) - 1
            lines.append(indent + ("└─ " if last else "├─ ") + line(child))
            walk(child, indent + ("   " if last else "│  "))
    walk(root, "")
    return "\n".join(lines)


# ------------------------------------------------------------------------- input-invariant analysis
# Directions y in the residual stream, ignoring the prompt-dependent norm scale (a positive factor per token,
# which changes no ranking). Each accepts a batch [..., D].
@torch.no_grad()
def feature_direction(model, tc, index) -> torch.Tensor:
    """The residual direction a transcoder feature reads: P W_enc[:, index] (its ln2 input, mean removed)."""
    return centered(model, tc.W_enc[:, index].t())


@torch.no_grad()
def logit_direction(model, a, b=None) -> torch.Tensor:
    """The residual direction of logit a − logit b: P(γ_final ⊙ (W_U[a] − W_U[b]))."""
    u = unembed_read(model, [a] if b is None else [a, b], [1.0] if b is None else [1.0, -1.0],
                     model.unembed.weight.dtype)
    return through_gain(model, model.ln_final, u)


@torch.no_grad()
def pullback(tc, y) -> torch.Tensor:
    """W_dec y [..., d_sae]: how much one unit of each feature of an earlier transcoder adds along y."""
    return y @ tc.W_dec.t()


@torch.no_grad()
def de_embed(model, y, head=None) -> torch.Tensor:
    """[..., vocab]: how much each token's embedding adds along y directly, or, with head=h, through the OV
    circuit of layer-0 head h (as the value it moves: W_E · P(γ1 ⊙ W_V^hᵀ W_O^hᵀ y))."""
    if head is not None:
        y = through_gain(model, model.blocks[0].ln1, ov(model, 0, y)[..., head, :])
    return y @ model.embed.weight.t()


@torch.no_grad()
def logit_effects(model, tc, index) -> torch.Tensor:
    """[..., vocab]: the direct effect on every logit of one unit of the feature's output W_dec[index], through the
    final norm's gain (its scale frozen at 1): W_U · (γ_final ⊙ P W_dec[index])."""
    return (centered(model, tc.W_dec[index]) * model.ln_final.weight) @ model.unembed.weight.t()
