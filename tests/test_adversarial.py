"""Hostile inputs, built here: TorchScript and pickle archives that would run code, a malicious hub on 127.0.0.1,
and crafted GGUF, config.json and transcoder files. Each must end in a one-line MinisvError (or a correct load),
quickly, without running code (no marker file), without writing outside the allowed directories, and without
changing what was already there."""
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Tuple

import numpy as np
import pytest
import torch
from helpers import FILES, MAIN, REFS, WEIGHTS, git_sha1, loads_or_refuses, refused, server, write_gguf  # noqa: F401
from safetensors.torch import save_file

import minisv
from minisv import hub, unpickle
from minisv.atomic import atomic_write, write_text
from minisv import formats
from minisv.formats import import_released
from minisv.transcoder import Transcoder, TranscoderConfig


def tree(path):
    """Every file under `path` with its bytes (links followed): to check that nothing changed."""
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- code in torch.save files
class Scripted(torch.nn.Module):
    """Loading this TorchScript module runs its __setstate__, which writes a file (torch.save is a TorchScript op)."""

    def __init__(self, marker: str):
        super().__init__()
        self.x = torch.zeros(10000)   # as many bytes as the tiny model's weights, so only the code is wrong
        self.marker = marker

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return self.x, self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.x, self.marker, self.training = state
        torch.save(self.x, self.marker)

    def forward(self, x):
        return x + self.x


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):          # unpickling this calls os.system("touch MARKER")
        return os.system, (f"touch {self.marker}",)


def hf_dir(path, tiny, weights=None):
    """A Hugging Face directory with the tiny model's config.json and, as pytorch_model.bin, the given file."""
    path.mkdir(exist_ok=True)
    (path / "config.json").write_bytes((tiny[1] / "config.json").read_bytes())
    if weights is not None:
        (path / "pytorch_model.bin").write_bytes(weights.read_bytes())
    return path


@pytest.fixture
def tiny_llama(tiny_one):
    return tiny_one


def test_torchscript_archive_is_refused_before_torch_sees_it(tmp_path, tiny_llama):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.jit.script(Scripted(str(marker))).save(str(evil))
    torch.jit.load(str(evil))      # the archive really runs code when torch loads it...
    assert marker.exists()
    marker.unlink()
    for call, arg in [(import_released, evil), (unpickle.load, evil),      # unpickle.load: training checkpoints
                      (minisv.load, hf_dir(tmp_path / "model", tiny_llama, evil))]:
        refused("TorchScript archive", call, str(arg))
        assert not marker.exists(), call  # ...but not when minisv does


@pytest.mark.parametrize("forced", [None, "1"])
def test_pickled_calls_are_refused_everywhere(tmp_path, tiny_llama, monkeypatch, forced):
    if forced:
        monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", forced)
    marker = tmp_path / "pwned"
    state = {"cfg": Payload(marker), "state_dict": {"W_enc": torch.zeros(100, 100)}}
    for zipped in (True, False):
        evil = tmp_path / f"evil{zipped}.pt"
        torch.save(state, evil, _use_new_zipfile_serialization=zipped)
        for call, arg in [(import_released, evil), (unpickle.load, evil),
                          (minisv.load, hf_dir(tmp_path / "model", tiny_llama, evil))]:
            refused(r"refusing to load this pickle: it calls (posix|os|nt)\.system", call, str(arg))
            assert not marker.exists()
    torch.save(state, tmp_path / "cfg.pt")     # an old tar-format file extracts members to disk: not even opened
    tar = tmp_path / "old.tar"
    subprocess.run(["tar", "-cf", str(tar), "-C", str(tmp_path), "cfg.pt"], check=True)
    refused("not a torch.save file", unpickle.load, str(tar))


