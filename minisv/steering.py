"""One-shot optimized steering vectors (Dunefsky & Cohan, arXiv 2502.18862; see docs/methods.md §1).

A steering vector v [D] is added to the residual stream entering block `layer` (`blocks.{layer}.hook_resid_pre`)
and found by gradient descent so that on one prompt (or a few) the model says (promotion) or stops saying
(suppression) given completions. With p = softmax(coldness · logits) at each completion token y_k:

    promotion     L+ = − Σ_k log(p(y_k | x, y_<k; v) + ε)
    suppression   L− = − Σ_k log(1 − p(y_k | x, y_<k; v) + ε)      (or + Σ_k log(p + ε) with one_minus=False)

ε = 1e-6. Losses are in nats (natural log; the paper's "hartleys" thresholds were applied to nat losses too),
one per completion (optionally divided by its length); the optimizer minimizes their sum over completions and
datapoints. Other ways of steering, all trained with the same loss:
    clamp     x − (x·v̂)v̂ + α v     (the component along v̂ is set to α‖v‖)
    affine    x + v + M x,  M = Lᵀ R [D, D] of rank r, L and R [r, D] trained with v

Cost: nothing below `layer` depends on v, so the residual entering `layer` is computed once (no grad) and each
step re-runs only blocks `layer..n_layers-1`. All completions of all datapoints of a step go in one
right-padded batch (right padding needs no attention mask: real tokens never see the pads after them), and
only the positions that predict completion tokens go through the final norm and the unembedding.

The reference implementation (`steering_opt.optimize_vector` in the paper's code) and where minisv differs:
  - Stopping. Both stop when every completion's loss is at most its target (per-completion targets, else
    `target_loss`; `target_sum=True` compares the summed loss instead, the reference's `do_target_loss_sum`),
    or when the summed loss moves less than `converge_tol` (default 1e-6, the reference's ε) from one step to
    the next. The reference counts converged steps without ever resetting the count; minisv wants `patience`
    of them in a row (identical for the default patience 1).
  - max_iters. minisv takes exactly max_iters Adam steps and evaluates max_iters + 1 vectors (the last one
    is the vector it returns). The reference's loop runs until `iters > max_iters`, i.e. max_iters + 1 steps,
    and checks the target on the losses computed *before* the last step: the vector it returns is one Adam
    step past the one whose loss it reports. minisv returns the vector whose losses `info` reports.
  - Affine steering. Initialised as the reference does (rows of L and R random with norm
    `starting_affine_norm` = 1) and, after each step, rows longer than `max_affine_norm` = 2 are scaled back
    to it. M multiplies the residual *before* v is added (the reference's Hugging Face hook; its
    TransformerLens hook multiplies the already-steered residual).
  - Batching. The reference runs one forward per completion; minisv batches every completion of every
    datapoint. Its minibatch variant slides a window over the prompts with roll-over; minisv's `batch_size`
    splits the datapoints into fixed consecutive groups and steps through them in turn (so each group's
    frozen prefix is computed once).
  - Input checks. The reference accepts a clamp of a zero vector, a NaN coldness or a negative max_norm
    (which flips v at every step); minisv refuses them, and stops with an error if a loss becomes NaN.
  - BOS. Text is tokenized as the model's own tokenizer does it, with BOS first when it adds one (the
    reference's Hugging Face tokenizer call does the same).
"""
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from .atomic import atomic_write
from .errors import MinisvError

EPS = 1e-6


@dataclass
class Datapoint:
    """One training example. prompt and completions are text (needs model.tokenizer) or lists of token ids.
    promote / suppress: completions to make likely / unlikely. *_targets: a target loss (nats) per completion,
    for early stopping and satisficing. positions: where v is added during optimization, as Python indexing
    over the *prompt's* tokens as the model sees them (BOS included when the tokenizer adds one): an int, a
    slice (slice(-20, None) = the last 20 prompt tokens) or a list of ints; None = every token, prompt and
    completion. negative: apply −v to this datapoint."""
    prompt: str | list
    promote: list = field(default_factory=list)
    suppress: list = field(default_factory=list)
    promote_targets: list | None = None
    suppress_targets: list | None = None
    positions: int | slice | list | None = None
    negative: bool = False


