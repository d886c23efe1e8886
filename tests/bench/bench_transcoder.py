"""Transcoder training speed, side by side on the same activation batches (a benchmark, not a test).

    python tests/bench/bench_transcoder.py                       # SmolLM2 layer 6, d_sae 9216, k 32, batch 1024
    python tests/bench/bench_transcoder.py --model random-gpt2 --device cuda --d-sae 24576 --batch 4096  # a GPU

Rows: minisv TopK (sparse backward + embedding_bag decode) without dead latents and with --dead of them dead
(then AuxK runs: the default run has 15-25% dead latents after its first steps), minisv ReLU (the paper's dense
ReLU + L1), a straightforward dense PyTorch TopK (plain autograd), and eai-sparsify's SparseCoder if it is
importable; all with Adam, each timed over the same --steps batches after one warm-up step. Then the three
figures of the default run side by side: harvest tok/s, TopK step tok/s (with dead latents) and train()'s end
to end tok/s, with the harmonic bound 1 / (1/harvest + 1/step) that a loop doing one then the other reaches
and the fraction of it end to end reached. On CUDA it also prints the fraction of the GPU's bf16 peak reached
by the encoder matmul FLOPs (the work every TopK implementation has to do).
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import minisv  # noqa: E402
from minisv.data import load_dataset  # noqa: E402
from minisv.activations import fast_bf16, harvest, harvester  # noqa: E402
from minisv.training import TrainConfig, relu_loss, topk_loss, train  # noqa: E402
from minisv.transcoder import Transcoder, TranscoderConfig, mlp_hooks  # noqa: E402

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def random_gpt2(tmp):
    """A GPT-2-small-sized model with random weights (speed only), written with transformers."""
    import transformers as tf
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config()).save_pretrained(tmp)
    return tmp


def harvested(model, rows, layer, tokens, bos_id):
    """(x, y) activations of at least `tokens` tokens and the harvest's trainable (non-BOS) tokens/s, as train()
    counts them, after a warm-up call."""
    rows = rows[:-(-tokens // rows.shape[1])]
    harvest(model, rows[:2], {layer: mlp_hooks(layer)})
    _sync()
    start = time.perf_counter()
    x, y = harvest(model, rows, {layer: mlp_hooks(layer)})[layer]
    _sync()
    trainable = int((rows != bos_id).sum()) if bos_id is not None else rows.numel()
    return x.flatten(0, 1)[:tokens], y.flatten(0, 1)[:tokens], trainable / (time.perf_counter() - start)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dense_topk_step(params, x, y, k):
    """The textbook implementation: dense pre-activations, topk, scatter, dense decode, plain autograd."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = x @ W_enc + b_enc
    top = pre.topk(k, dim=-1, sorted=False)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    err = f @ W_dec + b_dec - y
    return err.float().pow(2).sum() / (y.float() - y.float().mean(0)).pow(2).sum()


def load_sparsify():
    """eai-sparsify's SparseCoder without running the package __init__ (which pulls in `datasets`)."""
    spec = importlib.util.find_spec("sparsify")
    if spec is None or not os.path.isfile(os.path.join(spec.submodule_search_locations[0], "sparse_coder.py")):
        return None
    package = types.ModuleType("sparsify")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["sparsify"] = package
    try:
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder
    except ImportError as e:
        print(f"(eai-sparsify present but not importable: {e})")
        return None
    return SparseCoder, SparseCoderConfig


