"""Transcoders vs sparse autoencoders on one MLP: sparsity against fidelity, the transcoder paper's first claim.

    python tests/bench/sweep_tc_vs_sae.py --k 16 32 64 --seeds 0 1 --out docs     # SmolLM2 layer 6

For each training seed and k, a TopK transcoder (MLP input -> MLP output) and a TopK SAE (MLP output -> itself) are
trained by the same code (minisv.training.train) on exactly the same tokens, in the same seeded order: the
activations are harvested once into memory and every run reads them from there. All are evaluated on the same
held-out rows, drawn at random across all held-out documents (`minisv.data.eval_sample`): FVU of the MLP output,
and the next-token loss when the reconstruction replaces the MLP output (spliced CE minus clean CE) and its KL
from the clean model.

Error bars. CE increase and KL are compared PAIRED over the evaluation rows: each row gives the per-token
difference transcoder − SAE (same tokens, same clean model), so the row-to-row variation of the text itself,
much larger than the difference, cancels. The standard error of a difference combines the rows' (standard
deviation of the per-row differences, averaged over seeds, / √rows) and the seeds' (standard deviation of the
per-seed differences / √seeds: the rows being the same, that is training noise). FVU is one ratio over all
tokens: its spread is over seeds. A difference is called significant when it exceeds twice its standard error.
Writes OUT/tc_vs_sae.json (every run, every row), OUT/tc_vs_sae.md (the table, the setup, the conclusions) and
OUT/tc_vs_sae.svg (L0 vs FVU and L0 vs CE increase, seed means).
"""
import argparse
import json
import math
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
from minisv.report import svg_chart  # noqa: E402
from minisv.activations import CachedActivations, harvest, harvester, without_bos  # noqa: E402
from minisv.training import TrainConfig, train  # noqa: E402

