"""Helpers shared by test files: a fake Hugging Face hub on 127.0.0.1 (the `server` fixture), checks that a hostile
input ends in one line (`refused`), GGUF writers.

The fake hub answers like huggingface.co: X-Repo-Commit and an ETag (the git blob sha1) on every file, and for
LFS files (*.safetensors here) a 302 to a "CDN" path carrying X-Linked-Etag (the sha256) and X-Linked-Size.
"""

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from minisv.errors import MinisvError

MAIN, STEP, SHARDED = (hashlib.sha1(name).hexdigest() for name in (b"main", b"step3000", b"sharded"))
WEIGHTS = bytes(range(256)) * 16  # 4 KiB standing in for a safetensors file
SHARDS = {"model-00001-of-00002.safetensors": b"first shard", "model-00002-of-00002.safetensors": b"second shard"}
# repo -> {revision or commit: commit}, and commit -> files; *.safetensors go through the "CDN" like LFS files.
REFS = {"org/tiny": {"main": MAIN, MAIN: MAIN, "step3000": STEP, STEP: STEP},
        "org/sharded": {"main": SHARDED, SHARDED: SHARDED}}
FILES = {
    MAIN: {"config.json": b'{"n_layer": 2}', "model.safetensors": WEIGHTS, "tokenizer.json": b'{"model": {}}'},
    STEP: {"config.json": b'{"n_layer": 2, "step": 3000}', "model.safetensors": WEIGHTS[::-1]},
    SHARDED: {"config.json": b"{}", **SHARDS, "model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode()},
}
def git_sha1(data):
    """The hub's ETag of a file kept in git: its git blob hash (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


EXPECTED_TINY = ["config.json", "model.safetensors", "tokenizer.json"]
ALL_NAMES = ["config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
             "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json"]


class FakeHub(BaseHTTPRequestHandler):
    requests: list  # (method, path, Authorization header), shared by the whole server
    routes: dict    # request path -> function(handler, body) answering it instead (a hostile hub)
    cut = False     # send only half of each CDN body, then hang up

    def log_message(self, *args):
        pass

    def do_HEAD(self):  # huggingface_hub asks for metadata with HEAD
        self.do_GET(body=False)

    def do_GET(self, body=True):
        self.requests.append((self.command, self.path, self.headers.get("Authorization")))
        if self.path in self.routes:
            return self.routes[self.path](self, body)
        parts = unquote(self.path).lstrip("/").split("/")
        if parts[0] == "cdn":  # the CDN: a plain file server that knows nothing about commits
            data = next(f[n] for f in FILES.values() for n in f if hashlib.sha256(f[n]).hexdigest() == parts[1])
            return self.reply(200, data[: len(data) // 2] if self.cut else data, body, {"ETag": '"s3-etag"'},
                              length=len(data))
        repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo == "org/old-name":  # a renamed repo: the hub redirects on its own host, metadata comes after
            return self.reply(307, b"", body, {"Location": self.path.replace(repo, "org/tiny")})
        if repo == "org/gated":  # what the hub says to a request without a token that may see the model
            return self.reply(401, b"", body, {"X-Error-Code": "GatedRepo"})
        if repo not in REFS:
            return self.reply(404, b"", body, {"X-Error-Code": "RepositoryNotFound"})
        if revision not in REFS[repo]:
            return self.reply(404, b"", body, {"X-Error-Code": "RevisionNotFound"})
        commit = REFS[repo][revision]
        data = FILES[commit].get(name)
        if data is None:
            return self.reply(404, b"", body, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        if name.endswith(".safetensors"):  # the hub's 302 to a CDN on another host name, with the metadata on it
            sha = hashlib.sha256(data).hexdigest()
            location = f"http://localhost:{self.server.server_port}/cdn/{sha}"
            return self.reply(302, b"", body, {"Location": location, "X-Repo-Commit": commit, "ETag": 'W/"pointer"',
                                               "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
        self.reply(200, data, body, {"X-Repo-Commit": commit, "ETag": f'"{git_sha1(data)}"'})

    def reply(self, code, data, body, headers, length=None):
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(data)
        self.close_connection = True


@pytest.fixture
def server(monkeypatch, tmp_path):
    handler = type("Handler", (FakeHub,), {"requests": [], "routes": {}})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_port}"
    httpd.handler = handler
    monkeypatch.setenv("HF_ENDPOINT", httpd.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


# --- hostile input ---------------------------------------------------------------------------------------

@contextmanager
def deadline(seconds=20):
    """Fail, rather than hang, when the body takes longer than `seconds`."""
    def expire(*_):
        raise TimeoutError(f"took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(match, call, *args, **kwargs):
    """call(*args) raises a one-line MinisvError matching `match`, within the deadline; returns the message."""
    with deadline(), pytest.raises(MinisvError, match=match) as e:
        call(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def loads_or_refuses(call, *args):
    """A corrupt but possibly harmless input: either it loads, or it is a one-line MinisvError; nothing else."""
    try:
        with deadline():
            call(*args)
    except MinisvError as e:
        assert "\n" not in str(e)


def limited(code, headroom_mb=150):
    """Run `code` in a fresh Python whose address space may grow only `headroom_mb` past what torch and minisv
    take; returns what it prints. A file whose sizes were believed would be allocated there, and fail there."""
    prelude = textwrap.dedent(f"""
        import json, resource, torch
        import minisv.gguf, minisv.unpickle
        from minisv.errors import MinisvError
        torch.set_num_threads(1)
        size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + ({headroom_mb} << 20), resource.RLIM_INFINITY))
        """)
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[1])
    return out.stdout.strip() + out.stderr.strip()[-300:]


# --- GGUF -----------------------------------------------------------------------------------------------

def write_gguf(path, tensors, metadata, alignment=None, arch="test"):
    """Write a GGUF with the `gguf` package (llama.cpp's own writer). tensors: name -> (float32 array, GGML type);
    metadata: key -> (value, type, array item type). Returns name -> the reference's float32 dequantization."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch=arch)
    if alignment:
        w.add_custom_alignment(alignment)
    for key, (value, vtype, sub_type) in metadata.items():
        w.add_key_value(key, value, vtype, sub_type)
    expected = {}
    for name, (data, qtype) in tensors.items():
        Q = gguf.GGMLQuantizationType
        stored = data.astype(np.float16) if qtype == Q.F16 else gguf.quants.quantize(data, qtype)
        w.add_tensor(name, stored, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        expected[name] = gguf.quants.dequantize(stored, qtype).reshape(data.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


# llama.cpp's names for the tensors of a Llama-style transformers model (blk.{layer}. before the per-layer ones)
GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w, n_head):
    """llama.cpp's converter (convert_hf_to_gguf.py LlamaModel.permute): each head's rows (first half, second
    half) -> interleaved rotary pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_style_gguf(path, ref, arch):
    """A float32 GGUF of the tiny transformers model `ref` (Llama or Qwen2) laid out as llama.cpp's converter
    writes it: its hyperparameters, a 96-token BPE vocabulary ("a", "b", "ab", t3...), llama.cpp's tensor names,
    q/k rows permuted for arch "llama" (not for qwen2), and no output.weight when the embeddings are tied."""
    import gguf
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(3, cfg.vocab_size)])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(1)
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        module, _, leaf = name.rpartition(".")
        t = t.numpy().astype(np.float32)
        if module.startswith("model.layers."):
            layer, sub = module.removeprefix("model.layers.").split(".", 1)
            if arch == "llama" and sub in ("self_attn.q_proj", "self_attn.k_proj"):
                t = llama_cpp_permute(t, cfg.num_attention_heads if sub.endswith("q_proj") else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{layer}.{GGUF_NAMES[sub]}.{leaf}", t)
        else:
            w.add_tensor(f"{GGUF_NAMES[module]}.{leaf}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
