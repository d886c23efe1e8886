"""One-shot optimized steering vectors (arXiv 2502.18862; `docs/methods.md` §1).

A steering vector v [D] is added to the residual stream entering block `layer` (`blocks.{layer}.hook_resid_pre`)
at every position, and found by gradient descent so that on ONE prompt the model says (promotion) or stops
saying (suppression) given completions. With p = softmax(coldness · logits) at each completion token y_k:

    promotion     L+ = − Σ_k log(p(y_k | x, y_<k; v) + ε)
    suppression   L− = − Σ_k log(1 − p(y_k | x, y_<k; v) + ε)      (or + Σ_k log(p + ε) with one_minus=False)

ε = 1e-6. Losses are in nats (natural log; the paper's "hartleys" thresholds were applied to nat losses too),
summed over tokens (or divided by the completion's length), completions and datapoints.

Cost: nothing below `layer` depends on v, so the residual entering `layer` is computed once (no grad) and each
step re-runs only blocks `layer..n_layers-1`, with all completions of a datapoint in one right-padded batch.
Only the positions that predict completion tokens go through the final norm and the unembedding.
"""
import json
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
    over the *prompt's* tokens (an int, a slice, a list; slice(-20, None) = the last 20 prompt tokens);
    None = every token, prompt and completion. negative: apply −v to this datapoint."""
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
    positions: absolute token positions to steer (int, slice with non-negative bounds, or an iterable of ints),
    read from model.positions, so a restriction keeps working during KV-cache generation; None = all."""
    if vector.shape != (model.cfg.d_model,):
        raise MinisvError(f"steering vector has shape {tuple(vector.shape)}, expected ({model.cfg.d_model},) "
                          f"(d_model of this model); was it trained on another model?")
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
    n = model.cfg.n_layers
    if not layers or any(not isinstance(l, int) or not 0 <= l < n for l in layers):
        raise MinisvError(f"layer {layer!r} is out of range: this model has {n} layers, use 0..{n - 1}")
    return layers


# ------------------------------------------------------------------------------------------- tokenization
def _ids(model, text):
    if isinstance(text, str):
        if model.tokenizer is None:
            raise MinisvError("this model has no tokenizer: pass prompts and completions as lists of token ids")
        return model.tokenizer.encode(text)
    return [int(t) for t in text]


def _completion_ids(model, prompt, prompt_ids, completion):
    """Tokens of `completion` after `prompt`: tokens(prompt + completion)[len(tokens(prompt)):], checked."""
    if isinstance(completion, str) != isinstance(prompt, str):
        raise MinisvError("give the prompt and its completions both as text or both as token-id lists")
    if not isinstance(completion, str):
        ids = _ids(model, completion)
    else:
        joint = _ids(model, prompt + completion)
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


@dataclass
class _Batch:
    """A datapoint, tokenized: all its completions (promote first, then suppress) in one padded batch."""
    tokens: torch.Tensor      # [C, T]
    rows: torch.Tensor        # [N] for every completion token: its completion,
    cols: torch.Tensor        #     the position that predicts it,
    next: torch.Tensor        #     its id,
    promote: torch.Tensor     #     True for a promoted completion's token
    lengths: torch.Tensor     # [C] completion lengths
    targets: torch.Tensor     # [C] target loss per completion, nan where none
    positions: list | None    # absolute positions steered, None = all
    sign: float               # −1 for a negative datapoint
    labels: list              # [C] ("promote" | "suppress", completion) for reports


