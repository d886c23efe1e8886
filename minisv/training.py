"""Training transcoders (and SAEs): activation streaming, the two losses, and a resumable, data-parallel loop.

One step, for every trained layer L at once (`docs/methods.md` §2.1-2.2):
  1. activations: x = blocks.L.ln2.hook_normalized, y = blocks.L.hook_mlp_out (an SAE: the same hook twice),
     harvested by running the model only up to the deepest layer trained (`stop_at_layer`); one forward serves
     every layer; x and y are divided by their RMS (measured on the first batch) and the result scaled back;
  2. loss: TopK -> FVU + AuxK for dead latents; ReLU -> normalized MSE + L1 (+ ghost grads for dead latents);
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

The data order is a pure function of (seed, position): the token rows are shuffled per epoch with a seeded
permutation, consumed in chunks of `buffer_tokens`, and each chunk's tokens are shuffled with a seed derived
from its index. A checkpoint therefore only needs (chunk, batch within chunk) to resume exactly where it stopped.

Data parallel (`torchrun`, NCCL or gloo): every rank harvests its share of a chunk's rows and all-gathers the
rest, so all ranks hold the same shuffled chunk and take their slice of each global batch. Each loss is written
as (local sum) / (global count or variance), the denominators all-reduced, so summing gradients over ranks
gives exactly the single-process gradient of the global batch.
"""
import copy
import dataclasses
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import MinisvError
from .atomic import atomic_write
from . import unpickle
from .model import Model
from .transcoder import Transcoder, TranscoderConfig, selected_preacts

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
    seed: int = 0
    bos_id: int | None = None      # when set, positions holding this token are not trained on
    checkpoint_every: int = 50     # steps
    model: str = ""
    dataset: str = ""
    hook_in: str = "ln2.hook_normalized"   # what the coder reads in each trained block: the MLP input ...
    hook_out: str = "hook_mlp_out"         # ... and what it predicts: the MLP output; hook_in == hook_out is an SAE

    def hooks(self, layer):
        return f"blocks.{layer}.{self.hook_in}", f"blocks.{layer}.{self.hook_out}"


