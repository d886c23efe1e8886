"""One decoder-only transformer for three families, with TransformerLens-named hook points.

    gpt2   learned positions, LayerNorm, sequential blocks, GELU (tanh approximation), tied unembedding
    neox   (Pythia) rotary on the first rotary_dim dims of each head, LayerNorm, *parallel* blocks
           (attention and MLP both read resid_pre), exact GELU, untied unembedding
    llama  (Llama, SmolLM2, Qwen2) rotary, RMSNorm, SwiGLU MLP, grouped-query attention

The nn.Modules below only hold parameters; all of the math lives in `Model` methods so it reads top to
bottom, and every intermediate passes through `self._hook(name, x)`, where user callbacks may read or replace
it. Shapes: B batch, T positions, D d_model, H heads, K kv heads, E d_head, M d_mlp, V vocab.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinisvError
from .progress import progress


@dataclass
class ModelConfig:
    family: str            # "gpt2" | "neox" | "llama"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int        # < n_heads means grouped-query attention
    d_head: int
    d_mlp: int
    vocab_size: int        # rows of the (possibly padded) embedding; logits have this width
    n_ctx: int             # longest input the model was trained for
    act: str               # "gelu_new" (tanh approx.) | "gelu" | "silu" | "relu"
    norm_eps: float = 1e-5
    parallel: bool = False            # neox: x + attn(ln1 x) + mlp(ln2 x)
    rotary_dim: int = 0               # 0: learned absolute positions (gpt2)
    rope_base: float = 10000.0
    rope_llama3: tuple | None = None  # (factor, low_freq_factor, high_freq_factor, original_n_ctx)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    name: str = ""


ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh":
               lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu, "relu": F.relu}


class Norm(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.family != "llama" else None


class Rows(NamedTuple):
    """Rows lo:hi of a Linear's weight and bias, as views: edits reach the Linear (`attn.v.weight[0] = 0`)."""
    weight: torch.Tensor
    bias: torch.Tensor | None


def _rows(linear, lo, hi):
    return Rows(linear.weight[lo:hi], linear.bias[lo:hi] if linear.bias is not None else None)


class Attention(nn.Module):
    """Q, K and V share their input, so they are one Linear (one matmul): rows [q (H·E) | k (K·E) | v (K·E)];
    `q`, `k` and `v` are views of its rows."""
    def __init__(self, cfg):
        super().__init__()
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.qkv = nn.Linear(D, (H + 2 * K) * E, bias=cfg.qkv_bias)
        self.o = nn.Linear(H * E, D, bias=cfg.o_bias)
        self.sizes = [H * E, K * E, K * E]

    q = property(lambda self: _rows(self.qkv, 0, self.sizes[0]))
    k = property(lambda self: _rows(self.qkv, self.sizes[0], self.sizes[0] + self.sizes[1]))
    v = property(lambda self: _rows(self.qkv, self.sizes[0] + self.sizes[1], sum(self.sizes)))


