"""A cross-layer transcoder (CLT): one sparse coder that replaces every MLP of the model at once (Ameisen et al.
2025, "Circuit Tracing"; `docs/methods.md` §4.1).

Layer l has F features that read that layer's MLP input x_l (`blocks.l.ln2.hook_normalized`, the norm's output
before its gain, as minisv's transcoders do) and write into the MLP outputs of layer l and of every later layer
(or only the next `window` layers):

    pre_l = x_l W_enc[l] + b_enc[l]                                     [N, F]
    a_l   = TopK_k(pre_l), ReLU'd        architecture "topk"  (k per layer and token)
          | pre_l · 1[pre_l > θ_l]       architecture "jumprelu" (θ_l = exp(log_threshold[l]) > 0)
          | ReLU(pre_l)                  architecture "relu"
    ŷ_t   = Σ_{s ≤ t, t − s < window} a_s W_dec[t][s − s_0(t)] + b_dec[t] (+ x_t W_skip[t])   [N, d]

Shapes: L layers, F features per layer, d = d_model, N tokens. W_enc is [L, F, d] (feature-major: W_enc[l].t() is
layer l's [d, F] encoder, stored so each feature's vector is one contiguous row). The decoders are stored by the
layer they write to: W_dec[t] is [n_t, F, d], the decoders of the n_t = min(window, t + 1) source layers
s_0(t) = t − n_t + 1 .. t into layer t, so that MLP t's whole output is ONE gather over its n_t·F rows.
A set of per-layer transcoders is the window-1 case (`from_transcoders`), so everything downstream (training,
evaluation, attribution graphs, circuit-tracer's file layouts) handles both with one code path.

A TopK layer never needs its dense activations: the code is (values, indices) [N, L, k], and each output layer
sums the k·n_t decoder rows of its sources' active features per token with one `F.embedding_bag` (circuit-tracer
stores the same numbers by source layer, [F, L − s, d]; `minisv.circuit_tracer` converts).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinisvError
from .transcoder import dense_code, selected_preacts


@dataclass
class CLTConfig:
    n_layers: int
    d_model: int
    d_sae: int                            # features per layer
    architecture: str = "topk"            # "topk" | "jumprelu" | "relu"
    k: int = 16                           # active features per layer and token (topk)
    window: int = 0                       # decoders reach this many layers (0: every later layer; 1: per-layer)
    skip: bool = False                    # a dense x_l W_skip[l] path per layer (skip transcoders)
    model: str = ""
    dataset: str = ""
    training_tokens: int = 0
    hook_in: str = "ln2.hook_normalized"  # what layer l's features read, in block l ...
    hook_out: str = "hook_mlp_out"        # ... and what the decoders write

    def __post_init__(self):
        if self.architecture not in ("topk", "jumprelu", "relu"):
            raise MinisvError(f"unknown CLT architecture {self.architecture!r}; use 'topk', 'jumprelu' or 'relu'")
        if min(self.n_layers, self.d_model, self.d_sae) < 1 or self.window < 0 or \
                (self.architecture == "topk" and not 0 < self.k <= self.d_sae):
            raise MinisvError(f"bad CLT sizes n_layers={self.n_layers} d_model={self.d_model} d_sae={self.d_sae} "
                              f"k={self.k} window={self.window}; need positive sizes, 0 < k <= d_sae, window >= 0")

    def sources(self, target):
        """The layers whose features write to layer `target`'s MLP output: s_0(target) .. target."""
        return range(max(0, target - self.window + 1) if self.window else 0, target + 1)


