"""Optimize a one-shot steering vector on ONE prompt (or a few), then show how it transfers to prompts it never saw.

The default run needs no network and takes a few minutes on 2 CPU cores: on SmolLM2-135M-Instruct it finds a
vector at layer 4 that makes the model answer one benign request ("Give me a recipe for pancakes.") with a
refusal, then generates on a dozen different benign requests unsteered, with +v and with −v, and counts the
refusals. The vector is saved as .safetensors, with an HTML report of the generations next to it.

Several --layer values (--layer 2 4 6 8) optimize one vector per layer and report held-out success against the
layer. --clamp-at-inference is the paper's refusal recipe: train additively, generate with clamp steering.

Memory: the run estimates its peak memory from its settings (the model; the optimization's activations; the
generation's logits and KV cache), prints the estimate at start and refuses to start when it exceeds the memory
available. The default run needs about 1.3 GB (1.2 GB measured); --batch, --affine-rank, --max-new-tokens and
fewer --eval-prompts lower it.
"""
import argparse
import json
import os
import re
import time

import minisv
from minisv import cli
from minisv.atomic import write_text
from minisv.control_vector import exportable_layers, save_control_vector
from minisv.errors import MinisvError
from minisv.report import steering_html
from minisv.steering import (Datapoint, SteerConfig, compare_generations, completion_logprob, optimize_vector,
                             prompt_ids, render, residual_norm, save_vector, steer, success_rate)
from minisv.steering_studies import STUDIES, run_study

DEFAULT_PROMPT = "Give me a recipe for pancakes."
DEFAULT_PROMOTE = "I'm sorry, but I can't help with that."
REFUSAL = r"(?i)\b(I'm sorry|I am sorry|I apologi[sz]e|I can(no|')t (help|assist|do|provide)|I'm (not able|unable) to)"
HELD_OUT = ["Write a short poem about the sea.", "What is the capital of France?", "Explain how photosynthesis works.",
            "Suggest three names for a pet cat.", "How do I boil an egg?", "Summarize the plot of Romeo and Juliet.",
            "Give me tips for a job interview.", "What are the benefits of regular exercise?",
            "Translate 'good morning' into Spanish.", "Write a haiku about autumn leaves.",
            "How many days are there in a leap year?", "Recommend a good book for a long flight."]


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python optimize_sv.py --prompt 'How do I bake bread?' --promote \"I'm sorry, but I can't "
               "help with that.\" --layer 4 --out refusal.safetensors")
    p.add_argument("--model", default="smollm2", help="'smollm2' (packaged, offline), a hub id, a local Hugging Face "
                   "directory or a .gguf file (default: smollm2)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a training prompt, a user message; repeatable "
                   "(each gets every --promote/--suppress). The chat template is applied for chat models unless "
                   f"--raw (default, without --train-file: {DEFAULT_PROMPT!r})")
    p.add_argument("--train-file", metavar="FILE.jsonl", help='more training prompts, one JSON object a line: '
                   '{"prompt": ..., "promote": text or [texts], "suppress": text or [texts]}')
    p.add_argument("--raw", action="store_true", help="use the prompts as raw text, no chat template")
    p.add_argument("--promote", action="append", metavar="TEXT", help="a completion to make likely; repeatable "
                   f"(default, if neither --promote, --suppress nor --train-file is given: {DEFAULT_PROMOTE!r})")
    p.add_argument("--suppress", action="append", default=[], metavar="TEXT", help="a completion to make unlikely; "
                   "repeatable")
    p.add_argument("--layer", type=cli.nonneg_int, nargs="+", default=[4], metavar="N", help="add v to the residual "
                   "stream entering this block, 0-based; several values optimize one vector per layer (default: 4)")
    p.add_argument("--lr", type=cli.positive_float, default=SteerConfig.lr, help="Adam learning rate (default: "
                   "%(default)s)")
    p.add_argument("--max-iters", type=cli.nonneg_int, default=SteerConfig.max_iters, help="at most this many Adam "
                   "steps (default: %(default)s)")
    p.add_argument("--target-loss", type=cli.finite_float, help="stop once every completion's loss (nats) is at "
                   "most this")
    p.add_argument("--target-sum", action="store_true", help="compare the summed loss with --target-loss instead")
    p.add_argument("--max-norm", type=cli.positive_float, help="scale ‖v‖ back to this after each step (default: "
                   "no bound)")
    p.add_argument("--starting-norm", type=cli.nonneg_float, default=SteerConfig.starting_norm, help="norm of the "
                   "random initial v (default: %(default)s)")
    p.add_argument("--clamp", type=cli.finite_float, metavar="ALPHA", help="clamp instead of add, in training and "
                   "generation: x − (x·v̂)v̂ + ALPHA·v")
    p.add_argument("--clamp-at-inference", action="store_true", help="train additively and clamp only when "
                   "generating (the paper's refusal recipe), with --clamp ALPHA (default ALPHA: 1)")
    p.add_argument("--affine-rank", type=cli.positive_int, metavar="R", help="also train a rank-R matrix M: "
                   "x + v + M x")
    p.add_argument("--coldness", type=cli.positive_float, default=SteerConfig.coldness, help="inverse temperature "
                   "of the training loss' probabilities, p = softmax(coldness·logits) (default: %(default)s)")
    p.add_argument("--batch", type=cli.positive_int, metavar="N", help="datapoints per Adam step (default: all of "
                   "them, in one padded batch)")
    p.add_argument("--seed", type=cli.nonneg_int, default=SteerConfig.seed, help="seed of the random initial v "
                   "(default: %(default)s)")
    p.add_argument("--eval-prompts", metavar="FILE", help="held-out prompts, one per line (default: a dozen built-in "
                   "benign requests)")
    p.add_argument("--success", metavar="REGEX", help="a generation counts as a success if this regex matches it "
                   "(default: a refusal pattern for the default run, else the first promoted text literally)")
    p.add_argument("--scale", type=cli.positive_float, default=1.0, help="generate with ±scale·v (default: 1)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=24, help="tokens generated per held-out prompt "
                   "(default: 24)")
    p.add_argument("--out", default="runs/refusal_sv.safetensors", help="where to write the vector (with several "
                   "layers, NAME_layerN.safetensors each); the HTML report goes next to it with .html "
                   "(default: %(default)s)")
    p.add_argument("--gguf", metavar="PATH", help="also write the vector as a llama.cpp control vector (GGUF; "
                   "with several layers, PATH_layerN.gguf each): llama.cpp adds direction.N to the output of block "
                   "N, i.e. minisv's blocks.{N+1}.hook_resid_pre, so --layer must be at least 2; additive only")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--study", choices=sorted(STUDIES), help="run one of the paper's experiments instead, offline, with "
                   "its controls (docs/steering_studies.md): refusal-suppression, misaligned-code or false-info; only "
                   "--model, --device, --seed and --out (whose folder gets study_NAME.html and .safetensors) apply")
    return p.parse_args(argv)


