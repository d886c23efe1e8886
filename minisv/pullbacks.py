"""The frozen, linear view of a transformer that circuits, ObProp and attribution graphs all stand on.

Freeze a prompt's attention patterns A and norm scales s, and let transcoders stand in for the MLPs (the
*replacement model*, `splice_hooks`). Then everything written into the residual stream is linear in an earlier
residual or in a sparse feature activation, and a direction y that something reads the stream along can be
carried backwards, one linear map at a time. Such a carried direction is a *pullback*: reading the output of a
map along y is reading its input along Mᵀy. The maps, each written once here:

    norm      x̂ = s·P r, then the sublayer reads γ⊙x̂ + β. P removes the mean (LayerNorm) or is I (RMSNorm);
              s = 1/√(mean((P r)²) + ε) is frozen at the prompt.
              reading γ⊙x̂+β along y  = reading x̂ along P(γ⊙y)            `through_gain`
              reading x̂ along u      = reading r along s·P u              `through_scale`
                                       (exact Jacobian: s·(P u − x̃(x̃·u)), x̃ = x̂/√d, the unit radial direction)
    head h    the attention output at t is Σ_h Σ_s A^h[t,s]·W_O^h W_V^h x_s (x_s: ln1's output at source s), so
              reading it along y reads each source along A^h[t,s]·W_V^hᵀ W_O^hᵀ y                `ov`
              (grouped-query attention: head h uses kv head h // (H/K); rotary touches Q and K, not V or O)
    unembed   the logits' observable n·ℓ reads ln_final's output along W_Uᵀ n                    `unembed_read`

Shapes: D d_model, H heads, E d_head; every function keeps y's dtype (circuits work in float64, ObProp in float32)
and accepts a batch [..., D].
"""
import torch

from .clt import CrossLayerTranscoder
from .transcoder import mlp_hooks


def is_layernorm(model):
    return model.ln_final.bias is not None


def centered(model, v):
    """P v [..., D]: v minus its mean for a LayerNorm model, v itself for RMSNorm."""
    return v - v.mean(-1, keepdim=True) if is_layernorm(model) else v


def through_gain(model, norm, y):
    """A read y [..., D] of norm's output γ⊙x̂ + β, as a read of x̂: P(γ⊙y). (x̂ has zero mean under LayerNorm, so
    y's mean reads nothing and is dropped; β adds a constant, not a direction.)"""
    return centered(model, y * norm.weight.to(y.dtype))


def norm_scale(model, resid):
    """s = 1/√(mean((P r)²) + ε) of a norm reading residuals r [..., D]: [...]."""
    return centered(model, resid).pow(2).mean(-1).add(model.cfg.norm_eps).rsqrt()


def through_scale(model, u, resid, exact=False):
    """A read u [..., D] of x̂ = s·P r, as a read of the norm's input r [..., D] at that point: s·P u with the scale
    frozen (what attribution does), or with exact=True the Jacobian's transpose s·(P u − x̃(x̃·u))."""
    s, u = norm_scale(model, resid)[..., None], centered(model, u)
    if not exact:
        return s * u
    radial = centered(model, resid) * s / resid.shape[-1] ** 0.5      # x̂/√d, a unit vector (up to ε)
    return s * (u - radial * (radial * u).sum(-1, keepdim=True))


def ov(model, layer, y):
    """W_V^hᵀ W_O^hᵀ y for every head of `layer`: [..., H, D], a read of the attention's input (ln1's output, after
    its gain) per head, from a read y [..., D] of the attention's output."""
    cfg, attn = model.cfg, model.blocks[layer].attn
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    w = (y @ attn.o.weight.to(y.dtype)).unflatten(-1, (H, E))                    # W_O^hᵀ y: o.weight is [D, H·E]
    W_V = attn.v.weight.to(y.dtype).view(K, E, -1).repeat_interleave(H // K, 0)  # [H, E, D]
    return torch.einsum("...he,hed->...hd", w, W_V)


def unembed_read(model, ids, weights, dtype=torch.float32):
    """W_Uᵀ n [D] for the observable n = Σ_i weights[i]·e[ids[i]] on the logits: the read of ln_final's output."""
    W_U = model.unembed.weight
    rows = W_U[torch.as_tensor(ids, device=W_U.device)].to(dtype)                 # only the k rows n selects
    return rows.T @ torch.as_tensor(weights, device=W_U.device).to(dtype)


def splice_hooks(coders, keep=None) -> dict:
    """Hooks that build the replacement model: each coder {layer: Transcoder} reads its hook_in and its output takes
    the place of its hook_out (an SAE: the same hook; coders without hook names: the MLP's); a layer mapped to None
    has its MLP output zeroed instead (ablation). A CrossLayerTranscoder replaces every MLP: layer l's features are
    encoded from the MLP input the replacement model computes there, and MLP l's output becomes what the features
    of layers ≤ l write to it. keep [B, T] bool: replace only there (BOS positions, which coders are not trained
    on, are left alone)."""
    if isinstance(coders, CrossLayerTranscoder):
        return _clt_hooks(coders, keep)
    hooks, inputs = {}, {}
    for l, coder in coders.items():
        x_name, y_name = coder.sites(l) if coder is not None else mlp_hooks(l)

        def read(x, name, l=l):
            inputs[l] = x

        def write(y, name, l=l, coder=coder, sae=x_name == y_name):
            new = torch.zeros_like(y) if coder is None else coder(y if sae else inputs[l]).to(y.dtype)
            return new if keep is None else torch.where(keep[..., None], new, y)
        if x_name != y_name:
            hooks[x_name] = read
        hooks[y_name] = write
    return hooks


def _clt_hooks(clt, keep):
    """The CLT's side of `splice_hooks`: MLP l's input is encoded when the forward reaches it (its code, and for a
    skip path the input itself, are kept), and MLP l's output is replaced by what the features of layers ≤ l write."""
    codes, inputs = {}, {}

    def read(x, name):
        l = int(name.split(".")[1])
        inputs[l] = x.flatten(0, 1)
        codes[l] = clt.encode_layer(l, inputs[l])

    def write(y, name):
        l = int(name.split(".")[1])
        values = [codes[s][0] for s in range(l + 1)]
        indices = [codes[s][1] for s in range(l + 1)] if codes[0][1] is not None else None
        new = clt.decode_layer(l, values, indices)
        if clt.W_skip is not None:
            new = new + inputs[l].to(new.dtype) @ clt.W_skip[l]
        new = new.view_as(y).to(y.dtype)
        return new if keep is None else torch.where(keep[..., None], new, y)
    L, x_hook, y_hook = clt.cfg.n_layers, clt.cfg.hook_in, clt.cfg.hook_out
    return {f"blocks.{l}.{h}": fn for l in range(L) for h, fn in ((x_hook, read), (y_hook, write))}