def _world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _all_reduce(t):
    """Sum over ranks in place (identity in a single process)."""
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------- activation streaming
def fast_bf16(device):
    """Whether bf16 matmuls beat float32 ones here: on CUDA, and on CPUs with AMX tile units (Intel Sapphire
    Rapids and later: a [1024, 576] × [576, 9216] matmul runs ~10× faster than in float32). CPUs without AMX
    emulate bf16 and run it slower than float32."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return device.type == "cuda" or device.type == "cpu" and bool(capabilities.get("amx_bf16"))


@torch.no_grad()
def harvest(model, tokens, hooks, batch_rows=32):
    """tokens [R, T] -> {layer: (x [R, T, d_in], y [R, T, d_out])} for hooks {layer: (x name, y name)}, running
    the model only up to the deepest layer needed."""
    out = {l: ([], []) for l in hooks}
    names = sorted({n for pair in hooks.values() for n in pair})
    for i in range(0, len(tokens), batch_rows):
        _, cache = model.run_with_cache(tokens[i:i + batch_rows].to(model.embed.weight.device), names=names,
                                        stop_at_layer=max(hooks) + 1)
        for l, (x_name, y_name) in hooks.items():
            out[l][0].append(cache[x_name])
            out[l][1].append(cache[y_name])
    return {l: (torch.cat(xs), torch.cat(ys)) for l, (xs, ys) in out.items()}


def as_bf16(model):
    """A bf16 copy of `model` (without its hooks), built on the meta device so that nothing is allocated twice;
    the model is left untouched."""
    with torch.device("meta"):
        twin = Model(model.cfg, model.tokenizer)
    twin.load_state_dict(model.state_dict(), assign=True)    # new parameters over the same tensors ...
    if model.unembed.weight is model.embed.weight:
        twin.unembed.weight = twin.embed.weight
    return twin.to(torch.bfloat16)                           # ... then bf16 copies of them


def harvester(model, amp=True):
    """The model training activations are harvested from: where bf16 is fast (and amp), a bf16 copy of a float32
    model; else, and while hooks are active (a steering vector, an ablation: they belong to the model, they read
    model.positions), the model itself."""
    float32 = model.embed.weight.dtype == torch.float32
    copy_ = amp and fast_bf16(model.embed.weight.device) and float32 and not model._hooks
    return as_bf16(model) if copy_ else model


class ActivationStream:
    """Shuffled batches of (x, y) per layer, as a deterministic function of (seed, chunk, batch index).
    `hooks` {layer: (x hook name, y hook name)} says what to harvest (the same name twice for an SAE).

    The token rows are walked in a fresh seeded order every epoch; chunk c takes just enough of the next rows to
    hold `buffer_tokens` (rounded down to whole batches) trainable tokens, i.e. not counting BOS positions, so
    no harvested token is wasted beyond the last row's overshoot. With `tokens`, the stream ends there and the
    last chunk harvests only what is left (so a shorter run's data is not a prefix of a longer one's: its last
    chunk is shuffled on its own)."""

    def __init__(self, model, rows, hooks, batch_tokens, buffer_tokens, seed, bos_id=None, tokens=None):
        self.model, self.rows, self.hooks, self.seed, self.bos_id = model, rows, hooks, seed, bos_id
        self.rank, self.world = _world()
        if batch_tokens % self.world:
            raise MinisvError(f"batch of {batch_tokens} tokens does not split evenly over {self.world} processes")
        self.batch = batch_tokens
        self.per_chunk = max(1, buffer_tokens // batch_tokens)          # batches served by one chunk
        self.n_batches = tokens // batch_tokens if tokens else None
        self.usable = ((rows != bos_id).sum(1) if bos_id is not None else torch.full((len(rows),), rows.shape[1]))
        if int(self.usable.sum()) == 0:
            raise MinisvError("the training rows hold nothing but BOS tokens; give more text")
        self.usable, self.orders, self.starts = self.usable.tolist(), {}, [0]

    def _row(self, g):
        """Row number at position g of the endless walk over the rows (each epoch in a fresh seeded order)."""
        n = len(self.rows)
        if g // n not in self.orders:   # the walk moves forward: keep the last epoch's order, drop older ones
            self.orders = {e: order for e, order in self.orders.items() if e == g // n - 1}
            self.orders[g // n] = torch.randperm(n, generator=_generator(self.seed, 0, g // n)).tolist()
        return self.orders[g // n][g % n]

    def _batches_in(self, chunk):
        """Batches chunk c serves: per_chunk, fewer in the last chunk of a stream of n_batches (≤ 0 past it)."""
        if self.n_batches is None:
            return self.per_chunk
        return min(self.per_chunk, self.n_batches - chunk * self.per_chunk)

    def _row_ids(self, chunk):
        """Row numbers of a chunk: walk positions [starts[c], starts[c+1]), found by counting trainable tokens
        (the same for any number of processes)."""
        while len(self.starts) <= chunk + 1:
            c, g, have = len(self.starts) - 1, self.starts[-1], 0
            while have < self._batches_in(c) * self.batch:
                have, g = have + self.usable[self._row(g)], g + 1
            self.starts.append(g)
        return torch.tensor([self._row(g) for g in range(self.starts[chunk], self.starts[chunk + 1])])

    def chunk(self, c):
        """The shuffled activations of chunk c: {layer: (x [n, d_in], y [n, d_out])}, n = its batches × batch,
        identical on every rank."""
        ids = self._row_ids(c)
        share = -(-len(ids) // self.world)      # rows per process, the last ones padded with repeats of the first
        tokens = self.rows[ids[torch.arange(share * self.world) % len(ids)]]
        acts = harvest(self.model, tokens[self.rank * share:(self.rank + 1) * share], self.hooks)
        if self.world > 1:      # everyone gets every rank's rows, in rank order = chunk order, without the padding
            acts = {l: tuple(torch.cat(_all_gather(t))[:len(ids)] for t in xy) for l, xy in acts.items()}
        acts = _without_bos(acts, tokens[:len(ids)], self.bos_id)
        order = torch.randperm(len(next(iter(acts.values()))[0]), generator=_generator(self.seed, 1, c))
        order = order[:self._batches_in(c) * self.batch]
        return {l: (x[order.to(x.device)], y[order.to(x.device)]) for l, (x, y) in acts.items()}

    def batches(self, chunk=0, offset=0):
        """Yield (chunk, index, {layer: (x, y)}) from position (chunk, offset), forever or up to `tokens`; each
        x, y is this rank's slice [batch / world, d] of the global batch."""
        part = self.batch // self.world
        while self._batches_in(chunk) > 0:
            if offset < self._batches_in(chunk):       # (a run resumed at a chunk's end starts with the next)
                acts = self.chunk(chunk)
                for i in range(offset, self._batches_in(chunk)):
                    lo = i * self.batch + self.rank * part
                    yield chunk, i, {l: (x[lo:lo + part], y[lo:lo + part]) for l, (x, y) in acts.items()}
            chunk, offset = chunk + 1, 0


