"""A cross-layer transcoder (CLT): one sparse coder that replaces every MLP of the model at once (Ameisen et al.
2025, "Circuit Tracing"; `docs/methods.md` §4.1).

Layer l has F features that read that layer's MLP input x_l (`blocks.l.ln2.hook_normalized`, the norm's output
before its gain, as minisv's transcoders do) and write into the MLP outputs of layer l and of every later layer
(or only the next `window` layers):

    pre_l = x_l W_enc[l] + b_enc[l]                                     [N, F]
    a_l   = TopK_k(pre_l), ReLU'd        architecture "topk"  (k per layer and token)
          | pre_l · 1[pre_l > θ_l]       architecture "jumprelu" (θ_l = exp(log_threshold[l]) > 0)
          | ReLU(pre_l)                  architecture "relu"
    ŷ_t   = Σ_{s ≤ t, t - s < window} a_s W_dec[s][t - s] + b_dec[t] (+ x_t W_skip[t])      [N, d]

Shapes: L layers, F features per layer, d = d_model, N tokens. W_enc is [L, F, d] (feature-major: W_enc[l].t() is
layer l's [d, F] encoder, stored so each feature's vector is one contiguous row), W_dec[s] is [n_s, F, d] with
n_s = min(window, L − s) (W_dec[s][j] is the contiguous [F, d] map from layer s's features into layer s + j).
A set of per-layer transcoders is the window-1 case (`from_transcoders`), so everything downstream (training,
evaluation, attribution graphs, circuit-tracer's file layouts) handles both with one code path.

A TopK layer never needs its dense activations: the code is (values, indices) [N, L, k] and each output layer
sums k decoder rows per source layer and token with `F.embedding_bag`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinisvError
from .transcoder import selected_preacts


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

    def reach(self, layer):
        """How many output layers layer `layer`'s features write to."""
        return min(self.window or self.n_layers, self.n_layers - layer)


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


class CrossLayerTranscoder(nn.Module):
    BANDWIDTH = 0.01          # JumpReLU's straight-through window ε

    def __init__(self, cfg: CLTConfig):
        super().__init__()
        self.cfg = cfg
        L, d, F_ = cfg.n_layers, cfg.d_model, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(L, F_, d).uniform_(-d ** -0.5, d ** -0.5))
        self.b_enc = nn.Parameter(torch.zeros(L, F_))
        # decoders start at zero (as minisv's TopK transcoders): the first steps learn the output map
        self.W_dec = nn.ParameterList(nn.Parameter(torch.zeros(cfg.reach(l), F_, d)) for l in range(L))
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

    def decode_layer(self, target, values, indices):
        """ŷ_target [N, d] from the codes of every layer (lists or [N, L, ·] tensors; only layers that reach
        `target` are read), without the skip path."""
        out = self.b_dec[target].expand(values[0].shape[0], -1)
        for s in range(max(0, target - (self.cfg.window or target + 1) + 1), target + 1):
            W = self.W_dec[s][target - s]                                              # [F, d]
            if indices is None:
                out = out + values[s] @ W
            else:
                out = out + F.embedding_bag(indices[s], W, mode="sum", per_sample_weights=values[s].to(W.dtype))
        return out

    def reconstruct(self, x):
        """x [N, L, d] -> (ŷ [N, L, d], values, indices): every layer's prediction and the code behind it."""
        values, indices = self.encode(x)
        v, i = values.unbind(1), (indices.unbind(1) if indices is not None else None)
        y = torch.stack([self.decode_layer(t, v, i) for t in range(self.cfg.n_layers)], 1)
        return (y + torch.einsum("nld,lde->nle", x.to(y.dtype), self.W_skip) if self.W_skip is not None else y), \
            values, indices

    def forward(self, x):
        return self.reconstruct(x)[0]

    def dense(self, values, indices):
        """A code as dense activations [N, L, F]."""
        if indices is None:
            return values
        return torch.zeros(*values.shape[:-1], self.cfg.d_sae, dtype=values.dtype,
                           device=values.device).scatter(-1, indices, values)

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
        return torch.stack([w.pow(2).sum((0, 2)).add(1e-12).sqrt() for w in self.W_dec])

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
