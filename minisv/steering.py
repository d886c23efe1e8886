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
import dataclasses
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
def render(model, prompt, chat=True):
    """A text prompt as the model is shown it: with chat (and a model that has a chat template), one user turn in
    that template, as `Tokenizer.chat` renders it; else the text itself. Token-id lists are kept as they are."""
    tok = model.tokenizer
    return tok.chat(prompt) if chat and isinstance(prompt, str) and tok is not None and tok.is_chat else prompt


def prompt_ids(model, text):
    """Token ids of a (rendered) prompt: text is tokenized with BOS first when the model's tokenizer adds one (and
    the text does not already start with it, as a chat template may); a list of ids is kept as is."""
    if not isinstance(text, str):
        return [int(t) for t in text]
    tok = model.tokenizer
    if tok is None:
        raise MinisvError("this model has no tokenizer: pass prompts and completions as lists of token ids")
    ids = tok.encode(text)
    return [tok.bos_id] + ids if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id] else ids


def _completion_ids(model, prompt, head, completion):
    """Tokens of `completion` after `prompt` (whose tokens are `head`): tokens(prompt + completion)[len(head):],
    checked."""
    if isinstance(completion, str) != isinstance(prompt, str):
        raise MinisvError("give the prompt and its completions both as text or both as token-id lists")
    if not isinstance(completion, str):
        ids = prompt_ids(model, completion)
    else:
        joint = prompt_ids(model, prompt + completion)
        if joint[:len(head)] != head:
            raise MinisvError(f"completion {completion!r} merges with the end of the prompt when tokenized; "
                              f"end the prompt with a space or newline, or start the completion differently")
        ids = joint[len(head):]
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


def _prepare(model, datapoints, first=0, chat=True):
    """Tokenize and pack `datapoints` (numbered from `first` in the labels; prompts rendered as `render` does)
    into one _Batch."""
    pairs, kinds, targets, signs, labels, chosen = [], [], [], [], [], []
    for i, dp in enumerate(datapoints, first):
        if not isinstance(dp, Datapoint):
            raise MinisvError(f"expected minisv Datapoint objects, got {type(dp).__name__}")
        if not dp.promote and not dp.suppress:
            raise MinisvError(f"datapoint {dp.prompt!r:.60} has no completions; give promote=[...] and/or "
                              f"suppress=[...]")
        prompt = render(model, dp.prompt, chat)
        head = prompt_ids(model, prompt)
        if not head:
            raise MinisvError("the prompt is empty; a completion's first token needs at least one token before it")
        where = _prompt_positions(dp, len(head))
        for kind, texts, tl in (("promote", dp.promote, dp.promote_targets),
                                ("suppress", dp.suppress, dp.suppress_targets)):
            if tl is not None and len(tl) != len(texts):
                raise MinisvError(f"{kind}_targets has {len(tl)} entries for {len(texts)} completions; give one each")
            for c, t in zip(texts, tl if tl is not None else [float("nan")] * len(texts)):
                pairs.append((head, _completion_ids(model, prompt, head, c)))
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