class CachedActivations:
    """Batches from activations already in memory, {layer: (x [n, d_in], y [n, d_out])}, in a fresh seeded order
    every epoch (one process). For sweeps: harvest once, train many coders on exactly the same tokens."""

    def __init__(self, acts, batch_tokens, seed):
        self.acts, self.batch, self.seed = acts, batch_tokens, seed
        self.n = len(next(iter(acts.values()))[0])
        if self.n < batch_tokens:
            raise MinisvError(f"{self.n} cached activations are less than one batch of {batch_tokens}")

    def batches(self, chunk=0, offset=0):
        """Like ActivationStream.batches, with one epoch per chunk."""
        while True:
            order = torch.randperm(self.n, generator=_generator(self.seed, 2, chunk))
            for i in range(offset, self.n // self.batch):
                take = order[i * self.batch:(i + 1) * self.batch]
                yield chunk, i, {l: (x[take.to(x.device)], y[take.to(y.device)]) for l, (x, y) in self.acts.items()}
            chunk, offset = chunk + 1, 0


def _generator(*key):
    """A CPU generator seeded by a tuple of ints (hash of an int tuple is the same in every process and run)."""
    return torch.Generator().manual_seed(hash(key))


def _all_gather(t):
    parts = [torch.empty_like(t) for _ in range(_world()[1])]
    dist.all_gather(parts, t.contiguous())
    return parts


# ------------------------------------------------------------------------- losses
def _total_variance(y):
    """Σ_n ‖y_n − ȳ‖² over the global batch, from all-reduced Σy, Σ‖y‖² and n (a constant for autograd). In
    float64: Σ‖y‖² − ‖Σy‖²/n cancels catastrophically in float32 when the mean dwarfs the spread (residual
    streams have dimensions like that)."""
    y = y.detach().double()
    count = torch.tensor([len(y)], device=y.device, dtype=y.dtype)
    stats = _all_reduce(torch.cat([y.sum(0), y.pow(2).sum()[None], count]))
    total, sq, n = stats[:-2], stats[-2], stats[-1]
    return (sq - total.pow(2).sum() / n).float(), n.float()


def topk_loss(tc: Transcoder, x, y, dead, k_aux, aux_coef):
    """FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖², plus AuxK: the k_aux most active *dead* latents must reconstruct the error
    e = y − ŷ (target minus reconstruction), scaled by min(n_dead / k_aux, 1). Returns (loss, stats)."""
    with torch.no_grad():
        pre = tc.preacts(x)
    indices = pre.topk(tc.cfg.k, dim=-1, sorted=False).indices
    values = selected_preacts(x, tc.W_enc, tc.b_enc, pre, indices).relu()
    y_hat = tc.decode_sparse(values, indices)
    if tc.W_skip is not None:
        y_hat = y_hat + x @ tc.W_skip
    err = y_hat.float() - y.float()
    var, n = _total_variance(y)
    fvu = err.pow(2).sum() / var
    loss = fvu
    n_dead = int(dead.sum())
    if n_dead:
        # dense over the dead latents only: k_aux is large (d_in / 2 per token), and four matmuls of
        # [N, n_dead] × [n_dead, d] beat gathering N·k_aux rows (2-3× on CPU at 40% dead)
        ids = dead.nonzero().squeeze(1)                                       # [n_dead]
        # index_select, not W[ids]: its backward is an index_add, not a sorting, accumulating index_put (2× slower)
        W_enc, b_enc, W_dec = (t.index_select(0, ids) for t in (tc.W_enc.t(), tc.b_enc, tc.W_dec))
        pre_dead = F.linear(x, W_enc, b_enc)                                  # [N, n_dead], differentiable
        floor = pre_dead.detach().topk(min(k_aux, n_dead), dim=-1, sorted=False).values.min(-1, keepdim=True).values
        f_aux = pre_dead.relu() * (pre_dead.detach() >= floor)               # the k_aux largest per token
        e_hat = f_aux @ W_dec
        e = -err.detach()
        aux = (e_hat.float() - e).pow(2).sum() / _total_variance(e)[0]
        loss = loss + aux_coef * min(n_dead / k_aux, 1.0) * aux
    fired = torch.zeros(tc.cfg.d_sae, device=x.device).index_add_(0, indices.flatten(), (values > 0).flatten().float())
    return loss, {"fvu": fvu.detach(), "l0": (values > 0).sum() / n, "fired": fired}


def relu_loss(tc: Transcoder, x, y, dead, l1):
    """The paper's loss: mean over tokens and dims of (ŷ − y)² / ‖y‖ (per-token norm, not squared), plus
    l1 · mean_tokens Σ_j f_j; ghost grads for dead latents, fitting the error target − reconstruction."""
    pre = tc.preacts(x)
    f = F.relu(pre)
    y_hat = tc.decode(f)
    if tc.W_skip is not None:
        y_hat = y_hat + x @ tc.W_skip
    y = y.float()
    err = y_hat.float() - y
    var, n = _total_variance(y)
    norm = y.norm(dim=-1, keepdim=True)
    mse = (err.pow(2) / norm).sum() / (n * y.shape[-1])
    loss = mse + l1 * f.float().sum() / n
    if dead.any():
        # ghost grads: exp(pre) of the dead latents, decoded and scaled to half the error's norm, fits the error;
        # the term is rescaled to the size of the MSE so it pulls as hard as reconstruction does
        r = -err.detach()
        ghost = torch.exp(pre[:, dead].float()) @ tc.W_dec[dead].float()
        ghost = ghost * (r.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + 1e-6)).detach()
        ghost_mse = ((ghost - r).pow(2) / r.norm(dim=-1, keepdim=True).clamp_min(1e-6)).sum() / (n * y.shape[-1])
        ratio = _all_reduce(torch.stack([mse.detach(), ghost_mse.detach()]))
        loss = loss + ghost_mse * (ratio[0] / (ratio[1] + 1e-9))
    fired = (f > 0).float().sum(0).detach()
    return loss, {"fvu": err.detach().pow(2).sum() / var, "l0": (f > 0).sum() / n, "fired": fired}