def test_legacy_pytorch_model_bin_loads(tmp_path, tiny):
    """Checkpoints written before torch 1.6 are a plain pickle stream, which cannot be memory-mapped."""
    family, path, ref = tiny
    from safetensors.torch import load_file
    model_dir = hf_dir(tmp_path / "legacy", tiny)
    torch.save(load_file(path / "model.safetensors"), model_dir / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    model = minisv.load(str(model_dir), device="cpu")
    x = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


class RunnerConfig:
    """Stands in for sae_lens' config class, which a released transcoder file pickles by reference."""

    def __init__(self, hook_point):
        self.hook_point = hook_point


def test_torch_force_weights_only_load_leaves_minisv_files_readable(tmp_path, tiny_llama, monkeypatch):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes torch.load refuse every pickle module, minisv's too; that one runs
    no code either, so files load as without the variable (the hostile ones: test above), and it stays set."""
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    sd = dict(W_enc=torch.randn(16, 64), b_enc=torch.zeros(64), W_dec=torch.randn(64, 16), b_dec=torch.zeros(16),
              b_dec_out=torch.ones(16))
    torch.save({"state_dict": sd, "cfg": RunnerConfig("blocks.3.ln2.hook_normalized")}, tmp_path / "released.pt")
    tc = import_released(str(tmp_path / "released.pt"))
    assert tc.cfg.layer == 3 and torch.equal(tc.W_dec.detach(), sd["W_dec"])
    _, path, ref = tiny_llama
    from safetensors.torch import load_file
    for zipped in (True, False):
        model_dir = hf_dir(tmp_path / f"bin{zipped}", tiny_llama)
        torch.save(load_file(path / "model.safetensors"), model_dir / "pytorch_model.bin",
                   _use_new_zipfile_serialization=zipped)
        x = torch.arange(10)[None]
        with torch.no_grad():
            torch.testing.assert_close(minisv.load(str(model_dir), device="cpu")(x), ref(x).logits, atol=1e-4,
                                       rtol=1e-4)
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"


# ------------------------------------------------------------------------- a hostile hub
def answer(code, data=b"", length=True, pace=0.0, **headers):
    """A route for the fake hub: reply with `code`, `data` and headers (names with '_' for '-'); pace > 0 sends
    the body one byte every `pace` seconds."""
    def reply(handler, body):
        handler.send_response(code)
        for key, value in headers.items():
            handler.send_header(key.replace("_", "-"), value)
        if length:
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        try:
            step = 1 if pace else 1 << 16
            for start in range(0, len(data), step) if body else ():
                handler.wfile.write(data[start:start + step])
                time.sleep(pace)
        except (BrokenPipeError, ConnectionResetError):
            pass    # the client hung up, as it should on a body that never ends
        handler.close_connection = True
    return reply


def file_answer(data):
    """A small file as the hub sends it: its commit and its git blob sha1 as ETag."""
    return answer(200, data, X_Repo_Commit=MAIN, ETag=f'"{git_sha1(data)}"')


def cdn(server):
    """The fake hub's CDN, on another host name (so the hub's headers on the redirect are the ones that count)."""
    return f"http://localhost:{server.server_port}/cdn"


CONFIG_PATH, WEIGHTS_PATH = "/org/tiny/resolve/main/config.json", f"/org/tiny/resolve/{MAIN}/model.safetensors"


def test_redirects_off_http_are_refused(server, tmp_path, monkeypatch):
    server.handler.routes[CONFIG_PATH] = answer(302, Location="file:///etc/hostname", X_Repo_Commit=MAIN,
                                                ETag=f'"{git_sha1(b"x")}"')
    refused(r"redirected to 'file:///etc/hostname'; refused: only http\(s\) redirects", hub.snapshot, "org/tiny")
    assert not (tmp_path / "models--org--tiny" / "blobs").exists()
    monkeypatch.setenv("HF_ENDPOINT", "file:///etc")
    refused("HF_ENDPOINT='file:///etc' is not an http", hub.snapshot, "org/tiny")


def test_bodies_are_capped_and_checked_against_the_declared_size(server, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "_MAX_SMALL", 1 << 20)
    endless = b"{" + b" " * (256 << 20)    # 256 MB without a Content-Length: endless, as far as 1 MB is concerned
    server.handler.routes[CONFIG_PATH] = answer(200, endless, length=False, X_Repo_Commit=MAIN,
                                                ETag=f'"{git_sha1(b"{}")}"')
    refused(r"config.json sent more than the 1048576 bytes allowed without a declared size", hub.snapshot, "org/tiny")
    server.handler.routes[CONFIG_PATH] = answer(200, b"{}", length=False, X_Repo_Commit=MAIN,
                                                ETag=f'"{git_sha1(b"{}")}"', Content_Length=str(10 ** 12))
    refused(r"declares 1000000000000 bytes for config.json, too large", hub.snapshot, "org/tiny")
    del server.handler.routes[CONFIG_PATH]
    sha = hashlib.sha256(WEIGHTS).hexdigest()   # the hub's own record of an LFS file's size disagrees with the CDN
    server.handler.routes[WEIGHTS_PATH] = answer(302, Location=f"{cdn(server)}/{sha}", X_Repo_Commit=MAIN,
                                                 X_Linked_Etag=f'"{sha}"', X_Linked_Size=str(len(WEIGHTS) + 1))
    refused(rf"model.safetensors stopped after {len(WEIGHTS)} of {len(WEIGHTS) + 1} bytes", hub.snapshot, "org/tiny")
    assert {p.name for p in (tmp_path / "models--org--tiny" / "blobs").iterdir()} == {git_sha1(FILES[MAIN]["config.json"])}


def test_a_dripping_server_meets_a_deadline(server, tmp_path, monkeypatch):
    """One byte every 0.1 s never trips the 30 s read timeout; the whole file must still come in time."""
    monkeypatch.setattr(hub, "_MIN_SECONDS", 0.5)
    monkeypatch.setattr(hub, "_MIN_RATE", 28)   # 14 bytes -> 0.5 s more: 1 s in all
    data = FILES[MAIN]["config.json"]           # 14 bytes: 1.4 s at this pace
    server.handler.routes[CONFIG_PATH] = answer(200, data, pace=0.1, X_Repo_Commit=MAIN, ETag=f'"{git_sha1(data)}"')
    message = refused(r"download of config.json was still at byte \d+ after 1 s: the server is stalling",
                      hub.snapshot, "org/tiny")
    assert int(message.split("at byte ")[1].split()[0]) < 14   # cut off on time, not once all had come
    assert not any(tmp_path.glob("models--org--tiny/blobs/*"))
    del server.handler.routes[CONFIG_PATH]      # an honest server fits in the same deadline
    assert (hub.snapshot("org/tiny") / "config.json").read_bytes() == data


def test_content_must_match_its_hash_and_json_must_parse(server, tmp_path):
    repo = tmp_path / "models--org--tiny"
    server.handler.routes[CONFIG_PATH] = answer(200, b'{"n_layer": 3}', X_Repo_Commit=MAIN,
                                                ETag=f'"{git_sha1(FILES[MAIN]["config.json"])}"')
    refused(r"config.json is corrupt: its hash is [0-9a-f]{40}, the hub says", hub.snapshot, "org/tiny")
    server.handler.routes[CONFIG_PATH] = file_answer(b'{"n_layer": 3')
    refused(r"the download of config.json: not valid JSON", hub.snapshot, "org/tiny")
    assert not (repo / "refs").exists() and not list(repo.rglob("*config.json"))
    del server.handler.routes[CONFIG_PATH]
    other = hashlib.sha256(b"something else").hexdigest()
    server.handler.routes[WEIGHTS_PATH] = answer(
        302, Location=f"{cdn(server)}/{hashlib.sha256(WEIGHTS).hexdigest()}", X_Repo_Commit=MAIN,
        X_Linked_Etag=f'"{other}"', X_Linked_Size=str(len(WEIGHTS)))
    refused(rf"model.safetensors is corrupt: its hash is {hashlib.sha256(WEIGHTS).hexdigest()}, the hub says {other}",
            hub.snapshot, "org/tiny")
    assert not (repo / "blobs" / other).exists()
    del server.handler.routes[WEIGHTS_PATH]     # a rerun against an honest hub trusts nothing from before
    assert (hub.snapshot("org/tiny") / "model.safetensors").read_bytes() == WEIGHTS


@pytest.mark.parametrize("revision", [".", "..", "./x", "a/../b", "a//b", "x/", "/x", "x.lock", "a@{1}", "a b",
                                      "a:b", "a~1", "a\\b", "@", ""])
def test_bad_revisions_write_nothing(server, tmp_path, monkeypatch, revision):
    monkeypatch.setitem(REFS["org/tiny"], revision, MAIN)  # even a hub (or proxy) that answers them
    refused("is not a revision", hub.snapshot, "org/tiny", revision)
    refused("is not a revision|unknown model|neither a model directory", minisv.load, f"org/tiny@{revision}")
    assert list(tmp_path.iterdir()) == [] and server.handler.requests == []


@pytest.mark.parametrize("repo_id", ["org/modèl", "org/a--b", "org/x.git", "org/.x", "a" * 97])
def test_repo_ids_follow_huggingface_hub_rules(server, repo_id):
    refused("is not a Hugging Face model id", hub.snapshot, repo_id)
    assert server.handler.requests == []


def test_shard_names_are_quoted_and_contained(server, tmp_path, monkeypatch):
    commit = hashlib.sha1(b"unicode").hexdigest()
    shards = {"modèl-1.safetensors": b"first", "sub dir/ü 2.safetensors": b"second"}
    index = {"weight_map": {"a": "modèl-1.safetensors", "b": "sub dir/ü 2.safetensors"}}
    monkeypatch.setitem(REFS, "org/unicode", {"main": commit, commit: commit})
    monkeypatch.setitem(FILES, commit, {"config.json": b"{}", **shards,
                                        "model.safetensors.index.json": json.dumps(index).encode()})
    path = hub.snapshot("org/unicode")
    assert {name: (path / name).read_bytes() for name in shards} == shards
    before = tree(tmp_path)
    for bad in ("../../../outside.safetensors", "../../../../outside.safetensors", "/etc/passwd",
                "a/../../x.safetensors", "a\\..\\x", ""):
        bad_commit = hashlib.sha1(bad.encode()).hexdigest()   # each index at a commit of its own
        REFS["org/unicode"][bad_commit] = bad_commit
        FILES[bad_commit] = {"config.json": b"{}", "model.safetensors.index.json":
                             json.dumps({"weight_map": {"a": bad}}).encode()}
        refused("is not a file inside its directory", hub.snapshot, "org/unicode", bad_commit)
    assert not (tmp_path / "outside.safetensors").exists() and not (tmp_path.parent / "outside.safetensors").exists()
    after = tree(tmp_path)
    assert {p: after.get(p) for p in before} == before


def test_local_index_cannot_reach_outside_the_model_directory(tmp_path, tiny_llama):
    _, path, _ = tiny_llama
    (tmp_path / "outside.safetensors").write_bytes((path / "model.safetensors").read_bytes())  # a valid checkpoint
    model_dir = hf_dir(tmp_path / "model", tiny_llama)
    for bad in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "/etc/passwd"):
        (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": bad}}))
        refused("is not a file inside its directory", minisv.load, str(model_dir))


def test_a_damaged_ref_is_resolved_again(server, tmp_path):
    ref = tmp_path / "models--org--tiny" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("../../../elsewhere")
    assert hub.snapshot("org/tiny") == tmp_path / "models--org--tiny" / "snapshots" / MAIN
    assert ref.read_text() == MAIN


def test_a_failed_download_changes_nothing_already_cached(server, tmp_path):
    hub.snapshot("org/tiny")
    before = tree(tmp_path)
    server.handler.routes["/org/tiny/resolve/step3000/config.json"] = answer(302, Location="file:///etc/passwd")
    refused("refused: only http", hub.snapshot, "org/tiny", "step3000")
    server.handler.routes[f"/org/tiny/resolve/{MAIN}/config.json"] = file_answer(b"{}")  # another body, same path
    hub.snapshot("org/tiny", MAIN)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------- crafted model files
def byte_tokens():
    """GPT-2's printable stand-ins for the 256 byte values: a byte-level BPE vocabulary without merges."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def tiny_gguf(path, changes=()):
    """A 2-layer llama GGUF (d_model 32, 4 heads, 2 kv heads, d_mlp 64, 257 tokens) with metadata changes:
    key -> (value, GGUF type[, GGUF type of an array's items]), or None to drop the key."""
    from gguf import GGMLQuantizationType as Q, GGUFValueType as V
    metadata = {"llama.block_count": (2, V.UINT32), "llama.embedding_length": (32, V.UINT32),
                "llama.attention.head_count": (4, V.UINT32), "llama.attention.head_count_kv": (2, V.UINT32),
                "llama.feed_forward_length": (64, V.UINT32), "llama.context_length": (64, V.UINT32),
                "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32), "llama.rope.freq_base": (1e4, V.FLOAT32),
                "tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.merges": (["Ā ā"], V.ARRAY, V.STRING),
                "tokenizer.ggml.tokens": (byte_tokens() + ["Āā"], V.ARRAY, V.STRING)}
    metadata.update(changes)
    metadata = {k: (*v, None)[:3] for k, v in metadata.items() if v is not None}
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (257, 32), "output_norm.weight": (32,)}
    for l in range(2):
        shapes.update({f"blk.{l}.{n}.weight": s for n, s in [
            ("attn_norm", (32,)), ("attn_q", (32, 32)), ("attn_k", (16, 32)), ("attn_v", (16, 32)),
            ("attn_output", (32, 32)), ("ffn_norm", (32,)), ("ffn_gate", (64, 32)), ("ffn_up", (64, 32)),
            ("ffn_down", (32, 64))]})
    write_gguf(path, {n: (rng.standard_normal(s).astype(np.float32), Q.F32) for n, s in shapes.items()}, metadata,
               arch="llama")
    return str(path)