def _prepare(model, dp: Datapoint):
    if not isinstance(dp, Datapoint):
        raise MinisvError(f"expected minisv Datapoint objects, got {type(dp).__name__}")
    if not dp.promote and not dp.suppress:
        raise MinisvError(f"datapoint {dp.prompt!r:.60} has no completions; give promote=[...] and/or suppress=[...]")
    prompt_ids = _ids(model, dp.prompt)
    if not prompt_ids:
        raise MinisvError("the prompt is empty; a completion's first token needs at least one token before it")
    completions, targets = [], []
    for kind, texts, tl in (("promote", dp.promote, dp.promote_targets), ("suppress", dp.suppress, dp.suppress_targets)):
        if tl is not None and len(tl) != len(texts):
            raise MinisvError(f"{kind}_targets has {len(tl)} entries for {len(texts)} completions; give one each")
        completions += [(kind, c) for c in texts]
        targets += list(tl) if tl is not None else [float("nan")] * len(texts)
    comp_ids = [_completion_ids(model, dp.prompt, prompt_ids, c) for _, c in completions]
    tokens, rows, cols, nxt = _pack([(prompt_ids, c) for c in comp_ids], model.embed.weight.device)
    n_promote = len(dp.promote)
    positions = None
    if dp.positions is not None:
        try:
            index = range(len(prompt_ids))[dp.positions]
        except (IndexError, TypeError, ValueError):
            raise MinisvError(f"positions {dp.positions!r} do not index the prompt's {len(prompt_ids)} tokens") from None
        positions = [index] if isinstance(index, int) else list(index)
    return _Batch(tokens, rows, cols, nxt, rows < n_promote, torch.tensor([len(c) for c in comp_ids], device=rows.device),
                  torch.tensor(targets, dtype=torch.float, device=rows.device), positions,
                  -1.0 if dp.negative else 1.0, completions)


# ------------------------------------------------------------------------------------------- loss
def _losses(model, batch, prefix, layers, vector, coldness, one_minus, normalize_length, clamp, matrix):
    """Per-completion losses [C] (nats) with `vector` steering, running blocks min(layers).. from `prefix`."""
    with steer(model, batch.sign * vector, layers, clamp=clamp, positions=batch.positions, matrix=matrix):
        resid = model(prefix, start_at_layer=min(layers), stop_at_layer=model.cfg.n_layers)     # [C, T, D]
    h = resid[batch.rows, batch.cols]                                                            # [N, D]
    logits = model.unembed(model.apply_norm("ln_final", h)).float()                  # [N, V]
    p = F.log_softmax(coldness * logits, -1).gather(-1, batch.next[:, None])[:, 0].exp()        # [N]
    suppress = -torch.log(1 - p + EPS) if one_minus else torch.log(p + EPS)
    per_token = torch.where(batch.promote, -torch.log(p + EPS), suppress)
    loss = torch.zeros(len(batch.lengths), device=p.device).index_add(0, batch.rows, per_token)
    return loss / batch.lengths if normalize_length else loss


@torch.no_grad()
def _prefixes(model, batches, layers):
    """The residual entering the lowest steered block, computed once: it does not depend on v. (For layer 0 it
    is the tokens themselves: `start_at_layer=0` means "start from token ids".)"""
    low = min(layers)
    return [model(b.tokens, stop_at_layer=low) if low else b.tokens for b in batches]


def steering_loss(model, datapoints, layer, vector, coldness=0.7, one_minus=True, normalize_length=False,
                  clamp=None, matrix=None):
    """Per-completion losses (nats, differentiable in `vector`) of the datapoints' completions, concatenated
    in order (each datapoint: promote, then suppress)."""
    layers = _check_layers(model, layer)
    batches = [_prepare(model, dp) for dp in datapoints]
    return torch.cat([_losses(model, b, pre, layers, vector, coldness, one_minus, normalize_length, clamp, matrix)
                      for b, pre in zip(batches, _prefixes(model, batches, layers))])


