"""Train sparse MLP transcoders on a language model, evaluate them on held-out text, and save them.

A transcoder reads an MLP's input (blocks.L.ln2.hook_normalized) and predicts its output (blocks.L.hook_mlp_out)
through many sparse latents (TopK, or ReLU + L1 as in the paper). The default run needs no network and takes a
few minutes on 2 CPU cores: a TopK transcoder (d_sae 9,216, k 32) for layer 6 of SmolLM2-135M-Instruct, trained
on the built-in corpus (Python's own documentation text), evaluated on documents held out from training.
Writes cfg.json + transcoder.safetensors (loadable with minisv.load_transcoder) and metrics.json to
--out; a checkpoint.pt there lets --resume continue an interrupted run. Several --layer values train one
transcoder per layer from the same forward passes (written to --out/layer_L/). Multi-GPU:
torchrun --nproc_per_node N train_transcoder.py ... (the global batch is split across processes).
The run ends by writing dashboards.html, what the features respond to; --prompt adds a circuit analysis.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import re
import time

import torch
import torch.distributed as dist

import minisv
from minisv.circuits import Circuit, format_tree
from minisv.data import eval_sample, load_dataset
from minisv.cli import (device as parse_device, fraction, main as cli_main, nonneg_float, nonneg_int, positive_float,
                        positive_int)
from minisv.errors import MinisvError
from minisv.evals import evaluate
from minisv.atomic import write_text
from minisv.dashboards import DashboardConfig, collect_dashboards
from minisv.report import circuit_html, dashboards_html, graph_html, training_html
from minisv.training import TrainConfig, train
from minisv import formats
from minisv import circuit_tracer
from minisv.clt import CrossLayerTranscoder
from minisv.dashboards import graph_contexts
from minisv.formats import check_export, import_released
from minisv.graph import attribute, prune, scores

DEFAULT_LAYER = 6
SAE_SITES = {"mlp_out": "hook_mlp_out", "resid_mid": "hook_resid_mid", "ln2": "ln2.hook_normalized"}
LOCK = ".lock"


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python train_transcoder.py --layer 6 8 --arch topk --expansion 16 --k 32 "
               "--tokens 2000000 --data my_texts/ --out runs/my-transcoders\n"
               "  python train_transcoder.py --load runs/transcoder-smollm2-L6 --prompt 'The function returns' "
               "--target '6:123@-1'")
    p.add_argument("--model", default="smollm2", help="'smollm2' (packaged, offline), a hub id such as 'gpt2', a "
                   "local Hugging Face directory or a .gguf file (default: smollm2)")
    p.add_argument("--layer", type=nonneg_int, nargs="+", default=[DEFAULT_LAYER], help="layer(s) whose MLP to "
                   f"replace, 0-based; several share each forward pass (default: {DEFAULT_LAYER})")
    p.add_argument("--kind", choices=["transcoder", "sae"], default="transcoder", help="transcoder: read the MLP "
                   "input, predict its output; sae: a sparse autoencoder that reconstructs --sae-site from itself, "
                   "trained by the same code (default: transcoder)")
    p.add_argument("--sae-site", choices=list(SAE_SITES), default="mlp_out", help="what an SAE reconstructs: the "
                   "MLP output (hook_mlp_out), the residual before the MLP (hook_resid_mid) or the MLP input "
                   "(ln2.hook_normalized) (default: mlp_out)")
    p.add_argument("--arch", choices=["topk", "relu", "jumprelu"], default="topk", help="topk: keep the k largest "
                   "latents, FVU + AuxK loss; relu: ReLU + L1 with unit-norm decoder rows, the paper's loss, init and "
                   "constant-after-warm-up schedule, with shorter warm-up and dead windows (see the README); jumprelu "
                   "(--clt only): JumpReLU with the tanh(c·‖W_dec‖·a) sparsity penalty (default: topk)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--d-sae", type=positive_int, help="number of latents (default: 16 × d_model)")
    size.add_argument("--expansion", type=positive_int, help="number of latents as a multiple of d_model")
    p.add_argument("--k", type=positive_int, help="active latents per token, topk only (default: 32; with --clt 16 per "
                   "layer)")
    p.add_argument("--l1", type=nonneg_float, default=1.4e-4, help="L1 coefficient, relu only (default: 1.4e-4, the "
                   "paper's GPT-2 value)")
    p.add_argument("--skip", action="store_true", help="add a dense skip connection x @ W_skip (skip transcoder)")
    p.add_argument("--lr", type=positive_float, help="peak Adam learning rate (default: 4e-3·sqrt(9216/d_sae) for "
                   "topk, 4e-4 for relu)")
    p.add_argument("--tokens", type=positive_int, help="training tokens (default: 327,680; with --clt 163,840)")
    p.add_argument("--batch-tokens", type=positive_int, default=1024, help="tokens per optimizer step (default: 1024; "
                   "on short runs more, smaller steps win, see the README)")
    p.add_argument("--ctx", type=positive_int, default=128, help="tokens per sequence; documents are packed into rows "
                   "of this length, each starting with BOS (default: 128)")
    p.add_argument("--data", metavar="PATH", help="a .txt/.md file, a folder of them, a .jsonl with a 'text' field, "
                   "or pre-tokenized .bin (uint16) / .npy token ids (default: the built-in corpus)")
    p.add_argument("--eval-tokens", type=positive_int, default=4096, help="held-out tokens for the final evaluation "
                   "(default: 4096)")
    p.add_argument("--out", help="output directory (default: runs/transcoder-MODEL-L<layers>)")
    p.add_argument("--export-format", nargs="+", default=[],
                   choices=[f for f in formats.FORMATS if f != "minisv"] + ["circuit-tracer"],
                   help="also write each trained coder in these tools' layouts, into OUT/<format>/ (saelens: "
                        "SAELens' SAE.load_from_disk; sparsify: EleutherAI sparsify's SparseCoder.load_from_disk; "
                        "circuit-tracer: its CLT / transcoder-set layout, with --clt and --arch jumprelu or relu)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                       "(same flags required)")
    again.add_argument("--overwrite", action="store_true", help="train into --out even though it holds files "
                       "(a finished or interrupted run); without it such a directory is refused")
    p.add_argument("--eval-every", type=nonneg_int, default=0, metavar="STEPS", help="also measure held-out FVU "
                   "every STEPS steps during training, for report.html (default: 0 = about 10 times per run)")
    p.add_argument("--checkpoint-every", type=positive_int, default=50, help="steps between checkpoints (default: 50)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available). Under torchrun any cuda "
                   "value means NCCL, each process on GPU number LOCAL_RANK")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (CUDA only)")
    p.add_argument("--no-autocast", action="store_true", help="harvest and train in the model's dtype. By default, "
                   "where bf16 matmuls are fast (CUDA, and CPUs with AMX units: Intel Sapphire Rapids and later, "
                   "~1.8× faster end to end), training activations of a float32 model come from a bf16 copy (not "
                   "while hooks are active) and the loss runs under bf16 autocast; evaluation never does")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="the model's dtype (default: "
                   "bfloat16 on CUDA, float32 on CPU); evaluation, dashboards and circuits run in it. Training "
                   "activations of a float32 model still come from a bf16 copy where bf16 is fast, unless "
                   "--no-autocast; transcoder weights stay float32")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed for initialization, data order and the held-out "
                   "split (default: 0)")
    a = p.add_argument_group("dashboards and circuits", "run after training, or instead of it on --load / "
                             "--import-released transcoders")
    a.add_argument("--load", nargs="+", metavar="DIR", help="skip training; use transcoders saved by this script "
                   "(directories with cfg.json, or holding layer_L/ subdirectories)")
    a.add_argument("--import-released", nargs="+", metavar="FILE", help="skip training; use released GPT-2 "
                   "transcoders (pchlenski/gpt2-transcoders .pt files, read without running any code from them), "
                   "with --model gpt2")
    a.add_argument("--dash-features", type=nonneg_int, default=1000, metavar="N", help="features in the HTML dashboard "
                   "written to --out, a seeded random sample of the live ones; 0 skips the dashboard (default: 1000)")
    a.add_argument("--features", type=nonneg_int, nargs="+", metavar="ID", help="show these features in the dashboard "
                   "instead of a sample")
    a.add_argument("--dash-tokens", type=positive_int, default=16384, metavar="N", help="held-out tokens scanned for "
                   "the dashboard (default: 16384)")
    a.add_argument("--prompt", metavar="TEXT", help="explain a target on this text (BOS prepended when the model "
                   "has one): print the top computational paths as a tree, write circuit.json and circuit.html "
                   "to --out")
    a.add_argument("--target", metavar="SPEC", help="what --prompt explains: 'L:F@T' is feature F of the layer-L "
                   "transcoder at token T (T defaults to the last; negative counts from the end), \"logit: ' 40' - "
                   "' 20'\" a logit difference at the last token (default: the most active feature of the deepest "
                   "transcoder at the last token). MLPs without a transcoder are kept whole, as error terms")
    a.add_argument("--rounds", type=positive_int, default=3, metavar="N", help="rounds of the path search = path "
                   "length (default: 3)")
    a.add_argument("--branches", type=positive_int, default=5, metavar="N", help="terms followed per path and paths "
                   "kept per round (default: 5)")
    c = p.add_argument_group("cross-layer transcoders and attribution graphs")
    c.add_argument("--clt", action="store_true", help="train ONE cross-layer transcoder replacing every MLP: layer "
                   "l's features read MLP l's input and write to the outputs of MLP l and the --window next ones; "
                   "--d-sae and --k are per layer (defaults with --clt: d_sae 512, k 16, 163,840 tokens; about 15 "
                   "minutes on 2 CPU cores for SmolLM2)")
    c.add_argument("--window", type=nonneg_int, default=0, help="with --clt: how many layers a feature's decoders "
                   "reach, its own included (default: 0 = every later layer; 1 = a set of per-layer transcoders)")
    c.add_argument("--sparsity", type=nonneg_float, default=TrainConfig.sparsity, help="with --arch jumprelu: "
                   "coefficient of the tanh sparsity penalty (default: %(default)s)")
    c.add_argument("--graph", metavar="PROMPT", help="trace the attribution graph of the next token after PROMPT "
                   "(BOS prepended) through the replacement model: after training with --clt, or of --load coders "
                   "covering every layer (a CLT, per-layer transcoders, circuit-tracer or sparsify layouts); writes "
                   "graph.json (circuit-tracer's format) and graph.html")
    c.add_argument("--node-threshold", type=fraction, default=0.8, help="pruning: keep the nodes holding this "
                   "share of the influence on the logits (default: 0.8)")
    c.add_argument("--edge-threshold", type=fraction, default=0.98, help="pruning: keep the edges holding this "
                   "share (default: 0.98)")
    args = p.parse_args(argv)
    if args.target and not args.prompt:
        p.error("--target needs --prompt, the text to explain it on")
    if args.arch == "jumprelu" and not args.clt:
        p.error("--arch jumprelu trains cross-layer transcoders: add --clt")
    return args


def main(argv=None):
    cli_main(run, parse_args(argv), cleanup=lambda: dist.destroy_process_group() if dist.is_initialized() else None)


def run(args):
    started = time.time()
    rank, device = _setup_distributed(args.device)
    if args.compile and device.type != "cuda":
        raise MinisvError("--compile needs a CUDA device; on CPU it only adds compile time")
    name = os.path.basename(os.path.normpath(args.model)).removesuffix(".gguf")
    if args.load or args.import_released:       # no training: dashboards and circuits of existing transcoders
        model, _, held_out = _model_and_data(args, device)
        coders, out = _load_transcoders(args, model), args.out or os.path.join("runs", f"circuits-{name}")
        if args.graph:
            return trace(args, model, coders, held_out, out, print if rank == 0 else _quiet)
        return analyze(args, model, coders, held_out, out, say=print if rank == 0 else _quiet)
    if args.clt:
        args.layer, args.d_sae = None, args.d_sae or 512
    args.k, args.tokens = args.k or (16 if args.clt else 32), args.tokens or (163_840 if args.clt else 327_680)
    kind = "clt" if args.clt else "transcoder" if args.kind == "transcoder" else f"sae-{args.sae_site}"
    out = args.out or os.path.join("runs", f"{kind}-{name}" + (f"-L{'-'.join(map(str, args.layer))}" if args.layer else ""))
    with _run_directory(out, args.resume, args.overwrite, rank):
        train_and_report(args, out, rank, device, started)


def _quiet(*args, **kwargs):
    pass


def _model_and_data(args, device):
    """(model, training rows, held-out rows) for the flags."""
    model = minisv.load(args.model, device=device, dtype=args.dtype)
    if args.ctx > model.cfg.n_ctx or args.ctx < 2:
        raise MinisvError(f"--ctx {args.ctx} must be between 2 and the model's context of {model.cfg.n_ctx}")
    bos = model.tokenizer is not None and model.tokenizer.bos_id is not None
    return (model, *load_dataset(args.data, model.tokenizer, args.ctx, seed=args.seed, bos=bos))


@contextlib.contextmanager
def _run_directory(out, resume, overwrite, rank):
    """Claim --out for this run (rank 0 does it for all): refuse a directory that already holds files unless
    --resume or --overwrite, hold an exclusive fcntl lock on out/.lock while training (two runs sharing --out
    would overwrite each other's checkpoints; the kernel drops the lock when the process ends, even killed),
    and delete the temporary files a killed run left half-written."""
    if rank != 0:
        yield
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise MinisvError(f"--out {out} is a file; give a directory")
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, LOCK), "a")
    except OSError as e:
        raise MinisvError(f"cannot write to --out {out}: {e.strerror}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MinisvError(f"another run is writing to {out} (it holds {os.path.join(out, LOCK)}); wait for it "
                              f"to end or choose another --out") from None
        orphans = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if re.search(r"\.tmp\d+$", f)]
        held = sorted(set(os.listdir(out)) - {LOCK} - {os.path.basename(f) for f in orphans})
        if held and not (resume or overwrite):
            raise MinisvError(f"{out} already holds {', '.join(held[:4])}{', ...' if len(held) > 4 else ''}: pass "
                              f"--resume to continue that run, --overwrite to replace it, or choose another --out")
        for f in orphans:       # nobody else writes here while we hold the lock: these belong to a killed run
            os.remove(f)
        yield


def train_and_report(args, out, rank, device, started):
    say = print if rank == 0 else _quiet
    for fmt in args.export_format:                                     # refuse now, not after training
        _check_export(args, fmt)
    model, train_rows, held_out = _model_and_data(args, device)
    d_sae = args.d_sae or (args.expansion or 16) * model.cfg.d_model
    layers = list(range(model.cfg.n_layers)) if args.clt else args.layer
    lr = args.lr or (4e-3 * (9216 / d_sae) ** 0.5 if args.arch == "topk" else 4e-4)
    bos = model.tokenizer.bos_id if model.tokenizer is not None else None
    # whole rows drawn at random from every held-out document, not the first few documents' rows
    eval_rows, eval_data = eval_sample(held_out, args.eval_tokens, bos_id=bos, seed=args.seed)
    what = "cross-layer transcoder" if args.clt else "transcoder(s)" if args.kind == "transcoder" else \
        f"SAE(s) on {SAE_SITES[args.sae_site]}"
    say(f"{args.model}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; data: "
        f"{len(train_rows):,} training rows ({train_rows.numel():,} tokens), {len(eval_rows)} held-out rows; "
        f"{args.arch} {what} for layer(s) {layers}, d_sae {d_sae}{' per layer' if args.clt else ''}, on "
        f"{model.embed.weight.device}")
    steps = args.tokens // args.batch_tokens
    # warm-up 5% of the steps (at most 1,000); a latent is dead after 10% of the run without firing (at most
    # 10M tokens: OpenAI's AuxK window); the paper's ReLU code used 5,000 steps for both, on 60M tokens
    sites = ("ln2.hook_normalized", "hook_mlp_out") if args.kind == "transcoder" else (SAE_SITES[args.sae_site],) * 2
    cfg = TrainConfig(layers=layers, d_sae=d_sae, architecture=args.arch, k=args.k, skip=args.skip, l1=args.l1,
                      lr=lr, tokens=args.tokens, batch_tokens=args.batch_tokens, seed=args.seed, bos_id=bos,
                      warmup_steps=max(1, min(1000, steps // 20)),
                      dead_tokens=min(10_000_000, max(steps // 10, 1) * args.batch_tokens),
                      checkpoint_every=args.checkpoint_every, eval_every=args.eval_every or max(1, steps // 10),
                      # a CLT's chunk holds every layer's activations: 8 batches of 30 layers ≈ 1.1 GB on SmolLM2
                      buffer_tokens=8 * args.batch_tokens if args.clt else TrainConfig.buffer_tokens,
                      amp=not args.no_autocast, compile=args.compile, model=args.model, sparsity=args.sparsity,
                      clt_window=args.window if args.clt else None,
                      dataset=args.data or "builtin", hook_in=sites[0], hook_out=sites[1])
    transcoders, summary = train(model, train_rows, cfg, out_dir=out, resume=args.resume,
                                 eval_rows=eval_rows[:max(1, 4096 // args.ctx)], log=say)
    if rank != 0:
        return
    coders = transcoders.get("clt", transcoders)
    _save(args, model, coders, out)
    say(f"evaluating on {eval_rows.numel():,} held-out tokens ...")
    metrics = evaluate(model, eval_rows, coders, bos_id=bos)
    _print_table(metrics, summary, layers)
    report = {"model": args.model, "layers": layers, "train_config": dataclasses.asdict(cfg), "train": summary,
              "eval": metrics, "eval_data": eval_data, "seconds_total": round(time.time() - started, 1)}
    write_text(os.path.join(out, "metrics.json"), json.dumps(report, indent=2) + "\n")
    write_text(os.path.join(out, "report.html"), training_html(report, f"{what} of {args.model}"))
    say(f"trained {summary['tokens']:,} tokens in {summary['seconds']:.0f} s ({summary['tok_per_s']:,} tok/s end to "
        f"end, harvesting included); wrote {out}/ (cfg.json, transcoder.safetensors, metrics.json, report.html)")
    if args.graph:
        trace(args, model, coders, held_out, out, say)
    elif args.clt:
        say("trace a prompt through the replacement model with --graph PROMPT (or later: --load OUT --graph PROMPT)")
    elif args.kind == "transcoder":
        analyze(args, model, transcoders, held_out, out, say)
    else:
        say("dashboards and circuits read transcoders of the MLP: skipped for --kind sae")


def _check_export(args, fmt):
    if fmt == "circuit-tracer":
        if not args.clt or args.arch == "topk":
            raise MinisvError("--export-format circuit-tracer writes cross-layer transcoders (or per-layer sets, --window "
                              "1) with --clt --arch jumprelu or relu: circuit-tracer runs no TopK CLT")
    else:
        check_export(fmt, args.arch, args.skip)


def _save(args, model, coders, out):
    """The trained coders in minisv's layout (several layers: out/layer_L/) and the --export-format layouts."""
    if isinstance(coders, CrossLayerTranscoder):
        formats.save(coders, out)
        if "circuit-tracer" in args.export_format:
            circuit_tracer.save(coders, os.path.join(out, "circuit-tracer"), model)
        return
    for layer, tc in coders.items():
        where = out if len(coders) == 1 else os.path.join(out, f"layer_{layer}")
        formats.save(tc, where)
        for fmt in args.export_format:
            formats.save(tc, os.path.join(where, fmt), format=fmt)


def trace(args, model, coders, held_out, out, say):
    """The attribution graph of --graph's prompt: its scores, the nodes that carry the most influence, graph.json
    (circuit-tracer's format) and graph.html, whose feature nodes show their top activating held-out contexts."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise MinisvError("--graph needs a model with a tokenizer")
    tokens = tokenizer.encode(args.graph, bos=tokenizer.bos_id is not None)
    started = time.time()
    graph = attribute(model, coders, tokens)
    seconds = time.time() - started
    data = circuit_tracer.graph_json(graph, tokenizer, node_threshold=args.node_threshold,
                                     edge_threshold=args.edge_threshold, scan=f"minisv/{args.model}")
    full, pruned = scores(graph), scores(graph, *prune(graph, args.node_threshold, args.edge_threshold)[:2])
    data["metadata"] |= {"replacement_score": full[0], "completeness_score": full[1],
                         "pruned_replacement_score": pruned[0], "pruned_completeness_score": pruned[1]}
    say(f"graph of {len(tokens)} tokens: {graph.n_features:,} active features, {len(graph.logit_ids)} logits "
        f"({', '.join(f'{tokenizer.token_str(int(k))!r} {float(p):.2f}' for k, p in zip(graph.logit_ids, graph.logit_probs))}); "
        f"{seconds:.1f} s")
    say(f"replacement score {full[0]:.3f}, completeness {full[1]:.3f} (pruned to {len(data['nodes'])} nodes and "
        f"{len(data['links'])} edges: {pruned[0]:.3f}, {pruned[1]:.3f})")
    os.makedirs(out, exist_ok=True)
    contexts = graph_contexts(model, coders, held_out[:max(1, args.dash_tokens // held_out.shape[1])], data["nodes"])
    write_text(os.path.join(out, "graph.json"), json.dumps(data, indent=1) + "\n")
    write_text(os.path.join(out, "graph.html"), graph_html(data, contexts, f"Attribution graph: {args.graph!r}"))
    say(f"wrote {out}/graph.json and graph.html")


def analyze(args, model, transcoders, held_out, out, say):
    """The feature dashboards of each transcoder on held-out text, and the circuit behind --target on --prompt."""
    tokenizer = model.tokenizer
    bos = tokenizer.bos_id if tokenizer is not None else None
    token_str = tokenizer.token_str if tokenizer is not None else str
    os.makedirs(out, exist_ok=True)
    if args.dash_features or args.features:
        rows = held_out[:max(1, args.dash_tokens // held_out.shape[1])]
        for layer, tc in sorted(transcoders.items()):
            say(f"dashboards: layer {layer} transcoder on {rows.numel():,} held-out tokens ...")
            cfg = DashboardConfig(features=args.features, max_features=args.dash_features, bos_id=bos, seed=args.seed)
            data = collect_dashboards(model, tc, rows, cfg)
            path = os.path.join(out, "dashboards.html" if len(transcoders) == 1 else f"dashboards-L{layer}.html")
            write_text(path, dashboards_html(data, token_str, f"Layer {layer} transcoder features of {args.model}"))
            say(f"wrote {path}: {len(data['features']):,} features ({data['live']:,} of {tc.cfg.d_sae:,} fired)")
    if args.prompt is None:
        return
    if tokenizer is None:
        raise MinisvError("--prompt needs a model with a tokenizer")
    circuit = Circuit(model, transcoders, tokenizer.encode(args.prompt, bos=bos is not None))
    root = circuit.target(args.target)
    missing = [l for l in range(model.cfg.n_layers) if l not in transcoders]
    say(f"circuit of {root.label} = {root.value:+.4f} on {len(circuit.tokens)} tokens" +
        (f"; MLPs {missing} have no transcoder and stay whole, as error terms" if missing else ""))
    paths = circuit.top_paths(root, rounds=args.rounds, branches=args.branches)
    data, tree = circuit.to_json(root, paths), format_tree(paths)
    say("direct terms by kind: " + ", ".join(f"{k} {v:+.3f}" for k, v in data["direct"].items()))
    say(tree)
    write_text(os.path.join(out, "circuit.json"), json.dumps(data, indent=1) + "\n")
    write_text(os.path.join(out, "circuit.html"), circuit_html(data, tree, f"Circuit of {root.label}"))
    say(f"wrote {out}/circuit.json and circuit.html")


def _load_transcoders(args, model):
    """{layer: Transcoder} from --load directories (or their layer_L/ subdirectories) and --import-released files,
    or the CrossLayerTranscoder of one --load directory."""
    device = model.embed.weight.device
    found = [formats.load(d, device, model) for path in args.load or [] for d in _coder_dirs(path)]
    if any(isinstance(c, CrossLayerTranscoder) for c in found):
        if len(found) > 1 or args.import_released:
            raise MinisvError("a cross-layer transcoder replaces every MLP: --load it alone")
        return found[0]
    found += [import_released(f).to(device) for f in args.import_released or []]
    layers = [tc.cfg.layer for tc in found]
    if len(set(layers)) < len(layers):
        raise MinisvError(f"several transcoders for one layer (layers {layers}); give one per layer")
    return dict(zip(layers, found))


def _coder_dirs(path):
    """The coder directories of a --load path: its layer_L/ subdirectories (a multi-layer run), its hookpoint
    subdirectories (sparsify's multi-layer layout, e.g. model.layers.6.mlp/), or the path itself."""
    for pattern in ("layer_*", "*layers.*"):
        found = sorted(glob.glob(os.path.join(path, pattern)), key=lambda d: [int(n) for n in re.findall(r"\d+", d)])
        if found:
            return found
    return [path]


def _setup_distributed(device):
    """(rank, torch.device). Under torchrun (WORLD_SIZE > 1) every process joins the group: on CUDA with NCCL,
    each process on its own GPU, number LOCAL_RANK (so `--device cuda:N` picks the GPU of single-process runs
    only); on CPU with gloo."""
    device = parse_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), device


def _print_table(m, summary, layers):
    """The evaluation per layer and, for several layers or a CLT, with every one of them replaced at once ("all");
    "dead" is measured on training tokens (see the footnote it prints). What a row has no number for shows as –."""
    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else "–"
    print(f"{'':>10} {'L0':>7} {'FVU':>7} {'CE clean':>9} {'spliced':>8} {'zero-abl':>9} {'CE score':>9} "
          f"{'KL':>8} {'top-1':>6} {'dead*':>6}")
    rows = [(f"layer {l}", m[f"layer_{l}"] | {"dead": summary["dead"][str(l)]}) for l in layers] + \
        ([("all", m["all"])] if "all" in m else [])
    for label, r in rows:
        print(f"{label:>10} {cell(r, 'l0', '7.1f'):>7} {cell(r, 'fvu', '7.3f'):>7} {m['ce_clean']:9.4f} "
              f"{cell(r, 'ce_spliced', '8.4f'):>8} {cell(r, 'ce_zero_ablated', '9.4f'):>9} "
              f"{cell(r, 'ce_score', '9.3f'):>9} {cell(r, 'kl', '8.4f'):>8} {cell(r, 'top1_agreement', '6.1%'):>6} "
              f"{cell(r, 'dead', '6.1%'):>6}")
    print(f"* dead: latents that fired on none of the last {summary['dead_window_tokens']:,} training tokens; the "
          f"rest is measured on {m['tokens']:,} held-out tokens")


if __name__ == "__main__":
    main()