# ------------------------------------------------------------------------------------------- steering hooks
def steering_hook(model, vector, multiplier=1.0, clamp=None, positions=None, matrix=None):
    """A hook fn(x, name) that steers x [B, T, D] with u = multiplier · vector:
        additive  x + u
        clamp     x − (x·v̂)v̂ + clamp · u     (afterwards the component along v̂ is exactly clamp·multiplier·‖v‖)
        matrix    adds M x (M [D, D], e.g. a low-rank Lᵀ R), with x taken *before* steering.
    multiplier: a number, or a tensor [B, 1, 1] giving each row its own. positions: absolute token positions to
    steer (int, slice with non-negative bounds, or an iterable of ints), read from model.positions, so a
    restriction keeps working during KV-cache generation; None = all."""
    if vector.shape != (model.cfg.d_model,):
        raise MinisvError(f"steering vector has shape {tuple(vector.shape)}, expected ({model.cfg.d_model},) "
                          f"(d_model of this model); was it trained on another model?")
    if clamp is not None and not bool(vector.norm() > 0):
        raise MinisvError("clamp steering needs a non-zero vector (its direction v/‖v‖ is undefined for v = 0); "
                          "start from a non-zero vector (starting_norm > 0)")
    if isinstance(positions, slice):
        bounds = [positions.start or 0, positions.stop or 0, positions.step or 1]
    elif isinstance(positions, int) or positions is None:
        bounds = [positions or 0]
    else:
        positions = torch.as_tensor(list(positions), dtype=torch.long, device=vector.device)
        bounds = positions.tolist()
    if min(bounds, default=0) < 0:
        raise MinisvError(f"steering positions {positions!r} must be absolute (>= 0, step > 0); negative "
                          f"indices have no meaning while generating")
    unit = vector / vector.norm() if clamp is not None else None

    def hook(x, name):
        u = (multiplier * vector).to(x.dtype)
        if clamp is None:
            out = x + u
        else:
            v_hat = unit.to(x.dtype)
            out = x - (x @ v_hat)[..., None] * v_hat + clamp * u
        if matrix is not None:      # new tensors above, so x is still the pre-steering input (no clone needed)
            out = out + x @ matrix.to(x.dtype).T
        if positions is None:
            return out
        return torch.where(_position_mask(model.positions, positions)[..., None], out, x)
    return hook


def _position_mask(pos, where):
    """pos [B, T] absolute positions -> bool [B, T], True where `where` (int, slice, or LongTensor) selects."""
    if isinstance(where, int):
        return pos == where
    if isinstance(where, slice):
        start, step = where.start or 0, where.step or 1
        mask = (pos >= start) & ((pos - start) % step == 0)
        return mask if where.stop is None else mask & (pos < where.stop)
    return torch.isin(pos, where.to(pos.device))


@contextmanager
def steer(model, vector, layer, multiplier=1.0, clamp=None, positions=None, matrix=None):
    """Apply `vector` at blocks.{layer}.hook_resid_pre (layer: an int or a list of ints) inside the block, for
    forwards and model.generate alike. multiplier −1 is the negation; see steering_hook for the rest."""
    layers = _check_layers(model, layer)
    hook = steering_hook(model, vector, multiplier, clamp, positions, matrix)
    with model.hooks({f"blocks.{l}.hook_resid_pre": hook for l in layers}):
        yield model


def _check_layers(model, layer):
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers:
        raise MinisvError("no layer to steer: give at least one")
    return [model.check_layer(l) for l in layers]


# ------------------------------------------------------------------------------------------- tokenization
def encode(model, text):
    """Token ids of a prompt as the model sees it: text is tokenized with BOS first when the model's tokenizer
    adds one (and the text does not already start with it, as a chat template may); a list of ids is kept as is."""
    if not isinstance(text, str):
        return [int(t) for t in text]
    tok = model.tokenizer
    if tok is None:
        raise MinisvError("this model has no tokenizer: pass prompts and completions as lists of token ids")
    ids = tok.encode(text)
    return [tok.bos_id] + ids if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id] else ids


