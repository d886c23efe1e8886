"""Training transcoders (and SAEs): the two losses and a resumable, data-parallel loop (`docs/methods.md` §2.2).

One step, for every trained layer L at once (`train_step`):
  1. activations: x = blocks.L.ln2.hook_normalized, y = blocks.L.hook_mlp_out (an SAE: the same hook twice),
     from `minisv.activations` (one forward serves every layer); x and y are divided by their RMS (measured on
     the first batch), and the saved coder is scaled back;
  2. loss: TopK -> FVU + AuxK for dead latents; ReLU -> normalized MSE + L1 (+ ghost grads for dead latents);
     both through the coder's own `Transcoder.reconstruct`, and FVU through `evals.fvu`;
  3. Adam step with linear warm-up, then (TopK) a linear decay over the last 20% of steps or (ReLU, as the
     paper's code) a constant rate; then a check that the loss and every weight are finite.

"Dead" latents are those that fired on none of the last `dead_tokens` *training* tokens (a per-latent clock of
the token count at which it last fired); AuxK and ghost grads act on them, and the summary reports their share.

The ReLU recipe follows the transcoder paper's code (Dunefsky et al. 2024): its loss (squared error divided by
‖y‖, L1 on the activations), unit-norm decoder rows with the radial gradient removed, Kaiming-uniform init,
biases at the data means, warm-up then constant learning rate, ghost grads. Where it differs: the ghost-grad
residual is target − reconstruction (the reference used input − reconstruction, a bug for transcoders); the
warm-up is 5% of the steps (at most 1,000) and the dead window 10% of the run (the reference: 5,000 steps of
each, on a 60M-token run); activations are RMS-scaled (the loss is degree-1 homogeneous, so the L1
coefficient means the same, but the learning rate acts on scaled weights); inputs are not shuffled across a
buffer refilled by halves but in chunks of `buffer_tokens`.

Data parallel (`torchrun`, NCCL or gloo): each loss is written as (local sum) / (global count or variance), the
denominators all-reduced, so summing gradients over ranks gives exactly the single-process gradient of the
global batch.
"""
import copy
import dataclasses
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import unpickle
from . import activations
from .activations import all_reduce, world
from .atomic import atomic_write
from .errors import MinisvError
from .evals import fvu, moments
from .clt import CLTConfig, CrossLayerTranscoder
from .transcoder import Transcoder, TranscoderConfig, convention_of

CHECKPOINT = "checkpoint.pt"
DATA_ORDER = 2      # the version of the walk over the data; a checkpoint of another walk cannot resume exactly


@dataclass
class TrainConfig:
    layers: list
    d_sae: int
    architecture: str = "topk"
    k: int = 32
    skip: bool = False
    l1: float = 1.4e-4             # ReLU only: L1 coefficient (the paper's GPT-2 value)
    lr: float = 4e-4
    tokens: int = 1_000_000
    batch_tokens: int = 4096
    buffer_tokens: int = 65536     # tokens harvested and shuffled together
    warmup_steps: int = 100
    dead_tokens: int = 10_000_000  # a latent that has not fired for this many tokens is dead (AuxK / ghost grads)
    aux_coef: float = 1 / 32       # AuxK coefficient (OpenAI / sparsify)
    clt_window: int | None = None  # None: a transcoder per layer; else one cross-layer transcoder over every layer,
                                   # its decoders reaching the next clt_window layers (0: all later layers)
    sparsity: float = 1e-3         # JumpReLU CLT: coefficient of the tanh sparsity penalty ...
    sparsity_c: float = 4.0        # ... and its c in tanh(c · ‖W_dec‖ · a)
    seed: int = 0
    bos_id: int | None = None      # when set, positions holding this token are not trained on
    checkpoint_every: int = 50     # steps
    eval_every: int = 0            # steps between held-out FVU measurements (0: only at the end)
    amp: bool = True               # where bf16 is fast (`fast_bf16`): bf16 harvest and loss (see `train`)
    compile: bool = False          # torch.compile the loss (CUDA)
    model: str = ""
    dataset: str = ""
    hook_in: str = "ln2.hook_normalized"   # what the coder reads in each trained block: the MLP input ...
    hook_out: str = "hook_mlp_out"         # ... and what it predicts: the MLP output; hook_in == hook_out is an SAE

    def sites(self, layer):
        """The hooks the layer's coder reads and predicts, e.g. ("blocks.6.ln2.hook_normalized",
        "blocks.6.hook_mlp_out")."""
        return f"blocks.{layer}.{self.hook_in}", f"blocks.{layer}.{self.hook_out}"