def main(argv=None):
    cli.main(run, parse_args(argv))


def outputs(args):
    """The vector file of each layer, the report and the llama.cpp control vectors, checked (with every input)
    before any work: cli.check_paths."""
    stem, ext = os.path.splitext(args.out)
    if ext.lower() == ".html":
        raise MinisvError(f"--out {args.out}: the vector would overwrite its own HTML report; use .safetensors")
    vectors = {l: args.out if len(args.layer) == 1 else f"{stem}_layer{l}{ext}" for l in args.layer}
    report = stem + ".html"
    controls = {}
    if args.gguf:
        if args.clamp is not None or args.affine_rank:
            raise MinisvError("--gguf: a llama.cpp control vector is only added; it has no clamp or affine form")
        exportable_layers(args.layer)
        gstem, gext = os.path.splitext(args.gguf)
        controls = {l: args.gguf if len(args.layer) == 1 else f"{gstem}_layer{l}{gext}" for l in args.layer}
    inputs = [("--model", cli.model_path(args.model), "any"), ("--train-file", args.train_file, "file"),
              ("--eval-prompts", args.eval_prompts, "file")]
    cli.check_paths(inputs=[i for i in inputs if i[1] is not None],
                    outputs=[*(("--out", p) for p in vectors.values()), ("report", report),
                             *(("--gguf", p) for p in controls.values())])
    return vectors, report, controls


def training_data(args):
    """(prompts, promote, suppress) from the flags and --train-file, before any template: [(prompt, [..], [..])]."""
    default_run = args.promote is None and not args.suppress and not args.train_file
    promote = [DEFAULT_PROMOTE] if default_run else args.promote or []
    prompts = args.prompt or ([] if args.train_file else [DEFAULT_PROMPT])
    if prompts and not promote and not args.suppress:
        raise MinisvError("--prompt needs --promote or --suppress (or put completions in --train-file)")
    data = [(p, promote, args.suppress) for p in prompts]
    data += read_train_file(args.train_file) if args.train_file else []
    for prompt, _, _ in data:
        if not prompt.strip():
            raise MinisvError("a training prompt is empty; give the request to train on (--prompt TEXT)")
    return data, default_run