def _completion_ids(model, prompt, prompt_ids, completion):
    """Tokens of `completion` after `prompt`: tokens(prompt + completion)[len(tokens(prompt)):], checked."""
    if isinstance(completion, str) != isinstance(prompt, str):
        raise MinisvError("give the prompt and its completions both as text or both as token-id lists")
    if not isinstance(completion, str):
        ids = encode(model, completion)
    else:
        joint = encode(model, prompt + completion)
        if joint[:len(prompt_ids)] != prompt_ids:
            raise MinisvError(f"completion {completion!r} merges with the end of the prompt when tokenized; "
                              f"end the prompt with a space or newline, or start the completion differently")
        ids = joint[len(prompt_ids):]
    if not ids:
        raise MinisvError(f"completion {completion!r} is empty; give at least one token to promote or suppress")
    return ids


def _pack(pairs, device):
    """Right-pad (prompt ids, completion ids) pairs into tokens [C, T]. Right padding needs no attention mask:
    under causal attention real tokens never see the pad tokens after them, and the loss skips pad positions.
    Also returns, for every completion token, its row, the position that predicts it, and its id: [N] each."""
    T = max(len(p) + len(c) for p, c in pairs)
    tokens = torch.zeros(len(pairs), T, dtype=torch.long)
    rows, cols, nxt = [], [], []
    for i, (p, c) in enumerate(pairs):
        tokens[i, :len(p) + len(c)] = torch.tensor(p + c)
        rows += [i] * len(c)
        cols += range(len(p) - 1, len(p) + len(c) - 1)
        nxt += c
    return tokens.to(device), *(torch.tensor(t, device=device) for t in (rows, cols, nxt))


def _prompt_positions(dp, n):
    """The prompt token indices [0, n) that dp.positions selects, as a list; None for every token."""
    if dp.positions is None:
        return None
    where, index = dp.positions, range(n)
    try:
        if isinstance(where, (int, slice)):
            chosen = index[where]
            chosen = [chosen] if isinstance(chosen, int) else list(chosen)
        else:
            chosen = sorted({index[int(i)] for i in where})
    except (IndexError, TypeError, ValueError):
        raise MinisvError(f"positions {where!r} do not index the prompt's {n} tokens; give an int, a slice or "
                          f"a list of ints within -{n}..{n - 1}") from None
    if not chosen:
        raise MinisvError(f"positions {where!r} select none of the prompt's {n} tokens, so v would steer nothing")
    return chosen


@dataclass
class _Batch:
    """Datapoints, tokenized: all their completions (each datapoint: promote, then suppress) in one batch."""
    tokens: torch.Tensor          # [C, T] right-padded prompt + completion
    rows: torch.Tensor            # [N] for every completion token: its completion,
    cols: torch.Tensor            #     the position that predicts it,
    next: torch.Tensor            #     its id,
    promote: torch.Tensor         #     True for a promoted completion's token
    lengths: torch.Tensor         # [C] completion lengths
    targets: torch.Tensor         # [C] target loss per completion, nan where none
    sign: torch.Tensor            # [C, 1, 1] −1 for a negative datapoint's completions, else 1
    mask: torch.Tensor | None     # [C, T] True where v is added; None = everywhere
    labels: list                  # [C] (datapoint index, "promote" | "suppress", completion) for reports