@dataclass
class TrainState:
    """Everything a resumed run needs: the coders (trained on RMS-scaled activations), the optimizer, and the loop's
    own record: its step, its position in the data, and the dead-latent clocks."""
    coders: dict                   # {layer: Transcoder}
    opt: torch.optim.Optimizer
    last_fired: dict               # {layer: LongTensor [d_sae]}: training-token count at which each latent last fired
    step: int = 0
    chunk: int = 0                 # data position: batch `offset` of chunk `chunk` comes next
    offset: int = 0
    seconds: float = 0.0
    scale: dict = field(default_factory=dict)      # {layer: (RMS of x, RMS of y)} of the first batch
    history: list = field(default_factory=list)    # logged steps
    evals: list = field(default_factory=list)      # held-out FVU during training


# ------------------------------------------------------------------------- losses
def topk_loss(tc: Transcoder, x, y, dead, k_aux, aux_coef):
    """FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖², plus AuxK: the k_aux most active *dead* latents must reconstruct the error
    e = y − ŷ (target minus reconstruction), scaled by min(n_dead / k_aux, 1). Returns (loss, stats)."""
    y_hat, values, indices = tc.reconstruct(x)
    err = y_hat.float() - y.float()
    m = all_reduce(moments(y))
    fvu_value = fvu(err.pow(2).sum(), m)
    loss = fvu_value + aux_coef * auxk(x, (tc.W_enc.t(), tc.b_enc, tc.W_dec), dead, -err.detach(), k_aux)
    return loss, {"fvu": fvu_value.detach(), "l0": (values > 0).sum() / m[-1].float(),
                  "fired": tc.fired(values, indices)}


def auxk(x, weights, dead, e, k_aux):
    """AuxK: the k_aux largest pre-activations among the dead latents (weights = (W_enc [F, d_in], b_enc [F],
    W_dec [F, d_out]); dead: bool [F]) must reconstruct the error e [N, d_out]; their FVU, weighted by
    min(n_dead / k_aux, 1), or 0 with no dead latent."""
    n_dead = int(dead.sum())
    if not n_dead:
        return 0.0
    # dense over the dead latents only: k_aux is large (d_in / 2 per token), and four matmuls of
    # [N, n_dead] × [n_dead, d] beat gathering N·k_aux rows (2-3× on CPU at 40% dead)
    ids = dead.nonzero().squeeze(1)                                           # [n_dead]
    # index_select, not W[ids]: its backward is an index_add, not a sorting, accumulating index_put (2× slower)
    W_enc, b_enc, W_dec = (t.index_select(0, ids) for t in weights)
    pre_dead = F.linear(x, W_enc, b_enc)                                      # [N, n_dead], differentiable
    floor = pre_dead.detach().topk(min(k_aux, n_dead), dim=-1, sorted=False).values.min(-1, keepdim=True).values
    f_aux = pre_dead.relu() * (pre_dead.detach() >= floor)                   # the k_aux largest per token
    return min(n_dead / k_aux, 1.0) * fvu((f_aux @ W_dec).float().sub(e).pow(2).sum(), all_reduce(moments(e)))