def test_gguf_metadata_is_checked_before_anything_is_built(tmp_path):
    from gguf import GGUFValueType as V
    assert minisv.load(tiny_gguf(tmp_path / "ok.gguf"), device="cpu").cfg.n_layers == 2   # the baseline loads
    cases = [({"llama.block_count": (10 ** 8, V.UINT32)}, r"declares a model of [\d,]+ parameters but its weights"),
             ({"llama.embedding_length": (2 ** 40, V.UINT64)}, "declares a model of"),
             ({"llama.attention.head_count": (0, V.UINT32)}, "n_heads is 0, expected a positive integer"),
             ({"llama.attention.head_count_kv": (3, V.UINT32)}, "4 attention heads cannot share 3 key/value heads"),
             ({"llama.rope.dimension_count": (7, V.UINT32)}, "rotary dimension 7 must be even"),
             ({"llama.block_count": ("2", V.STRING)}, "n_layers is '2', expected a positive integer"),
             ({"llama.block_count": (2.0, V.FLOAT32)}, "n_layers is 2.0, expected a positive integer"),
             ({"llama.attention.layer_norm_rms_epsilon": (-1.0, V.FLOAT32)}, "norm_eps is -1.0, expected a positive"),
             ({"llama.feed_forward_length": None}, "GGUF metadata lacks llama.feed_forward_length")]
    for changes, message in cases:
        refused(message, minisv.load, tiny_gguf(tmp_path / "bad.gguf", changes), device="cpu")
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.context_length", "llama.rope.freq_base"):
        for value in [(0, V.UINT32), (1, V.UINT32), (2 ** 63, V.UINT64), ("x", V.STRING), (True, V.BOOL),
                      (-2, V.INT32), (0.5, V.FLOAT32), None]:
            loads_or_refuses(minisv.load, tiny_gguf(tmp_path / "bad.gguf", {key: value}))