def _prepare(model, datapoints, first=0):
    """Tokenize and pack `datapoints` (numbered from `first` in the labels) into one _Batch."""
    pairs, kinds, targets, signs, labels, chosen = [], [], [], [], [], []
    for i, dp in enumerate(datapoints, first):
        if not isinstance(dp, Datapoint):
            raise MinisvError(f"expected minisv Datapoint objects, got {type(dp).__name__}")
        if not dp.promote and not dp.suppress:
            raise MinisvError(f"datapoint {dp.prompt!r:.60} has no completions; give promote=[...] and/or suppress=[...]")
        prompt_ids = encode(model, dp.prompt)
        if not prompt_ids:
            raise MinisvError("the prompt is empty; a completion's first token needs at least one token before it")
        where = _prompt_positions(dp, len(prompt_ids))
        for kind, texts, tl in (("promote", dp.promote, dp.promote_targets),
                                ("suppress", dp.suppress, dp.suppress_targets)):
            if tl is not None and len(tl) != len(texts):
                raise MinisvError(f"{kind}_targets has {len(tl)} entries for {len(texts)} completions; give one each")
            for c, t in zip(texts, tl if tl is not None else [float("nan")] * len(texts)):
                pairs.append((prompt_ids, _completion_ids(model, dp.prompt, prompt_ids, c)))
                kinds.append(kind == "promote")
                targets.append(t)
                signs.append(-1.0 if dp.negative else 1.0)
                labels.append((i, kind, c))
                chosen.append(where)
    device = model.embed.weight.device
    tokens, rows, cols, nxt = _pack(pairs, device)
    mask = None
    if any(w is not None for w in chosen):
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for r, w in enumerate(chosen):
            mask[r, slice(None) if w is None else w] = True
        mask = mask.to(device)
    lengths = torch.tensor([len(c) for _, c in pairs], device=device)
    return _Batch(tokens, rows, cols, nxt, torch.tensor(kinds, device=device)[rows], lengths,
                  torch.tensor(targets, dtype=torch.float, device=device),
                  torch.tensor(signs, device=device)[:, None, None], mask, labels)


# ------------------------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class LossConfig:
    """How a step's completions are scored and steered (everything but the trained tensors)."""
    layers: list                    # blocks whose input v is added to (the same v at each)
    coldness: float = 0.7           # p = softmax(coldness · logits)
    one_minus: bool = True          # suppression loss −log(1 − p + ε); False: +log(p + ε)
    normalize_length: bool = False  # divide each completion's loss by its number of tokens
    clamp: float | None = None      # clamp steering x − (x·v̂)v̂ + clamp·v instead of x + v


def _losses(model, batch, prefix, vector, cfg, matrix=None):
    """Per-completion losses [C] (nats) with `vector` (and `matrix`) steering, running blocks min(layers)..
    from `prefix`, the frozen residual entering them (or the tokens, for layer 0)."""
    steered = steering_hook(model, vector, batch.sign, cfg.clamp, matrix=matrix)

    def hook(x, name):
        return steered(x, name) if batch.mask is None else torch.where(batch.mask[..., None], steered(x, name), x)
    with model.hooks({f"blocks.{l}.hook_resid_pre": hook for l in cfg.layers}):
        resid = model(prefix, start_at_layer=min(cfg.layers), stop_at_layer=model.cfg.n_layers)    # [C, T, D]
    h = resid[batch.rows, batch.cols]                                                                 # [N, D]
    logits = model.unembed(model.apply_norm("ln_final", h)).float()                                   # [N, V]
    p = F.log_softmax(cfg.coldness * logits, -1).gather(-1, batch.next[:, None])[:, 0].exp()         # [N]
    suppress = -torch.log(1 - p + EPS) if cfg.one_minus else torch.log(p + EPS)
    per_token = torch.where(batch.promote, -torch.log(p + EPS), suppress)
    loss = torch.zeros(len(batch.lengths), device=p.device).index_add(0, batch.rows, per_token)
    return loss / batch.lengths if cfg.normalize_length else loss


@torch.no_grad()
def _prefix(model, batch, layers):
    """The residual entering the lowest steered block, computed once: it does not depend on v. (For layer 0 it
    is the tokens themselves: `start_at_layer=0` means "start from token ids".)"""
    low = min(layers)
    return model(batch.tokens, stop_at_layer=low) if low else batch.tokens


def steering_loss(model, datapoints, layer, vector, coldness=0.7, one_minus=True, normalize_length=False,
                  clamp=None, matrix=None):
    """Per-completion losses (nats, differentiable in `vector`) of the datapoints' completions, concatenated
    in order (each datapoint: promote, then suppress)."""
    cfg = LossConfig(_check_layers(model, layer), _check(coldness, "coldness", 0), one_minus, normalize_length, clamp)
    batch = _prepare(model, datapoints)
    return _losses(model, batch, _prefix(model, batch, cfg.layers), vector, cfg, matrix)