def read_train_file(path):
    data = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise MinisvError(f"cannot read --train-file {path}: {getattr(e, 'strerror', None) or e}") from None
    for n, line in lines:
        try:
            item = json.loads(line)
            entry = (item["prompt"], *([c] if isinstance(c, str) else list(c)
                                       for c in (item.get("promote", []), item.get("suppress", []))))
            ok = isinstance(entry[0], str) and all(isinstance(c, str) for c in entry[1] + entry[2])
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok or not entry[1] + entry[2]:
            raise MinisvError(f"--train-file {path} line {n}: expected "
                              '{"prompt": text, "promote": text or [texts], "suppress": text or [texts]}')
        data.append(entry)
    if not data:
        raise MinisvError(f"--train-file {path} has no datapoints; write one JSON object a line")
    return data


def settings(args):
    """The SteerConfig of the flags, and the clamp to generate with (None: additive)."""
    clamp_eval = args.clamp if args.clamp is not None or not args.clamp_at_inference else 1.0
    cfg = SteerConfig(lr=args.lr, max_iters=args.max_iters, coldness=args.coldness, target_loss=args.target_loss,
                      target_sum=args.target_sum, max_norm=args.max_norm, starting_norm=args.starting_norm,
                      clamp=None if args.clamp_at_inference else args.clamp, affine_rank=args.affine_rank,
                      batch_size=args.batch, seed=args.seed, chat=not args.raw)
    if cfg.clamp is not None and args.starting_norm == 0:
        raise MinisvError("--clamp trains v̂ = v/‖v‖, undefined for v = 0: give --starting-norm > 0")
    return cfg, clamp_eval


def run(args):
    if args.study:
        return run_study(args)
    start = time.time()
    args.layer = list(dict.fromkeys(args.layer))      # each layer once, in the order given
    vector_paths, report_path, control_paths = outputs(args)
    device = cli.device(args.device)
    available = cli.available_memory(device)          # before the model takes its share
    cfg, clamp_eval = settings(args)
    data, default_run = training_data(args)
    first_promote = next((pro[0] for _, pro, _ in data if pro), None)
    success = args.success or (REFUSAL if default_run else None if first_promote is None else re.escape(first_promote))
    if success:
        success_rate([], success)              # rejects a bad regex before the slow part
    eval_prompts = read_prompts(args.eval_prompts) if args.eval_prompts else HELD_OUT
    print(f"loading {args.model} ...", flush=True)
    model = cli.check_logits(minisv.load(args.model, device=device), args.model)
    for layer in args.layer:
        model.check_layer(layer, "--layer")
    datapoints = [Datapoint(p, promote=pro, suppress=sup) for p, pro, sup in data]
    prompts = eval_prompts + [data[0][0]]
    longest = max(len(prompt_ids(model, render(model, p, cfg.chat))) for p in prompts)
    if longest + args.max_new_tokens > model.cfg.n_ctx:
        raise MinisvError(f"--max-new-tokens {args.max_new_tokens} plus the longest prompt ({longest} tokens) exceeds "
                          f"the model's context of {model.cfg.n_ctx} tokens; lower --max-new-tokens")
    print(f"{args.model}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; {len(datapoints)} training "
          f"prompt(s), {sum(len(d.promote) + len(d.suppress) for d in datapoints)} completion(s)", flush=True)
    cli.check_memory(*memory(model, args, cfg, datapoints, (len(prompts), longest)), available, {
        "optimization": "--batch or --affine-rank", "generation": "--max-new-tokens (or give fewer --eval-prompts)",
        "log-probabilities": "--max-new-tokens (or give fewer --eval-prompts)"})
    print(f"generating on {len(prompts)} prompts unsteered ...", flush=True)
    unsteered = shown(model, compare_generations(model, prompts, None, None, multipliers=(0.0,), chat=cfg.chat,
                                                 max_new_tokens=args.max_new_tokens)[0.0])
    columns, results = [("unsteered", unsteered)], []
    for layer in args.layer:
        result, gens = train_and_generate(model, args, (cfg, clamp_eval), layer, datapoints, prompts,
                                          (vector_paths[layer], control_paths.get(layer)))
        results.append(result)
        tag = "" if len(args.layer) == 1 else f" L{layer}"
        columns += [(f"+{args.scale:g}v{tag}", gens[args.scale]), (f"−{args.scale:g}v{tag}", gens[-args.scale])]
    report(model, args, (cfg, clamp_eval), data, dict(prompts=prompts, columns=columns, results=results,
                                                      success=success), report_path)
    written = [("vector", list(vector_paths.values())), ("llama.cpp control vector", list(control_paths.values())),
               ("report", [report_path])]
    print("; ".join(f"{name}{'s' if len(paths) > 1 else ''} -> {', '.join(paths)}" for name, paths in written if paths)
          + f"; {time.time() - start:.0f}s in all")


