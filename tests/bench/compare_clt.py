"""A cross-layer transcoder against per-layer transcoders, on the same tokens, with the same total number of
features and the same L0.

Both are trained by minisv's one loop with the same settings, seed and data order: the per-layer set is the
window-1 CLT, whose loss Σ_l FVU_l is exactly that of training one transcoder per layer. Both are evaluated on the
same held-out rows (drawn at random across the held-out documents): per-layer FVU, and with every MLP replaced at
once, the CE increase, KL and top-1 agreement with the real model. Differences are paired per row, with their
standard errors across rows; the whole comparison is repeated for each seed. Writes a Markdown table.

    python tests/bench/compare_clt.py --tokens 65536 --seeds 0 1 --out runs/clt_vs_per_layer.md
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import minisv  # noqa: E402
from minisv.atomic import write_text  # noqa: E402
from minisv.cli import positive_int  # noqa: E402
from minisv.data import eval_sample, load_dataset  # noqa: E402
from minisv.evals import evaluate  # noqa: E402
from minisv.training import TrainConfig, train  # noqa: E402


def run(model, rows, eval_rows, args, seed, window):
    L, bos = model.cfg.n_layers, model.tokenizer.bos_id
    steps = args.tokens // args.batch_tokens
    cfg = TrainConfig(layers=list(range(L)), d_sae=args.d_sae, k=args.k, lr=args.lr, tokens=args.tokens,
                      batch_tokens=args.batch_tokens, seed=seed, bos_id=bos, warmup_steps=max(1, steps // 20),
                      dead_tokens=max(1, steps // 10) * args.batch_tokens, checkpoint_every=10 ** 9,
                      clt_window=window, model=args.model)
    started = time.time()
    coders, summary = train(model, rows, cfg, log=lambda line: None)
    metrics = evaluate(model, eval_rows, coders["clt"], bos_id=bos, per_row=True)
    metrics["seconds"] = time.time() - started
    return metrics


def paired(a, b):
    """Mean and standard error over rows of a − b."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.mean()), float(d.std() / len(d) ** 0.5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--d-sae", type=positive_int, default=512, help="features per layer, both (default: 512)")
    p.add_argument("--k", type=positive_int, default=16, help="active features per layer and token (default: 16)")
    p.add_argument("--window", type=int, default=0, help="the CLT's window (default: 0, every later layer)")
    p.add_argument("--tokens", type=positive_int, default=65_536)
    p.add_argument("--batch-tokens", type=positive_int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3, help="both (default: 3e-3, train_transcoder.py --clt's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--eval-tokens", type=positive_int, default=4096)
    p.add_argument("--out", default="runs/clt_vs_per_layer.md")
    args = p.parse_args(argv)
    model = minisv.load(args.model, device="cpu")
    T = model.cfg.n_layers
    # one split and one evaluation sample for every seed: the seeds vary the training (initialisation, data order)
    rows, held = load_dataset(None, model.tokenizer, 128, seed=0, bos=True)
    eval_rows, info = eval_sample(held, args.eval_tokens, bos_id=model.tokenizer.bos_id, seed=0)
    lines = [f"CLT (window {args.window or 'all'}) vs per-layer transcoders: {args.model}, {args.d_sae} features and "
             f"k = {args.k} per layer for both ({args.d_sae * T:,} features in all, L0 {args.k} per layer), "
             f"{args.tokens:,} training tokens, seeds {args.seeds}. Differences are CLT − per-layer, paired per "
             f"held-out row, ± their standard error across rows; held-out sample: {info}.", "",
             "| seed | FVU (mean over layers) CLT / per-layer | CE increase CLT / per-layer (nats) | Δ CE increase | "
             "KL CLT / per-layer | Δ KL | top-1 agreement CLT / per-layer | train + eval s CLT / per-layer |",
             "|---|---|---|---|---|---|---|---|"]
    for seed in args.seeds:
        clt, per_layer = (run(model, rows, eval_rows, args, seed, w) for w in (args.window, 1))
        n = eval_rows.shape[1] - 1
        mean_fvu = lambda m: sum(m[f"layer_{l}"]["fvu"] for l in range(T)) / T
        ce = lambda m: [(a - c) / n for a, c in zip(m["rows"]["all"]["nll"], m["rows"]["clean"]["nll"])]
        kl = lambda m: [x / n for x in m["rows"]["all"]["kl"]]
        d_ce, d_kl = paired(ce(clt), ce(per_layer)), paired(kl(clt), kl(per_layer))
        lines.append(f"| {seed} | {mean_fvu(clt):.3f} / {mean_fvu(per_layer):.3f} | "
                     f"{clt['all']['ce_spliced'] - clt['ce_clean']:.4f} / "
                     f"{per_layer['all']['ce_spliced'] - per_layer['ce_clean']:.4f} | {d_ce[0]:+.4f} ± {d_ce[1]:.4f} | "
                     f"{clt['all']['kl']:.4f} / {per_layer['all']['kl']:.4f} | {d_kl[0]:+.4f} ± {d_kl[1]:.4f} | "
                     f"{clt['all']['top1_agreement']:.3f} / {per_layer['all']['top1_agreement']:.3f} | "
                     f"{clt['seconds']:.0f} / {per_layer['seconds']:.0f} |")
        print(lines[-1], flush=True)
    write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
