"""Transcoders vs sparse autoencoders on one MLP: sparsity against fidelity, the transcoder paper's first claim.

    python tests/bench/sweep_tc_vs_sae.py                     # SmolLM2 layer 6, k 8 16 32 64, 131,072 tokens each

For each k, a TopK transcoder (MLP input -> MLP output) and a TopK SAE (MLP output -> itself) are trained by the
same code (minisv.training.train) on exactly the same tokens, in the same order: the activations are harvested
once into memory and every run reads them from there. All are evaluated on the same held-out rows: FVU of the
MLP output, and the next-token loss when the reconstruction replaces the MLP output (spliced CE minus clean CE).
A transcoder and an SAE of the same L0 can then be compared directly: lower FVU / CE increase is better.
Writes OUT/tc_vs_sae.json, OUT/tc_vs_sae.md (the table) and OUT/tc_vs_sae.svg (L0 vs FVU and L0 vs CE increase).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import minisv  # noqa: E402
from minisv.atomic import write_text  # noqa: E402
from minisv.cli import positive_int  # noqa: E402
from minisv.data import load_dataset  # noqa: E402
from minisv.evals import evaluate  # noqa: E402
from minisv.report import svg_chart  # noqa: E402
from minisv.activations import CachedActivations, harvest, harvester, without_bos  # noqa: E402
from minisv.training import TrainConfig, train  # noqa: E402

KINDS = {"transcoder": ("ln2.hook_normalized", "hook_mlp_out"), "SAE": ("hook_mlp_out", "hook_mlp_out")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--k", type=positive_int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--d-sae", type=positive_int, default=9216)
    p.add_argument("--tokens", type=positive_int, default=131072, help="training tokens per run (default: 131,072)")
    p.add_argument("--batch-tokens", type=positive_int, default=1024)
    p.add_argument("--ctx", type=positive_int, default=128)
    p.add_argument("--eval-tokens", type=positive_int, default=4096, help="held-out tokens (default: 4,096)")
    p.add_argument("--out", default="docs", help="directory for tc_vs_sae.{json,md,svg} (default: docs)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    model = minisv.load(args.model, device="cpu")
    bos = model.tokenizer.bos_id if model.tokenizer is not None else None
    rows, held_out = load_dataset(None, model.tokenizer, args.ctx) if model.tokenizer is not None else \
        _random_rows(model, args.ctx)
    held_out = held_out[:max(1, args.eval_tokens // args.ctx)]
    # harvest once: enough rows for the budget after dropping BOS positions, both hooks in one forward; in bf16
    # where bf16 is fast, as train() harvests for the default run
    need = rows[:args.tokens // (args.ctx - 1) + 1]
    L = args.layer
    hooks = {L: [f"blocks.{L}.{h}" for h in KINDS["transcoder"]]}
    acts = without_bos(harvest(harvester(model), need, hooks), need, bos)[L]
    harvest_s = time.perf_counter() - started
    print(f"harvested {len(acts[0]):,} tokens of layer {L} once in {harvest_s:.0f} s; held out: {held_out.numel():,} "
          f"tokens in {len(held_out)} rows")
    results = []
    for kind, (hook_in, hook_out) in KINDS.items():
        cached = CachedActivations({L: (acts[1], acts[1]) if kind == "SAE" else acts}, args.batch_tokens, seed=0)
        for k in args.k:
            steps = args.tokens // args.batch_tokens
            cfg = TrainConfig(layers=[L], d_sae=args.d_sae, k=k, lr=4e-3 * (9216 / args.d_sae) ** 0.5,
                              tokens=args.tokens, batch_tokens=args.batch_tokens, bos_id=bos,
                              warmup_steps=max(1, steps // 20), dead_tokens=max(1, steps // 10) * args.batch_tokens,
                              model=args.model, hook_in=hook_in, hook_out=hook_out)
            t0 = time.perf_counter()
            coders, _ = train(model, cached, cfg, log=lambda line: None)
            m = evaluate(model, held_out, coders, bos_id=bos)
            r = m[f"layer_{L}"]
            results.append({"kind": kind, "k": k, "l0": r["l0"], "fvu": r["fvu"], "ce_clean": m["ce_clean"],
                            "ce_spliced": r["ce_spliced"], "ce_increase": r["ce_spliced"] - m["ce_clean"],
                            "ce_score": r["ce_score"], "kl": r["kl"], "seconds": round(time.perf_counter() - t0, 1)})
            print(" ".join(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}"
                           for key, v in results[-1].items()))
    os.makedirs(args.out, exist_ok=True)
    setup = (f"{args.model} layer {L}, d_sae {args.d_sae}, TopK, {args.tokens:,} training tokens per run (the same "
             f"cached activations), batch {args.batch_tokens}, evaluated on the same {m['tokens']:,} held-out "
             f"token predictions; {time.perf_counter() - started:.0f} s in all")
    write_text(os.path.join(args.out, "tc_vs_sae.json"), json.dumps({"setup": setup, "runs": results}, indent=1))
    write_text(os.path.join(args.out, "tc_vs_sae.md"), table(results, setup))
    write_text(os.path.join(args.out, "tc_vs_sae.svg"), plot(results, f"{args.model} layer {L}"))
    print(table(results, setup))
    print(f"wrote {args.out}/tc_vs_sae.json, .md, .svg")


def _random_rows(model, ctx):
    """Random token rows (models without a tokenizer): 512 to train on, 32 held out."""
    rows = torch.randint(0, model.cfg.vocab_size, (544, ctx), generator=torch.Generator().manual_seed(0))
    return rows[:512], rows[512:]


def table(results, setup):
    """Markdown: one row per k, transcoder and SAE side by side."""
    by = {(r["kind"], r["k"]): r for r in results}
    lines = ["| k | L0 TC / SAE | FVU TC / SAE | CE increase TC / SAE (nats) | KL TC / SAE (nats) | CE score TC / SAE |",
             "|---|---|---|---|---|---|"]
    for k in sorted({r["k"] for r in results}):
        tc, sae = by[("transcoder", k)], by[("SAE", k)]
        lines.append(f"| {k} | {tc['l0']:.1f} / {sae['l0']:.1f} | {tc['fvu']:.3f} / {sae['fvu']:.3f} | "
                     f"{tc['ce_increase']:.4f} / {sae['ce_increase']:.4f} | {tc['kl']:.4f} / {sae['kl']:.4f} | "
                     f"{tc['ce_score']:.3f} / {sae['ce_score']:.3f} |")
    return "\n".join(lines) + f"\n\n{setup}\n"


def plot(results, title):
    """Two charts side by side in one SVG: L0 vs FVU and L0 vs CE increase, a line per kind."""
    def series(key):
        return {kind: [(r["l0"], r[key]) for r in results if r["kind"] == kind] for kind in KINDS}
    left = svg_chart(series("fvu"), "L0 (active latents per token)", "FVU of the MLP output", f"{title}: FVU",
                     log_x=True)
    right = svg_chart(series("ce_increase"), "L0 (active latents per token)", "spliced CE − clean CE (nats)",
                      f"{title}: CE increase", log_x=True)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="920" height="260"><g>{left}</g>'
            f'<g transform="translate(460 0)">{right}</g></svg>\n')


if __name__ == "__main__":
    main()