def time_steps(step_fn, params, batches, bf16, relu=None):
    """Adam over `batches` (the first one is a warm-up), the loss under bf16 autocast if `bf16`; returns tokens/s."""
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    start = None
    for i, (x, y) in enumerate(batches):
        if i == 1:
            _sync()
            start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if relu is not None:
            relu.project_decoder_grad()
        opt.step()
    _sync()
    tok_s = sum(len(x) for x, _ in batches[1:]) / (time.perf_counter() - start)
    return tok_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model spec, or 'random-gpt2' for a GPT-2-small-sized random "
                   "model (no download)")
    p.add_argument("--layer", type=int, default=6, help="layer whose MLP the transcoders replace (default: 6)")
    p.add_argument("--d-sae", type=int, default=9216, help="latents (default: 9216)")
    p.add_argument("--k", type=int, default=32, help="TopK k (default: 32)")
    p.add_argument("--batch", type=int, default=1024, help="tokens per step (default: 1024, the default run's)")
    p.add_argument("--dead", type=float, default=0.2, help="fraction of dead latents in the second TopK row "
                   "(default: 0.2)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per implementation (default: 6)")
    p.add_argument("--e2e-tokens", type=int, default=65536, help="tokens for the end-to-end train() run, 0 to skip")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--no-autocast", action="store_true", help="float32 throughout, as train_transcoder.py "
                   "--no-autocast (default: bf16 harvest and autocast where bf16 is fast, as the default run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    bf16 = fast_bf16(device) and not args.no_autocast
    tmp = tempfile.mkdtemp()
    spec = random_gpt2(tmp) if args.model == "random-gpt2" else args.model
    model = minisv.load(spec, device=device)
    if model.tokenizer is not None:
        rows = load_dataset(None, model.tokenizer, 128)[0]
    else:
        rows = torch.randint(0, model.cfg.vocab_size, (4096, 128), generator=torch.Generator().manual_seed(0))
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    n = args.batch * (args.steps + 1)
    source = harvester(model, amp=not args.no_autocast)              # what train() harvests from
    bos = getattr(model.tokenizer, "bos_id", None)
    x, y, harvest_tok_s = harvested(source, rows, args.layer, n, bos)
    d, S, k = model.cfg.d_model, args.d_sae, args.k
    print(f"{model.cfg.name or spec}, layer {args.layer}, d_in {d}, d_sae {S}, k {k}, batch {args.batch}, "
          f"{device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, harvest in {source.embed.weight.dtype}, loss under bf16 autocast: "
          f"{bf16}; harvest {harvest_tok_s:,.0f} tok/s")
    y = y / y.float().pow(2).mean().sqrt().to(y.dtype)
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, n, args.batch)]
    results = {}

    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(d, d, S, "topk", k)).to(device)
    none_dead = torch.zeros(S, dtype=torch.bool, device=device)
    results["minisv TopK"] = time_steps(lambda x, y: topk_loss(tc, x, y, none_dead, d // 2, 1 / 32)[0],
                                        list(tc.parameters()), batches, bf16)
    some_dead = torch.arange(S, device=device) < args.dead * S
    results[f"minisv TopK, {args.dead:.0%} dead"] = time_steps(
        lambda x, y: topk_loss(tc, x, y, some_dead, d // 2, 1 / 32)[0], list(tc.parameters()), batches, bf16)
    relu = Transcoder(TranscoderConfig(d, d, S, "relu")).to(device)
    results["minisv ReLU + L1"] = time_steps(lambda x, y: relu_loss(relu, x, y, none_dead, 1.4e-4)[0],
                                             list(relu.parameters()), batches, bf16, relu=relu)
    dense = [t.detach().clone().contiguous().requires_grad_() for t in (tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec)]
    results["dense PyTorch TopK"] = time_steps(lambda x, y: dense_topk_step(dense, x, y, k), dense, batches, bf16)
    sparsify = load_sparsify()
    if sparsify is not None:
        SparseCoder, SparseCoderConfig = sparsify
        coder = SparseCoder(d, SparseCoderConfig(num_latents=S, k=k, transcode=True), device=device)
        results["eai-sparsify SparseCoder"] = time_steps(lambda x, y: coder(x, y).fvu,
                                                         list(coder.parameters()), batches, bf16)
    else:
        print("(eai-sparsify not installed: pip install --no-deps eai-sparsify simple-parsing einops natsort)")
    flops = 2 * d * S          # encoder matmul per token, forward
    peak = next((v for key, v in BF16_PEAK.items() if device.type == "cuda" and key in torch.cuda.get_device_name()),
                None)
    base = results["minisv TopK"]
    for name, tok_s in results.items():
        extra = f" | {tok_s * flops / peak:6.2%} of bf16 peak (encoder FLOPs)" if peak else ""
        print(f"  {name:<26} {tok_s:>10,.0f} tok/s  ({tok_s / base:5.2f}× minisv TopK){extra}")
    if args.e2e_tokens:
        steps = args.e2e_tokens // args.batch       # warm-up and dead window as train_transcoder.py sets them
        cfg = TrainConfig(layers=[args.layer], d_sae=S, k=k, lr=4e-3, tokens=args.e2e_tokens, batch_tokens=args.batch,
                          bos_id=bos, checkpoint_every=10 ** 9, amp=not args.no_autocast,
                          warmup_steps=max(1, steps // 20), dead_tokens=max(1, steps // 10) * args.batch)
        _, summary = train(model, rows, cfg, log=lambda line: None)
        step = results[f"minisv TopK, {args.dead:.0%} dead"]
        bound = 1 / (1 / harvest_tok_s + 1 / step)
        print(f"  default run, side by side: harvest {harvest_tok_s:,.0f} | TopK step ({args.dead:.0%} dead) "
              f"{step:,.0f} | harmonic bound {bound:,.0f} | train() end to end {summary['tok_per_s']:,} tok/s "
              f"= {summary['tok_per_s'] / bound:.0%} of the bound")


if __name__ == "__main__":
    main()
