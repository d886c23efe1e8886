"""Transcoder training on one GPU: harvest and TopK training tokens/s, peak memory, bf16 autocast vs fp32.

    bash tests/bench/bench_transcoder_gpu.sh          # an H100/H200, under 5 minutes, nothing downloaded
    python tests/bench/bench_transcoder_gpu.py --dry-run   # the same steps, tiny, on CPU (what the tests run)

A GPT-2-small-sized model with random weights (written with transformers' save_pretrained: speed only, no
download), layer 8, d_sae 24,576 (32 × 768), k 32, batch 4,096 tokens, ctx 128. Each configuration is timed
separately: harvesting (the model forward up to the layer, activations kept on the GPU), then train() on those
cached activations (the real training loop: loss, backward, Adam, dead-latent bookkeeping), for
fp32 / bf16 autocast training, each with and without torch.compile. Prints one table.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import minisv  # noqa: E402
from minisv.activations import CachedActivations, harvest  # noqa: E402
from minisv.training import TrainConfig, train  # noqa: E402

SIZES = {"full": dict(n_embd=768, n_layer=12, n_head=12, layer=8, d_sae=24576, tokens=4096 * 60, batch=4096),
         "dry-run": dict(n_embd=32, n_layer=2, n_head=2, layer=1, d_sae=128, tokens=256 * 6, batch=256)}


def random_gpt2(directory, n_embd, n_layer, n_head):
    import transformers as tf
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)).save_pretrained(directory)
    return directory


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks the steps, measures nothing")
    args = p.parse_args(argv)
    size = SIZES["dry-run" if args.dry_run else "full"]
    device = torch.device("cpu" if args.dry_run else "cuda")
    L, ctx = size["layer"], 128
    model_dir = random_gpt2(tempfile.mkdtemp(), size["n_embd"], size["n_layer"], size["n_head"])
    rows = torch.randint(0, 50257, (size["tokens"] // ctx + 1, ctx), generator=torch.Generator().manual_seed(0))
    hooks = {L: (f"blocks.{L}.ln2.hook_normalized", f"blocks.{L}.hook_mlp_out")}
    results = []
    for model_dtype in (torch.float32, torch.bfloat16):
        model = minisv.load(model_dir, device=device, dtype=model_dtype)
        harvest(model, rows[:2], hooks)                                  # warm-up (kernels, allocator)
        sync(device)
        t0 = time.perf_counter()
        acts = {l: (x.flatten(0, 1), y.flatten(0, 1)) for l, (x, y) in harvest(model, rows, hooks).items()}
        sync(device)
        harvest_tok_s = rows.numel() / (time.perf_counter() - t0)
        for compiled in (False, True):
            if compiled and device.type != "cuda":
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            cfg = TrainConfig(layers=[L], d_sae=size["d_sae"], k=32, lr=1e-3, tokens=size["tokens"],
                              batch_tokens=size["batch"], warmup_steps=5, dead_tokens=size["batch"] * 5,
                              compile=compiled, amp=model_dtype == torch.bfloat16)
            stream = CachedActivations(acts, size["batch"], seed=0)
            run = lambda: train(model, stream, cfg, log=lambda line: None)[1]["tok_per_s"]
            try:
                if compiled:        # the first run compiles, the second is timed
                    run()
                tok_s = run()
            except Exception as e:  # report a failing configuration (torch.compile is new here), keep going
                print(f"{model_dtype} compile={compiled} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                tok_s = float("nan")
            results.append((str(model_dtype).removeprefix("torch."), "bf16 autocast" if model_dtype == torch.bfloat16
                            else "fp32", compiled, harvest_tok_s, tok_s, peak_gib(device)))
        del model, acts
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run: tiny model, not a measurement)"
    print(f"{name}; GPT-2-small-sized random model, layer {L}, d_sae {size['d_sae']}, k 32, batch {size['batch']}")
    print(f"{'model':>9} {'training':>14} {'compile':>8} {'harvest tok/s':>14} {'train tok/s':>12} {'peak GiB':>9}")
    for model_dtype, training, compiled, h, t, peak in results:
        print(f"{model_dtype:>9} {training:>14} {str(compiled):>8} {h:14,.0f} {t:12,.0f} {peak:9.2f}")
    return results


if __name__ == "__main__":
    main()
