"""minisv.hub against a fake hub on 127.0.0.1, checked against huggingface_hub's own reading of the cache."""

import hashlib
import os
import socket

import pytest
from helpers import ALL_NAMES, EXPECTED_TINY, FILES, MAIN, REFS, SHARDS, STEP, WEIGHTS, git_sha1, server  # noqa: F401

from minisv import hub
from minisv.errors import MinisvError


def test_download_lands_in_hf_cache_layout(server, tmp_path, capsys):
    path = hub.snapshot("org/tiny")
    repo = tmp_path / "models--org--tiny"
    assert path == repo / "snapshots" / MAIN
    assert (repo / "refs" / "main").read_text() == MAIN
    assert sorted(os.listdir(path)) == sorted(EXPECTED_TINY)
    for name in EXPECTED_TINY:
        link, data = path / name, FILES[MAIN][name]
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.read_bytes() == data
        # blobs are named by X-Linked-Etag (LFS sha256) when present, else by the git sha1 ETag
        digest = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_sha1(data)
        assert link.resolve() == (repo / "blobs" / digest).resolve()
    for name in set(ALL_NAMES) - set(EXPECTED_TINY):  # optional files that 404'd are remembered
        assert (repo / ".no_exist" / MAIN / name).is_file()
    assert not list(repo.rglob("*.incomplete"))
    assert ("GET", "/org/tiny/resolve/main/config.json", None) in server.handler.requests
    # once main is resolved, the rest is asked for by commit so that all files come from that one commit
    assert ("GET", f"/org/tiny/resolve/{MAIN}/tokenizer.json", None) in server.handler.requests
    assert capsys.readouterr().err == ""  # small files download silently

    huggingface_hub = pytest.importorskip("huggingface_hub")
    for name in EXPECTED_TINY:
        found = huggingface_hub.try_to_load_from_cache("org/tiny", name, cache_dir=tmp_path)
        assert open(found, "rb").read() == FILES[MAIN][name]
    missing = huggingface_hub.try_to_load_from_cache("org/tiny", "vocab.json", cache_dir=tmp_path)
    assert missing is huggingface_hub.file_download._CACHED_NO_EXIST


def test_second_call_and_offline_make_no_requests(server, monkeypatch):
    first = hub.snapshot("org/tiny")
    count = len(server.handler.requests)
    assert hub.snapshot("org/tiny") == first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.snapshot("org/tiny") == first
    assert hub.snapshot("org/tiny", MAIN) == first  # a commit hash needs no refs/ entry
    assert len(server.handler.requests) == count