def test_gguf_tokenizer_fields_are_checked(tmp_path):
    """Each tokenizer field read from a GGUF has its type, its length (one entry per token) and, for ids, a range."""
    from gguf import GGUFValueType as V
    n = len(byte_tokens()) + 1
    ok = {"tokenizer.ggml.token_type": ([1] * n, V.ARRAY, V.INT32), "tokenizer.ggml.scores": ([0.0] * n, V.ARRAY,
          V.FLOAT32), "tokenizer.ggml.bos_token_id": (n - 1, V.UINT32), "tokenizer.ggml.add_bos_token": (True, V.BOOL),
          "tokenizer.ggml.pre": ("smollm", V.STRING), "tokenizer.chat_template": ("{{ x }}", V.STRING)}
    tok = minisv.load(tiny_gguf(tmp_path / "ok.gguf", ok), device="cpu").tokenizer   # the baseline loads
    assert (tok.bos_id, tok.add_bos, tok.vocab_size, tok.encode("\0\1\0\1")) == (256, True, 257, [256, 256])
    cases = [("tokenizer.ggml.tokens", ("abc", V.STRING), "tokens is 'abc', expected a list of strings"),
             ("tokenizer.ggml.tokens", ([1, 2, 3], V.ARRAY, V.INT32), r"tokens is \[1, 2, 3\], expected a list of str"),
             ("tokenizer.ggml.merges", ([1, 2], V.ARRAY, V.UINT8), r"merges is \[1, 2\], expected a list of strings"),
             ("tokenizer.ggml.merges", ("Ā ā", V.STRING), "merges is 'Ā ā', expected a list of strings"),
             ("tokenizer.ggml.token_type", ([1] * (n - 1), V.ARRAY, V.INT32),
              rf"token_type is \[1, 1, .*\.\.\., expected a list of {n} ints, one per token"),
             ("tokenizer.ggml.token_type", (["1"] * n, V.ARRAY, V.STRING), f"expected a list of {n} ints"),
             ("tokenizer.ggml.scores", ([0.0] * (n + 1), V.ARRAY, V.FLOAT32), f"scores is .*, expected a list of {n} num"),
             ("tokenizer.ggml.bos_token_id", (n, V.UINT32), f"bos_token_id is {n}, expected a token id in 0..{n - 1}"),
             ("tokenizer.ggml.eos_token_id", (-1, V.INT32), f"eos_token_id is -1, expected a token id in 0..{n - 1}"),
             ("tokenizer.ggml.padding_token_id", ("0", V.STRING), "padding_token_id is '0', expected a token id"),
             ("tokenizer.ggml.bos_token_id", (1.0, V.FLOAT32), "bos_token_id is 1.0, expected a token id"),
             ("tokenizer.ggml.add_bos_token", (1, V.UINT8), "add_bos_token is 1, expected true or false"),
             ("tokenizer.ggml.add_space_prefix", ("no", V.STRING), "add_space_prefix is 'no', expected true or false"),
             ("tokenizer.ggml.pre", (["gpt-2"], V.ARRAY, V.STRING), r"pre is \['gpt-2'\], expected a string"),
             ("tokenizer.chat_template", (7, V.INT32), "chat_template is 7, expected a string"),
             ("general.name", (7, V.INT32), "general.name is 7, expected a string")]
    for key, value, message in cases:
        refused(rf"GGUF metadata {'' if key.startswith('general') else 'tokenizer.'}.*{message}.*the file is corrupt",
                minisv.load, tiny_gguf(tmp_path / "bad.gguf", {**ok, key: value}), device="cpu")


