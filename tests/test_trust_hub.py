"""minisv.hub against a hostile or slow hub on 127.0.0.1 and an unusable cache: a server dripping its headers, two
downloads of one file at once, a cache that cannot be written, headers that would name paths outside the cache,
and a shared blob changed on disk. The oracles: the bytes served (FILES), the files under the cache (unchanged
where nothing may change), and hand-written messages."""
import hashlib
import threading
import time

import pytest
from helpers import FILES, MAIN, REFS, WEIGHTS, git_sha1, refused, server  # noqa: F401

from minisv import hub

CONFIG_PATH = "/org/tiny/resolve/main/config.json"


def drip_headers(pause):
    """A route that sends a status line, then one header line every `pause` seconds, never ending the headers."""
    def reply(handler, body):
        try:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(400):
                handler.wfile.write(f"X-Drip-{i}: x\r\n".encode())
                handler.wfile.flush()
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass            # the client gave up, as it should
        handler.close_connection = True
    return reply


def test_the_deadline_covers_the_headers(server, tmp_path, monkeypatch):
    """One header line every 0.25 s never trips the 30 s read timeout; the answer must still come in time."""
    monkeypatch.setattr(hub, "_MIN_SECONDS", 1)
    server.handler.routes[CONFIG_PATH] = drip_headers(0.25)
    refused(r"config.json sent no complete answer within 1 s: the server is stalling", hub.snapshot, "org/tiny")
    assert not (tmp_path / "models--org--tiny" / "blobs").exists()
    del server.handler.routes[CONFIG_PATH]          # an honest server fits in the same deadline
    assert (hub.snapshot("org/tiny") / "config.json").read_bytes() == FILES[MAIN]["config.json"]


def test_two_downloads_of_one_file_at_once_both_succeed(server, tmp_path):
    """Both start before either ends (the body comes in two halves 0.3 s apart), each writes its own temporary
    file, and both renames leave the whole file."""
    def slow(handler, body):
        data = FILES[MAIN]["config.json"]
        handler.send_response(200)
        for key, value in {"X-Repo-Commit": MAIN, "ETag": f'"{git_sha1(data)}"',
                           "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data[:5])
        handler.wfile.flush()
        time.sleep(0.3)
        handler.wfile.write(data[5:])
        handler.close_connection = True
    server.handler.routes[CONFIG_PATH] = slow
    results, errors = [], []

    def download():
        try:
            results.append(hub.snapshot("org/tiny"))
        except Exception as e:     # noqa: BLE001 (the test reports whatever either thread met)
            errors.append(e)
    threads = [threading.Thread(target=download) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 2
    for name, data in FILES[MAIN].items():
        assert (results[0] / name).read_bytes() == data
    assert not [p for p in tmp_path.rglob("*") if "minisv-tmp" in p.name or p.name.endswith(".link")]


def test_a_cache_that_cannot_be_written_is_one_line(server, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "file"))
    refused(r"cannot write to the Hugging Face cache at .*file/models--org--tiny \(Not a directory\) — make it",
            hub.snapshot, "org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "models--org--tiny").mkdir(parents=True)
    (tmp_path / "cache" / "models--org--tiny" / "blobs").write_text("in the way")
    refused(r"cannot write to the Hugging Face cache at .*\(File exists\)", hub.snapshot, "org/tiny")

    def read_only(*args, **kwargs):       # what a read-only directory answers (root ignores chmod, so simulated)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "ro"))
    monkeypatch.setattr(hub, "atomic_write", read_only)
    refused(r"cannot write to the Hugging Face cache at .*ro/models--org--tiny \(Permission denied\)", hub.snapshot,
            "org/tiny")


@pytest.mark.parametrize("header", ["ETag", "X-Repo-Commit"])
def test_headers_that_are_paths_are_refused(server, tmp_path, header):
    """An etag or commit that starts like a hash but goes on with a path: only a full match may become a name."""
    data = FILES[MAIN]["config.json"]
    headers = {"ETag": f'"{git_sha1(data)}"', "X-Repo-Commit": MAIN}
    headers[header] = f"{'a' * 40}/../../../../escaped"
    server.handler.routes[CONFIG_PATH] = lambda handler, body: handler.reply(200, data, body, headers)
    refused("came without valid X-Repo-Commit and ETag headers", hub.snapshot, "org/tiny")
    assert sorted(p.name for p in tmp_path.parent.iterdir() if "escaped" in p.name) == []
    assert not list(tmp_path.rglob("*escaped*"))


def test_a_blob_shared_with_another_revision_is_verified_before_reuse(server, tmp_path, monkeypatch):
    """A second commit holds the same config.json as main, so its snapshot links the blob main downloaded; that
    blob was changed on disk meanwhile (same size): it must be hashed again, found wrong and fetched again."""
    path = hub.snapshot("org/tiny")
    blob = (path / "config.json").resolve()
    good = FILES[MAIN]["config.json"]
    blob.write_bytes(b"X" * len(good))
    other = hashlib.sha1(b"other").hexdigest()
    monkeypatch.setitem(REFS["org/tiny"], "other", other)
    monkeypatch.setitem(REFS["org/tiny"], other, other)
    monkeypatch.setitem(FILES, other, {"config.json": good, "model.safetensors": WEIGHTS})
    assert (hub.snapshot("org/tiny", "other") / "config.json").read_bytes() == good
    assert blob.read_bytes() == good