def test_offline_with_empty_cache_fails_clearly(server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    with pytest.raises(MinisvError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        hub.snapshot("org/tiny")
    assert server.handler.requests == []


def test_reuses_cache_filled_by_huggingface_hub(server, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    for name in ALL_NAMES:
        try:
            huggingface_hub.hf_hub_download("org/tiny", name, cache_dir=tmp_path, endpoint=server.url)
        except huggingface_hub.errors.EntryNotFoundError:
            pass
    count = len(server.handler.requests)
    path = hub.snapshot("org/tiny")
    assert len(server.handler.requests) == count
    assert {name: (path / name).read_bytes() for name in EXPECTED_TINY} == FILES[MAIN]


def test_revision_is_requested_and_recorded(server, tmp_path):
    path = hub.snapshot("org/tiny", "step3000")
    assert path == tmp_path / "models--org--tiny" / "snapshots" / STEP
    assert (tmp_path / "models--org--tiny" / "refs" / "step3000").read_text() == STEP
    assert ("GET", "/org/tiny/resolve/step3000/config.json", None) in server.handler.requests
    assert (path / "config.json").read_bytes() == FILES[STEP]["config.json"]
    assert (path / "model.safetensors").read_bytes() == WEIGHTS[::-1]
    assert not (path / "tokenizer.json").exists()


def test_sharded_checkpoint_fetches_every_shard(server):
    path = hub.snapshot("org/sharded")
    for name, data in SHARDS.items():
        assert (path / name).read_bytes() == data


def test_unknown_repo_and_revision(server):
    with pytest.raises(MinisvError, match=r"model 'org/nope' not found at http://127\.0\.0\.1:\d+ \(revision main\)"):
        hub.snapshot("org/nope")
    with pytest.raises(MinisvError, match="not found"):
        hub.snapshot("org/tiny", "no-such-branch")
    with pytest.raises(MinisvError, match="not a Hugging Face model id"):
        hub.snapshot("../etc")
    with pytest.raises(MinisvError, match="not a revision"):
        hub.snapshot("org/tiny", "../../etc")


def test_cut_short_transfer_leaves_no_broken_file(server, tmp_path):
    server.handler.cut = True
    with pytest.raises(MinisvError, match="stopped after 2048 of 4096 bytes"):
        hub.snapshot("org/tiny")
    repo = tmp_path / "models--org--tiny"
    assert not (repo / "snapshots" / MAIN / "model.safetensors").exists()
    for blob in (repo / "blobs").iterdir():  # only complete files: the config downloaded before the cut
        assert blob.name == git_sha1(FILES[MAIN]["config.json"])
    server.handler.cut = False
    assert (hub.snapshot("org/tiny") / "model.safetensors").read_bytes() == WEIGHTS  # a retry completes it


def test_token_goes_to_the_hub_but_not_the_cdn(server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.snapshot("org/tiny")
    for method, path, auth in server.handler.requests:
        assert auth == (None if path.startswith("/cdn/") else "Bearer hf_secret"), path


def test_renamed_repo_is_followed_on_the_hub(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = hub.snapshot("org/old-name")
    assert path == tmp_path / "models--org--old-name" / "snapshots" / MAIN
    assert (path / "model.safetensors").read_bytes() == WEIGHTS
    assert ("GET", "/org/tiny/resolve/main/config.json", "Bearer hf_secret") in server.handler.requests


def test_progress_line_for_large_files(server, monkeypatch, capsys):
    monkeypatch.setattr(hub, "_PROGRESS_BYTES", 1000)
    hub.snapshot("org/tiny")
    err = capsys.readouterr().err
    assert err.startswith("\rmodel.safetensors: 0.0 / 0.0 MB") and "MB/s" in err and err.endswith("\n")


def test_unreachable_hub_and_refused_access(server, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(MinisvError, match="could not reach the Hugging Face hub"):
        hub.snapshot("org/tiny")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with pytest.raises(MinisvError, match="HTTP 401: the model is gated.* set HF_TOKEN"):
        hub.snapshot("org/gated")


def test_load_a_tiny_model_from_the_hub(server, monkeypatch, tiny):
    """minisv.load("org/name@rev") end to end: download, cache, build, and the logits of the reference."""
    import torch

    import minisv
    family, path, ref = tiny
    commit = hashlib.sha1(family.encode()).hexdigest()
    monkeypatch.setitem(REFS, "org/real", {"v1": commit, commit: commit})
    monkeypatch.setitem(FILES, commit, {f.name: f.read_bytes() for f in path.iterdir()})
    model = minisv.load("org/real@v1", device="cpu")
    x = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x).logits, atol=1e-4)
    count = len(server.handler.requests)
    minisv.load("org/real@v1", device="cpu")
    assert len(server.handler.requests) == count


def test_a_cached_file_changed_since_download_is_downloaded_again(server, tmp_path, monkeypatch, capsys):
    path = hub.snapshot("org/tiny")
    weights, config = (path / "model.safetensors").resolve(), (path / "config.json").resolve()
    count = len(server.handler.requests)
    record = tmp_path / "models--org--tiny" / ".verified" / weights.name   # what one stat is compared with
    assert record.read_text() == f"{len(WEIGHTS)} {weights.stat().st_mtime_ns}"
    os.utime(weights, ns=(0, 0))   # touched, not changed: hashed again, found whole, kept
    assert hub.snapshot("org/tiny") == path and len(server.handler.requests) == count
    assert record.read_text() == f"{len(WEIGHTS)} 0"
    with open(weights, "r+b") as f:
        f.truncate(100)
    config.write_bytes(b'{"n_layer": 9}')   # same size, other content
    assert hub.snapshot("org/tiny") == path
    assert (path / "model.safetensors").read_bytes() == WEIGHTS
    assert (path / "config.json").read_bytes() == FILES[MAIN]["config.json"]
    err = capsys.readouterr().err
    assert f"{weights} (100 bytes) is not the file that was downloaded" in err
    assert f"{config} (14 bytes) is not the file that was downloaded" in err
    assert ("GET", f"/org/tiny/resolve/{MAIN}/model.safetensors", None) in server.handler.requests[count:]
    with open(weights, "r+b") as f:   # offline, a damaged file is refused, never used
        f.truncate(100)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MinisvError, match="the weights of 'org/tiny' .* are not in the Hugging Face cache"):
        hub.snapshot("org/tiny")
    assert "(100 bytes) is not the file that was downloaded" in capsys.readouterr().err


def test_a_read_only_cache_is_checked_but_not_written(server, tmp_path, monkeypatch, capsys):
    path = hub.snapshot("org/tiny")
    count, weights = len(server.handler.requests), (path / "model.safetensors").resolve()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(hub, "write_text", read_only)
    monkeypatch.setattr(type(weights), "unlink", read_only)
    os.utime(weights, ns=(0, 0))   # no record of this: hashed, found whole, used, on every load
    for _ in range(2):
        assert (hub.snapshot("org/tiny") / "model.safetensors").read_bytes() == WEIGHTS
    assert len(server.handler.requests) == count
    with open(weights, "r+b") as f:
        f.truncate(100)
    with pytest.raises(MinisvError, match=r"\(100 bytes\) is not the file that was downloaded: it was truncated or "
                                          r"changed since, and cannot be deleted \(Permission denied\) — delete it"):
        hub.snapshot("org/tiny")
    assert capsys.readouterr().err == ""