class _JumpReLU(torch.autograd.Function):
    """pre · 1[pre > θ], with the straight-through gradient of Rajamanoharan et al. (2024) for θ: the step's
    derivative is replaced by a rectangle of width ε around θ, ∂a/∂θ ≈ −(θ/ε)·1[|pre − θ| < ε/2]."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = -(threshold / ctx.bandwidth * near * grad).sum(0)
        return grad * (pre > threshold), grad_threshold, None


class _DecoderGrad(torch.autograd.Function):
    """The weight gradient of a bag decode out = Σ_j values[n, j]·W[indices[n, j]], computed without sorting: as
    the identity on `out` in the forward, and grad W = Sᵀ grad in the backward, one sparse [R, N] × dense [N, d]
    product (S holds the values). embedding_bag's own weight gradient sorts the N·m indices and fills dense
    buffers per call, which with m = k·n_t rows per token (up to k·L) dominated a whole training step; its
    gradient for the values (the per-sample weights) is kept."""

    @staticmethod
    def forward(ctx, out, values, indices, W):
        ctx.save_for_backward(values, indices)
        ctx.rows = W.shape[0]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        values, indices = ctx.saved_tensors
        N, m = indices.shape
        tokens = torch.arange(N, device=grad.device).repeat_interleave(m)
        S = torch.sparse_coo_tensor(torch.stack([indices.flatten(), tokens]), values.flatten().to(grad.dtype),
                                    (ctx.rows, N), check_invariants=False)
        return grad, None, None, torch.sparse.mm(S, grad)


def bag_decode(values, indices, W):
    """Σ_j values[n, j]·W[indices[n, j]] [N, d], differentiable in values and W (see _DecoderGrad)."""
    out = F.embedding_bag(indices, W.detach(), mode="sum", per_sample_weights=values.to(W.dtype))
    return _DecoderGrad.apply(out, values.detach(), indices, W) if W.requires_grad and torch.is_grad_enabled() else out


class CrossLayerTranscoder(nn.Module):
    BANDWIDTH = 0.01          # JumpReLU's straight-through window ε

    def __init__(self, cfg: CLTConfig):
        super().__init__()
        self.cfg = cfg
        L, d, F_ = cfg.n_layers, cfg.d_model, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(L, F_, d).uniform_(-d ** -0.5, d ** -0.5))
        self.b_enc = nn.Parameter(torch.zeros(L, F_))
        # decoders start at zero (as minisv's TopK transcoders): the first steps learn the output map
        self.W_dec = nn.ParameterList(nn.Parameter(torch.zeros(len(cfg.sources(t)), F_, d)) for t in range(L))
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.log_threshold = nn.Parameter(torch.full((L, F_), math.log(0.1))) if cfg.architecture == "jumprelu" \
            else None
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if cfg.skip else None

    # ---------------------------------------------------------------- the map
    def encode_layer(self, layer, x):
        """The code of layer `layer`'s input x [N, d]: (values, indices) [N, k] for TopK, (a [N, F], None) else."""
        x = x.to(self.W_enc.dtype)
        W = self.W_enc[layer].t()                                                     # [d, F]
        if self.cfg.architecture != "topk":
            pre = F.linear(x, self.W_enc[layer], self.b_enc[layer])
            if self.cfg.architecture == "relu":
                return F.relu(pre), None
            return _JumpReLU.apply(pre, self.log_threshold[layer].exp(), self.BANDWIDTH), None
        with torch.no_grad():
            pre = F.linear(x, self.W_enc[layer], self.b_enc[layer])
        indices = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
        return selected_preacts(x, W, self.b_enc[layer], pre, indices).relu(), indices

    def encode(self, x):
        """The code of inputs x [N, L, d]: per layer as `encode_layer`, stacked: values [N, L, m], indices or None."""
        codes = [self.encode_layer(l, x[:, l]) for l in range(self.cfg.n_layers)]
        values = torch.stack([v for v, _ in codes], 1)
        return values, (torch.stack([i for _, i in codes], 1) if codes[0][1] is not None else None)

    def decode_layer(self, target, values, indices=None):
        """ŷ_target [N, d], without the skip path, from the codes of the layers that write to it (values and indices
        of every layer ≤ target: lists of [N, m], or [N, L, m] tensors; indices None for dense codes)."""
        sources, F_ = self.cfg.sources(target), self.cfg.d_sae
        W = self.W_dec[target].flatten(0, 1)                                           # [n_t·F, d]
        v = torch.cat([values[s] for s in sources], -1).to(W.dtype)                    # [N, n_t·m]
        if indices is None:
            return v @ W + self.b_dec[target]
        i = torch.cat([indices[s] + j * F_ for j, s in enumerate(sources)], -1)        # rows of W
        return bag_decode(v, i, W) + self.b_dec[target]

    def decode(self, values, indices=None):
        """ŷ [N, L, d] of every layer from the code of every layer ([N, L, ·]), without the skip path."""
        v, i = values.unbind(1), indices.unbind(1) if indices is not None else None
        return torch.stack([self.decode_layer(t, v, i) for t in range(self.cfg.n_layers)], 1)

    def decoder(self, source, feature, target):
        """The vector feature `feature` of layer `source` writes to layer `target`'s MLP output per unit of
        activation: [..., d] (zero beyond the window)."""
        sources = self.cfg.sources(target)
        W = self.W_dec[target][0 if source not in sources else source - sources[0], feature]
        return W if source in sources else torch.zeros_like(W)

    def reconstruct(self, x):
        """x [N, L, d] -> (ŷ [N, L, d], values, indices): every layer's prediction and the code behind it."""
        values, indices = self.encode(x)
        y = self.decode(values, indices)
        return (y + torch.einsum("nld,lde->nle", x.to(y.dtype), self.W_skip) if self.W_skip is not None else y), \
            values, indices

    def forward(self, x):
        return self.reconstruct(x)[0]

    def dense(self, values, indices):
        """A code as dense activations [N, L, F]."""
        return dense_code(values, indices, self.cfg.d_sae)

    def fired(self, values, indices):
        """How many tokens each feature is active on: [L, F] (float)."""
        if indices is None:
            return (values > 0).sum(0).float()
        L, F_ = self.cfg.n_layers, self.cfg.d_sae
        flat = (indices + torch.arange(L, device=indices.device)[:, None] * F_).flatten()
        return torch.zeros(L * F_, device=values.device).index_add_(0, flat, (values > 0).flatten().float()) \
            .view(L, F_)

    def decoder_norms(self):
        """‖W_dec‖ of each feature over every layer it writes to: [L, F] (the JumpReLU sparsity penalty's weight;
        + 1e-12 under the root, whose gradient at the zero-initialised decoders would be 0/0)."""
        squares = torch.zeros(self.cfg.n_layers, self.cfg.d_sae, dtype=self.W_dec[0].dtype, device=self.W_dec[0].device)
        for t, W in enumerate(self.W_dec):                                             # W [n_t, F, d]
            squares = squares.index_add(0, torch.tensor(self.cfg.sources(t), device=W.device), W.pow(2).sum(-1))
        return squares.add(1e-12).sqrt()

    # ---------------------------------------------------------------- training's constraints
    @torch.no_grad()
    def center_on(self, x_mean, y_mean):
        """b_dec = mean target per layer, b_enc = −mean(x) W_enc: pre-activations start centered. x_mean,
        y_mean: [L, d]."""
        self.b_dec.copy_(y_mean)
        self.b_enc.copy_(-torch.einsum("ld,lfd->lf", x_mean, self.W_enc))

    # ---------------------------------------------------------------- per-layer transcoders as a CLT
    @classmethod
    def from_transcoders(cls, transcoders, n_layers):
        """The window-1 CLT of per-layer transcoders {layer: Transcoder}, one for every layer (same sizes, same
        architecture; a ReLU set becomes "relu")."""
        if sorted(transcoders) != list(range(n_layers)):
            raise MinisvError(f"a replacement model needs a transcoder for every layer 0..{n_layers - 1}; got "
                              f"layers {sorted(transcoders)}")
        first = transcoders[0].cfg
        if any((t.cfg.d_in, t.cfg.d_out, t.cfg.d_sae, t.cfg.architecture, t.cfg.k, t.cfg.skip) !=
               (first.d_in, first.d_out, first.d_sae, first.architecture, first.k, first.skip)
               for t in transcoders.values()) or first.d_in != first.d_out or first.target_centered:
            raise MinisvError("the per-layer transcoders differ in size, architecture or k, or predict a centred "
                              "target; a replacement model needs one kind, d_in = d_out, uncentred targets")
        clt = cls(CLTConfig(n_layers, first.d_in, first.d_sae, first.architecture, first.k, window=1,
                            skip=first.skip, model=first.model, dataset=first.dataset,
                            training_tokens=first.training_tokens))
        tcs = [transcoders[l] for l in range(n_layers)]
        with torch.no_grad():
            clt.W_enc.copy_(torch.stack([t.W_enc.t() for t in tcs]))
            clt.b_enc.copy_(torch.stack([t.b_enc for t in tcs]))
            for l, t in enumerate(tcs):
                clt.W_dec[l].copy_(t.W_dec[None])
            clt.b_dec.copy_(torch.stack([t.b_dec for t in tcs]))
            if first.skip:
                clt.W_skip.copy_(torch.stack([t.W_skip for t in tcs]))
        return clt.to(tcs[0].W_enc.dtype)