def _check(value, name, low, allow_zero=False):
    """value must be a finite number > low (>= low with allow_zero); returns it."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= low if allow_zero else value > low)
    if not ok:
        raise MinisvError(f"{name} must be a finite number {'>=' if allow_zero else '>'} {low}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------- optimization
def optimize_vector(model, datapoints, layer, lr=0.01, max_iters=50, coldness=0.7, target_loss=None,
                    target_sum=False, patience=1, converge_tol=1e-6, satisfice=False, one_minus=True,
                    normalize_length=False, max_norm=None, starting_norm=1.0, starting_vec=None, clamp=None,
                    affine_rank=None, max_affine_norm=2.0, starting_affine_norm=1.0, batch_size=None, seed=None,
                    callback=None):
    """Find a steering vector for `datapoints` at `layer` (an int, or a list: the same v at each).
    Adam(lr) on v (and, with affine_rank r, on L, R [r, D] of M = Lᵀ R, rows started at norm
    starting_affine_norm and clipped to max_affine_norm after each step). v starts as starting_vec, or
    starting_norm · g/‖g‖ with g ~ N(0, I) (seeded by `seed`); after each step ‖v‖ is scaled back to max_norm.
    satisfice: minimize Σ (ℓ − target)² per completion instead of Σ ℓ.
    Each step scores every datapoint in one batch, or, with batch_size, the next group of batch_size datapoints
    (fixed consecutive groups, taken in turn). Stops after max_iters Adam steps (None: no limit); or when the
    target is reached for `patience` evaluations in a row: every completion's loss at most its own target, or
    target_loss for those without one (target_sum=True: the summed loss at most target_loss, and the own
    targets); or when the summed loss moves less than converge_tol (None: never) `patience` times in a row.
    The returned vector is the one whose losses info reports. callback(step, loss, norm) is called after each
    evaluation. Returns (vector [D], info): iters (Adam steps taken), loss (summed), losses (per completion, of
    every datapoint), norm, stop, history (summed loss of each evaluation, of its step's group); with affine_rank
    also matrix M and factors (L, R)."""
    cfg = LossConfig(_check_layers(model, layer), _check(coldness, "coldness", 0), one_minus, normalize_length,
                     clamp if clamp is None else _check(clamp, "clamp", -math.inf))
    if not datapoints:
        raise MinisvError("no datapoints: give at least one Datapoint(prompt, promote=[...] or suppress=[...])")
    if max_iters is None and target_loss is None and converge_tol is None:
        raise MinisvError("no stopping rule: set max_iters, target_loss or converge_tol")
    _check(lr, "lr", 0)
    _check(starting_norm, "starting_norm", 0, allow_zero=True)
    for name, value in (("max_norm", max_norm), ("max_affine_norm", max_affine_norm), ("converge_tol", converge_tol)):
        if value is not None:
            _check(value, name, 0)
    for name, value, low in (("max_iters", max_iters, 0), ("patience", patience, 1), ("batch_size", batch_size, 1),
                             ("affine_rank", affine_rank, 1)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise MinisvError(f"{name} must be an integer >= {low}, got {value!r}")
    if target_loss is not None:
        _check(target_loss, "target_loss", -math.inf)
    elif target_sum:
        raise MinisvError("target_sum=True compares the summed loss with target_loss: set target_loss")
    size = batch_size or len(datapoints)
    batches = [_prepare(model, datapoints[i:i + size], i) for i in range(0, len(datapoints), size)]
    own = [b.targets for b in batches]
    goals = [torch.where(t.isnan(), math.nan if target_loss is None or target_sum else target_loss, t) for t in own]
    if satisfice and any(g.isnan().any() for g in goals):
        raise MinisvError("satisfice=True needs a target loss for every completion: set target_loss")
    has_target = target_loss is not None or any(not t.isnan().all() for t in own)
    device, D = model.embed.weight.device, model.cfg.d_model
    if starting_vec is not None:
        if tuple(starting_vec.shape) != (D,):
            raise MinisvError(f"starting_vec has shape {tuple(starting_vec.shape)}, expected ({D},)")
        vector = starting_vec.detach().to(device, torch.float).clone()
    else:
        g = torch.randn(D, generator=None if seed is None else torch.Generator().manual_seed(seed))
        vector = (starting_norm * g / g.norm()).to(device)
    params = [vector.requires_grad_()]
    if affine_rank:
        _check(starting_affine_norm, "starting_affine_norm", 0)
        gen = None if seed is None else torch.Generator().manual_seed(seed + 1)
        L, R = (starting_affine_norm * F.normalize(torch.randn(affine_rank, D, generator=gen), dim=-1)
                for _ in range(2))
        params += [L.to(device).requires_grad_(), R.to(device).requires_grad_()]

    def matrix():       # M = Lᵀ R, rebuilt at every step so that the step's graph reaches L and R
        return params[1].T @ params[2] if affine_rank else None
    prefixes = [_prefix(model, b, cfg.layers) for b in batches]
    optimizer = torch.optim.Adam(params, lr=lr)
    history, hits, still, prev, step = [], 0, 0, None, 0
    while True:
        last = step == max_iters
        g = step % len(batches)
        optimizer.zero_grad()
        with torch.set_grad_enabled(not last):
            losses = _losses(model, batches[g], prefixes[g], vector, cfg, matrix())
            if not last:
                ((losses - goals[g]) ** 2 if satisfice else losses).sum().backward()
        losses = losses.detach()
        total, norm = losses.sum().item(), vector.norm().item()
        if not math.isfinite(total):
            raise MinisvError(f"the loss became {total} at step {step} (‖v‖ = {norm:.3g}); lower lr or set max_norm")
        history.append(total)
        if callback is not None:
            callback(step, total, norm)
        reached = has_target and (not target_sum or total <= target_loss) and \
            bool((losses <= goals[g])[~goals[g].isnan()].all())
        hits = hits + 1 if reached else 0
        still = still + 1 if converge_tol is not None and prev is not None and abs(prev - total) < converge_tol else 0
        stop = "max_iters" if last else "target_loss" if hits >= patience else "converged" if still >= patience else None
        if stop:
            break
        optimizer.step()
        with torch.no_grad():
            if max_norm is not None:
                vector.mul_(min(1.0, max_norm / vector.norm().item()))
            if affine_rank and max_affine_norm is not None:
                for m in params[1:]:
                    m.mul_((max_affine_norm / m.norm(dim=1, keepdim=True)).clamp(max=1.0))
        prev, step = total, step + 1
    if len(batches) > 1:      # report every datapoint, not only the last group
        with torch.no_grad():
            losses = torch.cat([_losses(model, b, pre, vector, cfg, matrix()) for b, pre in zip(batches, prefixes)])
        total = losses.sum().item()
    labels = [label for b in batches for label in b.labels]
    info = dict(iters=step, loss=total, norm=norm, stop=stop, history=history,
                losses=[dict(datapoint=i, kind=k, completion=t, loss=l) for (i, k, t), l in zip(labels, losses.tolist())])
    if affine_rank:
        info["matrix"], info["factors"] = matrix().detach(), (params[1].detach(), params[2].detach())
    return vector.detach(), info


# ------------------------------------------------------------------------------------------- save / load
_TEXT_FIELDS = ("model", "hook", "kind", "prompt", "minisv_version")


def save_vector(path, vector, layer, model="", clamp=None, positions=None, matrix=None, scale=None, **metadata):
    """Write `vector` [D] (and an affine `matrix` [D, D]) to a .safetensors file, atomically, with what is
    needed to steer with it again: layer, hook, kind (additive | clamp | affine), clamp, positions (absolute,
    as `steer` takes them), scale (the multiplier to generate with), norm, minisv_version, and any extra
    keyword (prompt, promote, loss, ...; values that are not text are stored as JSON)."""
    from . import __version__
    layers = [layer] if isinstance(layer, int) else list(layer)
    if isinstance(positions, slice):
        positions = dict(slice=[positions.start, positions.stop, positions.step])
    elif positions is not None and not isinstance(positions, int):
        positions = [int(p) for p in positions]
    kind = "additive" if clamp is None and matrix is None else "clamp" if matrix is None else "affine"
    meta = dict(model=model, layer=layer, hook=",".join(f"blocks.{l}.hook_resid_pre" for l in layers), kind=kind,
                clamp=clamp, positions=positions, scale=scale, norm=vector.norm().item(),
                minisv_version=__version__, **metadata)
    meta = {k: v if k in _TEXT_FIELDS else json.dumps(v) for k, v in meta.items() if v is not None}
    tensors = {"vector": vector.detach().float().cpu().contiguous()}
    if matrix is not None:
        tensors["matrix"] = matrix.detach().float().cpu().contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_vector(path, device=None):
    """Read a vector written by save_vector -> (vector [D], metadata dict with layer, clamp, positions (an int,
    list or slice), scale, ... decoded, and "matrix" [D, D] for an affine vector)."""
    if not os.path.isfile(path):
        raise MinisvError(f"no such steering vector file: {path}")
    try:
        with safe_open(path, "pt", device="cpu") as f:
            if "vector" not in f.keys():
                raise MinisvError(f"{path} holds no 'vector' tensor; is it a minisv steering vector?")
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except SafetensorError as e:
        raise MinisvError(f"{path} is not a readable .safetensors file ({e}); save it again") from None
    meta = {k: _decode(k, v) for k, v in meta.items()}
    if isinstance(meta.get("positions"), dict):
        meta["positions"] = slice(*meta["positions"]["slice"])
    if "matrix" in tensors:
        meta["matrix"] = tensors["matrix"] if device is None else tensors["matrix"].to(device)
    vector = tensors["vector"]
    return (vector if device is None else vector.to(device)), meta


def _decode(key, value):
    if key not in _TEXT_FIELDS:
        try:
            return json.loads(value)
        except ValueError:      # written by another tool: keep the text
            pass
    return value


# ------------------------------------------------------------------------------------------- evaluation
def compare_generations(model, prompts, vector, layer, multipliers=(0.0, 1.0, -1.0), clamp=None, positions=None,
                        matrix=None, max_new_tokens=40, **generate_kwargs):
    """Generate on each prompt (text or ids) once per multiplier, all prompts in one batch; multiplier 0 means
    no steering at all (with clamp, a hook at 0 would still ablate v̂). clamp, positions, matrix: as for
    `steer` (and as save_vector stores them). -> {multiplier: [texts or id lists]}."""
    ids = [encode(model, p) for p in prompts]
    decode = model.tokenizer.decode if model.tokenizer is not None else list
    out = {}
    for m in multipliers:
        if m == 0:
            new = model.generate(ids, max_new_tokens, **generate_kwargs)
        else:
            with steer(model, vector, layer, multiplier=m, clamp=clamp, positions=positions, matrix=matrix):
                new = model.generate(ids, max_new_tokens, **generate_kwargs)
        out[m] = [decode(n) for n in new]
    return out


@torch.no_grad()
def completion_logprob(model, prompts, completion):
    """log p(completion | prompt) in nats (coldness 1) for each prompt, in one padded batch; steer with the
    `steer` context manager around the call."""
    pairs = []
    for p in prompts:
        p_ids = encode(model, p)
        if not p_ids:
            raise MinisvError("a prompt is empty; a completion's first token needs at least one token before it")
        pairs.append((p_ids, _completion_ids(model, p, p_ids, completion)))
    tokens, rows, cols, nxt = _pack(pairs, model.embed.weight.device)
    logp = F.log_softmax(model(tokens)[rows, cols].float(), -1).gather(-1, nxt[:, None])[:, 0]
    return torch.zeros(len(pairs), device=logp.device).index_add(0, rows, logp).tolist()


@torch.no_grad()
def residual_norm(model, prompt, layer):
    """Median ‖x‖ of the residual stream entering `layer` over the prompt's tokens: the scale to compare a
    steering vector's norm with (it differs a lot between models and layers)."""
    layer = _check_layers(model, layer)[0]
    ids = encode(model, prompt)
    if not ids:
        raise MinisvError("the prompt is empty: give at least one token")
    tokens = torch.tensor([ids], dtype=torch.long, device=model.embed.weight.device)
    return model(tokens, stop_at_layer=layer)[0].float().norm(dim=-1).median().item()


def success_rate(texts, pattern):
    """Fraction of texts in which the regex `pattern` matches (re.search)."""
    try:
        rule = re.compile(pattern)
    except re.error as e:
        raise MinisvError(f"success pattern {pattern!r} is not a valid regular expression ({e})") from None
    return sum(bool(rule.search(t)) for t in texts) / max(len(texts), 1)