# ------------------------------------------------------------------------------------------- optimization
def optimize_vector(model, datapoints, layer, lr=0.01, max_iters=50, coldness=0.7, target_loss=None,
                    patience=1, converge_tol=None, satisfice=False, one_minus=True, normalize_length=False,
                    max_norm=None, starting_norm=1.0, starting_vec=None, clamp=None, affine_rank=None, seed=None,
                    callback=None):
    """Find a steering vector for `datapoints` at `layer` (an int, or a list: the same v at each).
    Adam(lr) on v (and, with affine_rank r, on L, R [r, D] of M = Lᵀ R; R starts at 0 so M does too).
    v starts as starting_vec, or starting_norm · g/‖g‖ with g ~ N(0, I) (seeded by `seed`); after each step
    ‖v‖ is projected back to max_norm. satisfice: minimize Σ (ℓ − target)² per completion instead of Σ ℓ.
    Stops after max_iters steps; or when the target is reached for `patience` evaluations in a row (summed
    loss ≤ target_loss and every completion ≤ its own target, whichever are given); or when the summed loss
    moves less than converge_tol, `patience` times in a row. The returned vector is the one whose losses
    info reports. callback(step, loss, norm) is called after each evaluation.
    Returns (vector [D], info): iters (Adam steps taken), loss, losses (per completion), norm, stop, history."""
    layers = _check_layers(model, layer)
    if not datapoints:
        raise MinisvError("no datapoints: give at least one Datapoint(prompt, promote=[...] or suppress=[...])")
    if max_iters is None and target_loss is None and converge_tol is None:
        raise MinisvError("no stopping rule: set max_iters, target_loss or converge_tol")
    batches = [_prepare(model, dp) for dp in datapoints]
    own = torch.cat([b.targets for b in batches])
    goal = torch.where(own.isnan(), float("nan") if target_loss is None else target_loss, own)
    if satisfice and goal.isnan().any():
        raise MinisvError("satisfice=True needs a target loss for every completion: set target_loss")
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
        gen = None if seed is None else torch.Generator().manual_seed(seed + 1)
        L = F.normalize(torch.randn(affine_rank, D, generator=gen), dim=-1).to(device).requires_grad_()
        R = torch.zeros(affine_rank, D, device=device, requires_grad=True)
        params += [L, R]
    prefixes = _prefixes(model, batches, layers)
    goals = goal.split([len(b.lengths) for b in batches])
    has_target = target_loss is not None or not own.isnan().all()
    optimizer = torch.optim.Adam(params, lr=lr)
    history, hits, still, prev, step = [], 0, 0, None, 0
    while True:
        last = step == max_iters
        optimizer.zero_grad()
        losses = []
        for batch, prefix, goal_b in zip(batches, prefixes, goals):
            with torch.set_grad_enabled(not last):      # backward per datapoint: memory for one batch at a time
                matrix = L.T @ R if affine_rank else None
                loss = _losses(model, batch, prefix, layers, vector, coldness, one_minus, normalize_length, clamp, matrix)
                if not last:
                    ((loss - goal_b) ** 2 if satisfice else loss).sum().backward()
            losses.append(loss.detach())
        losses = torch.cat(losses)
        total, norm = losses.sum().item(), vector.norm().item()
        history.append(total)
        if callback is not None:
            callback(step, total, norm)
        reached = has_target and (target_loss is None or total <= target_loss) and \
            bool((losses <= own)[~own.isnan()].all())
        hits = hits + 1 if reached else 0
        still = still + 1 if converge_tol is not None and prev is not None and abs(prev - total) < converge_tol else 0
        stop = "max_iters" if last else "target_loss" if hits >= patience else "converged" if still >= patience else None
        if stop:
            break
        optimizer.step()
        if max_norm is not None:
            with torch.no_grad():
                vector.mul_(min(1.0, max_norm / vector.norm().item()))
        prev, step = total, step + 1
    labels = [(i, kind, text) for i, b in enumerate(batches) for kind, text in b.labels]
    info = dict(iters=step, loss=total, norm=norm, stop=stop, history=history,
                losses=[dict(datapoint=i, kind=k, completion=t, loss=l) for (i, k, t), l in zip(labels, losses.tolist())])
    if affine_rank:
        info["matrix"] = (L.T @ R).detach()
    return vector.detach(), info


# ------------------------------------------------------------------------------------------- save / load
_TEXT_FIELDS = ("model", "hook", "kind", "prompt", "minisv_version")