KINDS = {"transcoder": ("ln2.hook_normalized", "hook_mlp_out"), "SAE": ("hook_mlp_out", "hook_mlp_out")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--k", type=positive_int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (init and batch order)")
    p.add_argument("--d-sae", type=positive_int, default=9216)
    p.add_argument("--tokens", type=positive_int, default=327680,
                   help="training tokens per run (default: 327,680, the default training run's budget)")
    p.add_argument("--batch-tokens", type=positive_int, default=1024)
    p.add_argument("--ctx", type=positive_int, default=128)
    p.add_argument("--eval-tokens", type=positive_int, default=16384,
                   help="held-out tokens, whole rows drawn across all held-out documents (default: 16,384)")
    p.add_argument("--out", default="docs", help="directory for tc_vs_sae.{json,md,svg} (default: docs)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    model = minisv.load(args.model, device="cpu")
    bos = model.tokenizer.bos_id if model.tokenizer is not None else None
    rows, held_out = load_dataset(None, model.tokenizer, args.ctx) if model.tokenizer is not None else \
        _random_rows(model, args.ctx)
    eval_rows, info = eval_sample(held_out, args.eval_tokens, bos_id=bos)
    # harvest once: enough rows for the budget after dropping BOS positions, both hooks in one forward; in bf16
    # where bf16 is fast, as train() harvests for the default run
    need = rows[:args.tokens // (args.ctx - 1) + 1]
    L = args.layer
    hooks = {L: [f"blocks.{L}.{h}" for h in KINDS["transcoder"]]}
    acts = without_bos(harvest(harvester(model), need, hooks), need, bos)[L]
    harvest_s = time.perf_counter() - started
    print(f"harvested {len(acts[0]):,} tokens of layer {L} once in {harvest_s:.0f} s; evaluation: {info}")
    results, clean_rows = [], None
    for seed in args.seeds:
        for kind, (hook_in, hook_out) in KINDS.items():
            cached = CachedActivations({L: (acts[1], acts[1]) if kind == "SAE" else acts}, args.batch_tokens,
                                       seed=seed)
            for k in args.k:
                steps = args.tokens // args.batch_tokens
                cfg = TrainConfig(layers=[L], d_sae=args.d_sae, k=k, lr=4e-3 * (9216 / args.d_sae) ** 0.5,
                                  tokens=args.tokens, batch_tokens=args.batch_tokens, bos_id=bos, seed=seed,
                                  warmup_steps=max(1, steps // 20),
                                  dead_tokens=max(1, steps // 10) * args.batch_tokens,
                                  model=args.model, hook_in=hook_in, hook_out=hook_out)
                t0 = time.perf_counter()
                coders, _ = train(model, cached, cfg, log=lambda line: None)
                m = evaluate(model, eval_rows, coders, bos_id=bos, per_row=True)
                r, per_row = m[f"layer_{L}"], m["rows"]
                clean_rows = per_row["clean"]["nll"]
                results.append({"kind": kind, "k": k, "seed": seed, "l0": r["l0"], "fvu": r["fvu"],
                                "ce_clean": m["ce_clean"], "ce_spliced": r["ce_spliced"],
                                "ce_increase": r["ce_spliced"] - m["ce_clean"], "ce_score": r["ce_score"],
                                "kl": r["kl"], "seconds": round(time.perf_counter() - t0, 1),
                                "row_nll": per_row[f"layer_{L}"]["nll"], "row_kl": per_row[f"layer_{L}"]["kl"]})
                print(" ".join(f"{key} {v:.4g}" if isinstance(v, float) else f"{key} {v}"
                               for key, v in results[-1].items() if not key.startswith("row_")), flush=True)
    per_row_tokens = eval_rows.shape[1] - 1
    summary = compare(results, clean_rows, per_row_tokens)
    os.makedirs(args.out, exist_ok=True)
    wall = time.perf_counter() - started
    command = "python tests/bench/sweep_tc_vs_sae.py " + " ".join(argv if argv is not None else sys.argv[1:])
    setup = (f"{args.model} layer {L}, d_sae {args.d_sae}, TopK, {args.tokens:,} training tokens per run (the same "
             f"cached activations for every run), batch {args.batch_tokens}, seeds {args.seeds}; evaluated on "
             f"{info['rows']} held-out rows ({info['tokens']:,} tokens, {len(eval_rows) * per_row_tokens:,} "
             f"next-token predictions) drawn across the held-out set ({info['held_out_rows']} rows"
             + (f", {info['documents']} of its {info['held_out_documents']} documents" if bos is not None else "")
             + f"); {wall:.0f} s in all ({wall / 60:.1f} min)")
    write_text(os.path.join(args.out, "tc_vs_sae.json"), json.dumps(
        {"command": command, "setup": setup, "eval": info, "row_predictions": per_row_tokens,
         "summary": summary, "clean_row_nll": clean_rows, "runs": results}))
    write_text(os.path.join(args.out, "tc_vs_sae.md"), report(summary, setup, command))
    write_text(os.path.join(args.out, "tc_vs_sae.svg"), plot(summary, f"{args.model} layer {L}"))
    print(report(summary, setup, command))
    print(f"wrote {args.out}/tc_vs_sae.json, .md, .svg")


def _mean(xs):
    return sum(xs) / len(xs)


def _se(xs):
    """Standard error of the mean of xs (0 for a single value)."""
    n = len(xs)
    if n < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def paired(per_seed_rows):
    """per_seed_rows: for each seed, the per-row values of one quantity (a difference). Returns {mean, se,
    se_rows, se_seeds, per_seed}: se_rows from the rows (values averaged over seeds first), se_seeds from the
    seeds' means (training noise: the rows are the same), se = √(se_rows² + se_seeds²)."""
    seeds = [_mean(r) for r in per_seed_rows]
    averaged = [_mean(v) for v in zip(*per_seed_rows)]
    se_rows, se_seeds = _se(averaged), _se(seeds)
    return {"mean": _mean(averaged), "se": math.hypot(se_rows, se_seeds), "se_rows": se_rows, "se_seeds": se_seeds,
            "per_seed": seeds}


def compare(results, clean_rows, n_tok):
    """Per k: each kind's L0, FVU (mean, SE over seeds), CE increase and KL (paired over rows vs the clean run),
    and the transcoder − SAE differences of FVU, CE increase and KL with their standard errors."""
    out = []
    for k in sorted({r["k"] for r in results}):
        runs = {kind: sorted((r for r in results if r["kind"] == kind and r["k"] == k), key=lambda r: r["seed"])
                for kind in KINDS}
        tc, sae = runs["transcoder"], runs["SAE"]
        row = {"k": k, "seeds": [r["seed"] for r in tc]}
        for kind, rs in runs.items():
            row[kind] = {"l0": _mean([r["l0"] for r in rs]), "fvu": _mean([r["fvu"] for r in rs]),
                         "fvu_se": _se([r["fvu"] for r in rs]), "fvu_per_seed": [r["fvu"] for r in rs],
                         "ce_increase": paired([[(a - c) / n_tok for a, c in zip(r["row_nll"], clean_rows)]
                                                for r in rs]),
                         "kl": paired([[v / n_tok for v in r["row_kl"]] for r in rs])}
        diffs = [a["fvu"] - b["fvu"] for a, b in zip(tc, sae)]
        row["diff"] = {"fvu": {"mean": _mean(diffs), "se": _se(diffs), "per_seed": diffs},
                       "ce_increase": paired([[(a - b) / n_tok for a, b in zip(x["row_nll"], y["row_nll"])]
                                              for x, y in zip(tc, sae)]),
                       "kl": paired([[(a - b) / n_tok for a, b in zip(x["row_kl"], y["row_kl"])]
                                     for x, y in zip(tc, sae)])}
        out.append(row)
    return out


def _pm(d, digits=4):
    return f"{d['mean']:+.{digits}f} ± {d['se']:.{digits}f}"


def verdict(d, lower, higher, spread=True):
    """A sentence part for a difference d = TC − SAE: which is lower, if beyond 2 standard errors."""
    if d["se"] == 0 and not spread:
        return "no error estimate (one seed)"
    if abs(d["mean"]) <= 2 * d["se"]:
        return "not significant"
    return lower if d["mean"] < 0 else higher


def report(summary, setup, command):
    """Markdown: the table (means over seeds, differences with standard errors), the setup and the conclusions."""
    lines = ["# Transcoders vs SAEs: measured", "", f"`{command}`", "",
             "| k | L0 TC / SAE | FVU TC / SAE | ΔFVU TC − SAE | CE increase TC / SAE (nats) | ΔCE TC − SAE (nats) "
             "| KL TC / SAE (nats) | ΔKL TC − SAE (nats) |", "|---|---|---|---|---|---|---|---|"]
    for row in summary:
        tc, sae, d = row["transcoder"], row["SAE"], row["diff"]
        lines.append(f"| {row['k']} | {tc['l0']:.1f} / {sae['l0']:.1f} | {tc['fvu']:.3f} / {sae['fvu']:.3f} | "
                     f"{_pm(d['fvu'], 3)} | {tc['ce_increase']['mean']:+.4f} / {sae['ce_increase']['mean']:+.4f} | "
                     f"{_pm(d['ce_increase'])} | {tc['kl']['mean']:.4f} / {sae['kl']['mean']:.4f} | "
                     f"{_pm(d['kl'])} |")
    lines += ["", setup, "",
              "Means over seeds. ± is one standard error: for ΔCE and ΔKL paired over the evaluation rows (each row's "
              "per-token TC − SAE difference) combined with the seed-to-seed spread; for ΔFVU the seed-to-seed "
              "spread alone (FVU is one ratio over all tokens). CE increase is spliced minus clean CE per "
              "prediction.", "", "Conclusions (a difference counts where it exceeds 2 standard errors):", ""]
    for row in summary:
        d, seeds = row["diff"], len(row["seeds"])
        parts = [f"FVU: {verdict(d['fvu'], 'the transcoder reconstructs better', 'the SAE reconstructs better', seeds > 1)}",
                 f"CE increase: {verdict(d['ce_increase'], 'the transcoder costs less', 'the SAE costs less')}",
                 f"KL: {verdict(d['kl'], 'the transcoder is closer to the clean model', 'the SAE is closer to the clean model')}"]
        per_seed = ", ".join(f"{v:+.4f}" for v in d["ce_increase"]["per_seed"])
        lines.append(f"- k = {row['k']}: " + "; ".join(parts) + f" (ΔCE per seed: {per_seed}).")
    return "\n".join(lines) + "\n"


def _random_rows(model, ctx):
    """Random token rows (models without a tokenizer): 512 to train on, 64 held out."""
    rows = torch.randint(0, model.cfg.vocab_size, (576, ctx), generator=torch.Generator().manual_seed(0))
    return rows[:512], rows[512:]


def plot(summary, title):
    """Two charts side by side in one SVG: L0 vs FVU and L0 vs CE increase, a line per kind (means over seeds)."""
    def series(key):
        return {kind: [(row[kind]["l0"], row[kind][key] if key == "fvu" else row[kind][key]["mean"]) for row in summary]
                for kind in KINDS}
    left = svg_chart(series("fvu"), "L0 (active latents per token)", "FVU of the MLP output", f"{title}: FVU",
                     log_x=True)
    right = svg_chart(series("ce_increase"), "L0 (active latents per token)", "spliced − clean CE (nats)",
                      f"{title}: CE increase", log_x=True)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="920" height="260"><g>{left}</g>'
            f'<g transform="translate(460 0)">{right}</g></svg>\n')


if __name__ == "__main__":
    main()