def clt_loss(clt, x, y, dead, cfg):
    """A cross-layer transcoder's loss on x, y [N, L, d] (each layer's activations divided by their own RMS):
    Σ_l FVU_l, so every layer's target counts in units of its own variance; plus per layer AuxK (TopK: layer l's
    dead features fit layer l's error through their own-layer decoder) or Anthropic's sparsity penalty (JumpReLU:
    sparsity · mean over tokens of Σ_l,f tanh(c · ‖W_dec[l, f]‖ · a[l, f])). dead: bool [L, F]."""
    y_hat, values, indices = clt.reconstruct(x)
    err = y_hat.float() - y.float()
    sse = err.pow(2).sum((0, 2))                  # [L], in one op: a slice's backward would zero all of err per layer
    loss, stats, fired = 0.0, {}, clt.fired(values, indices)
    for i, l in enumerate(cfg.layers):
        m = all_reduce(moments(y[:, i]))
        fvu_l = fvu(sse[i], m)
        loss = loss + fvu_l
        if cfg.architecture == "topk":
            weights = (clt.W_enc[i], clt.b_enc[i], clt.W_dec[i][-1])     # layer i's own decoder into layer i
            loss = loss + cfg.aux_coef * auxk(x[:, i], weights, dead[i], -err[:, i].detach(), max(1, x.shape[-1] // 2))
        stats[l] = {"fvu": fvu_l.detach(), "l0": (values[:, i] > 0).sum() / m[-1].float(), "fired": fired[i]}
    if cfg.architecture == "jumprelu":
        n = all_reduce(torch.tensor(float(len(x)), device=x.device))
        loss = loss + cfg.sparsity * torch.tanh(cfg.sparsity_c * clt.decoder_norms() * values).sum() / n
    return loss, stats


def relu_loss(tc: Transcoder, x, y, dead, l1):
    """The paper's loss: mean over tokens and dims of (ŷ − y)² / ‖y‖ (per-token norm, not squared), plus
    l1 · mean_tokens Σ_j f_j; ghost grads for dead latents, fitting the error target − reconstruction."""
    y_hat, f, _ = tc.reconstruct(x)
    y = y.float()
    err = y_hat.float() - y
    m = all_reduce(moments(y))
    n = m[-1].float()
    mse = (err.pow(2) / y.norm(dim=-1, keepdim=True)).sum() / (n * y.shape[-1])
    loss = mse + l1 * f.float().sum() / n
    if dead.any():
        # ghost grads: exp(pre) of the dead latents, decoded and scaled to half the error's norm, fits the error;
        # the term is rescaled to the size of the MSE so it pulls as hard as reconstruction does
        r = -err.detach()
        pre_dead = F.linear(x, tc.W_enc.t()[dead], tc.b_enc[dead])
        ghost = torch.exp(pre_dead.float()) @ tc.W_dec[dead].float()
        ghost = ghost * (r.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + 1e-6)).detach()
        ghost_mse = ((ghost - r).pow(2) / r.norm(dim=-1, keepdim=True).clamp_min(1e-6)).sum() / (n * y.shape[-1])
        ratio = all_reduce(torch.stack([mse.detach(), ghost_mse.detach()]))
        loss = loss + ghost_mse * (ratio[0] / (ratio[1] + 1e-9))
    stats = {"fvu": fvu(err.detach().pow(2).sum(), m), "l0": (f > 0).sum() / n, "fired": tc.fired(f, None)}
    return loss, stats


def lr_at(step, n_steps, lr, warmup, decay=True):
    """Linear warm-up over `warmup` steps, constant, then (with `decay`) linear decay to 0 over the last 20% of
    steps. The ReLU recipe runs without the decay, as the paper's code does."""
    tail = min(1.0, (n_steps - step) / max(1, n_steps // 5)) if decay else 1.0
    return lr * min(1.0, (step + 1) / max(1, warmup)) * tail


# ------------------------------------------------------------------------- the loop
def train(model, rows, cfg: TrainConfig, out_dir=None, resume=False, eval_rows=None, log=print, on_step=None):
    """Train one transcoder per layer in cfg.layers on activations of `model` over token `rows` [N, ctx], or
    from `rows` = CachedActivations (harvested before, at cfg's sites, without BOS positions).
    With out_dir, checkpoints go to out_dir/checkpoint.pt every cfg.checkpoint_every steps (atomically) and
    `resume=True` continues from there. on_step(step, transcoders, stats) runs after every step (it may raise).
    With eval_rows (held-out token rows), the FVU on them is measured every cfg.eval_every steps and at the end.
    Where bf16 is fast (`fast_bf16`: CUDA, AMX CPUs), unless cfg.amp is False, training activations are harvested
    in bf16 (from a bf16 copy of a float32 model without active hooks; held-out ones from the model as given) and
    the loss runs under bf16 autocast. Returns ({layer: Transcoder}, summary dict)."""
    n_steps, device = cfg.tokens // cfg.batch_tokens, model.embed.weight.device
    if n_steps < 1:
        raise MinisvError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_tokens}; train for more tokens")
    for layer in cfg.layers:
        model.check_layer(layer)
    state = _new_state(model, cfg)
    ckpt = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if resume:
        _restore(ckpt, cfg, state)
        log(f"resuming at step {state.step}/{n_steps} from {ckpt}")
    sites = {l: cfg.sites(l) for l in cfg.layers}
    stream = rows
    if torch.is_tensor(rows):
        stream = activations.ActivationStream(activations.harvester(model, cfg.amp), rows, sites, cfg.batch_tokens,
                                              cfg.buffer_tokens, cfg.seed, cfg.bos_id, tokens=n_steps * cfg.batch_tokens)
        log(f"harvesting activations in shuffled chunks of {stream.per_chunk * cfg.batch_tokens:,} tokens ...")
    batches = stream.batches(state.chunk, state.offset)
    held_out = None if eval_rows is None else \
        activations.without_bos(activations.harvest(model, eval_rows, sites), eval_rows, cfg.bos_id)
    t0, seconds_before, start_step = time.perf_counter(), state.seconds, state.step
    log_every = max(1, min(50, n_steps // 20))
    while state.step < n_steps:
        state.chunk, state.offset, acts = next(batches)
        loss, stats = train_step(state, cfg, acts, n_steps, ckpt)
        state.seconds = seconds_before + time.perf_counter() - t0
        if on_step is not None:
            on_step(state.step, state.coders, stats)
        done = state.step == n_steps
        if state.step % log_every == 0 or done:
            record = _progress(state, cfg, n_steps, loss, stats, (state.step - start_step) * cfg.batch_tokens /
                               (time.perf_counter() - t0))
            if world()[0] == 0:
                log(record.pop("line"))
            state.history.append(record)
        if held_out is not None and (state.step % max(1, cfg.eval_every or n_steps) == 0 or done):
            state.evals.append({"step": state.step, "tokens": state.step * cfg.batch_tokens,
                                "fvu": held_out_fvu(state, held_out)})
        if world()[0] == 0 and ckpt and (state.step % cfg.checkpoint_every == 0 or done):
            _save_checkpoint(ckpt, cfg, state)
    seen = n_steps * cfg.batch_tokens
    coders = {"clt": _unscaled_clt(state.coders["clt"], [state.scale[l] for l in cfg.layers], seen)} \
        if "clt" in state.coders else {l: _unscaled(tc, *state.scale[l], seen) for l, tc in state.coders.items()}
    return coders, \
        {"steps": n_steps, "tokens": seen, "seconds": round(state.seconds, 1),
         "tok_per_s": round((n_steps - start_step) * cfg.batch_tokens / (time.perf_counter() - t0)),
         "dead": {str(l): _dead(v, seen, cfg.dead_tokens) for l, v in state.last_fired.items()},
         "dead_window_tokens": cfg.dead_tokens, "history": state.history, "held_out": state.evals}


def _new_state(model, cfg):
    """Fresh coders (seeded): a transcoder per layer, or one CLT under the key "clt"; their Adam optimizer and
    zeroed clocks."""
    torch.manual_seed(cfg.seed)
    d, device = model.cfg.d_model, model.embed.weight.device
    if cfg.clt_window is not None:
        if list(cfg.layers) != list(range(model.cfg.n_layers)):
            raise MinisvError(f"a cross-layer transcoder replaces every MLP: train it on all layers 0.."
                              f"{model.cfg.n_layers - 1}, not {list(cfg.layers)}")
        coders = {"clt": CrossLayerTranscoder(CLTConfig(
            len(cfg.layers), d, cfg.d_sae, cfg.architecture, cfg.k, cfg.clt_window, cfg.skip, cfg.model, cfg.dataset,
            hook_in=cfg.hook_in, hook_out=cfg.hook_out)).to(device)}
    else:
        coders = {l: Transcoder(TranscoderConfig(d, d, cfg.d_sae, cfg.architecture, cfg.k, cfg.skip, cfg.model, l,
                                                 *cfg.sites(l), convention_of(cfg.hook_in), dataset=cfg.dataset))
                  .to(device) for l in cfg.layers}
    opt = torch.optim.Adam([p for tc in coders.values() for p in tc.parameters()], lr=cfg.lr, fused=True)
    return TrainState(coders, opt, {l: torch.zeros(cfg.d_sae, dtype=torch.long, device=device) for l in cfg.layers})


def train_step(state: TrainState, cfg: TrainConfig, acts, n_steps, ckpt=None):
    """One optimizer step of every coder on its layer's batch acts {layer: (x, y)}; returns (the summed loss over
    layers and ranks, {layer: stats})."""
    step, seen = state.step, state.step * cfg.batch_tokens
    if step == 0:   # inputs and targets are divided by their RMS (the MLP input's is ~1 already), so one
        for l in cfg.layers:                     # learning rate suits every model, layer and hook
            _check_resolution(acts[l][1], l)
            state.scale[l] = (_rms(acts[l][0]), _rms(acts[l][1]))
        _center(state, cfg, acts)
    for group in state.opt.param_groups:
        group["lr"] = lr_at(step, n_steps, cfg.lr, cfg.warmup_steps, decay=cfg.architecture != "relu")
    device = state.last_fired[cfg.layers[0]].device
    dead = {l: seen - state.last_fired[l] >= cfg.dead_tokens for l in cfg.layers}
    bf16 = cfg.amp and activations.fast_bf16(device)
    with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
        if "clt" in state.coders:
            x, y = (torch.stack(t, 1) for t in zip(*(_scaled(acts[l], state.scale[l]) for l in cfg.layers)))
            total, stats = clt_loss(state.coders["clt"], x, y, torch.stack([dead[l] for l in cfg.layers]), cfg)
        else:
            loss_fn, total, stats = _loss_fn(cfg), 0.0, {}
            for l, tc in state.coders.items():
                loss, stats[l] = loss_fn(tc, *_scaled(acts[l], state.scale[l]), dead[l])
                total = total + loss
    params = [p for tc in state.coders.values() for p in tc.parameters()]
    state.opt.zero_grad(set_to_none=True)
    total.backward()
    for p in params:             # each rank's loss is (its share) / (global size): summed grads = global grad
        if p.grad is not None:   # (a JumpReLU threshold nobody came near has none)
            all_reduce(p.grad)
    if cfg.architecture == "relu":
        for tc in state.coders.values():
            tc.project_decoder_grad()
    state.opt.step()
    if cfg.architecture == "relu":
        for tc in state.coders.values():
            tc.normalize_decoder()
    loss = _check_finite(total, params, step, ckpt)
    for l in cfg.layers:         # the clock behind "dead": the training-token count at which each latent last fired
        state.last_fired[l][all_reduce(stats[l]["fired"]) > 0] = seen + cfg.batch_tokens
    state.step, state.offset = step + 1, state.offset + 1
    return loss, stats


_COMPILED = {}


def _center(state, cfg, acts):
    """On the first batch: b_dec = the mean (scaled) target, b_enc = −mean(x) W_enc, over all ranks."""
    means = {}
    for l in cfg.layers:
        x, y = _scaled(acts[l], state.scale[l])
        stats = all_reduce(torch.cat([x.sum(0), y.sum(0), torch.tensor([len(x)], device=x.device)]))
        means[l] = (stats[:x.shape[1]] / stats[-1], stats[x.shape[1]:-1] / stats[-1])
    if "clt" in state.coders:
        state.coders["clt"].center_on(*(torch.stack(m) for m in zip(*(means[l] for l in cfg.layers))))
    else:
        for l, tc in state.coders.items():
            tc.center_on(*means[l])


def _loss_fn(cfg):
    """loss(tc, x, y, dead) -> (loss, stats) for the architecture, compiled once per process with cfg.compile."""
    loss = topk_loss if cfg.architecture == "topk" else relu_loss
    if cfg.compile:
        loss = _COMPILED.setdefault(loss, torch.compile(loss))
    if cfg.architecture == "topk":
        return lambda tc, x, y, dead: loss(tc, x, y, dead, max(1, tc.cfg.d_in // 2), cfg.aux_coef)
    return lambda tc, x, y, dead: loss(tc, x, y, dead, cfg.l1)


def _check_finite(total, params, step, ckpt):
    """The loss summed over ranks, checked finite *after* the step with the weights: a finite loss can still give an
    overflowing gradient and non-finite weights, which must never be saved as the last good checkpoint (one sync
    for the loss and every weight's sum)."""
    health = all_reduce(torch.stack([total.detach().float()] + [p.detach().float().sum() for p in params]))
    loss_value, weights_ok = float(health[0]), bool(health[1:].isfinite().all())
    if not (math.isfinite(loss_value) and weights_ok):
        what = f"loss is {loss_value}" if not math.isfinite(loss_value) else "the weights became non-finite"
        where = f"; the last good checkpoint is {ckpt} (--resume continues from it)" if ckpt else ""
        raise MinisvError(f"training diverged: {what} at step {step}{where}; lower --lr")
    return loss_value


def _dead(last_fired, seen, window):
    """Fraction of latents that fired on none of the last `window` training tokens (of `seen` so far)."""
    return float((seen - last_fired >= window).float().mean())


def _check_resolution(y, layer):
    """bf16 keeps 8 significant bits, so targets whose spread is under ~3% of their size (Σ‖y − ȳ‖² < 1e-3 Σ‖y‖²)
    lose much of their variance to rounding: refuse them rather than train on the rounding noise."""
    if y.dtype == torch.bfloat16:
        m = all_reduce(moments(y))
        variance, size = float(m[-2] - m[:-2].pow(2).sum() / m[-1]), float(m[-2])
        if variance < 1e-3 * size:
            raise MinisvError(f"layer {layer}: the targets vary by {(variance / size) ** 0.5:.2%} of their size, "
                              f"below what bf16 activations resolve; train in float32 (train_transcoder.py "
                              f"--no-autocast --dtype float32, or train(..., amp=False) on a float32 model)")


def _scaled(xy, scale):
    """(x / s_in, y / s_out) in float32 (activations come in the model's dtype; the transcoders are float32)."""
    return xy[0].float() / scale[0], xy[1].float() / scale[1]


@torch.no_grad()
def held_out_fvu(state, held_out, batch=1024):
    """{layer: FVU} on held-out activations {layer: (x, y)}, in the scaled units training uses (FVU does not depend
    on them)."""
    layers = sorted(held_out)
    x, y = (torch.stack(t, 1) for t in zip(*(_scaled(held_out[l], state.scale[l]) for l in layers)))   # [n, L, d]
    if "clt" in state.coders:
        y_hat = torch.cat([state.coders["clt"](x[i:i + batch]) for i in range(0, len(x), batch)])
    else:
        y_hat = torch.stack([torch.cat([state.coders[l](x[i:i + batch, j]) for i in range(0, len(x), batch)])
                             for j, l in enumerate(layers)], 1)
    return {str(l): float(fvu((y_hat[:, j].double() - y[:, j].double()).pow(2).sum(), moments(y[:, j])))
            for j, l in enumerate(layers)}


def _rms(y):
    """Root mean square of the targets over the (global) batch."""
    stats = all_reduce(torch.stack([y.float().pow(2).sum(), torch.tensor(float(y.numel()), device=y.device)]))
    return float((stats[0] / stats[1]).sqrt())


@torch.no_grad()
def _unscaled(tc, s_in, s_out, tokens):
    """A copy for raw inputs and targets. Trained on x' = x / s_in to predict y' = y / s_out, it becomes
    f = s_out·f' = act(x·(s_out/s_in)·W_enc + s_out·b_enc) (ReLU and TopK commute with a positive scale; ReLU
    decoder rows keep unit norm) and ŷ = f·W_dec + s_out·b_dec + x·(s_out/s_in)·W_skip."""
    out = copy.deepcopy(tc)
    for p in (out.b_enc, out.b_dec):
        p.mul_(s_out)
    for p in (out.W_enc,) + ((out.W_skip,) if out.W_skip is not None else ()):
        p.mul_(s_out / s_in)
    out.cfg.training_tokens = tokens
    return out


@torch.no_grad()
def _unscaled_clt(clt, scales, tokens):
    """A copy of a CLT for raw activations. Trained on x'_l = x_l / s_in_l to predict y'_t = y_t / s_out_t: the
    encoders take the input scale (x_l (W_enc[l] / s_in_l) = x'_l W_enc[l], so activations and thresholds are
    unchanged) and the decoders, biases and skips into layer t the output scale s_out_t."""
    out = copy.deepcopy(clt)
    s_in, s_out = (torch.tensor(s, dtype=out.b_dec.dtype, device=out.b_dec.device) for s in zip(*scales))
    out.W_enc.div_(s_in[:, None, None])
    out.b_dec.mul_(s_out[:, None])
    for t, W in enumerate(out.W_dec):
        W.mul_(s_out[t])
    if out.W_skip is not None:
        out.W_skip.mul_((s_out / s_in)[:, None, None])
    out.cfg.training_tokens = tokens
    return out


# ------------------------------------------------------------------------- checkpoints
_RECORD = ("step", "chunk", "offset", "seconds", "history", "evals")


def _save_checkpoint(path, cfg, state):
    out = {"train_cfg": dataclasses.asdict(cfg), "data_order": DATA_ORDER, "optimizer": state.opt.state_dict(),
           "transcoders": {str(l): tc.state_dict() for l, tc in state.coders.items()},
           "scale": {str(l): v for l, v in state.scale.items()},
           "last_fired": {str(l): v for l, v in state.last_fired.items()},
           **{k: getattr(state, k) for k in _RECORD}}
    atomic_write(path, lambda tmp: torch.save(out, tmp))


def _restore(path, cfg, state):
    """Load a checkpoint into `state`, refusing one of other settings, another data walk, or a damaged file."""
    if not path or not os.path.isfile(path):
        raise MinisvError(f"nothing to resume: no {CHECKPOINT} in {os.path.dirname(path or '') or 'the output dir'}; "
                          f"start without --resume")
    device = state.last_fired[cfg.layers[0]].device
    try:
        saved = unpickle.load(path, map_location=device)
        same = saved["train_cfg"] == dataclasses.asdict(cfg)
    except Exception as e:      # truncated, not a torch file, not a dict
        raise MinisvError(f"cannot resume: {path} is damaged or not a checkpoint of this script ({_first_line(e)}); "
                          f"start again with --overwrite") from None
    if not same:
        diff = [k for k, v in dataclasses.asdict(cfg).items() if saved["train_cfg"].get(k) != v]
        raise MinisvError(f"cannot resume {path}: it was trained with different settings ({', '.join(diff)}); "
                          f"rerun with the original flags or a new --out")
    if saved.get("data_order") != DATA_ORDER:
        raise MinisvError(f"cannot resume {path}: an older minisv wrote it, which walked the data in another order "
                          f"(resuming would repeat or skip data); start again with --overwrite")
    try:
        for l, tc in state.coders.items():
            tc.load_state_dict(saved["transcoders"][str(l)])
        state.opt.load_state_dict(saved["optimizer"])
        for k in _RECORD:
            setattr(state, k, saved[k])
        state.scale = {int(l): tuple(v) for l, v in saved["scale"].items()}
        state.last_fired = {int(l): v.to(device) for l, v in saved["last_fired"].items()}
        if any(v.shape != (cfg.d_sae,) for v in state.last_fired.values()):
            raise ValueError("last_fired has the wrong shape")
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise MinisvError(f"cannot resume: {path} does not match this run's transcoders ({_first_line(e)}); "
                          f"start again with --overwrite") from None


def _first_line(e):
    """An exception as one short line (torch's messages can span many)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _progress(state, cfg, n_steps, loss, stats, tok_s):
    seen = state.step * cfg.batch_tokens
    mean = lambda key: sum(float(all_reduce(stats[l][key].detach().float().reshape(1))) for l in cfg.layers) / \
        len(cfg.layers)
    fvu_, l0 = mean("fvu"), mean("l0")
    dead = sum(_dead(v, seen, cfg.dead_tokens) for v in state.last_fired.values()) / len(cfg.layers)
    eta = (n_steps - state.step) * cfg.batch_tokens / max(tok_s, 1e-9)
    line = (f"step {state.step}/{n_steps} | {seen:,} tok | {tok_s:,.0f} tok/s | ETA {eta:,.0f} s | loss "
            f"{loss:.4f} | L0 {l0:.1f} | FVU {fvu_:.3f} | dead {dead:.1%}")
    return {"step": state.step, "tokens": seen, "loss": loss, "fvu": fvu_, "l0": l0, "dead": dead,
            "line": line}
