"""Train sparse MLP transcoders on a language model, evaluate them on held-out text, and save them.

A transcoder reads an MLP's input (blocks.L.ln2.hook_normalized) and predicts its output (blocks.L.hook_mlp_out)
through many sparse latents (TopK, or ReLU + L1 as in the paper). The default run needs no network and takes 3
(bf16 on a CPU with AMX) to 9 minutes on 2 CPU cores: a TopK transcoder (d_sae 9,216, k 32) for layer 6 of
SmolLM2-135M-Instruct, trained on the built-in corpus (Python's own documentation text), evaluated on documents
held out from training.
Writes cfg.json + transcoder.safetensors (loadable with minisv.load_transcoder) and metrics.json to
--out; a checkpoint.pt there lets --resume continue an interrupted run. Several --layer values train one
transcoder per layer from the same forward passes (written to --out/layer_L/). Multi-GPU:
torchrun --nproc_per_node N train_transcoder.py ... (the global batch is split across processes).
The run ends by writing dashboards.html, what the features respond to; --prompt adds a circuit analysis.

Memory: the run estimates its peak memory from its settings (the model; the activation chunk, the coders with
their Adam state and a batch's latents while training; 16 rows of logits while evaluating), prints the estimate
at start and refuses to start when it exceeds the memory available. The default run needs about 4.3 GB (4.0 GB
measured), most of it the evaluation's logits, which --ctx lowers; --batch-tokens, --d-sae and fewer --layer
values lower the training's share.
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
from minisv import cli
from minisv.cli import (device as parse_device, fraction, main as cli_main, nonneg_float, nonneg_int, positive_float,
                        positive_int)
from minisv.errors import MinisvError
from minisv.evals import evaluate
from minisv.atomic import TMP_SUFFIX, write_text
from minisv.activations import harvests_bf16
from minisv.dashboards import DashboardConfig, collect_dashboards
from minisv.report import circuit_html, dashboards_html, graph_html, training_html
from minisv.training import CHECKPOINT, TrainConfig, train
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
               "--target '6:123@-1'\n"
               "  python train_transcoder.py --clt --graph 'The capital of France is'   # a CLT, then a graph")
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
                   "topk, 4e-4 for relu; with --clt 3e-3, as the per-layer rule's 0.017 collapses its features)")
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
                   "--d-sae and --k are per layer (defaults with --clt: d_sae 512, k 16, 163,840 tokens, lr 3e-3; 15 "
                   "minutes and 8.5 GB on 2 CPU cores for SmolLM2)")
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
    name = os.path.basename(os.path.normpath(args.model)).removesuffix(".gguf")
    analysis = bool(args.load or args.import_released)  # no training: dashboards and circuits of existing coders
    if args.clt:
        args.layer, args.d_sae = [], args.d_sae or 512
    args.k, args.tokens = args.k or (16 if args.clt else 32), args.tokens or (163_840 if args.clt else 327_680)
    kind = "clt" if args.clt else "transcoder" if args.kind == "transcoder" else f"sae-{args.sae_site}"
    out = args.out or os.path.join("runs", f"circuits-{name}" if analysis else
                                   f"{kind}-{name}" + (f"-L{'-'.join(map(str, args.layer))}" if args.layer else ""))
    loads = _load_dirs(args.load or [])

    def check(writes):          # every input and every file this run writes into --out, before any work
        cli.check_paths(inputs=_inputs(args, loads), outputs=[("--out", os.path.join(out, f)) for f in writes],
                        out_dirs=[("--out", out)])
    check(_outputs(args, [] if analysis else args.layer, coders=not analysis))
    for fmt in args.export_format:                                     # refuse now, not after training
        _check_export(args, fmt)
    rank, device = _setup_distributed(args.device)
    available = cli.available_memory(device)        # before the model takes its share
    if args.compile and device.type != "cuda":
        raise MinisvError("--compile needs a CUDA device; on CPU it only adds compile time")
    say = print if rank == 0 else _quiet
    if analysis:
        model = _model(args, device)
        coders = _load_transcoders(args, loads, model)
        # the dashboards' names follow the coders' layers
        check(_outputs(args, sorted(coders) if isinstance(coders, dict) else [], coders=False))
        cli.check_memory(*_analysis_memory(args, model, coders), available, LOWER)
        return (trace if args.graph else analyze)(args, model, coders, _data(args, model)[1], out, say)
    with _run_directory(out, args, rank):
        train_and_report(args, out, rank, device, (started, available))


def _quiet(*args, **kwargs):
    pass


def _load_dirs(paths):
    """The coder directories behind --load: each path itself or, when it holds layer_L/ subdirectories (a
    multi-layer run) or hookpoint subdirectories (sparsify's multi-layer layout, e.g. model.layers.6.mlp/), those.
    Each must hold a coder (a cfg.json, or circuit-tracer's config.yaml). A path holding both a coder and such
    subdirectories is refused: which one is meant?"""
    def holds_coder(d):
        return os.path.isfile(os.path.join(d, formats.CONFIG)) or circuit_tracer.is_layout(d)
    dirs = []
    for path in paths:
        subdirs = []
        for pattern in ("layer_*", "*layers.*"):
            subdirs = subdirs or sorted((d for d in glob.glob(os.path.join(glob.escape(path), pattern))
                                         if os.path.isdir(d)), key=lambda d: [int(n) for n in re.findall(r"\d+", d)])
        if subdirs and holds_coder(path):
            raise MinisvError(f"--load {path} holds a coder ({formats.CONFIG}) and per-layer subdirectories "
                              f"({os.path.basename(subdirs[0])}, ...): load one of them, e.g. --load {subdirs[0]}")
        for d in subdirs or [path]:
            if not os.path.isdir(d) or not holds_coder(d):
                raise MinisvError(f"--load {d} holds no transcoder: no {formats.CONFIG} there (nor layer_L/ "
                                  f"subdirectories with one); give a directory train_transcoder.py wrote")
        dirs += subdirs or [path]
    return dirs


def _inputs(args, loads):
    """Every file and directory the run reads, for cli.check_paths: the model, --data, the --load transcoders'
    files and --import-released files."""
    found = [("--model", cli.model_path(args.model), "any"), ("--data", args.data, "data")]
    found += [("--load", os.path.join(d, f), "file") for d in loads
              for f in (formats.CONFIG, formats.CLT_WEIGHTS, *formats.WEIGHTS.values())
              if os.path.exists(os.path.join(d, f))]
    found += [("--import-released", f, "file") for f in args.import_released or []]
    return [i for i in found if i[1] is not None]


def _outputs(args, layers, coders):
    """The files a run writes into --out, relative to it, for the coders of `layers` (trained by this run if
    `coders`): to check them against the inputs before any work, and (with --overwrite) to tell an earlier run's
    leftovers from what this run replaces."""
    several = len(layers) > 1
    files = [CHECKPOINT, "metrics.json", "report.html"] if coders else []
    if coders and args.clt:
        files += [formats.CONFIG, formats.CLT_WEIGHTS]
        files += [os.path.join("circuit-tracer", "config.yaml")] if "circuit-tracer" in args.export_format else []
    for folder in [] if args.clt or not coders else [f"layer_{l}" for l in layers] if several else [""]:
        files += [os.path.join(folder, formats.CONFIG), os.path.join(folder, formats.WEIGHTS["minisv"])]
        files += [os.path.join(folder, fmt, name) for fmt in args.export_format
                  for name in (formats.CONFIG, formats.WEIGHTS[fmt])]
    if args.graph:              # a graph instead of dashboards and a circuit
        return files + ["graph.json", "graph.html"]
    if args.kind == "transcoder" and (args.dash_features or args.features) and layers:
        files += [f"dashboards-L{l}.html" for l in layers] if several else ["dashboards.html"]
    if args.kind == "transcoder" and args.prompt:
        files += ["circuit.json", "circuit.html"]
    return files


def _model(args, device):
    """The model, checked (finite logits; --ctx within its context, every --layer one of its blocks) before any
    data is read."""
    model = cli.check_logits(minisv.load(args.model, device=device, dtype=args.dtype), args.model)
    if args.ctx > model.cfg.n_ctx or args.ctx < 2:
        raise MinisvError(f"--ctx {args.ctx} must be between 2 and the model's context of {model.cfg.n_ctx}")
    if not (args.load or args.import_released):
        for layer in args.layer:
            model.check_layer(layer)
    return model


# ------------------------------------------------------------------------- memory
LOWER = {"training": "--batch-tokens, --d-sae/--expansion or the number of --layer values", "evaluation": "--ctx",
         "dashboards": "--dash-tokens, or skip the dashboards with --dash-features 0",
         "graph": "a shorter --graph prompt"}


def _held_memory(args, model):
    """Bytes held all run long: Python with torch, the model (with what loading keeps: tokenizer, file pages),
    a bf16 copy for harvesting where bf16 is fast, and the token rows (tokenizing holds ~12 bytes a text byte)."""
    copy = harvests_bf16(model, not args.no_autocast)
    source = [args.data] if args.data else []
    if args.data and os.path.isdir(args.data):
        source = [os.path.join(r, f) for r, _, fs in os.walk(args.data) for f in fs]
    text = sum(os.path.getsize(f) for f in source) if source else 2_100_000        # the built-in corpus: 2.1 MB
    weights = cli.model_bytes(model)
    bf16 = weights // model.embed.weight.element_size() * 2 if copy else 0
    return {"runtime": cli.RUNTIME_BYTES, "model": weights * 5 // 4 + bf16, "data": 12 * text}


def _coder_bytes(model, d_sae, skip, copies):
    """One coder's weights, `copies` times (4 while training: weights, gradients, Adam's two moments)."""
    d = model.cfg.d_model
    return copies * 4 * (d_sae * (2 * d + 1) + d + (d * d if skip else 0))


def _evaluation_memory(args, model, coders):
    """evaluate: 16 rows of logits at a time, with the clean log-probabilities kept and the KL's exp, difference
    and product beside them: 8 logit-sized float32 tensors (the default run measured 7.4)."""
    return coders + 8 * 16 * args.ctx * model.cfg.vocab_size * 4


def _dashboard_memory(args, model, d_sae, coders):
    """collect_dashboards: a batch of latent activations (rows of ~2^24 numbers in all, at least one row, at most
    --dash-tokens) in ~6 forms, and W_E·W_enc in chunks of 256 latents."""
    floats = min(max(2 ** 24, args.ctx * d_sae), args.dash_tokens * d_sae)
    return coders + 6 * floats * 4 + model.cfg.vocab_size * 256 * 4


def _training_memory(args, model, d_sae):
    """(held, phases) of a training run, for cli.check_memory: training holds the activation chunk (the one served
    and the next being harvested, cut and shuffled: 4 copies of buffer_tokens × (d_in + d_out) per layer), the
    coders with gradients and Adam moments, and a step's [batch, d_sae] pre-activations (~4 forms); evaluation
    and dashboards follow, with the coders kept once. Calibrated with /usr/bin/time -v on the default run."""
    c, n = model.cfg, model.cfg.n_layers if args.clt else len(args.layer)
    act = 2 if harvests_bf16(model, not args.no_autocast) else model.embed.weight.element_size()
    # batches in one chunk: what the buffer holds, at least one, at most the whole run
    chunk = min(max(1, _buffer_tokens(args) // args.batch_tokens), max(1, args.tokens // args.batch_tokens)) * \
        args.batch_tokens
    harvest = 32 * args.ctx * (6 * c.d_model + 3 * c.d_mlp) * act                    # a forward of 32 rows

    def weights(copies):
        return _clt_bytes(model, d_sae, args.window, copies) if args.clt else \
            n * _coder_bytes(model, d_sae, args.skip, copies)
    training = 4 * chunk * 2 * c.d_model * n * act + harvest + weights(4) + 4 * n * args.batch_tokens * d_sae * 4
    coders = weights(1)
    phases = {"training": training, "evaluation": _evaluation_memory(args, model, coders)}
    if args.graph:
        phases["graph"] = _graph_memory(args, model, coders, args.k)
    elif args.kind == "transcoder" and (args.dash_features or args.features):
        phases["dashboards"] = _dashboard_memory(args, model, d_sae, coders)
    return _held_memory(args, model), phases


def _clt_bytes(model, d_sae, window, copies):
    """A CLT's weights, `copies` times: per layer an encoder [d_sae, d] with its biases, and a decoder [d_sae, d]
    per (source, target) pair the window allows."""
    L, d = model.cfg.n_layers, model.cfg.d_model
    pairs = sum(min(window or L, L - l) for l in range(L))
    return copies * 4 * (L * (d_sae * (d + 1) + d) + pairs * d_sae * d)


def _buffer_tokens(args):
    """Tokens per shuffled activation chunk: a CLT's holds every layer's activations, so 8 batches (≈ 1.1 GB for
    SmolLM2's 30 layers)."""
    return 8 * args.batch_tokens if args.clt else TrainConfig.buffer_tokens


def _graph_memory(args, model, coders, k):
    """--graph: the coders; the adjacency [n, n] (twice) for n ≈ L·k·T feature nodes, plus error, embedding and
    logit nodes; and the backward sweep's reads, ~8 tensors of [n, T, d]. For the default SmolLM2 CLT this
    estimates 1.9 GB for a 6-token prompt and 4.2 GB for 15 tokens, where the peaks measured 2.1 and 3.8 GB."""
    T = len(model.tokenizer.encode(args.graph)) + 1 if model.tokenizer is not None else 16
    L, d = model.cfg.n_layers, model.cfg.d_model
    n = L * (k or 32) * T + L * T + T + 10
    return coders + 4 * (2 * n * n + 8 * n * T * d)


def _analysis_memory(args, model, transcoders):
    if isinstance(transcoders, CrossLayerTranscoder):
        cfg = transcoders.cfg
        return _held_memory(args, model), {"graph": _graph_memory(
            args, model, _clt_bytes(model, cfg.d_sae, cfg.window, 1), cfg.k if cfg.architecture == "topk" else None)}
    coders = sum(_coder_bytes(model, tc.cfg.d_sae, tc.cfg.skip, 1) for tc in transcoders.values())
    widest = max(tc.cfg.d_sae for tc in transcoders.values())
    if args.graph:
        k = max(tc.cfg.k if tc.cfg.architecture == "topk" else 32 for tc in transcoders.values())
        return _held_memory(args, model), {"graph": _graph_memory(args, model, coders, k)}
    return _held_memory(args, model), {"dashboards": _dashboard_memory(args, model, widest, coders)}


def _data(args, model):
    """(training rows, held-out rows) for the flags."""
    bos = model.tokenizer is not None and model.tokenizer.bos_id is not None
    return load_dataset(args.data, model.tokenizer, args.ctx, seed=args.seed, bos=bos)


# the files (and folders) this script writes into --out, by name: what --overwrite may remove when this run will not
# write them again. Nothing else in --out is ever touched.
OWN_FILES = {formats.CONFIG, formats.CLT_WEIGHTS, *formats.WEIGHTS.values(), CHECKPOINT, "metrics.json",
             "report.html", "circuit.json", "circuit.html", "graph.json", "graph.html"}
OWN_DIRS = re.compile(r"layer_\d+|circuit-tracer|" + "|".join(f for f in formats.FORMATS if f != "minisv"))


def _own(name):
    return name in OWN_FILES or re.fullmatch(r"dashboards(-L\d+)?\.html", name)


def _remove_stale(folder, keep):
    """Delete what an earlier run of this script wrote under `folder` and this run will not write again (`keep`:
    paths relative to folder), so that no old layer_L/ or dashboard is taken for this run's; then drop folders
    of ours left empty. Only our own names are touched."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path) and OWN_DIRS.fullmatch(name):
            _remove_stale(path, [k.split(os.sep, 1)[1] for k in keep if k.startswith(name + os.sep)])
            if not os.listdir(path):
                os.rmdir(path)
        elif os.path.isfile(path) and _own(name) and name not in keep:
            os.remove(path)


@contextlib.contextmanager
def _run_directory(out, args, rank):
    """Claim --out for this run (rank 0 does it for all): refuse a directory that already holds files unless
    --resume or --overwrite (which clears what an earlier run wrote and this one will not replace), hold an
    exclusive fcntl lock on out/.lock while training (two runs sharing --out would overwrite each other's
    checkpoints; the kernel drops the lock when the process ends, even killed), and delete the temporary files a
    killed run left half-written. A run that fails before writing anything removes what it created."""
    if rank != 0:
        yield
        return
    created = _missing_ancestors(out)
    new_lock = not os.path.exists(os.path.join(out, LOCK))
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, LOCK), "a")
    except OSError as e:
        raise MinisvError(f"cannot write to --out {out}: {e.strerror}") from None
    before = set(os.listdir(out))
    try:
        with lock:
            _claim(out, lock, args)
            yield
    except BaseException:
        if new_lock and set(os.listdir(out)) == before:  # failed before writing anything: leave no trace
            os.remove(os.path.join(out, LOCK))
            for folder in created:                       # deepest first; each is empty once the lock is gone
                os.rmdir(folder)
        raise


def _missing_ancestors(path):
    """The folders that creating `path` (makedirs) would create, deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _claim(out, lock, args):
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise MinisvError(f"another run is writing to {out} (it holds {os.path.join(out, LOCK)}); wait for it "
                          f"to end or choose another --out") from None
    orphans = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.endswith(TMP_SUFFIX)]
    held = sorted(set(os.listdir(out)) - {LOCK} - {os.path.basename(f) for f in orphans})
    if held and not (args.resume or args.overwrite):
        raise MinisvError(f"{out} already holds {', '.join(held[:4])}{', ...' if len(held) > 4 else ''}: pass "
                          f"--resume to continue that run, --overwrite to replace it, or choose another --out")
    for f in orphans:       # nobody else writes here while we hold the lock: these belong to a killed run
        os.remove(f)
    if args.overwrite:
        _remove_stale(out, _outputs(args, args.layer, coders=True))


def train_and_report(args, out, rank, device, clock):
    (started, available), say = clock, print if rank == 0 else _quiet
    model = _model(args, device)
    d_sae = args.d_sae or (args.expansion or 16) * model.cfg.d_model
    layers = list(range(model.cfg.n_layers)) if args.clt else args.layer
    lr = args.lr or (3e-3 if args.clt else 4e-3 * (9216 / d_sae) ** 0.5 if args.arch == "topk" else 4e-4)
    bos = model.tokenizer.bos_id if model.tokenizer is not None else None
    cli.check_memory(*_training_memory(args, model, d_sae), available, LOWER)
    train_rows, held_out = _data(args, model)
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
                      buffer_tokens=_buffer_tokens(args),
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
    cli.check_finite(metrics, "the evaluation", f"the coders are saved in {out}, metrics.json is not written")
    _print_table(metrics, summary, layers)
    report = {"model": args.model, "layers": layers, "train_config": dataclasses.asdict(cfg), "train": summary,
              "eval": metrics, "eval_data": eval_data, "seconds_total": round(time.time() - started, 1)}
    write_text(os.path.join(out, "metrics.json"), json.dumps(report, indent=2) + "\n")
    write_text(os.path.join(out, "report.html"), training_html(report, f"{what} of {args.model}"))
    say(f"trained {summary['tokens']:,} tokens in {summary['seconds']:.0f} s ({summary['tok_per_s']:,} tok/s end to "
        f"end, harvesting included); wrote {out}/ (cfg.json, "
        f"{formats.CLT_WEIGHTS if args.clt else formats.WEIGHTS['minisv']}, metrics.json, report.html)")
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
            raise MinisvError("--export-format circuit-tracer writes cross-layer transcoders (or per-layer sets, "
                              "--window 1) with --clt --arch jumprelu or relu: circuit-tracer runs no TopK CLT")
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
    logits = ", ".join(f"{tokenizer.token_str(int(k))!r} {float(p):.2f}"
                       for k, p in zip(graph.logit_ids, graph.logit_probs))
    say(f"graph of {len(tokens)} tokens: {graph.n_features:,} active features, {len(graph.logit_ids)} logits "
        f"({logits}); {seconds:.1f} s")
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
            data = cli.check_finite(collect_dashboards(model, tc, rows, cfg), f"the layer {layer} dashboard")
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
    data, tree = cli.check_finite(circuit.to_json(root, paths), "the circuit"), format_tree(paths)
    say("direct terms by kind: " + ", ".join(f"{k} {v:+.3f}" for k, v in data["direct"].items()))
    say(tree)
    write_text(os.path.join(out, "circuit.json"), json.dumps(data, indent=1) + "\n")
    write_text(os.path.join(out, "circuit.html"), circuit_html(data, tree, f"Circuit of {root.label}"))
    say(f"wrote {out}/circuit.json and circuit.html")


def _load_transcoders(args, loads, model):
    """{layer: Transcoder} from the --load coder directories (`_load_dirs`) and --import-released files, or the
    CrossLayerTranscoder of one --load directory."""
    device = model.embed.weight.device
    found = [formats.load(d, device, model) for d in loads]
    if any(isinstance(c, CrossLayerTranscoder) for c in found):
        if len(found) > 1 or args.import_released:
            raise MinisvError("a cross-layer transcoder replaces every MLP: --load it alone")
        return found[0]
    found += [import_released(f).to(device) for f in args.import_released or []]
    layers = [tc.cfg.layer for tc in found]
    if len(set(layers)) < len(layers):
        raise MinisvError(f"several transcoders for one layer (layers {layers}); give one per layer")
    return dict(zip(layers, found))


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
