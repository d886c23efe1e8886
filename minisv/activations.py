"""Training activations: harvested from the model, shuffled, and served as batches (`docs/methods.md` §2.2).

A coder trains on pairs (x, y) read at two hooks of every trained layer (a transcoder: the MLP input and output;
an SAE: one hook twice). `harvest` runs the model only up to the deepest layer needed, one forward for all
layers. `ActivationStream` serves shuffled batches as a pure function of (seed, chunk, batch index):

    rows      the token rows are walked in a fresh seeded order every epoch
    chunks    chunk c takes just enough of the next rows to hold `buffer_tokens` (rounded down to whole batches)
              trainable tokens (BOS positions excluded), harvests them, and shuffles them with a seed derived
              from c; so a checkpoint only needs (chunk, batch within chunk) to resume exactly where it stopped
    ranks     under data parallelism (torchrun) every rank harvests its share of a chunk's rows and all-gathers
              the rest, so all ranks hold the same shuffled chunk and take their slice of each global batch

Where bf16 matmuls are fast (`fast_bf16`), activations are harvested from a bf16 copy of a float32 model.
"""
import torch
import torch.distributed as dist

from .errors import MinisvError
from .model import Model
from .progress import progress


def world():
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def all_reduce(t):
    """Sum over ranks in place (identity in a single process)."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


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
    for i in progress(range(0, len(tokens), batch_rows), "harvesting", unit=" batches"):
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


def harvests_bf16(model, amp=True):
    """Whether training activations come from a bf16 copy of the model: where bf16 is fast (and amp), for a
    float32 model, and not while hooks are active (a steering vector, an ablation: they belong to the model, they
    read model.positions)."""
    float32 = model.embed.weight.dtype == torch.float32
    return amp and fast_bf16(model.embed.weight.device) and float32 and not model._hooks


def harvester(model, amp=True):
    """The model training activations are harvested from: its bf16 copy where `harvests_bf16`, else itself."""
    return as_bf16(model) if harvests_bf16(model, amp) else model


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
        self.rank, self.world = world()
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
        acts = without_bos(acts, tokens[:len(ids)], self.bos_id)
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
    parts = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(parts, t.contiguous())
    return parts


def without_bos(acts, rows, bos_id):
    """{layer: (x [R, T, d], y)} -> the same at the positions not holding BOS, flattened: (x [n, d], y [n, d])."""
    keep = (rows != bos_id if bos_id is not None else torch.ones_like(rows, dtype=torch.bool)).flatten()
    return {l: (x.flatten(0, 1)[keep.to(x.device)], y.flatten(0, 1)[keep.to(x.device)]) for l, (x, y) in acts.items()}
