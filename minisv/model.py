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

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MinisvError


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


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.q = nn.Linear(D, H * E, bias=cfg.qkv_bias)
        self.k = nn.Linear(D, K * E, bias=cfg.qkv_bias)
        self.v = nn.Linear(D, K * E, bias=cfg.qkv_bias)
        self.o = nn.Linear(H * E, D, bias=cfg.o_bias)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)      # "up" in SwiGLU
        self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias) if cfg.family == "llama" else None
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)    # "down"


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
        per_layer = ["hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                     "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "ln2.hook_normalized", "mlp.hook_pre",
                     "mlp.hook_post", "hook_mlp_out", "hook_resid_post"] + ([] if self.cfg.parallel else ["hook_resid_mid"])
        names = ["hook_embed", "ln_final.hook_normalized"] + (["hook_pos_embed"] if self.pos_embed is not None else [])
        return set(names + [f"blocks.{l}.{n}" for l in range(self.cfg.n_layers) for n in per_layer])

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
    def forward(self, x, *, stop_at_layer=None, start_at_layer=0, attention_mask=None, kv_cache=None):
        """x: token ids [B, T] (or [T]) -> logits [B, T, V]; or, with start_at_layer=L, the residual stream
        [B, T, D] entering block L. stop_at_layer=L returns the residual entering block L instead of logits
        (before that block's hook_resid_pre runs, so `start_at_layer=L` picks up exactly there).
        attention_mask [B, T_total]: 1 for real tokens, 0 for left padding. kv_cache: a KVCache, extended in place."""
        if start_at_layer == 0:
            tokens = x if x.dim() == 2 else x[None]
            self._check_tokens(tokens, kv_cache)
            B, T = tokens.shape
        else:
            resid = x if x.dim() == 3 else x[None]
            B, T = resid.shape[:2]
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is None:
            self.positions = torch.arange(past, past + T, device=x.device).expand(B, T)
        else:   # left padding: a row's first real token is position 0
            self.positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
        mask = self._attention_mask(attention_mask, T, past, x.device)
        if start_at_layer == 0:
            resid = self._hook("hook_embed", self.embed(tokens))
            if self.pos_embed is not None:
                resid = resid + self._hook("hook_pos_embed", self.pos_embed(self.positions))
        rope = self._rotary(self.positions) if self.cfg.rotary_dim else None
        for l in range(start_at_layer, self.cfg.n_layers if stop_at_layer is None else stop_at_layer):
            resid = self._block(l, resid, rope, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if stop_at_layer is not None:
            return resid
        return self.unembed(self.apply_norm("ln_final", resid))

    def _check_tokens(self, tokens, kv_cache):
        if tokens.dtype not in (torch.long, torch.int, torch.int32):
            raise MinisvError(f"expected integer token ids, got a {tokens.dtype} tensor (to start from a residual, "
                              f"pass start_at_layer)")
        total = tokens.shape[1] + (kv_cache.length if kv_cache is not None else 0)
        if total > self.cfg.n_ctx:
            raise MinisvError(f"input of {total} tokens is longer than the model's context of {self.cfg.n_ctx}; "
                              f"shorten the prompt")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            raise MinisvError(f"token id {int(tokens.max() if tokens.max() >= self.cfg.vocab_size else tokens.min())}"
                              f" is outside the vocabulary [0, {self.cfg.vocab_size})")

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
        """The norm named `prefix` ("ln_final", "blocks.3.ln2") applied to x: LayerNorm (x - mean)/std or
        RMSNorm x/rms, computed in fp32 like the reference; hook_normalized sees the result before the learned
        scale (and bias), as in TransformerLens."""
        norm = self.get_submodule(prefix)
        h = x.float()
        if norm.bias is not None:
            h = h - h.mean(-1, keepdim=True)
        h = self._hook(prefix + ".hook_normalized", (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True)
                                                                       + self.cfg.norm_eps)).to(x.dtype))
        return h * norm.weight + norm.bias if norm.bias is not None else norm.weight * h

    def _attention(self, l, x, rope, mask, kv_cache):
        cfg, attn, p = self.cfg, self.blocks[l].attn, f"blocks.{l}.attn."
        B, T, _ = x.shape
        q = self._hook(p + "hook_q", attn.q(x).view(B, T, cfg.n_heads, cfg.d_head))
        k = self._hook(p + "hook_k", attn.k(x).view(B, T, cfg.n_kv_heads, cfg.d_head))
        v = self._hook(p + "hook_v", attn.v(x).view(B, T, cfg.n_kv_heads, cfg.d_head))
        if rope is not None:
            q, k = _apply_rotary(q, rope, cfg.rotary_dim), _apply_rotary(k, rope, cfg.rotary_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # [B, H or K, T, E]
        if kv_cache is not None:
            k, v = kv_cache.update(l, k, v)
        if p + "hook_pattern" in self._hooks:    # materialize the pattern only when someone looks at it
            group = cfg.n_heads // cfg.n_kv_heads
            k_, v_ = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            scores = q @ k_.transpose(-1, -2) / cfg.d_head ** 0.5                 # [B, H, T, T_total]
            causal = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            pattern = self._hook(p + "hook_pattern", scores.masked_fill(~causal, float("-inf")).softmax(-1))
            z = pattern @ v_
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=cfg.n_kv_heads != cfg.n_heads)
        z = self._hook(p + "hook_z", z.transpose(1, 2))                            # [B, T, H, E]
        return attn.o(z.reshape(B, T, cfg.n_heads * cfg.d_head))

    def apply_mlp(self, l, x):
        """Block l's MLP on its (normed) input x [..., D] -> [..., D]; public so methods can linearize it."""
        mlp, p, act = self.blocks[l].mlp, f"blocks.{l}.mlp.", ACTIVATIONS[self.cfg.act]
        if mlp.gate is not None:   # SwiGLU: hook_pre is the gate's pre-activation, as in TransformerLens
            post = act(self._hook(p + "hook_pre", mlp.gate(x))) * mlp.fc(x)
        else:
            post = act(self._hook(p + "hook_pre", mlp.fc(x)))
        return mlp.proj(self._hook(p + "hook_post", post))

    def _rotary(self, positions):
        """cos, sin [B, T, rotary_dim] for NeoX-style ("halves") rotary, computed in fp32."""
        rd = self.cfg.rotary_dim
        inv_freq = 1.0 / self.cfg.rope_base ** (torch.arange(0, rd, 2, device=positions.device).float() / rd)
        if self.cfg.rope_llama3 is not None:
            inv_freq = _llama3_scaling(inv_freq, *self.cfg.rope_llama3)
        angles = positions[..., None].float() * inv_freq                           # [B, T, rd/2]
        angles = torch.cat([angles, angles], -1)
        return angles.cos(), angles.sin()

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
        width = max(len(r) for r in rows)
        device = self.embed.weight.device
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        padded = bool((mask == 0).any())
        eos = getattr(self.tokenizer, "eos_id", None) if stop_at_eos else None
        cache, out = KVCache(self.cfg.n_layers), []
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = self(ids, kv_cache=cache, attention_mask=mask if padded else None)[:, -1].float()
            nxt = _sample(logits, temperature, top_k, top_p, generator)
            out.append(nxt)
            if eos is not None:
                done |= nxt == eos
                if done.all():
                    break
            ids, mask = nxt[:, None], torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        new = torch.stack(out, 1).tolist() if out else [[] for _ in rows]
        new = [r[:r.index(eos) + 1] if eos in r else r for r in new]
        return new[0] if single else new


class KVCache:
    """Keys and values of every layer for the tokens seen so far: [B, K, T_seen, E] each."""
    def __init__(self, n_layers):
        self.kv, self.length = [None] * n_layers, 0

    def update(self, l, k, v):
        if self.kv[l] is not None:
            k, v = torch.cat([self.kv[l][0], k], 2), torch.cat([self.kv[l][1], v], 2)
        self.kv[l] = (k, v)
        return k, v


def _apply_rotary(x, rope, rd):
    """Rotate the first rd dims of each head of x [B, T, H, E]: pairs (i, i + rd/2) turn by angle_i·position."""
    cos, sin = (t[:, :, None, :].to(x.dtype) for t in rope)
    r, rest = x[..., :rd], x[..., rd:]
    r1, r2 = r.chunk(2, -1)
    return torch.cat([r * cos + torch.cat([-r2, r1], -1) * sin, rest], -1)


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