def test_config_json_fields_are_checked(tmp_path, tiny):
    family, path, _ = tiny
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    layers = {"gpt2": "n_layer"}.get(family, "num_hidden_layers")
    heads = {"gpt2": "n_head"}.get(family, "num_attention_heads")
    cases = [({layers: 10 ** 8}, r"declares a model of [\d,]+ parameters but its weights take only"),
             ({heads: 0}, f"{heads} is 0, expected a positive integer"), ({layers: "3"}, f"{layers} is '3'"),
             ({layers: None}, f"{layers} is None"), ({layers: 3.0}, f"{layers} is 3.0"), ({layers: True}, "is True"),
             ({heads: 5}, "has shape|rotary dimension 1|5 attention heads cannot share 2"), ({"vocab_size": -1}, "vocab_size is -1"),
             ({"model_type": "bert"}, "model_type 'bert' is not supported")]
    cases += {"gpt2": [({"n_embd": None}, "n_embd is None, expected a positive integer"),
                       ({"layer_norm_epsilon": "x"}, "layer_norm_epsilon is 'x', expected a positive number")],
              "neox": [({"rotary_pct": 0.25 * 3 / 2}, "rotary dimension 3 must be even"),
                       ({"use_parallel_residual": "yes"}, "use_parallel_residual is 'yes', expected true or false")],
              "llama": [({"num_key_value_heads": 3}, "4 attention heads cannot share 3"),
                        ({"head_dim": 7}, "rotary dimension 7 must be even"),
                        ({"rope_parameters": {"rope_type": "llama3", "factor": 8}}, "lacks 'low_freq_factor'"),
                        ({"rope_parameters": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                                              "high_freq_factor": 1, "original_max_position_embeddings": 8}},
                         "low_freq_factor < high_freq_factor"),
                        ({"rope_parameters": "x"}, "rope_parameters is 'x', expected a JSON object or null")]}[family]
    for changes, message in cases:
        (model_dir / "config.json").write_text(json.dumps({**config, **changes}))
        refused(message, minisv.load, str(model_dir), device="cpu")
    read = {"n_embd", "n_layer", "n_head", "n_inner", "n_positions", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rotary_pct",
            "layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps", "rope_theta", "head_dim", "tie_word_embeddings",
            "use_parallel_residual", "attention_bias", "mlp_bias", "hidden_act", "activation_function",
            "rope_parameters", "model_type"}
    for key in sorted(read & set(config)):    # any other value of a field minisv reads: a load, or one line
        for value in ("x", 0, 1.5, None, [], 10 ** 30):
            (model_dir / "config.json").write_text(json.dumps({**config, key: value}))
            loads_or_refuses(minisv.load, str(model_dir))
    del config[layers]
    (model_dir / "config.json").write_text(json.dumps(config))
    refused(f"config.json lacks '{layers}'", minisv.load, str(model_dir))
    for text, message in [("[1, 2]", r"the JSON is \[1, 2\], expected a JSON object"), ("{not json", "not valid JSON"),
                          ("\xff", "byte 0 is not valid UTF-8")]:
        (model_dir / "config.json").write_text(text, encoding="latin-1")
        refused(f"config.json: {message}", minisv.load, str(model_dir))