def save_vector(path, vector, layer, model="", clamp=None, **metadata):
    """Write `vector` [D] to a .safetensors file (atomically) with string metadata: model, layer, hook, kind
    (additive | clamp), clamp, norm, minisv_version and any extra keyword (prompt, promote, loss, ...; values
    that are not text are stored as JSON)."""
    from . import __version__
    layers = [layer] if isinstance(layer, int) else list(layer)
    meta = dict(model=model, layer=layer, hook=",".join(f"blocks.{l}.hook_resid_pre" for l in layers),
                kind="additive" if clamp is None else "clamp", clamp=clamp, norm=vector.norm().item(),
                minisv_version=__version__, **metadata)
    meta = {k: v if k in _TEXT_FIELDS else json.dumps(v) for k, v in meta.items() if v is not None}
    atomic_write(path, lambda tmp: save_file({"vector": vector.detach().float().cpu().contiguous()}, tmp, metadata=meta))


def load_vector(path, device=None):
    """Read a vector written by save_vector -> (vector [D], metadata dict with layer, clamp, ... decoded)."""
    if not os.path.isfile(path):
        raise MinisvError(f"no such steering vector file: {path}")
    try:
        with safe_open(path, "pt", device="cpu") as f:
            if "vector" not in f.keys():
                raise MinisvError(f"{path} holds no 'vector' tensor; is it a minisv steering vector?")
            vector, meta = f.get_tensor("vector"), f.metadata() or {}
    except SafetensorError as e:
        raise MinisvError(f"{path} is not a readable .safetensors file ({e}); save it again") from None
    return (vector if device is None else vector.to(device)), {k: _decode(k, v) for k, v in meta.items()}


def _decode(key, value):
    if key not in _TEXT_FIELDS:
        try:
            return json.loads(value)
        except ValueError:      # written by another tool: keep the text
            pass
    return value


# ------------------------------------------------------------------------------------------- evaluation
def compare_generations(model, prompts, vector, layer, multipliers=(0.0, 1.0, -1.0), clamp=None,
                        max_new_tokens=40, **generate_kwargs):
    """Generate on each prompt (text or ids) once per multiplier, all prompts in one batch; multiplier 0 means
    no steering at all (with clamp, a hook at 0 would still ablate v̂). -> {multiplier: [texts or id lists]}."""
    ids = [_ids(model, p) for p in prompts]
    decode = model.tokenizer.decode if model.tokenizer is not None else list
    out = {}
    for m in multipliers:
        if m == 0:
            new = model.generate(ids, max_new_tokens, **generate_kwargs)
        else:
            with steer(model, vector, layer, multiplier=m, clamp=clamp):
                new = model.generate(ids, max_new_tokens, **generate_kwargs)
        out[m] = [decode(n) for n in new]
    return out


@torch.no_grad()
def completion_logprob(model, prompts, completion):
    """log p(completion | prompt) in nats (coldness 1) for each prompt, in one padded batch; steer with the
    `steer` context manager around the call."""
    pairs = []
    for p in prompts:
        p_ids = _ids(model, p)
        pairs.append((p_ids, _completion_ids(model, p, p_ids, completion)))
    tokens, rows, cols, nxt = _pack(pairs, model.embed.weight.device)
    logp = F.log_softmax(model(tokens)[rows, cols].float(), -1).gather(-1, nxt[:, None])[:, 0]
    return torch.zeros(len(pairs), device=logp.device).index_add(0, rows, logp).tolist()


@torch.no_grad()
def residual_norm(model, prompt, layer):
    """Median ‖x‖ of the residual stream entering `layer` over the prompt's tokens: the scale to compare a
    steering vector's norm with (it differs a lot between models and layers)."""
    layer = _check_layers(model, layer)[0]
    tokens = torch.tensor([_ids(model, prompt)], device=model.embed.weight.device)
    return model(tokens, stop_at_layer=layer)[0].float().norm(dim=-1).median().item()


def success_rate(texts, pattern):
    """Fraction of texts in which the regex `pattern` matches (re.search)."""
    try:
        rule = re.compile(pattern)
    except re.error as e:
        raise MinisvError(f"success pattern {pattern!r} is not a valid regular expression ({e})") from None
    return sum(bool(rule.search(t)) for t in texts) / max(len(texts), 1)
