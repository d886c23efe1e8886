"""Optimize a one-shot steering vector on ONE prompt, then show how it transfers to prompts it never saw.

The default run needs no network and takes a few minutes on 2 CPU cores: on SmolLM2-135M-Instruct it finds a
vector at layer 4 that makes the model answer one benign request ("Give me a recipe for pancakes.") with a
refusal, then generates on a dozen different benign requests unsteered, with +v and with −v, and counts the
refusals. The vector is saved as .safetensors, with an HTML report of the generations next to it.
"""
import argparse
import html
import os
import re
import sys
import time

import minisv
from minisv.atomic import write_text
from minisv.errors import MinisvError
from minisv.steering import (Datapoint, compare_generations, completion_logprob, optimize_vector, residual_norm,
                             save_vector, steer, success_rate)

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
    p.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help="the one training prompt, a user message; the chat "
                   "template is applied for chat models unless --raw (default: %(default)r)")
    p.add_argument("--raw", action="store_true", help="use --prompt and the eval prompts as raw text, no chat template")
    p.add_argument("--promote", action="append", metavar="TEXT", help="a completion to make likely; repeatable "
                   f"(default, if neither --promote nor --suppress is given: {DEFAULT_PROMOTE!r})")
    p.add_argument("--suppress", action="append", default=[], metavar="TEXT", help="a completion to make unlikely; repeatable")
    p.add_argument("--layer", type=int, default=4, metavar="N", help="add v to the residual stream entering this block, 0-based "
                   "(default: 4)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (default: 0.1)")
    p.add_argument("--max-iters", type=int, default=20, help="at most this many Adam steps (default: 20)")
    p.add_argument("--target-loss", type=float, help="stop once the summed loss (nats) is at most this")
    p.add_argument("--max-norm", type=float, help="project ‖v‖ back to this after each step (default: no bound)")
    p.add_argument("--starting-norm", type=float, default=1.0, help="norm of the random initial v (default: 1)")
    p.add_argument("--clamp", type=float, metavar="ALPHA", help="clamp instead of add, in training and generation: "
                   "x − (x·v̂)v̂ + ALPHA·v")
    p.add_argument("--coldness", type=float, default=0.7, help="inverse temperature of the training loss' "
                   "probabilities, p = softmax(coldness·logits) (default: 0.7)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial v (default: 0)")
    p.add_argument("--eval-prompts", metavar="FILE", help="held-out prompts, one per line (default: a dozen built-in "
                   "benign requests)")
    p.add_argument("--success", metavar="REGEX", help="a generation counts as a success if this regex matches it "
                   "(default: a refusal pattern for the default run, else the first --promote text literally)")
    p.add_argument("--scale", type=float, default=1.0, help="generate with ±scale·v (default: 1)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per held-out prompt (default: 24)")
    p.add_argument("--out", default="runs/refusal_sv.safetensors", help="where to write the vector; the HTML report goes "
                   "next to it with .html (default: %(default)s)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except MinisvError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def run(args):
    start = time.time()
    default_run = args.promote is None and not args.suppress
    promote = [DEFAULT_PROMOTE] if default_run else args.promote or []
    success = args.success or (REFUSAL if default_run else None if not promote else re.escape(promote[0]))
    if success:
        success_rate([], success)              # rejects a bad regex before the slow part
    if args.scale <= 0 or args.max_iters < 0 or args.max_new_tokens < 1:
        raise MinisvError("--scale and --max-new-tokens must be positive and --max-iters at least 0")
    eval_prompts = read_prompts(args.eval_prompts) if args.eval_prompts else HELD_OUT
    print(f"loading {args.model} ...", flush=True)
    model = minisv.load(args.model, device=args.device)
    chat = not args.raw and model.tokenizer is not None and model.tokenizer.is_chat
    template = model.tokenizer.chat if chat else (lambda text: text)
    dp = Datapoint(template(args.prompt), promote=promote, suppress=args.suppress)
    resid_norm = residual_norm(model, dp.prompt, args.layer)
    print(f"{args.model}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; steering "
          f"blocks.{args.layer}.hook_resid_pre (median residual norm there: {resid_norm:.1f})", flush=True)

    def progress(step, loss, norm):
        print(f"step {step:3d}  loss {loss:8.4f} nats  ‖v‖ {norm:7.2f}  {time.time() - t0:6.1f}s", flush=True)
    t0 = time.time()
    vector, info = optimize_vector(model, [dp], args.layer, lr=args.lr, max_iters=args.max_iters,
                                   coldness=args.coldness, target_loss=args.target_loss, max_norm=args.max_norm,
                                   starting_norm=args.starting_norm, clamp=args.clamp, seed=args.seed,
                                   callback=progress)
    seconds = time.time() - t0
    print(f"stopped ({info['stop']}) after {info['iters']} steps, {seconds / max(info['iters'], 1):.2f} s/step; "
          f"loss {info['loss']:.4f} nats, ‖v‖ {info['norm']:.2f}")
    save_vector(args.out, vector, args.layer, model=args.model, clamp=args.clamp, prompt=args.prompt,
                chat_template=chat, promote=promote, suppress=args.suppress, loss=info["loss"], iters=info["iters"],
                lr=args.lr, coldness=args.coldness, seed=args.seed)

    print(f"generating on {len(eval_prompts)} held-out prompts (and the training prompt): unsteered, "
          f"+{args.scale:g}v, −{args.scale:g}v ...", flush=True)
    prompts = [template(p) for p in eval_prompts]
    gens = compare_generations(model, prompts + [dp.prompt], vector, args.layer, multipliers=(0.0, args.scale, -args.scale),
                               clamp=args.clamp, max_new_tokens=args.max_new_tokens)
    columns = [("unsteered", gens[0.0]), (f"+{args.scale:g}v", gens[args.scale]), (f"−{args.scale:g}v", gens[-args.scale])]
    logps = None
    if promote:     # log p of the first promoted completion's training tokens, appended to each held-out prompt
        tok = model.tokenizer
        ids = [tok.encode(p) for p in prompts]
        completion = tok.encode(dp.prompt + promote[0])[len(tok.encode(dp.prompt)):]
        plain = completion_logprob(model, ids, completion)
        with steer(model, vector, args.layer, multiplier=args.scale, clamp=args.clamp):
            logps = list(zip(plain, completion_logprob(model, ids, completion)))
    rates = {name: success_rate(texts[:-1], success) for name, texts in columns} if success else None
    print_table(eval_prompts + [f"[training] {args.prompt}"], columns, logps)
    if rates:
        print(f"success on the {len(eval_prompts)} held-out prompts: " +
              ", ".join(f"{name} {rate * len(eval_prompts):.0f}" for name, rate in rates.items()) + f"  (regex {success})")
    report = os.path.splitext(args.out)[0] + ".html"
    write_report(report, args, info, promote, eval_prompts, columns, logps, rates, success, resid_norm)
    print(f"vector -> {args.out}, report -> {report}; {time.time() - start:.0f}s in all")


def read_prompts(path):
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise MinisvError(f"cannot read --eval-prompts {path}: {e.strerror}") from None
    if not prompts:
        raise MinisvError(f"--eval-prompts {path} has no prompts; write one per line")
    return prompts


def one_line(text, width):
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def print_table(prompts, columns, logps):
    width = 34
    head = f"{'prompt':{width}} | " + " | ".join(f"{name:{width}}" for name, _ in columns)
    print(head + (" | log p(promote) unsteered → +v" if logps else ""))
    print("-" * len(head))
    for i, prompt in enumerate(prompts):
        row = f"{one_line(prompt, width):{width}} | " + " | ".join(f"{one_line(t[i], width):{width}}" for _, t in columns)
        print(row + (f" | {logps[i][0]:8.2f} → {logps[i][1]:7.2f}" if logps and i < len(logps) else ""))


def write_report(path, args, info, promote, prompts, columns, logps, rates, success, resid_norm):
    """A self-contained HTML page (inline CSS, every string escaped), written atomically."""
    e = html.escape
    rule = re.compile(success) if success else None
    rows = []
    for i, prompt in enumerate(prompts + [f"[training prompt] {args.prompt}"]):
        lp = f"{logps[i][0]:.2f} → {logps[i][1]:.2f}" if logps and i < len(logps) else ""
        cells = "".join(f"<td{' class=hit' if rule and rule.search(t[i]) else ''}>{e(t[i])}</td>" for _, t in columns)
        rows.append(f"<tr><td>{e(prompt)}</td>{cells}<td>{e(lp)}</td></tr>")
    summary = ", ".join(f"{e(name)}: {rate * len(prompts):.0f}/{len(prompts)}" for name, rate in rates.items()) \
        if rates else "no success rule"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>steering vector report</title><style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; white-space: pre-wrap; max-width: 28em; }}
th {{ background: #eee; }} code {{ background: #f4f4f4; }} .hit {{ background: #fde2e2; }}</style></head><body>
<h1>One-shot steering vector</h1>
<p>model <code>{e(args.model)}</code>, layer {args.layer} (median residual norm {resid_norm:.1f}),
{'clamp α=' + e(str(args.clamp)) if args.clamp is not None else 'additive'}, lr {args.lr}, {info['iters']} steps
({e(info['stop'])}), final loss {info['loss']:.4f} nats, ‖v‖ {info['norm']:.2f}</p>
<p>training prompt: <code>{e(args.prompt)}</code>; promote: {e(repr(promote))}; suppress: {e(repr(args.suppress))}</p>
<p>success rule <code>{e(success or '')}</code> (matches shaded) on {len(prompts)} held-out prompts — {summary}</p>
<table><tr><th>prompt</th>{''.join(f'<th>{e(name)}</th>' for name, _ in columns)}<th>log p(promote) unsteered → +v</th></tr>
{chr(10).join(rows)}</table></body></html>
"""
    write_text(path, page)


if __name__ == "__main__":
    main()