def random_transcoder(path):
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(12, 10, 40, "topk", 5, hook_in="blocks.1.ln2.hook_normalized",
                                     hook_out="blocks.1.hook_mlp_out", layer=1))
    formats.save(tc, path)
    return json.loads((path / "cfg.json").read_text())


def test_transcoder_cfg_and_weights_are_checked_before_allocating(tmp_path):
    cfg = random_transcoder(tmp_path)
    weights = (tmp_path / "transcoder.safetensors").read_bytes()
    cases = [({"d_sae": 10 ** 12}, r"W_enc has shape \[12, 40\], cfg says \[12, 1000000000000\]"),
             ({"d_in": "12"}, "d_in is '12', expected"), ({"d_out": 10.0}, "d_out is 10.0, expected"),
             ({"skip": "false"}, "skip is 'false', expected"), ({"k": None}, "k is None, expected"),
             ({"hook_in": 3}, "hook_in is 3, expected"), ({"skip": True}, "needs .*W_skip"),
             ({"d_sae": 0}, "need positive sizes"), ({"architecture": "gelu"}, "unknown transcoder architecture")]
    for changes, message in cases:
        write_text(tmp_path / "cfg.json", json.dumps({**cfg, **changes}))
        refused(message, formats.load, tmp_path)
    for text, message in [("[1]", "cfg.json: the JSON is \\[1\\], expected a JSON object"), ("{", "not valid JSON"),
                          (json.dumps({"d_in": 12}), "lacks d_out, d_sae")]:
        write_text(tmp_path / "cfg.json", text)
        refused(message, formats.load, tmp_path)
    write_text(tmp_path / "cfg.json", json.dumps(cfg))
    header = 8 + int.from_bytes(weights[:8], "little")
    for cut in (0, 7, 8, header // 2, header, header + 1, len(weights) - 1):
        (tmp_path / "transcoder.safetensors").write_bytes(weights[:cut])
        refused("transcoder.safetensors: truncated or corrupt", formats.load, tmp_path)


def test_released_transcoder_shapes_are_checked(tmp_path):
    good = dict(W_enc=torch.zeros(16, 64), b_enc=torch.zeros(64), W_dec=torch.zeros(64, 16), b_dec=torch.zeros(16),
                b_dec_out=torch.zeros(16))
    for name, bad in [("b_dec", torch.zeros(17)), ("W_enc", torch.zeros(16)), ("W_dec", torch.zeros(63, 16)),
                      ("b_enc", torch.zeros(64, 1)), ("W_enc", torch.zeros(0, 64))]:
        torch.save({"state_dict": {**good, name: bad}}, tmp_path / "blocks.3.pt")
        refused(f"{name} has shape", import_released, str(tmp_path / "blocks.3.pt"))
    torch.save({"state_dict": good, "cfg": {"hook_point": 5}}, tmp_path / "nolayer.pt")
    refused("cannot tell the layer", import_released, str(tmp_path / "nolayer.pt"))
    torch.save({"state_dict": good}, tmp_path / "blocks.x.pt")
    refused("cannot tell the layer", import_released, str(tmp_path / "blocks.x.pt"))


# ------------------------------------------------------------------------- writes
def test_artifacts_get_the_same_mode_as_any_other_file(tmp_path):
    write_text(tmp_path / "plain.txt", "x")
    atomic_write(tmp_path / "v.safetensors", lambda tmp: save_file({"vector": torch.zeros(3)}, tmp))
    formats.save(Transcoder(TranscoderConfig(4, 4, 8, k=2)), tmp_path / "tc")
    with open(tmp_path / "reference", "w"):     # what open() gives under the current umask
        pass
    mode = os.stat(tmp_path / "reference").st_mode
    for name in ("plain.txt", "v.safetensors", "tc/transcoder.safetensors", "tc/cfg.json"):
        assert oct(os.stat(tmp_path / name).st_mode) == oct(mode), name


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    """A writer killed mid-write leaves its temporary file; the next write of that path removes it, and keeps the
    temporary files of live processes and every file not named like one of minisv's own (a user's files)."""
    target = tmp_path / "checkpoint.pt"
    killed = subprocess.run([sys.executable, "-c", "import os; from minisv.atomic import atomic_write; "
                             f"atomic_write({str(target)!r}, lambda tmp: (open(tmp, 'w').write('half'), os._exit(9)))"],
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert killed.returncode == 9
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint.pt.")]
    assert stale.read_text() == "half" and stale.name.endswith(".minisv-tmp")
    live = tmp_path / f".checkpoint.pt.{'0' * 16}.{os.getppid()}.minisv-tmp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                 # reaped: its pid names no process any more
    unrelated = [tmp_path / f"checkpoint.pt.tmp{dead.pid}", tmp_path / f"other.pt.tmp{dead.pid}",
                 tmp_path / f".other.pt.{'0' * 16}.{dead.pid}.minisv-tmp", tmp_path / "checkpoint.pt.tmpx"]
    for p in [live, *unrelated]:
        p.write_text("old")
    write_text(target, "new")
    assert not stale.exists() and live.exists() and target.read_text() == "new"
    assert all(p.read_text() == "old" for p in unrelated)