def _fix_decoder_grad(tc):
    """ReLU: the decoder rows live on the unit sphere (else L1 is cheated by shrinking f and growing W_dec);
    remove each row's gradient component along the row, so Adam moves along the sphere."""
    w, g = tc.W_dec, tc.W_dec.grad
    g.sub_((g * w).sum(-1, keepdim=True) * w)


@torch.no_grad()
def _init_from_batch(tc, x, y):
    """b_dec = mean target, b_enc = −mean(x) @ W_enc: pre-activations start centered, the output at the mean."""
    stats = _all_reduce(torch.cat([x.float().sum(0), y.float().sum(0), torch.tensor([len(x)], device=x.device)]))
    n = stats[-1]
    tc.b_dec.copy_(stats[x.shape[1]:-1] / n)
    tc.b_enc.copy_(-(stats[:x.shape[1]] / n) @ tc.W_enc)


def lr_at(step, n_steps, lr, warmup, decay=True):
    """Linear warm-up over `warmup` steps, constant, then (with `decay`) linear decay to 0 over the last 20% of
    steps. The ReLU recipe runs without the decay, as the paper's code does."""
    tail = min(1.0, (n_steps - step) / max(1, n_steps // 5)) if decay else 1.0
    return lr * min(1.0, (step + 1) / max(1, warmup)) * tail


# ------------------------------------------------------------------------- the loop
def train(model, rows, cfg: TrainConfig, out_dir=None, resume=False, log=print, on_step=None, eval_rows=None,
          eval_every=0, compile_step=False, amp=True):
    """Train one transcoder per layer in cfg.layers on activations of `model` over token `rows` [N, ctx], or
    from `rows` = CachedActivations (harvested before, at cfg's hooks, without BOS positions).
    With out_dir, checkpoints go to out_dir/checkpoint.pt every cfg.checkpoint_every steps (atomically) and
    `resume=True` continues from there. on_step(step, transcoders, stats) runs after every step (it may raise).
    With eval_rows (held-out token rows), the FVU on them is measured every `eval_every` steps and at the end.
    Where bf16 is fast (`fast_bf16`: CUDA, AMX CPUs), unless amp=False, training activations are harvested in bf16
    (from a bf16 copy of a float32 model without active hooks; held-out ones from the model as given) and the
    loss runs under bf16 autocast. compile_step: torch.compile the loss (CUDA).
    Returns ({layer: Transcoder}, summary dict)."""
    rank, _ = _world()
    device, d, n_steps = model.embed.weight.device, model.cfg.d_model, cfg.tokens // cfg.batch_tokens
    if n_steps < 1:
        raise MinisvError(f"--tokens {cfg.tokens} is less than one batch of {cfg.batch_tokens}; train for more tokens")
    for layer in cfg.layers:
        model.check_layer(layer)
    torch.manual_seed(cfg.seed)
    convention = "normalized" if cfg.hook_in.endswith("hook_normalized") else "raw"
    tcs = {l: Transcoder(TranscoderConfig(d, d, cfg.d_sae, cfg.architecture, cfg.k, cfg.skip, cfg.model, l,
                                          *cfg.hooks(l), convention, dataset=cfg.dataset)) for l in cfg.layers}
    if cfg.architecture == "relu":      # the paper's code: Kaiming-uniform weights (W_enc [d_in, d_sae]: bound
        with torch.no_grad():           # sqrt(6 / d_sae)), decoder rows then scaled to unit norm
            for tc in tcs.values():
                torch.nn.init.kaiming_uniform_(tc.W_enc)
                tc.W_dec.copy_(F.normalize(torch.nn.init.kaiming_uniform_(torch.empty_like(tc.W_dec)), dim=1))
    tcs = {l: tc.to(device) for l, tc in tcs.items()}
    params = [p for tc in tcs.values() for p in tc.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=True)
    # everything besides weights and optimizer that a resumed run needs: data position, dead-latent clocks, ...
    run = {"step": 0, "chunk": 0, "offset": 0, "seconds": 0.0, "history": [], "evals": [], "scale": {},
           "last_fired": {l: torch.zeros(cfg.d_sae, dtype=torch.long, device=device) for l in cfg.layers}}
    ckpt = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if resume:
        run = _restore(ckpt, cfg, tcs, opt, device)
        log(f"resuming at step {run['step']}/{n_steps} from {ckpt}")
    hooks, bf16 = {l: cfg.hooks(l) for l in cfg.layers}, amp and fast_bf16(device)
    stream = rows
    if torch.is_tensor(rows):
        stream = ActivationStream(harvester(model, amp), rows, hooks, cfg.batch_tokens, cfg.buffer_tokens, cfg.seed,
                                  cfg.bos_id, tokens=n_steps * cfg.batch_tokens)
        log(f"harvesting activations in shuffled chunks of {stream.per_chunk * cfg.batch_tokens:,} tokens ...")
    batches = stream.batches(run["chunk"], run["offset"])
    held_out = _without_bos(harvest(model, eval_rows, hooks), eval_rows, cfg.bos_id) if eval_rows is not None else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    topk, relu = (torch.compile(topk_loss), torch.compile(relu_loss)) if compile_step else (topk_loss, relu_loss)
    t0, seconds_before, start_step = time.perf_counter(), run["seconds"], run["step"]
    log_every = max(1, min(50, n_steps // 20))
    while run["step"] < n_steps:
        step, seen = run["step"], run["step"] * cfg.batch_tokens
        run["chunk"], run["offset"], acts = next(batches)
        if step == 0:   # inputs and targets are divided by their RMS (the MLP input's is ~1 already), so one
            for l, tc in tcs.items():       # learning rate suits every model, layer and hook
                _check_resolution(acts[l][1], l)
                run["scale"][l] = (_rms(acts[l][0]), _rms(acts[l][1]))
                _init_from_batch(tc, *_scaled(acts[l], run["scale"][l]))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, n_steps, cfg.lr, cfg.warmup_steps, decay=cfg.architecture == "topk")
        total, stats = 0.0, {}
        with autocast:
            for l, tc in tcs.items():
                x, y = _scaled(acts[l], run["scale"][l])
                dead = seen - run["last_fired"][l] >= cfg.dead_tokens
                loss, stats[l] = topk(tc, x, y, dead, max(1, d // 2), cfg.aux_coef) \
                    if cfg.architecture == "topk" else relu(tc, x, y, dead, cfg.l1)
                total = total + loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        for p in params:             # each rank's loss is (its share) / (global size): summed grads = global grad
            _all_reduce(p.grad)
        if cfg.architecture == "relu":
            for tc in tcs.values():
                _fix_decoder_grad(tc)
        opt.step()
        if cfg.architecture == "relu":
            with torch.no_grad():
                for tc in tcs.values():
                    tc.W_dec.div_(tc.W_dec.norm(dim=1, keepdim=True))
        # checked *after* the step: a finite loss can still give an overflowing gradient and non-finite weights,
        # which must never be saved as the last good checkpoint (one sync for the loss and every weight's sum)
        health = _all_reduce(torch.stack([total.detach().float()] + [p.detach().float().sum() for p in params]))
        loss_value, weights_ok = float(health[0]), bool(health[1:].isfinite().all())
        if not (math.isfinite(loss_value) and weights_ok):
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else "the weights became non-finite"
            where = f"; the last good checkpoint is {ckpt} (--resume continues from it)" if ckpt else ""
            raise MinisvError(f"training diverged: {what} at step {step}{where}; lower --lr")
        for l in tcs:       # the clock behind "dead": the training-token count at which each latent last fired
            run["last_fired"][l][_all_reduce(stats[l]["fired"]) > 0] = seen + cfg.batch_tokens
        run["step"], run["offset"] = step + 1, run["offset"] + 1
        run["seconds"] = seconds_before + time.perf_counter() - t0
        if on_step is not None:
            on_step(step + 1, tcs, stats)
        if (step + 1) % log_every == 0 or step + 1 == n_steps:
            record = _progress(step + 1, n_steps, cfg, loss_value, stats, run["last_fired"],
                               (step + 1 - start_step) * cfg.batch_tokens / (time.perf_counter() - t0))
            line = record.pop("line")
            run["history"].append(record)
            if rank == 0:
                log(line)
        if held_out is not None and ((step + 1) % max(1, eval_every) == 0 or step + 1 == n_steps):
            run["evals"].append({"step": step + 1, "tokens": seen + cfg.batch_tokens,
                                 "fvu": _held_out_fvu(tcs, held_out, run["scale"])})
        if rank == 0 and ckpt and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == n_steps):
            _save_checkpoint(ckpt, cfg, tcs, opt, run)
    seen = n_steps * cfg.batch_tokens
    return {l: _unscaled(tc, *run["scale"][l], seen) for l, tc in tcs.items()}, \
        {"steps": n_steps, "tokens": seen, "seconds": round(run["seconds"], 1),
         "tok_per_s": round((n_steps - start_step) * cfg.batch_tokens / (time.perf_counter() - t0)),
         "dead": {str(l): _dead(v, seen, cfg.dead_tokens) for l, v in run["last_fired"].items()},
         "dead_window_tokens": cfg.dead_tokens, "history": run["history"], "held_out": run["evals"]}


def _dead(last_fired, seen, window):
    """Fraction of latents that fired on none of the last `window` training tokens (of `seen` so far)."""
    return float((seen - last_fired >= window).float().mean())


def _check_resolution(y, layer):
    """bf16 keeps 8 significant bits, so targets whose spread is under ~3% of their size (Σ‖y − ȳ‖² < 1e-3 Σ‖y‖²)
    lose much of their variance to rounding: refuse them rather than train on the rounding noise."""
    if y.dtype == torch.bfloat16:
        variance, size = float(_total_variance(y)[0]), float(_all_reduce(y.double().pow(2).sum()))
        if variance < 1e-3 * size:
            raise MinisvError(f"layer {layer}: the targets vary by {(variance / size) ** 0.5:.2%} of their size, "
                              f"below what bf16 activations resolve; train in float32 (train_transcoder.py "
                              f"--no-autocast --dtype float32, or train(..., amp=False) on a float32 model)")


def _scaled(xy, scale):
    """(x / s_in, y / s_out) in float32 (activations come in the model's dtype; the transcoders are float32)."""
    return xy[0].float() / scale[0], xy[1].float() / scale[1]


def _without_bos(acts, rows, bos_id):
    """{layer: (x [R, T, d], y)} -> the same at the positions not holding BOS, flattened: (x [n, d], y [n, d])."""
    keep = (rows != bos_id if bos_id is not None else torch.ones_like(rows, dtype=torch.bool)).flatten()
    return {l: (x.flatten(0, 1)[keep.to(x.device)], y.flatten(0, 1)[keep.to(x.device)]) for l, (x, y) in acts.items()}


@torch.no_grad()
def _held_out_fvu(tcs, held_out, scale, batch=1024):
    """{layer: FVU} on held-out activations, in the scaled units training uses (FVU does not depend on them)."""
    out = {}
    for l, tc in tcs.items():
        x, y = _scaled(held_out[l], scale[l])
        err = sum(float((tc(x[i:i + batch]) - y[i:i + batch]).pow(2).sum()) for i in range(0, len(x), batch))
        out[str(l)] = err / float((y - y.mean(0)).pow(2).sum())
    return out


def _rms(y):
    """Root mean square of the targets over the (global) batch."""
    stats = _all_reduce(torch.stack([y.float().pow(2).sum(), torch.tensor(float(y.numel()), device=y.device)]))
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


def _save_checkpoint(path, cfg, tcs, opt, run):
    state = {"train_cfg": dataclasses.asdict(cfg), "data_order": DATA_ORDER, "optimizer": opt.state_dict(),
             "transcoders": {str(l): tc.state_dict() for l, tc in tcs.items()},
             **{k: v for k, v in run.items() if k not in ("scale", "last_fired")},
             "scale": {str(l): v for l, v in run["scale"].items()},
             "last_fired": {str(l): v for l, v in run["last_fired"].items()}}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _restore(path, cfg, tcs, opt, device):
    if not path or not os.path.isfile(path):
        raise MinisvError(f"nothing to resume: no {CHECKPOINT} in {os.path.dirname(path or '') or 'the output dir'}; "
                          f"start without --resume")
    try:
        state = unpickle.load(path, map_location=device)
        same = state["train_cfg"] == dataclasses.asdict(cfg)
    except Exception as e:      # truncated, not a torch file, not a dict
        raise MinisvError(f"cannot resume: {path} is damaged or not a checkpoint of this script ({_first_line(e)}); "
                          f"start again with --overwrite") from None
    if not same:
        diff = [k for k, v in dataclasses.asdict(cfg).items() if state["train_cfg"].get(k) != v]
        raise MinisvError(f"cannot resume {path}: it was trained with different settings ({', '.join(diff)}); "
                          f"rerun with the original flags or a new --out")
    if state.get("data_order") != DATA_ORDER:
        raise MinisvError(f"cannot resume {path}: an older minisv wrote it, which walked the data in another order "
                          f"(resuming would repeat or skip data); start again with --overwrite")
    try:
        for l, tc in tcs.items():
            tc.load_state_dict(state["transcoders"][str(l)])
        opt.load_state_dict(state["optimizer"])
        run = {k: state[k] for k in ("step", "chunk", "offset", "seconds", "history", "evals")}
        run["scale"] = {int(l): tuple(v) for l, v in state["scale"].items()}
        run["last_fired"] = {int(l): v.to(device) for l, v in state["last_fired"].items()}
        if any(v.shape != (cfg.d_sae,) for v in run["last_fired"].values()):
            raise ValueError("last_fired has the wrong shape")
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise MinisvError(f"cannot resume: {path} does not match this run's transcoders ({_first_line(e)}); "
                          f"start again with --overwrite") from None
    return run


def _first_line(e):
    """An exception as one short line (torch's messages can span many)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def _progress(step, n_steps, cfg, loss, stats, last_fired, tok_s):
    seen = step * cfg.batch_tokens
    mean = lambda key: sum(float(_all_reduce(s[key].detach().float().reshape(1))) for s in stats.values()) / len(stats)
    fvu, l0 = mean("fvu"), mean("l0")
    dead = sum(_dead(v, seen, cfg.dead_tokens) for v in last_fired.values()) / len(stats)
    line = (f"step {step}/{n_steps} | {seen:,} tok | {tok_s:,.0f} tok/s | loss {loss:.4f} | L0 {l0:.1f} | "
            f"FVU {fvu:.3f} | dead {dead:.1%}")
    return {"step": step, "tokens": seen, "loss": loss, "fvu": fvu, "l0": l0, "dead": dead, "line": line}