class MLP(nn.Module):
    """fc → act → proj. SwiGLU (llama) multiplies act(gate x) by up x; gate and up share their input, so `fc` is one
    Linear holding both, rows [gate (M) | up (M)], and `gate` and `up` are views of its rows."""
    def __init__(self, cfg):
        super().__init__()
        D, M, self.gated = cfg.d_model, cfg.d_mlp, cfg.family == "llama"
        self.fc = nn.Linear(D, 2 * M if self.gated else M, bias=cfg.mlp_bias)
        self.proj = nn.Linear(M, D, bias=cfg.mlp_bias)                      # "down"

    gate = property(lambda self: _rows(self.fc, 0, self.proj.in_features) if self.gated else None)
    up = property(lambda self: _rows(self.fc, self.proj.in_features, 2 * self.proj.in_features) if self.gated else None)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = Norm(cfg), Attention(cfg), Norm(cfg), MLP(cfg)


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model) if cfg.rotary_dim == 0 else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = Norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self._hooks = {}           # hook name -> list of callbacks, in the order they were added
        self.positions = None      # LongTensor [B, T]: absolute positions of the tokens in the current forward
        self.hook_names = self._all_hook_names()

    def _all_hook_names(self):
        cfg = self.cfg
        per_layer = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
                     "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out",
                     "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out",
                     "hook_resid_post"]
        per_layer += ["attn.hook_rot_q", "attn.hook_rot_k"] if cfg.rotary_dim else []
        per_layer += ["mlp.hook_pre_linear"] if cfg.family == "llama" else []
        per_layer += [] if cfg.parallel else ["hook_resid_mid"]
        names = ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"]
        names += ["hook_pos_embed"] if self.pos_embed is not None else []
        return set(names + [f"blocks.{l}.{n}" for l in range(cfg.n_layers) for n in per_layer])

    def check_layer(self, layer, what="layer"):
        """`layer` if it indexes one of this model's blocks, else a MinisvError; `what` names where the number
        came from ("transcoder layer", "layer in path 'mlp 40'")."""
        n = self.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise MinisvError(f"{what} {layer!r} is out of range: this model has {n} layers, use 0..{n - 1}")
        return layer

    # ---------------------------------------------------------------- hooks
    @contextmanager
    def hooks(self, fns: dict):
        """Within the block, call fn(activation, name) at each named hook point; a non-None return replaces
        the activation. Nestable: inner hooks run after outer ones. Callbacks can read `model.positions`
        ([B, T] absolute positions, also during KV-cache generation) to act on chosen tokens only."""
        unknown = [n for n in fns if n not in self.hook_names]
        if unknown:
            raise MinisvError(f"unknown hook name {unknown[0]!r}; valid names look like 'blocks.0.hook_resid_pre' "
                              f"(layers 0..{self.cfg.n_layers - 1}), see model.hook_names")
        for name, fn in fns.items():
            self._hooks.setdefault(name, []).append(fn)
        try:
            yield self
        finally:
            for name, fn in fns.items():
                self._hooks[name].remove(fn)
                if not self._hooks[name]:
                    del self._hooks[name]

    def _hook(self, name, x):
        for fn in self._hooks.get(name, ()):
            out = fn(x, name)
            x = x if out is None else out
        return x

    def run_with_cache(self, tokens, names=None, **kwargs):
        """Forward and also return {hook name: activation} for `names` (default: every hook point).
        Tensors keep their autograd graph when grad is enabled, so callers can differentiate through them."""
        names = sorted(self.hook_names) if names is None else list(names)
        cache = {}

        def keep(x, name):
            cache[name] = x
        with self.hooks({n: keep for n in names}):
            out = self(tokens, **kwargs)
        return out, cache

    # ---------------------------------------------------------------- forward
    def forward(self, x, *, start_at_layer=None, stop_at_layer=None, attention_mask=None, kv_cache=None):
        """x: token ids [B, T] (or [T]) -> logits [B, T, V].
        start_at_layer=L: x is instead the residual stream [B, T, D] (or [T, D]) entering block L, as in
        TransformerLens (L = 0 too; integer token ids are still accepted at L = 0). stop_at_layer=L returns the
        residual entering block L instead of logits (before that block's hook_resid_pre runs, so
        `start_at_layer=L` picks up exactly there). attention_mask [B, T_total]: 1 for real tokens, 0 for left
        padding. kv_cache: a KVCache, extended in place."""
        past = kv_cache.length if kv_cache is not None else 0
        start, stop = start_at_layer or 0, self.cfg.n_layers if stop_at_layer is None else stop_at_layer
        if not 0 <= start <= stop <= self.cfg.n_layers:
            raise MinisvError(f"need 0 <= start_at_layer <= stop_at_layer <= {self.cfg.n_layers}, got "
                              f"start_at_layer={start_at_layer}, stop_at_layer={stop_at_layer}")
        from_tokens = start_at_layer is None or start == 0 and not x.is_floating_point()
        x = self._check_input(x, from_tokens, past)
        B, T = x.shape[:2]
        if attention_mask is None:
            self.positions = torch.arange(past, past + T, device=x.device).expand(B, T)
        else:   # left padding: a row's first real token is position 0
            self.positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
        mask = self._attention_mask(attention_mask, T, past, x.device)
        resid = x
        if from_tokens:
            resid = self._hook("hook_embed", self.embed(x))
            if self.pos_embed is not None:
                resid = resid + self._hook("hook_pos_embed", self.pos_embed(self.positions))
        rope = self._rotary(self.positions, resid.dtype) if self.cfg.rotary_dim else None
        for l in range(start, stop):
            resid = self._block(l, resid, rope, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if stop_at_layer is not None:
            return resid
        return self.unembed(self.apply_norm("ln_final", resid))

    def _check_input(self, x, from_tokens, past):
        """x as [B, T] token ids or a [B, T, D] residual; a one-line MinisvError for anything else."""
        if x.numel() == 0:
            raise MinisvError(f"empty input (shape {tuple(x.shape)}): give at least one token — did the prompt "
                              f"encode to nothing?")
        if from_tokens and (x.dtype not in (torch.long, torch.int32) or x.dim() not in (1, 2)):
            raise MinisvError(f"expected integer token ids [B, T], got a {str(x.dtype).removeprefix('torch.')} "
                              f"tensor of shape {tuple(x.shape)} (to run from a residual stream, pass "
                              f"start_at_layer)")
        if not from_tokens and (not x.is_floating_point() or x.dim() not in (2, 3) or
                                x.shape[-1] != self.cfg.d_model):
            raise MinisvError(f"with start_at_layer, expected a float residual stream [B, T, {self.cfg.d_model}], "
                              f"got a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}")
        x = x[None] if x.dim() == (1 if from_tokens else 2) else x
        if x.shape[1] + past > self.cfg.n_ctx:
            raise MinisvError(f"input of {x.shape[1] + past} tokens is longer than the model's context of "
                              f"{self.cfg.n_ctx}; shorten the prompt")
        if from_tokens and (x.min() < 0 or x.max() >= self.cfg.vocab_size):
            raise MinisvError(f"token id {int(x.max() if x.max() >= self.cfg.vocab_size else x.min())}"
                              f" is outside the vocabulary [0, {self.cfg.vocab_size})")
        return x

    def _attention_mask(self, attention_mask, T, past, device):
        """None when plain causal attention suffices (SDPA's is_causal fast path), else bool [B, 1, T, past+T]."""
        if attention_mask is None and past == 0:
            return None
        q = torch.arange(past, past + T, device=device)[:, None]
        k = torch.arange(past + T, device=device)[None, :]
        mask = (k <= q)[None, None]
        if attention_mask is not None:
            # a padding query sees no real key: let it see itself so softmax stays finite (its output is unused)
            mask = mask & attention_mask.bool()[:, None, None, :] | (k == q)
        return mask

    def _block(self, l, resid, rope, mask, kv_cache):
        p = f"blocks.{l}."
        resid = self._hook(p + "hook_resid_pre", resid)
        attn_out = self._attention(l, self.apply_norm(p + "ln1", resid), rope, mask, kv_cache)
        attn_out = self._hook(p + "hook_attn_out", attn_out)
        if self.cfg.parallel:   # the MLP reads resid_pre too: it never sees this layer's attention output
            mlp_out = self._hook(p + "hook_mlp_out", self.apply_mlp(l, self.apply_norm(p + "ln2", resid)))
            resid = resid + attn_out + mlp_out
        else:
            resid = self._hook(p + "hook_resid_mid", resid + attn_out)
            resid = resid + self._hook(p + "hook_mlp_out", self.apply_mlp(l, self.apply_norm(p + "ln2", resid)))
        return self._hook(p + "hook_resid_post", resid)

    def apply_norm(self, prefix, x):
        """The norm named `prefix` ("ln_final", "blocks.3.ln2") applied to x [..., D]: LayerNorm (x - mean)/σ or
        RMSNorm x/σ, σ = sqrt(mean(x²) + eps) over the (centred) features [..., 1], in (at least) fp32 like
        the reference.
        As in TransformerLens, hook_scale sees σ (attribution methods freeze it) and hook_normalized the result
        before the learned scale (and bias). torch's fused norm runs unless someone hooks σ itself."""
        norm, eps = self.get_submodule(prefix), self.cfg.norm_eps
        h = x.to(torch.promote_types(x.dtype, torch.float32))                       # fp16/bf16 -> fp32
        if prefix + ".hook_scale" in self._hooks:
            if norm.bias is not None:
                h = h - h.mean(-1, keepdim=True)
            h = h / self._hook(prefix + ".hook_scale", (h.pow(2).mean(-1, keepdim=True) + eps).sqrt())
        elif norm.bias is not None:
            h = F.layer_norm(h, h.shape[-1:], eps=eps)
        else:
            h = F.rms_norm(h, h.shape[-1:], eps=eps)      # h * rsqrt(mean(h²) + eps), as Llama computes it
        h = self._hook(prefix + ".hook_normalized", h.to(x.dtype))
        return torch.addcmul(norm.bias, h, norm.weight) if norm.bias is not None else norm.weight * h

    def _attention(self, l, x, rope, mask, kv_cache):
        cfg, attn, p = self.cfg, self.blocks[l].attn, f"blocks.{l}.attn."
        B, T, _ = x.shape
        H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        qkv = attn.qkv(x).view(B, T, H + 2 * K, E)
        q, k, v = (self._hook(p + n, t) for n, t in zip(("hook_q", "hook_k", "hook_v"), qkv.split([H, K, K], 2)))
        if rope is not None:
            q = self._hook(p + "hook_rot_q", _apply_rotary(q, rope))
            k = self._hook(p + "hook_rot_k", _apply_rotary(k, rope))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # [B, H or K, T, E]
        if kv_cache is not None:
            k, v = kv_cache.update(l, k, v)
        if p + "hook_pattern" in self._hooks or p + "hook_attn_scores" in self._hooks:
            # materialize scores and pattern only when someone looks at them
            k_, v_ = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
            scores = q @ k_.transpose(-1, -2) / E ** 0.5                           # [B, H, T, T_total]
            causal = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = self._hook(p + "hook_attn_scores", scores.masked_fill(~causal, float("-inf")))
            z = self._hook(p + "hook_pattern", scores.softmax(-1)) @ v_
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=K != H)
        z = self._hook(p + "hook_z", z.transpose(1, 2))                            # [B, T, H, E]
        return attn.o(z.reshape(B, T, H * E))

    def apply_mlp(self, l, x):
        """Block l's MLP on its (normed) input x [..., D] -> [..., D]; public so methods can linearize it."""
        mlp, p, act = self.blocks[l].mlp, f"blocks.{l}.mlp.", ACTIVATIONS[self.cfg.act]
        if mlp.gated:              # SwiGLU: hook_pre is the gate's pre-activation, hook_pre_linear the "up" one
            gate, up = mlp.fc(x).chunk(2, -1)
            post = act(self._hook(p + "hook_pre", gate)) * self._hook(p + "hook_pre_linear", up)
        else:
            post = act(self._hook(p + "hook_pre", mlp.fc(x)))
        return mlp.proj(self._hook(p + "hook_post", post))

    def _rotary(self, positions, dtype):
        """(cos, sin) [B, T, 1, rotary_dim] for NeoX-style ("halves") rotary, computed in fp32 and cast to the
        residual's dtype, with the first half of sin negated (see _apply_rotary)."""
        rd = self.cfg.rotary_dim
        inv_freq = 1.0 / self.cfg.rope_base ** (torch.arange(0, rd, 2, device=positions.device).float() / rd)
        if self.cfg.rope_llama3 is not None:
            inv_freq = _llama3_scaling(inv_freq, *self.cfg.rope_llama3)
        angles = positions[..., None, None].float() * inv_freq                     # [B, T, 1, rd/2]
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, tokens, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, stop_at_eos=True,
                 generator=None):
        """Sample continuations with a KV cache; active hooks apply at every step (model.positions holds each
        token's absolute position). tokens: a list of ids, a [T] or [B, T] tensor, or a list of id lists of
        different lengths (left-padded internally). Returns the new ids: a list, or a list of lists for a batch.
        temperature 0 is greedy; top_k / top_p filter before sampling."""
        single = isinstance(tokens, torch.Tensor) and tokens.dim() == 1 or \
            isinstance(tokens, list) and (not tokens or isinstance(tokens[0], int))
        rows = [tokens] if single else list(tokens)
        rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in rows]
        if any(len(r) == 0 for r in rows):
            raise MinisvError("cannot generate from an empty prompt; give at least one token")
        width, n_ctx = max(len(r) for r in rows), self.cfg.n_ctx
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise MinisvError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
        if width + max_new_tokens > n_ctx:
            raise MinisvError(f"a {width}-token prompt plus max_new_tokens={max_new_tokens} exceeds the model's "
                              f"context of {n_ctx} tokens; " + (f"lower max_new_tokens to at most {n_ctx - width}"
                                                               if width < n_ctx else "shorten the prompt"))
        device = self.embed.weight.device
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
        # 1 for real tokens, 0 for left padding, allocated once for the prompt and every new token
        mask = torch.ones(len(rows), width + max_new_tokens, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            mask[i, :width - len(r)] = 0
        padded = any(len(r) < width for r in rows)
        # Pythia pads its embedding past the tokenizer's vocabulary: never sample ids that cannot be decoded
        usable = getattr(self.tokenizer, "vocab_size", self.cfg.vocab_size)
        eos = getattr(self.tokenizer, "eos_id", None) if stop_at_eos else None
        cache, out = KVCache(self.cfg.n_layers, capacity=width + max_new_tokens), []
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for step in progress(range(max_new_tokens), "generating", unit=" tokens"):
            logits = self(ids, kv_cache=cache, attention_mask=mask[:, :width + step] if padded else None)
            nxt = _sample(logits[:, -1, :usable].float(), temperature, top_k, top_p, generator)
            out.append(nxt)
            if eos is not None:
                done |= nxt == eos
                if done.all():
                    break
            ids = nxt[:, None]
        new = torch.stack(out, 1).tolist() if out else [[] for _ in rows]
        new = [r[:r.index(eos) + 1] if eos in r else r for r in new]
        return new[0] if single else new


class KVCache:
    """Keys and values of every layer for the tokens seen so far, in buffers [B, K, capacity, E] that grow
    (doubling) only when full, so a generation step writes its new entries in place instead of copying the past."""
    def __init__(self, n_layers, capacity=0):
        self.kv, self.length, self.capacity = [None] * n_layers, 0, capacity

    def update(self, l, k, v):
        """Store layer l's k, v [B, K, T, E] after the tokens seen so far; return all of them [B, K, seen+T, E]."""
        end = self.length + k.shape[2]
        if self.kv[l] is None or self.kv[l][0].shape[2] < end:
            size = max(end, self.capacity, 2 * self.kv[l][0].shape[2] if self.kv[l] is not None else 0)
            grown = tuple(t.new_empty(*t.shape[:2], size, t.shape[3]) for t in (k, v))
            if self.kv[l] is not None:
                for new, old in zip(grown, self.kv[l]):
                    new[:, :, :self.length] = old[:, :, :self.length]
            self.kv[l] = grown
        keys, values = self.kv[l]
        keys[:, :, self.length:end], values[:, :, self.length:end] = k, v
        return keys[:, :, :end], values[:, :, :end]


def _apply_rotary(x, rope):
    """Rotate the first rd dims of each head of x [B, T, H, E]: pairs (i, i + rd/2) turn by angle_i·position.
    With rope = (cos, sin) from Model._rotary (first half of sin negated) that is x·cos + swap_halves(x)·sin,
    bit for bit the reference's x·cos + rotate_half(x)·sin, with one kernel fewer."""
    cos, sin = rope
    rd = cos.shape[-1]
    r1, r2 = x[..., :rd].chunk(2, -1)
    rotated = x[..., :rd] * cos + torch.cat([r2, r1], -1) * sin
    return rotated if rd == x.shape[-1] else torch.cat([rotated, x[..., rd:]], -1)


def _llama3_scaling(inv_freq, factor, low_freq_factor, high_freq_factor, original_n_ctx):
    """Llama 3.1's long-context rotary: slow (long-wavelength) frequencies are divided by `factor`, fast ones
    are kept, and the band in between is interpolated smoothly."""
    wavelen = 2 * torch.pi / inv_freq
    smooth = (original_n_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > original_n_ctx / low_freq_factor, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= original_n_ctx / low_freq_factor) & (wavelen >= original_n_ctx / high_freq_factor)
    return torch.where(is_mid, mid, out)


def _sample(logits, temperature, top_k, top_p, generator):
    """logits [B, V] (fp32) -> next ids [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p     # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
