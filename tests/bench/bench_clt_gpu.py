"""Cross-layer transcoder training on one GPU: tokens/s and peak memory for the full CLT (every layer writes to
every later one) and a window-4 CLT, in fp32 and under bf16 autocast.

    bash tests/bench/bench_clt_gpu.sh                # an H100/H200, under 5 minutes, nothing downloaded
    python tests/bench/bench_clt_gpu.py --dry-run    # the same steps, tiny, on CPU (what the tests run)

A random model of SmolLM2-135M's shape (Llama: 30 layers, d_model 576, 9 heads / 3 KV heads, MLP 1,536; written
with transformers' save_pretrained: speed only, no download). All 30 layers' MLP inputs and outputs are harvested
once and kept on the GPU (81,920 tokens: 11 GiB in fp32), then train() runs on them: the real loop (loss over
every layer, backward, Adam, dead-latent bookkeeping). d_sae 4,096 per layer (122,880 features), k 32 per layer,
batch 4,096 tokens. What each configuration costs is dominated by its decoder: the full CLT has 465 (source,
target) layer pairs, 1.1 B decoder weights (Adam: ~18 GiB); window 4 has 114 pairs. Prints one table.

Expected, not yet measured (no GPU has run this): the sparse decode reads k = 32 decoder rows per token, layer
and target, 4,096 × 32 × 465 rows of 576 numbers per step for the full CLT, ~70 GB in bf16 forward and about
twice that backward; at an H100's ~3 TB/s that is ~0.1 s a step, so on the order of 40,000 tok/s for the full
CLT and 4× that for window 4 (fp32 about half). On 2 CPU cores the default CLT (d_sae 512, k 16) trains at
~180 tok/s.
"""
import argparse
import dataclasses
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import minisv  # noqa: E402
from minisv.activations import CachedActivations, harvest  # noqa: E402
from minisv.training import TrainConfig, train  # noqa: E402

SIZES = {"full": dict(hidden=576, layers=30, heads=9, kv=3, mlp=1536, d_sae=4096, k=32, batch=4096, steps=20),
         "dry-run": dict(hidden=32, layers=3, heads=2, kv=1, mlp=64, d_sae=64, k=4, batch=128, steps=4)}


def random_llama(directory, s):
    import transformers as tf
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"], vocab_size=49152,
                                       num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                                       intermediate_size=s["mlp"])).save_pretrained(directory)
    return directory


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks the steps, measures nothing")
    args = p.parse_args(argv)
    s = SIZES["dry-run" if args.dry_run else "full"]
    device = torch.device("cpu" if args.dry_run else "cuda")
    ctx, tokens = 128, s["batch"] * s["steps"]
    model = minisv.load(random_llama(tempfile.mkdtemp(), s), device=device)
    rows = torch.randint(0, 49152, (tokens // ctx + 1, ctx), generator=torch.Generator().manual_seed(0))
    base = TrainConfig(layers=list(range(s["layers"])), d_sae=s["d_sae"], k=s["k"], lr=1e-3, tokens=tokens,
                       batch_tokens=s["batch"], warmup_steps=2, dead_tokens=s["batch"] * 5)
    sites = {l: base.sites(l) for l in base.layers}
    t0 = time.perf_counter()
    acts = {l: (x.flatten(0, 1), y.flatten(0, 1)) for l, (x, y) in harvest(model, rows, sites).items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    harvest_tok_s = rows.numel() / (time.perf_counter() - t0)
    results = []
    for window, amp in ((0, False), (0, True), (4, True)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        cfg = dataclasses.replace(base, amp=amp, clt_window=window)
        try:
            tok_s = train(model, CachedActivations(acts, s["batch"], seed=0), cfg, log=lambda line: None)[1]["tok_per_s"]
        except torch.OutOfMemoryError as e:    # report the configuration that does not fit, keep going
            print(f"window {window} amp={amp}: out of memory ({str(e).splitlines()[0][:120]})")
            tok_s = float("nan")
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
        results.append((window, "bf16 autocast" if amp else "fp32", tok_s, peak))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run: tiny model, not a measurement)"
    print(f"{name}; random SmolLM2-shaped model, {s['layers']} layers, d_sae {s['d_sae']} per layer, k {s['k']}, "
          f"batch {s['batch']}; harvest {harvest_tok_s:,.0f} tok/s (all layers, fp32 model)")
    print(f"{'window':>7} {'training':>14} {'train tok/s':>12} {'peak GiB':>9}")
    for window, training, tok_s, peak in results:
        print(f"{window if window else 'all':>7} {training:>14} {tok_s:12,.0f} {peak:9.2f}")
    return results


if __name__ == "__main__":
    main()