# ------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SteerConfig:
    """How a steering vector is optimized. The defaults are the paper's quickstart settings, and what
    optimize_sv.py runs: `optimize_vector(model, data, layer)` and the script give the same vector."""
    lr: float = 0.1                     # Adam's learning rate
    max_iters: int | None = 20          # at most this many Adam steps (None: no limit)
    coldness: float = 0.7               # p = softmax(coldness · logits)
    target_loss: float | None = None    # stop once every completion's loss (nats) is at most this ...
    target_sum: bool = False            # ... or, with target_sum, the summed loss
    patience: int = 1                   # ... for this many evaluations in a row (also for converge_tol)
    converge_tol: float | None = 1e-6   # stop when the summed loss moves less than this (None: never)
    satisfice: bool = False             # minimize Σ (ℓ − target)² per completion instead of Σ ℓ
    one_minus: bool = True              # suppression loss −log(1 − p + ε); False: +log(p + ε)
    normalize_length: bool = False      # divide each completion's loss by its number of tokens
    max_norm: float | None = None       # after each step, scale ‖v‖ back to this
    starting_norm: float = 1.0          # ‖v‖ of the random initial vector
    clamp: float | None = None          # clamp steering x − (x·v̂)v̂ + clamp·v instead of x + v
    affine_rank: int | None = None      # also train M = Lᵀ R of this rank: x + v + M x
    max_affine_norm: float = 2.0        # rows of L and R are scaled back to this after each step
    starting_affine_norm: float = 1.0   # ... and start at this norm
    batch_size: int | None = None       # datapoints per step (None: all of them, in one batch)
    seed: int | None = 0                # seed of the random initial vector (None: torch's global generator)
    chat: bool = True                   # render text prompts in the model's chat template, if it has one

    def __post_init__(self):
        for name, low, allow_zero in (("lr", 0, False), ("coldness", 0, False), ("starting_norm", 0, True),
                                      ("max_norm", 0, False), ("max_affine_norm", 0, False),
                                      ("starting_affine_norm", 0, False), ("converge_tol", 0, False),
                                      ("target_loss", -math.inf, False), ("clamp", -math.inf, False)):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and
                                          math.isfinite(value) and (value >= low if allow_zero else value > low)):
                raise MinisvError(f"{name} must be a finite number {'>=' if allow_zero else '>'} {low}, got {value!r}")
        for name, low in (("max_iters", 0), ("patience", 1), ("batch_size", 1), ("affine_rank", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise MinisvError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.max_iters is None and self.target_loss is None and self.converge_tol is None:
            raise MinisvError("no stopping rule: set max_iters, target_loss or converge_tol")
        if self.target_sum and self.target_loss is None:
            raise MinisvError("target_sum=True compares the summed loss with target_loss: set target_loss")


# ------------------------------------------------------------------------------------------- loss
def _losses(model, batch, prefix, steering, cfg):
    """Per-completion losses [C] (nats), steering with (vector, matrix, layers), running blocks min(layers)..
    from `prefix`, the frozen residual entering them (or the tokens, for layer 0)."""
    vector, matrix, layers = steering
    steered = steering_hook(model, vector, batch.sign, cfg.clamp, matrix=matrix)

    def hook(x, name):
        return steered(x, name) if batch.mask is None else torch.where(batch.mask[..., None], steered(x, name), x)
    with model.hooks({f"blocks.{l}.hook_resid_pre": hook for l in layers}):
        resid = model(prefix, start_at_layer=min(layers), stop_at_layer=model.cfg.n_layers)        # [C, T, D]
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


def steering_loss(model, datapoints, layer, vector, cfg=None, matrix=None, **overrides):
    """Per-completion losses (nats, differentiable in `vector`) of the datapoints' completions, concatenated in
    order (each datapoint: promote, then suppress), scored and steered as cfg (a SteerConfig, with `overrides`
    of its fields) says."""
    cfg = dataclasses.replace(cfg or SteerConfig(), **overrides)
    layers = _check_layers(model, layer)
    batch = _prepare(model, datapoints, chat=cfg.chat)
    return _losses(model, batch, _prefix(model, batch, layers), (vector, matrix, layers), cfg)


# ------------------------------------------------------------------------------------------- optimization
def optimize_vector(model, datapoints, layer, cfg=None, starting_vec=None, callback=None, **overrides):
    """Find a steering vector for `datapoints` at `layer` (an int, or a list: the same v at each), with the
    settings of cfg (a SteerConfig; keyword `overrides` replace its fields, e.g. lr=0.5).
    Adam on v (and, with affine_rank r, on L, R [r, D] of M = Lᵀ R). v starts as starting_vec, or starting_norm ·
    g/‖g‖ with g ~ N(0, I) seeded by cfg.seed. Each step scores every datapoint in one batch, or, with
    batch_size, the next group of batch_size datapoints (fixed consecutive groups, taken in turn). Stops after
    max_iters Adam steps; or when the target is reached for `patience` evaluations in a row: every completion's
    loss at most its own target, or target_loss for those without one (target_sum=True: the summed loss at most
    target_loss, and the own targets); or when the summed loss moves less than converge_tol `patience` times in a
    row. The returned vector is the one whose losses info reports. callback(step, loss, norm) is called after
    each evaluation. Returns (vector [D], info): iters (Adam steps taken), loss (summed), losses (per
    completion, of every datapoint), norm, stop, history (summed loss of each evaluation, of its step's group);
    with affine_rank also matrix M and factors (L, R)."""
    cfg = dataclasses.replace(cfg or SteerConfig(), **overrides)
    layers = _check_layers(model, layer)
    if not datapoints:
        raise MinisvError("no datapoints: give at least one Datapoint(prompt, promote=[...] or suppress=[...])")
    size = cfg.batch_size or len(datapoints)
    batches = [_prepare(model, datapoints[i:i + size], i, cfg.chat) for i in range(0, len(datapoints), size)]
    goals = [_goals(b.targets, cfg) for b in batches]
    has_target = cfg.target_loss is not None or any(not b.targets.isnan().all() for b in batches)
    params = _initial_params(model, cfg, starting_vec)
    prefixes = [_prefix(model, b, layers) for b in batches]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    history, hits, still, prev, step = [], 0, 0, None, 0
    while True:
        last, g = step == cfg.max_iters, step % len(batches)
        optimizer.zero_grad()
        with torch.set_grad_enabled(not last):
            losses = _losses(model, batches[g], prefixes[g], _steering(params, layers), cfg)
            if not last:
                ((losses - goals[g]) ** 2 if cfg.satisfice else losses).sum().backward()
        losses = losses.detach()
        total, norm = losses.sum().item(), params[0].norm().item()
        if not math.isfinite(total):
            raise MinisvError(f"the loss became {total} at step {step} (‖v‖ = {norm:.3g}); lower lr or set max_norm")
        history.append(total)
        if callback is not None:
            callback(step, total, norm)
        reached = has_target and (not cfg.target_sum or total <= cfg.target_loss) and \
            bool((losses <= goals[g])[~goals[g].isnan()].all())
        hits = hits + 1 if reached else 0
        flat = cfg.converge_tol is not None and prev is not None and abs(prev - total) < cfg.converge_tol
        still = still + 1 if flat else 0
        stop = "max_iters" if last else "target_loss" if hits >= cfg.patience else \
            "converged" if still >= cfg.patience else None
        if stop:
            break
        optimizer.step()
        _project(params, cfg)
        prev, step = total, step + 1
    return params[0].detach(), _info(model, batches, prefixes, (params, layers, cfg), (step, stop, history, losses))


def _goals(targets, cfg):
    """Each completion's target loss [C]: its own, else target_loss (unless that bounds the sum), else nan."""
    goals = torch.where(targets.isnan(), math.nan if cfg.target_loss is None or cfg.target_sum else cfg.target_loss,
                        targets)
    if cfg.satisfice and goals.isnan().any():
        raise MinisvError("satisfice=True needs a target loss for every completion: set target_loss")
    return goals


def _initial_params(model, cfg, starting_vec):
    """[v] or, with affine_rank r, [v, L, R]: v = starting_vec or starting_norm · g/‖g‖; rows of L and R random with
    norm starting_affine_norm (the reference's initialisation)."""
    device, D = model.embed.weight.device, model.cfg.d_model
    if starting_vec is not None:
        if tuple(starting_vec.shape) != (D,):
            raise MinisvError(f"starting_vec has shape {tuple(starting_vec.shape)}, expected ({D},)")
        vector = starting_vec.detach().to(device, torch.float).clone()
    else:
        g = torch.randn(D, generator=None if cfg.seed is None else torch.Generator().manual_seed(cfg.seed))
        vector = (cfg.starting_norm * g / g.norm()).to(device)
    params = [vector.requires_grad_()]
    if cfg.affine_rank:
        gen = None if cfg.seed is None else torch.Generator().manual_seed(cfg.seed + 1)
        params += [(cfg.starting_affine_norm * F.normalize(torch.randn(cfg.affine_rank, D, generator=gen), dim=-1))
                   .to(device).requires_grad_() for _ in range(2)]
    return params


def _steering(params, layers):
    """(v, M, layers) from the trained tensors: M = Lᵀ R is rebuilt at every step so that the graph reaches L, R."""
    return params[0], params[1].T @ params[2] if len(params) == 3 else None, layers


@torch.no_grad()
def _project(params, cfg):
    """After a step: ‖v‖ back to max_norm, and the rows of L and R back to max_affine_norm."""
    if cfg.max_norm is not None:
        params[0].mul_(min(1.0, cfg.max_norm / params[0].norm().item()))
    for m in params[1:] if cfg.max_affine_norm is not None else ():
        m.mul_((cfg.max_affine_norm / m.norm(dim=1, keepdim=True)).clamp(max=1.0))


def _info(model, batches, prefixes, trained, end):
    """optimize_vector's record of a finished run; with several groups, every datapoint's losses are recomputed."""
    (params, layers, cfg), (step, stop, history, losses) = trained, end
    if len(batches) > 1:      # report every datapoint, not only the last group
        with torch.no_grad():
            losses = torch.cat([_losses(model, b, pre, _steering(params, layers), cfg)
                                for b, pre in zip(batches, prefixes)])
    labels = [label for b in batches for label in b.labels]
    info = dict(iters=step, loss=losses.sum().item(), norm=params[0].norm().item(), stop=stop, history=history,
                losses=[dict(datapoint=i, kind=k, completion=t, loss=l)
                        for (i, k, t), l in zip(labels, losses.tolist())])
    if cfg.affine_rank:
        info["matrix"] = _steering(params, layers)[1].detach()
        info["factors"] = (params[1].detach(), params[2].detach())
    return info


# ------------------------------------------------------------------------------------------- save / load
_TEXT_FIELDS = ("model", "hook", "kind", "prompt", "minisv_version")


def save_vector(path, vector, layer, clamp=None, positions=None, matrix=None, **metadata):
    """Write `vector` [D] (and an affine `matrix` [D, D]) to a .safetensors file, atomically, with what is
    needed to steer with it again: layer, hook, kind (additive | clamp | affine), clamp, positions (absolute,
    as `steer` takes them), norm, minisv_version, and any extra keyword (model, scale: the multiplier to generate
    with, prompt, promote, loss, ...; values that are not text are stored as JSON)."""
    from . import __version__
    layers = [layer] if isinstance(layer, int) else list(layer)
    if isinstance(positions, slice):
        positions = dict(slice=[positions.start, positions.stop, positions.step])
    elif positions is not None and not isinstance(positions, int):
        positions = [int(p) for p in positions]
    kind = "additive" if clamp is None and matrix is None else "clamp" if matrix is None else "affine"
    meta = dict(layer=layer, hook=",".join(f"blocks.{l}.hook_resid_pre" for l in layers), kind=kind, clamp=clamp,
                positions=positions, norm=vector.norm().item(), minisv_version=__version__, **metadata)
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
_STEER_OPTIONS = ("clamp", "positions", "matrix")


def compare_generations(model, prompts, vector, layer, multipliers=(0.0, 1.0, -1.0), chat=True, **options):
    """Generate on each prompt (text, rendered as `render` does, or ids) once per multiplier, all prompts in one
    batch; multiplier 0 means no steering at all (with clamp, a hook at 0 would still ablate v̂). options: clamp,
    positions, matrix as for `steer` (and as save_vector stores them); the rest go to model.generate
    (max_new_tokens, default 40; temperature, top_k, top_p, generator). -> {multiplier: [texts or id lists]}."""
    how = {k: options.pop(k) for k in _STEER_OPTIONS if k in options}
    options.setdefault("max_new_tokens", 40)
    ids = [prompt_ids(model, render(model, p, chat)) for p in prompts]
    decode = model.tokenizer.decode if model.tokenizer is not None else list
    out = {}
    for m in multipliers:
        if m == 0:
            new = model.generate(ids, **options)
        else:
            with steer(model, vector, layer, multiplier=m, **how):
                new = model.generate(ids, **options)
        out[m] = [decode(n) for n in new]
    return out


@torch.no_grad()
def completion_logprob(model, prompts, completion, chat=True):
    """log p(completion | prompt) in nats (coldness 1) for each prompt (rendered as `render` does), in one padded
    batch; steer with the `steer` context manager around the call."""
    pairs = []
    for p in prompts:
        p = render(model, p, chat)
        head = prompt_ids(model, p)
        if not head:
            raise MinisvError("a prompt is empty; a completion's first token needs at least one token before it")
        pairs.append((head, _completion_ids(model, p, head, completion)))
    tokens, rows, cols, nxt = _pack(pairs, model.embed.weight.device)
    logp = F.log_softmax(model(tokens)[rows, cols].float(), -1).gather(-1, nxt[:, None])[:, 0]
    return torch.zeros(len(pairs), device=logp.device).index_add(0, rows, logp).tolist()


@torch.no_grad()
def residual_norm(model, prompt, layer, chat=True):
    """Median ‖x‖ of the residual stream entering `layer` over the prompt's tokens (rendered as `render` does):
    the scale to compare a steering vector's norm with (it differs a lot between models and layers)."""
    layer = _check_layers(model, layer)[0]
    ids = prompt_ids(model, render(model, prompt, chat))
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