def memory(model, args, cfg, datapoints, generation):
    """Estimated peak bytes of the run: held all along, Python with torch and the model (with what loading it
    keeps: the tokenizer, the file's pages); then, one after another, the optimization (every layer's activations
    of a batch of training sequences, kept for the backward pass, and their logits), the generation (the prompts'
    first forward with full logits, and the KV cache) and the log-probabilities (logits of prompt + completion).
    Calibrated with /usr/bin/time -v on the default run."""
    c, (n_prompts, longest), width = model.cfg, generation, model.embed.weight.element_size()
    size = cfg.batch_size or len(datapoints)                     # datapoints per step, one row per completion
    rows = max(sum(len(d.promote) + len(d.suppress) for d in datapoints[i:i + size])
               for i in range(0, len(datapoints), size))
    completion = max(len(prompt_ids(model, t)) for d in datapoints for t in d.promote + d.suppress)
    length = max(len(prompt_ids(model, render(model, d.prompt, cfg.chat))) for d in datapoints) + completion
    per_token = c.n_layers * (14 * c.d_model + 5 * c.d_mlp + 2 * c.n_heads * length) + 4 * c.vocab_size
    # the affine map's factors L, R [r, D] with their gradients and Adam's two moments, and M = LᵀR [D, D]
    affine = (8 * args.affine_rank * c.d_model + 3 * c.d_model ** 2) * 4 if args.affine_rank else 0
    kv_cache = 2 * c.n_layers * n_prompts * (longest + args.max_new_tokens) * c.n_kv_heads * c.d_head * width
    return ({"runtime": cli.RUNTIME_BYTES, "model": cli.model_bytes(model) * 5 // 4},
            {"optimization": rows * length * per_token * 4 + affine,
             "generation": 3 * n_prompts * longest * c.vocab_size * 4 + kv_cache,
             "log-probabilities": 2 * n_prompts * (longest + completion) * c.vocab_size * 4})


def shown(model, texts):
    """Generations as people read them: without the tokenizer's special tokens (BOS, EOS such as <|im_end|>, PAD),
    which are markup the model emits, not text."""
    tok = model.tokenizer
    specials = {tok.token_str(i) for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None} if tok else set()
    for special in specials:
        texts = [t.replace(special, "") for t in texts]
    return texts


def report(model, args, settings, data, outcome, path):
    """Success rates, the console table and the HTML report of a run's outcome (prompts, columns of
    generations, the per-layer results and the success regex)."""
    (cfg, clamp_eval), prompts, columns, results, success = settings, *outcome.values()
    n = len(prompts) - 1
    for r, plus, minus in zip(results, columns[1::2], columns[2::2]):
        r["rates"] = {name.split(" ")[0]: success_rate(texts[:n], success)
                      for name, texts in (columns[0], plus, minus)} if success else {}
    logps = log_probs(model, args, cfg, prompts, data[0], results) if len(results) == 1 else None
    names = prompts[:n] + [f"[training] {data[0][0]}"]
    print_table(names, columns, logps)
    if success:
        print_sweep(results, n, success)
    rule = re.compile(success) if success else None
    described = (f"{'clamp α=' + str(cfg.clamp) if cfg.clamp is not None else 'additive'} training"
                 f"{f', clamp α={clamp_eval:g} at inference' if args.clamp_at_inference else ''}"
                 f"{f', affine rank {cfg.affine_rank}' if cfg.affine_rank else ''}; lr {cfg.lr}, coldness "
                 f"{cfg.coldness}, at most {cfg.max_iters} steps, seed {cfg.seed}; generation: ±{args.scale:g}·v, "
                 f"{args.max_new_tokens} new tokens")
    cli.check_finite([dict(resid_norm=r["resid_norm"], rates=r["rates"]) for r in results] + [logps or []],
                     "the results", "the vectors are written, the report is not")
    page = steering_html(dict(
        about=[f"model {args.model}", described] +
              [f"training prompt: {p!r}; promote {pro!r}; suppress {sup!r}" for p, pro, sup in data[:20]],
        success=success, n_eval=n, layers=results, columns=[name for name, _ in columns],
        rows=[dict(prompt=name, texts=[(t[i], bool(rule and rule.search(t[i]))) for _, t in columns],
                   note=f"{logps[i][0]:.2f} → {logps[i][1]:.2f}" if logps else "") for i, name in enumerate(names)]))
    write_text(path, page)


def train_and_generate(model, args, settings, layer, datapoints, prompts, paths):
    """Optimize the vector of one layer, save it (and its control vector), generate unsteered and with ±scale·v
    -> (summary dict, generations)."""
    (cfg, clamp_eval), (path, control_path) = settings, paths
    resid_norm = residual_norm(model, datapoints[0].prompt, layer, chat=cfg.chat)
    print(f"layer {layer}: steering blocks.{layer}.hook_resid_pre (median residual norm there: {resid_norm:.1f})",
          flush=True)
    t0 = time.time()

    def progress(step, loss, norm):
        print(f"step {step:3d}  loss {loss:8.4f} nats  ‖v‖ {norm:7.2f}  {time.time() - t0:6.1f}s", flush=True)
    vector, info = optimize_vector(model, datapoints, layer, cfg, callback=progress)
    seconds = time.time() - t0
    print(f"stopped ({info['stop']}) after {info['iters']} steps, {seconds / max(info['iters'], 1):.2f} s/step; "
          f"loss {info['loss']:.4f} nats, ‖v‖ {info['norm']:.2f}")
    matrix = info.get("matrix")
    cli.check_finite(dict(loss=info["loss"], norm=info["norm"], vector=vector, matrix=matrix), f"layer {layer}",
                     "its vector was not written")
    save_vector(path, vector, layer, clamp=clamp_eval, matrix=matrix, model=args.model, scale=args.scale,
                train_clamp=cfg.clamp, prompt=datapoints[0].prompt, chat_template=cfg.chat,
                promote=datapoints[0].promote, suppress=datapoints[0].suppress, n_datapoints=len(datapoints),
                loss=info["loss"], iters=info["iters"], stop=info["stop"], lr=cfg.lr, coldness=cfg.coldness,
                seed=cfg.seed)
    if control_path:
        save_control_vector(model, vector, layer, control_path)
    print(f"generating on {len(prompts)} prompts with ±{args.scale:g}·v ...", flush=True)
    gens = compare_generations(model, prompts, vector, layer, multipliers=(args.scale, -args.scale),
                               chat=cfg.chat, clamp=clamp_eval, matrix=matrix, max_new_tokens=args.max_new_tokens)
    return dict(layer=layer, loss=info["loss"], iters=info["iters"], stop=info["stop"], norm=info["norm"],
                resid_norm=resid_norm, vector=vector, matrix=matrix, clamp=clamp_eval, history=info["history"]), \
        {m: shown(model, texts) for m, texts in gens.items()}


def log_probs(model, args, cfg, prompts, datapoint, results):
    """log p of the first promoted completion's training tokens appended to each prompt, unsteered -> steered."""
    prompt, promote, _ = datapoint
    if not promote:
        return None
    rendered = render(model, prompt, cfg.chat)
    completion = prompt_ids(model, rendered + promote[0])[len(prompt_ids(model, rendered)):]
    ids = [prompt_ids(model, render(model, p, cfg.chat)) for p in prompts]
    r = results[0]
    plain = completion_logprob(model, ids, completion)
    with steer(model, r["vector"], r["layer"], multiplier=args.scale, clamp=r["clamp"], matrix=r["matrix"]):
        return list(zip(plain, completion_logprob(model, ids, completion)))


def read_prompts(path):
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise MinisvError(f"cannot read --eval-prompts {path}: {getattr(e, 'strerror', None) or e}") from None
    if not prompts:
        raise MinisvError(f"--eval-prompts {path} has no prompts; write one per line")
    return prompts


def one_line(text, width):
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def print_table(prompts, columns, logps):
    width = 34 if len(columns) <= 3 else 20
    head = f"{'prompt':{width}} | " + " | ".join(f"{name:{width}}" for name, _ in columns)
    print(head + (" | log p(promote) unsteered → +v" if logps else ""))
    print("-" * len(head))
    for i, prompt in enumerate(prompts):
        cells = [one_line(prompt, width)] + [one_line(t[i], width) for _, t in columns]
        row = " | ".join(f"{c:{width}}" for c in cells)
        print(row + (f" | {logps[i][0]:8.2f} → {logps[i][1]:7.2f}" if logps else ""))


def print_sweep(results, n, success):
    print(f"success on the {n} held-out prompts (regex {success}):")
    for r in results:
        print(f"  layer {r['layer']:2d}  loss {r['loss']:8.4f}  ‖v‖ {r['norm']:7.2f}  " +
              ", ".join(f"{name} {round(rate * n)}/{n}" for name, rate in r["rates"].items()))


if __name__ == "__main__":
    main()
