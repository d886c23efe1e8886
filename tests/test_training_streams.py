"""The activation stream's edge cases (exact chunks of BOS-separated documents, resuming across chunk boundaries,
two processes streaming what one does), the bf16 harvest and autocast, and the AuxK gathers. Tiny random
models, one CPU thread."""
import os
import subprocess
import sys

import pytest
import torch

import minisv
from minisv import activations, training
from minisv.errors import MinisvError
from minisv.activations import ActivationStream, CachedActivations, harvest
from minisv.training import train
from minisv.transcoder import mlp_hooks
from test_training import REPO, config, script, script_args, tiny_llama, token_file, token_rows, weights  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def short_documents(n, ctx, seed=0, bos_rate=0.3):
    """Token rows full of document separators (BOS = 0), and one row of nothing but BOS."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(2, 96, (n, ctx), generator=g)
    rows[torch.rand(n, ctx, generator=g) < bos_rate] = 0
    rows[n // 3] = 0
    return rows


def usable(rows, bos_id):
    return int((rows != bos_id).sum()) if bos_id is not None else rows.numel()


# ------------------------------------------------------------------------- the walk and its chunks
@pytest.mark.parametrize("case", [
    # no BOS and chunks of exactly 8 rows' tokens: a `<=` in the cutting loop would take a 9th row
    dict(rows=(40, 32), bos=None, batch=64, buffer=256, tokens=64 * 17),
    # short documents and an all-BOS row; a buffer smaller than one batch (1 batch per chunk)
    dict(rows=(40, 16), bos=0, batch=48, buffer=20, tokens=48 * 9 + 47),
    # a dataset smaller than one chunk: every chunk spans several epochs of the walk
    dict(rows=(5, 16), bos=0, batch=32, buffer=300, tokens=32 * 20),
])
def test_each_chunk_is_the_shortest_stretch_of_the_walk_holding_its_batches(tiny_llama, case):
    """Chunks tile the walk (no gap, no overlap), each epoch of the walk is a permutation of the rows, each chunk
    stops at the first row that completes its batches, and it serves exactly those batches: the streamed (x, y)
    pairs are pairs the model computes on the chunk's rows at non-BOS positions."""
    _, model = tiny_llama
    rows = short_documents(*case["rows"]) if case["bos"] is not None else \
        torch.randint(2, 96, case["rows"], generator=torch.Generator().manual_seed(0))
    batch, bos = case["batch"], case["bos"]
    stream = ActivationStream(model, rows, {1: mlp_hooks(1)}, batch_tokens=batch, buffer_tokens=case["buffer"],
                              seed=1, bos_id=bos, tokens=case["tokens"])
    per_chunk, n_batches = max(1, case["buffer"] // batch), case["tokens"] // batch
    sizes = [min(per_chunk, n_batches - c * per_chunk) for c in range(-(-n_batches // per_chunk))]
    walk = []
    for c, batches in enumerate(sizes):
        ids = stream._row_ids(c)
        need = batches * batch
        assert usable(rows[ids[:-1]], bos) < need <= usable(rows[ids], bos), c
        walk += ids.tolist()
    n = len(rows)
    assert walk == [stream._row(g) for g in range(len(walk))]
    for e in range(len(walk) // n):
        assert sorted(walk[e * n:(e + 1) * n]) == list(range(n)), e
    served = list(stream.batches())
    assert [(c, i) for c, i, _ in served] == [(c, i) for c, b in enumerate(sizes) for i in range(b)]
    last = len(sizes) - 1
    ids = stream._row_ids(last)
    _, cache = model.run_with_cache(rows[ids], names=mlp_hooks(1))
    keep = rows[ids] != bos if bos is not None else torch.ones_like(rows[ids], dtype=torch.bool)
    expected = torch.cat([cache[name][keep] for name in mlp_hooks(1)], 1)
    got = torch.cat([torch.cat(xy[1], 1) for c, _, xy in served if c == last])
    assert got.shape == (sizes[-1] * batch, expected.shape[1])
    assert torch.cdist(got, expected, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-5


def test_rows_of_nothing_but_bos_are_refused(tiny_llama):
    _, model = tiny_llama
    with pytest.raises(MinisvError, match="nothing but BOS"):
        ActivationStream(model, torch.zeros(4, 16, dtype=torch.long), {1: mlp_hooks(1)}, 32, 64, 0, bos_id=0)


# ------------------------------------------------------------------------- resume across chunk boundaries
class Killed(Exception):
    pass


def served_batches(monkeypatch):
    """Record (chunk, index, checksum of x) of every batch the stream serves."""
    log, real = [], ActivationStream.batches

    def spy(self, chunk=0, offset=0):
        for c, i, acts in real(self, chunk, offset):
            log.append((c, i, float(acts[1][0].double().sum())))
            yield c, i, acts
    monkeypatch.setattr(ActivationStream, "batches", spy)
    return log


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("kill", [13, 14])
def test_resume_is_bit_identical_at_and_after_a_chunk_boundary_up_to_a_short_last_chunk(tiny_llama, tmp_path,
                                                                                       monkeypatch, fast, kill):
    """14 steps in chunks of 4, 4, 4, 2 batches (short documents), a checkpoint every step. Killed at step 13
    the run resumes from step 12, a chunk boundary; killed at 14, from step 13, inside the short last chunk.
    Either way the resumed run serves the same batches and ends with bit-identical weights, bf16 or not."""
    _, model = tiny_llama
    monkeypatch.setattr(activations, "fast_bf16", lambda device: fast)
    served = served_batches(monkeypatch)
    rows = short_documents(160, 32, seed=2)
    cfg = config(tokens=256 * 14, buffer_tokens=1024, checkpoint_every=1)
    full, _ = train(model, rows, cfg, log=lambda s: None)
    full_order, served[:] = list(served), []

    def kill_at(step, transcoders, stats):
        if step == kill:
            raise Killed
    with pytest.raises(Killed):
        train(model, rows, cfg, out_dir=tmp_path, log=lambda s: None, on_step=kill_at)
    before, served[:] = served[:kill - 1], []
    resumed, _ = train(model, rows, cfg, out_dir=tmp_path, resume=True, log=lambda s: None)
    assert [c for c, _, _ in full_order] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2
    assert before + served == full_order
    for name, w in weights(full).items():
        assert torch.equal(weights(resumed)[name], w), name
    assert not torch.is_autocast_enabled("cpu")           # nothing leaks out of train(), killed or not


# ------------------------------------------------------------------------- two gloo processes
STREAM_WORKER = """
import sys, torch, torch.distributed as dist
import minisv
from minisv.activations import ActivationStream
from minisv.transcoder import mlp_hooks
from test_training_streams import short_documents


def stream(path):
    torch.set_num_threads(1)
    s = ActivationStream(minisv.load(path, device="cpu"), short_documents(40, 16), {1: mlp_hooks(1)},
                         batch_tokens=64, buffer_tokens=150, seed=3, bos_id=0, tokens=64 * 7)
    return {"rows": [s._row_ids(c) for c in range(4)], "chunks": [s.chunk(c)[1] for c in range(4)],
            "served": [(c, i, torch.cat(xy[1], 1)) for c, i, xy in s.batches()]}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.save(stream(sys.argv[1]), f"{sys.argv[2]}.{dist.get_rank()}")
    dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def two_process_stream(tiny_llama, tmp_path_factory):
    """What ActivationStream gives each of 2 gloo processes, and a single process, on rows of short documents."""
    path, _ = tiny_llama
    tmp = tmp_path_factory.mktemp("dp")
    worker = tmp / "worker.py"
    worker.write_text(STREAM_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(worker), str(path), str(tmp / "out")], env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    namespace = {"__name__": "worker"}
    exec(STREAM_WORKER, namespace)
    return [torch.load(f"{tmp / 'out'}.{r}") for r in (0, 1)], namespace["stream"](str(path))


def test_two_processes_stream_the_same_chunks(tiny_llama, two_process_stream):
    """Every rank holds the same chunk: pairs the model computes on the chunk's rows at non-BOS positions; the
    walk is cut after the first row that completes the chunk's batches, whatever the number of processes (an odd
    number of rows is padded for the all-gather and the padding dropped); each rank serves its half of every
    global batch."""
    _, model = tiny_llama
    (a, b), _ = two_process_stream
    rows = short_documents(40, 16)
    for c, need in enumerate([128, 128, 128, 64]):
        ids = a["rows"][c]
        assert torch.equal(ids, b["rows"][c])
        assert usable(rows[ids[:-1]], 0) < need <= usable(rows[ids], 0), c
        assert torch.equal(a["chunks"][c][0], b["chunks"][c][0]) and len(a["chunks"][c][0]) == need
        _, cache = model.run_with_cache(rows[ids], names=mlp_hooks(1))
        expected = torch.cat([cache[name][rows[ids] != 0] for name in mlp_hooks(1)], 1)
        got = torch.cat(a["chunks"][c], 1)
        assert torch.cdist(got, expected, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-5
    assert [(c, i) for c, i, _ in a["served"]] == [(c, i) for c, i, _ in b["served"]] == \
        [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]
    for (c, i, x0), (_, _, x1) in zip(a["served"], b["served"]):
        whole = torch.cat(a["chunks"][c], 1)[i * 64:(i + 1) * 64]
        assert torch.equal(torch.cat([x0, x1]), whole)


def test_two_processes_stream_what_one_process_streams(two_process_stream):
    (a, _), single = two_process_stream
    for c in range(4):
        assert torch.equal(a["rows"][c], single["rows"][c]), c
        assert torch.equal(a["chunks"][c][0], single["chunks"][c][0]), c


# ------------------------------------------------------------------------- the bf16 copy
def test_as_bf16_harvests_exactly_what_a_bf16_load_does_and_leaves_the_model_alone(tiny):
    """For each family (GPT-2's tied embeddings included), the copy's harvest equals bit for bit that of the same
    checkpoint loaded in bf16, and is within bf16 rounding of the float32 model; the caller's parameters (which
    the fused q/k/v matmul turned into views) keep their storage, values and tie."""
    family, path, _ = tiny
    model = minisv.load(str(path), device="cpu")
    rows = torch.randint(2, 96, (6, 24), generator=torch.Generator().manual_seed(0))
    hooks = {l: mlp_hooks(l) for l in range(3)}
    want32 = harvest(model, rows, hooks)                 # runs the fused q/k/v path first
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    tied = model.unembed.weight is model.embed.weight
    got = harvest(activations.as_bf16(model), rows, hooks)
    want16 = harvest(minisv.load(str(path), device="cpu", dtype="bfloat16"), rows, hooks)
    for l in hooks:
        for g, w16, w32 in zip(got[l], want16[l], want32[l]):
            assert g.dtype == torch.bfloat16 and torch.equal(g, w16)
            assert (g.float() - w32).norm() < 2e-2 * w32.norm()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]), n
    assert (model.unembed.weight is model.embed.weight) == tied == (family == "gpt2")
    for (n, p), (_, q) in zip(model.named_parameters(), activations.as_bf16(model).named_parameters()):
        assert p.shape == q.shape, n


def test_as_bf16_keeps_tied_embeddings_tied(tiny):
    family, path, _ = tiny
    if family != "gpt2":
        pytest.skip("only GPT-2 ties its embeddings")
    twin = activations.as_bf16(minisv.load(str(path), device="cpu"))
    assert twin.unembed.weight is twin.embed.weight


def test_training_activations_see_the_callers_hooks_where_bf16_is_fast(tiny_llama, monkeypatch):
    _, model = tiny_llama
    monkeypatch.setattr(activations, "fast_bf16", lambda device: True)
    calls, real = [], activations.harvest

    def spy(m, tokens, hooks, batch_rows=32):
        out = real(m, tokens, hooks, batch_rows)
        calls.append((tokens, out))
        return out
    monkeypatch.setattr(activations, "harvest", spy)
    shift = {"blocks.1.hook_mlp_out": lambda y, name: 2 * y + 0.01}  # e.g. a steering vector on the MLP output
    rows = token_rows(40)
    with model.hooks(shift):
        train(model, rows, config(tokens=256 * 2, buffer_tokens=512), log=lambda s: None)
        tokens, got = calls[0]
        want = real(model, tokens, {1: config().sites(1)})
    assert (got[1][1].float() - want[1][1]).norm() < 2e-2 * want[1][1].norm()


# ------------------------------------------------------------------------- train_transcoder.py
@pytest.mark.parametrize("flag", [[], ["--no-autocast"]])
def test_script_harvests_in_bf16_unless_told_and_always_evaluates_in_float32(tiny_llama, token_file, tmp_path,
                                                                            monkeypatch, flag):
    path, _ = tiny_llama
    monkeypatch.setattr(activations, "fast_bf16", lambda device: True)
    harvested, evaluated, real_harvest = [], [], activations.harvest

    def spy_harvest(m, tokens, hooks, batch_rows=32):
        harvested.append(m.embed.weight.dtype)
        return real_harvest(m, tokens, hooks, batch_rows)
    monkeypatch.setattr(activations, "harvest", spy_harvest)
    sys.path.insert(0, REPO)
    try:
        import train_transcoder
    finally:
        sys.path.remove(REPO)
    real_evaluate = train_transcoder.evaluate

    def spy_evaluate(model, *args, **kwargs):
        evaluated.append((model.embed.weight.dtype, torch.is_autocast_enabled("cpu")))
        return real_evaluate(model, *args, **kwargs)
    monkeypatch.setattr(train_transcoder, "evaluate", spy_evaluate)
    script(script_args(path, token_file, tmp_path / "run", "--dash-features", "0", *flag))
    assert harvested[0] == torch.float32                                  # held-out rows
    assert set(harvested[1:]) == {torch.float32 if flag else torch.bfloat16}
    assert evaluated == [(torch.float32, False)]


def test_targets_bf16_cannot_resolve_are_refused_not_trained_on(tiny_llama):
    """Targets of spread 0.004 around 3.0 round to a handful of values in bf16: training stops with a message that
    says to train in float32; the same targets in float32 train."""
    _, model = tiny_llama
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 32, generator=g), 3.0 + 0.004 * torch.randn(1024, 32, generator=g)
    cfg = config(tokens=256 * 2)
    with pytest.raises(MinisvError, match="below what bf16 activations resolve.*--no-autocast"):
        train(model, CachedActivations({1: (x.bfloat16(), y.bfloat16())}, 256, seed=0), cfg, log=lambda s: None)
    _, summary = train(model, CachedActivations({1: (x, y)}, 256, seed=0), cfg, log=lambda s: None)
    assert summary["steps"] == 2 and all(h["fvu"] == h["fvu"] for h in summary["history"])      # no NaN
