"""A transcoder: a wide, sparse MLP trained to imitate one MLP of a transformer (`docs/methods.md` §2.1).

It reads the MLP's input x (`blocks.L.ln2.hook_normalized`, the normalized residual before the norm's gain)
and predicts the MLP's output y (`blocks.L.hook_mlp_out`) through d_sae latents of which only a few are active:

    pre = x @ W_enc + b_enc                               [N, d_sae]
    f   = ReLU(pre)                      (architecture "relu", kept sparse by an L1 penalty in training)
        | ReLU(pre) on the k largest pre, 0 elsewhere   (architecture "topk")
    ŷ   = f @ W_dec + b_dec (+ x @ W_skip, optional)      [N, d_out]

Each latent j is a feature with an input direction W_enc[:, j] and an output direction W_dec[j]. Every user of a
transcoder (training, evaluation, circuits, dashboards) goes through the methods below, so changing one of them
(`encode` to BatchTopK, say) changes all of them. The code of a batch is a pair (values, indices): for TopK the
k active latents of each token, values and ids [N, k], decoded by summing k rows of W_dec with `F.embedding_bag`
(O(N·k·d_out) instead of O(N·d_sae·d_out)); for ReLU every latent, values [N, d_sae] and indices None.

Reading and writing files (minisv's own layout, SAELens, sparsify, the released GPT-2 transcoders) lives in
`minisv/formats.py`: this file is only the module.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinisvError


def mlp_hooks(layer):
    """The hooks a transcoder of `layer` reads and predicts: the MLP input before the norm gain, and the MLP output."""
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def convention_of(hook_in):
    """What a coder reading `hook_in` sees: "normalized" (a norm's output before its gain) or "raw"."""
    return "normalized" if hook_in.endswith("hook_normalized") else "raw"


def dense_code(values, indices, d_sae):
    """A sparse code, values and indices [..., k], as dense activations [..., d_sae]; with indices None the values
    are dense already (ReLU and JumpReLU codes)."""
    if indices is None:
        return values
    return torch.zeros(*values.shape[:-1], d_sae, dtype=values.dtype, device=values.device).scatter(-1, indices, values)


@dataclass
class TranscoderConfig:
    d_in: int
    d_out: int
    d_sae: int
    architecture: str = "topk"            # "topk" | "relu"
    k: int = 32                           # active latents per token (topk only)
    skip: bool = False                    # add a dense linear path x @ W_skip
    model: str = ""
    layer: int = 0
    hook_in: str = ""                     # e.g. "blocks.6.ln2.hook_normalized"
    hook_out: str = ""                    # e.g. "blocks.6.hook_mlp_out"
    input_convention: str = "normalized"  # x is the norm's output *before* its gain (and bias)
    target_centered: bool = False         # y is mlp_out minus its mean over d_model (released GPT-2 transcoders)
    dataset: str = ""
    training_tokens: int = 0

    def __post_init__(self):
        if self.architecture not in ("topk", "relu"):
            raise MinisvError(f"unknown transcoder architecture {self.architecture!r}; use 'topk' or 'relu'")
        if min(self.d_in, self.d_out, self.d_sae) < 1 or (self.architecture == "topk" and not 0 < self.k <= self.d_sae):
            raise MinisvError(f"bad transcoder sizes d_in={self.d_in} d_out={self.d_out} d_sae={self.d_sae} "
                              f"k={self.k}; need positive sizes and 0 < k <= d_sae")


class _SelectedPreacts(torch.autograd.Function):
    """pre[n, idx[n, j]] for a few selected latents per token, with a backward that touches only those.

    The selection needs every pre-activation, so the forward's dense x @ W_enc is unavoidable; but the
    gradient is nonzero for just N·k of the N·d_sae entries. Dense autograd would spend another two
    N·d_in·d_sae matmuls on zeros; here grad W_enc is a sparse [d_sae, N] × dense [N, d_in] product and
    grad x an embedding_bag over the selected encoder rows, both O(N·k·d_in)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, pre, indices):   # pre: the dense pre-activations, computed without grad
        ctx.save_for_backward(x, W_enc, indices)
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx, grad):                           # grad [N, m] w.r.t. the selected pre-activations
        x, W_enc, indices = ctx.saved_tensors
        N, m = indices.shape
        grad = grad.to(W_enc.dtype)
        tokens = torch.arange(N, device=x.device).repeat_interleave(m)
        scatter = torch.sparse_coo_tensor(torch.stack([indices.flatten(), tokens]), grad.flatten(),
                                          (W_enc.shape[1], N), check_invariants=False)
        grad_W = torch.sparse.mm(scatter, x.to(W_enc.dtype)).t()      # [d_in, d_sae], feature-major like W_enc
        grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(
            0, indices.flatten(), grad.flatten())
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.t(), per_sample_weights=grad, mode="sum").to(x.dtype)
        return grad_x, grad_W, grad_b, None, None


def selected_preacts(x, W_enc, b_enc, pre, indices):
    """Differentiable pre-activations of the latents in `indices` [N, m]; `pre` [N, d_sae] = x @ W_enc + b_enc
    computed under no_grad (the TopK forward needs it anyway to choose the indices)."""
    return _SelectedPreacts.apply(x, W_enc, b_enc, pre, indices)


class Transcoder(nn.Module):
    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_out, d_sae = cfg.d_in, cfg.d_out, cfg.d_sae
        # W_enc is [d_in, d_sae] but stored feature-major (its transpose is contiguous), so each latent's
        # encoder vector is one contiguous row for the sparse backward's gathers and scatters.
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_in).t())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out)) if cfg.skip else None
        with torch.no_grad():
            if cfg.architecture == "topk":
                # the decoder starts at zero, so the first steps learn the output map before a random decoder
                # can push the encoder around (sparsify's choice for transcoders)
                self.W_enc.t().uniform_(-d_in ** -0.5, d_in ** -0.5)   # in storage order
            else:
                # the paper's code: Kaiming-uniform weights (bound sqrt(6 / d_sae) for W_enc [d_in, d_sae]), the
                # decoder rows then at unit norm, where `normalize_decoder` keeps them
                nn.init.kaiming_uniform_(self.W_enc)
                nn.init.kaiming_uniform_(self.W_dec)
                self.normalize_decoder()

    # ---------------------------------------------------------------- the map
    def preacts(self, x):
        return F.linear(x, self.W_enc.t(), self.b_enc)     # x @ W_enc + b_enc, the bias fused into the matmul

    def encode(self, x):
        """The code of x [..., d_in]: (values, indices). TopK: values = ReLU of the k largest pre-activations and
        their latent ids, each [..., k]. ReLU: values = ReLU(pre) [..., d_sae] (mostly zeros), indices None."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.architecture == "relu":
            return F.relu(self.preacts(x)), None
        x2 = x.reshape(-1, self.cfg.d_in)
        with torch.no_grad():
            pre = self.preacts(x2)
        indices = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
        values = selected_preacts(x2, self.W_enc, self.b_enc, pre, indices).relu()
        return values.view(*x.shape[:-1], -1), indices.view(*x.shape[:-1], -1)

    def decode(self, values, indices=None):
        """Σ_j f_j · W_dec[j] + b_dec [..., d_out] (without the skip path, which needs x). A sparse code gathers
        its k rows per token with embedding_bag; a dense one (indices None) is a matmul."""
        if indices is None:
            return values @ self.W_dec + self.b_dec
        out = F.embedding_bag(indices.reshape(-1, indices.shape[-1]), self.W_dec, mode="sum",
                              per_sample_weights=values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype))
        return out.view(*values.shape[:-1], -1) + self.b_dec

    def reconstruct(self, x):
        """x [..., d_in] -> (ŷ [..., d_out], values, indices): the prediction and the code behind it."""
        values, indices = self.encode(x)
        y = self.decode(values, indices)
        return (y + x.to(self.W_skip.dtype) @ self.W_skip if self.W_skip is not None else y), values, indices

    def forward(self, x):
        """x [..., d_in] -> ŷ [..., d_out]: what replaces the MLP's output when the transcoder is spliced in."""
        return self.reconstruct(x)[0]

    def dense(self, values, indices):
        """A code as dense activations f [..., d_sae]."""
        return dense_code(values, indices, self.cfg.d_sae)

    def fired(self, values, indices):
        """How many tokens of a code [N, ...] each latent is active on: [d_sae] (float)."""
        if indices is None:
            return (values > 0).flatten(0, -2).sum(0).float()
        return torch.zeros(self.cfg.d_sae, device=values.device).index_add_(
            0, indices.flatten(), (values > 0).flatten().float())

    def sites(self, layer):
        """(hook read, hook predicted): the config's, or where it names none, the MLP's of `layer`."""
        return (self.cfg.hook_in, self.cfg.hook_out) if self.cfg.hook_in else mlp_hooks(layer)

    def target(self, mlp_out):
        """What this transcoder predicts from the MLP's output: itself, or for a target-centered transcoder (the
        released GPT-2 ones) itself minus its mean over d_model."""
        return mlp_out - mlp_out.mean(-1, keepdim=True) if self.cfg.target_centered else mlp_out

    # ---------------------------------------------------------------- training's constraints
    @torch.no_grad()
    def center_on(self, x_mean, y_mean):
        """b_dec = mean target, b_enc = −mean(x) @ W_enc: pre-activations start centered, the output at the mean."""
        self.b_dec.copy_(y_mean)
        self.b_enc.copy_(-x_mean @ self.W_enc)

    # ReLU + L1 keeps the decoder rows on the unit sphere (else the L1 penalty is cheated by shrinking f and growing
    # W_dec): before each optimizer step the gradient's component along each row is removed, so Adam moves along
    # the sphere, and after it the rows are scaled back to norm 1.
    @torch.no_grad()
    def project_decoder_grad(self):
        w, g = self.W_dec, self.W_dec.grad
        g.sub_((g * w).sum(-1, keepdim=True) * w)

    @torch.no_grad()
    def normalize_decoder(self):
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
