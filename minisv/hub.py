"""Download a model from the Hugging Face hub into the standard HF cache, with the standard library only.

The layout is huggingface_hub's, so a cache filled by transformers is reused here and the other way round:

    $HF_HUB_CACHE/models--{org}--{name}/
        blobs/{etag}                        file contents, named by git blob sha1 or LFS sha256
        .verified/{etag}                    minisv's own: "{size} {mtime_ns}" of the blob when it was verified
        snapshots/{commit}/{filename}   ->  ../../blobs/{etag}   (relative symlink)
        refs/{revision}                     the commit a branch or tag resolved to
        .no_exist/{commit}/{filename}       empty marker: the repo has no such file at that commit

A revision whose commit is in refs/ is answered from the cache without any network request, so a model
downloaded once keeps working offline; the price is that `main` stays pinned until refs/main is deleted.
"""

import functools
import hashlib
import http.client
import io
import os
import re
import secrets
import shutil
import sys
import time
import urllib.request
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import quote, urljoin, urlsplit

from .atomic import atomic_write, write_text
from .errors import MinisvError
from .files import ANY, STR, dict_of, field, parse_json, read_json

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # either may be split into {name}.index.json + shards
_EXTRAS = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
           "generation_config.json")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_ID = re.compile(r"(\b[\w.-]{1,96}\b/)?\b[\w.-]{1,96}\b", re.ASCII)  # huggingface_hub's rule
_HASH = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # an etag that names the content: git blob sha1 | LFS sha256
_CHUNK = 1 << 20            # stream 1 MiB at a time: a 500 MB checkpoint never sits in memory
_PROGRESS_BYTES = 10 << 20  # smaller files download silently
_TIMEOUT = 30               # seconds of silence from the server before giving up
# A server can also send one byte every 29 s, forever: each file must arrive within _MIN_SECONDS plus the time
# its size takes at _MIN_RATE bytes/s (a slow but honest line; 500 MB may take 3 h before it is cut off).
_MIN_SECONDS, _MIN_RATE = 600, 50_000
_MAX_SMALL = 64 << 20       # the most a config, tokenizer or index file (or any body of undeclared size) may be


def snapshot(repo_id: str, revision: str = "main") -> Path:
    """Local directory holding the model's files for repo_id@revision, downloading what is missing."""
    _check_names(repo_id, revision)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if urlsplit(endpoint).scheme not in ("http", "https"):
        raise MinisvError(f"HF_ENDPOINT={endpoint!r} is not an http(s) URL — unset it, or point it to a hub mirror")
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    repo = Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")).expanduser()
    repo /= "models--" + repo_id.replace("/", "--")
    ref = repo / "refs" / revision
    # anything but a commit hash is re-resolved (is_file: no FIFO; the size: no 10 GB file read for 40 bytes)
    cached = ref.read_text(errors="replace").strip() if ref.is_file() and ref.stat().st_size < 100 else ""
    commit = revision if _COMMIT.fullmatch(revision) else cached if _COMMIT.fullmatch(cached) else None
    where = f"'{repo_id}' (revision {revision})"

    def fetch(name: str, required: bool = False) -> Path | None:
        """Make snapshots/{commit}/{name} exist if the repo has that file: its path, or None if it has not."""
        nonlocal commit
        entry = repo / "snapshots" / str(commit) / name
        # a link is checked through the blob it names; a copy (made where symlinks are not allowed) is taken as is
        if commit and entry.is_file() and (not entry.is_symlink()
                                           or _intact(repo / "blobs" / Path(os.readlink(entry)).name, repo)):
            return entry
        if not (commit and (repo / ".no_exist" / commit / name).is_file()):
            if offline:
                if not required:
                    return None
                raise MinisvError(f"{name} of {where} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
                                  " — unset HF_HUB_OFFLINE to download it, or pass a local directory")
            # Once the commit is known, ask for it rather than the branch: every file then comes from one commit.
            got = _download(f"{endpoint}/{repo_id}/resolve/{quote(commit or revision, safe='')}/{quote(name)}", repo,
                            name)
            if got:
                if commit is None and got != revision:
                    write_text(ref, got)
                commit = got
                return repo / "snapshots" / commit / name
            if commit:
                (repo / ".no_exist" / commit / name).parent.mkdir(parents=True, exist_ok=True)
                (repo / ".no_exist" / commit / name).touch()
        if required:
            raise MinisvError(f"model '{repo_id}' not found at {endpoint} (revision {revision}): it has no {name}"
                              " — check the name, or pass a local directory")
        return None

    try:
        config = fetch("config.json", required=True)
        _fetch_weights(fetch, f"the weights of {where} are not in the Hugging Face cache and HF_HUB_OFFLINE is set —"
                       " unset HF_HUB_OFFLINE to download them, or pass a local directory" if offline else
                       f"{where} at {endpoint} has no model.safetensors or pytorch_model.bin — pass a local directory")
        for name in _EXTRAS:
            fetch(name)
    except OSError as e:  # the network's errors are MinisvErrors by now: this is the cache's own directory
        raise MinisvError(f"cannot write to the Hugging Face cache at {repo} ({e.strerror or e}) — make it writable, "
                          "or set HF_HUB_CACHE to a directory you can write to") from None
    return config.parent


def _check_names(repo_id: str, revision: str) -> None:
    """Refuse a repo id or revision that is not one (both become paths in the cache and parts of URLs)."""
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        raise MinisvError(f"'{repo_id}' is not a Hugging Face model id — expected 'org/name' (ASCII letters, digits,"
                          " '-', '_', '.') or a local directory")
    # git's ref-name rules (git check-ref-format); they also keep refs/{revision} a file inside refs/
    if not isinstance(revision, str) or re.search(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{", revision) or revision == "@" \
            or not all(part and not part.startswith(".") and not part.endswith(".lock") for part in revision.split("/")):
        raise MinisvError(f"{revision!r} is not a revision — expected a branch, tag or commit hash")


def _fetch_weights(fetch, missing: str) -> None:
    """model.safetensors, else pytorch_model.bin, each possibly split into shards listed by {name}.index.json."""
    for weights in _WEIGHTS:
        if fetch(weights):
            return
        index = fetch(weights + ".index.json")
        if index:
            for shard in shard_names(index):
                fetch(shard, required=True)
            return
    raise MinisvError(missing)


def shard_names(index: Path) -> list[str]:
    """The shard files a sharded checkpoint's {weights}.index.json lists, each checked to stay in its directory."""
    # {"weight_map": {tensor name: shard file}}; every shard is needed
    names = set(field(read_json(index), "weight_map", index, dict_of(STR)).values())
    for name in names:
        if not (isinstance(name, str) and name) or name.startswith("/") or "\\" in name or "\0" in name \
                or ".." in name.split("/"):
            raise MinisvError(f"{index} lists the shard {name!r}, which is not a file inside its directory — the "
                              "index is corrupt or malicious; download the model again")
    return sorted(names)


class _Deadline:
    """When the download of one file must be over (time.monotonic()), headers included: _MIN_SECONDS after its
    first request, plus the time its size takes at _MIN_RATE bytes/s once the size is known."""

    def __init__(self):
        self.start = time.monotonic()
        self.at = self.start + _MIN_SECONDS

    def allow(self, size: int) -> None:
        self.at = self.start + _MIN_SECONDS + size / _MIN_RATE

    def left(self) -> float:
        return self.at - time.monotonic()


class _TimedReader(io.RawIOBase):
    """The socket of a response, each read waiting at most until the deadline (and _TIMEOUT s of silence): a
    server dripping one header line, or one byte, at a time runs out of time instead of holding us forever."""

    def __init__(self, raw, sock, deadline: _Deadline):
        self.raw, self.sock, self.deadline = raw, sock, deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.deadline.left()
        if left <= 0:
            raise TimeoutError("the deadline passed")
        self.sock.settimeout(min(_TIMEOUT, left))
        return self.raw.readinto(buffer)

    def close(self):
        self.raw.close()
        super().close()


class _TimedResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, deadline: _Deadline, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_TimedReader(self.fp.detach(), sock, deadline))


def _timed(connection):
    """The http.client connection class whose responses are read under a deadline (keyword `deadline`)."""
    class Timed(connection):
        def __init__(self, *args, deadline: _Deadline, **kwargs):
            super().__init__(*args, **kwargs)
            self.response_class = functools.partial(_TimedResponse, deadline=deadline)
    return Timed


_HTTPConnection, _HTTPSConnection = _timed(http.client.HTTPConnection), _timed(http.client.HTTPSConnection)


class _TimedHTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, deadline=self.deadline), req)


class _TimedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self.deadline), req, context=self._context)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None  # urllib then raises the 3xx as an HTTPError, whose headers _open reads


def _open(url: str, deadline: _Deadline):
    """GET a hub URL: (the hub's headers, a response streaming the body), or None on a 404.

    The hub answers an LFS file with a 302 to a signed CDN URL. X-Repo-Commit and X-Linked-Etag are on that 302,
    not on the CDN's answer, and the token must not travel there. So redirects are followed by hand, like
    huggingface_hub does: those on the hub's host (a renamed repo) keep the token; the jump off it gives the headers.
    """
    host, meta, token = urlsplit(url).netloc, None, os.environ.get("HF_TOKEN")
    # also honours https_proxy & co. from the environment
    opener = urllib.request.build_opener(_NoRedirects, _TimedHTTP(deadline), _TimedHTTPS(deadline))
    try:
        for _ in range(10):
            auth = {"Authorization": f"Bearer {token}"} if token and urlsplit(url).netloc == host else {}
            try:
                response = opener.open(urllib.request.Request(url, headers=auth),
                                       timeout=max(min(_TIMEOUT, deadline.left()), 0.001))
                return meta or response.headers, response
            except HTTPError as e:
                if e.code not in (301, 302, 303, 307, 308):
                    raise
                e.close()
                target = urljoin(url, e.headers.get("Location", ""))
                if urlsplit(target).scheme not in ("http", "https"):  # urllib would open file:// and ftp:// too
                    raise MinisvError(f"{url} redirected to {target!r}; refused: only http(s) redirects are "
                                      "followed — check HF_ENDPOINT") from None
                if urlsplit(target).netloc != host:
                    meta = meta or e.headers
                url = target
        raise MinisvError(f"{url} redirects in a loop — check HF_ENDPOINT, or pass a local directory")
    except HTTPError as e:
        if e.code == 404:
            return None
        if e.code in (401, 403):
            raise MinisvError(f"{url} answered HTTP {e.code}: the model is gated, private or does not exist — accept"
                              " its licence on the hub and set HF_TOKEN to an access token, or check the name") from e
        raise MinisvError(f"{url} answered HTTP {e.code} {e.reason} — try again later, or pass a local directory")
    except (OSError, HTTPException) as e:  # URLError (refused, DNS) is an OSError, as are timeouts and resets
        if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
            raise MinisvError(f"{url} sent no complete answer within {deadline.at - deadline.start:.0f} s: the server"
                              " is stalling — run again to retry, or pass a local directory") from None
        raise MinisvError(f"could not reach the Hugging Face hub at {host} ({getattr(e, 'reason', e)}) — pass a local"
                          " directory, or fill the cache on another machine and set HF_HUB_OFFLINE=1") from e


def _download(url: str, repo: Path, name: str) -> str | None:
    """Fetch one file into blobs/ and link it as snapshots/{commit}/{name}; the commit, or None on a 404.

    Two processes may download the same file at once: each writes a temporary file of its own (minisv.atomic)
    and renames it into place, and the link is swapped in the same way, so either result is whole."""
    deadline = _Deadline()
    opened = _open(url, deadline)
    if opened is None:
        return None
    meta, response = opened
    with response:
        commit = meta.get("X-Repo-Commit")
        etag = (meta.get("X-Linked-Etag") or meta.get("ETag") or "").removeprefix("W/").strip('"')
        if not (_COMMIT.fullmatch(commit or "") and re.fullmatch(r"[\w-]+", etag)):  # both become paths
            raise MinisvError(f"{url} came without valid X-Repo-Commit and ETag headers — HF_ENDPOINT must point to"
                              " a Hugging Face hub or mirror")
        blob = repo / "blobs" / etag  # content-addressed: a file shared by two revisions is downloaded once
        if not _intact(blob, repo):
            blob.parent.mkdir(parents=True, exist_ok=True)
            # the size the hub declares for an LFS file (on its redirect), else that of the body itself
            sizes = [v for v in (meta.get("X-Linked-Size"), response.headers.get("Content-Length")) if v]
            size = int(sizes[0]) if sizes and sizes[0].isdigit() else None
            atomic_write(blob, lambda part: _stream(response, part, name, size, deadline, blob.name))
            _record(blob, repo)
    _link(blob, repo / "snapshots" / commit / name)
    return commit


def _link(blob: Path, link: Path) -> None:
    """Point snapshots/{commit}/{name} at its blob: a relative symlink made aside and renamed into place."""
    link.parent.mkdir(parents=True, exist_ok=True)
    aside = link.with_name(f".{link.name}.{secrets.token_hex(8)}.link")
    try:
        aside.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:  # no symlinks here (Windows without developer mode): a copy does the job
        atomic_write(link, lambda tmp: shutil.copyfile(blob, tmp))
        return
    os.replace(aside, link)


def _stream(response, part: str, name: str, size: int | None, deadline: _Deadline, etag: str) -> None:
    """Write the body to `part` (a temporary file that minisv.atomic renames into place if this returns) and
    verify it: exactly the declared size (at most _MAX_SMALL bytes when none is declared, or for a small file);
    the hash its etag names, when the etag is one (the hub's ETag is the git blob sha1 of a file kept in git,
    and X-Linked-Etag the sha256 of an LFS file); valid JSON for a .json file. What fails is never stored, so a
    rerun downloads it again instead of trusting it. The body must come before the deadline, which its size
    extends (_MIN_RATE)."""
    limit = size if size is not None else _MAX_SMALL
    if limit > _MAX_SMALL and not name.endswith((".safetensors", ".bin")):
        raise MinisvError(f"the hub declares {size} bytes for {name}, too large for such a file — check HF_ENDPOINT")
    deadline.allow(limit)
    done, shown = 0, 0.0
    try:
        with open(part, "wb") as f:
            # read1 returns what one socket read brings (read would wait for the whole chunk, byte by byte).
            # One byte past the limit shows excess.
            while chunk := response.read1(min(_CHUNK, limit + 1 - done)):
                f.write(chunk)
                done += len(chunk)
                if done > limit:
                    raise MinisvError(f"the download of {name} sent more than the {limit} bytes "
                                      f"{'declared' if size is not None else 'allowed without a declared size'}"
                                      " — check HF_ENDPOINT")
                if limit >= _PROGRESS_BYTES and (time.monotonic() - shown > 0.25 or done == limit):
                    shown = time.monotonic()  # \r redraws one line, about four times a second
                    print(f"\r{name}: {done / 1e6:.1f} / {limit / 1e6:.1f} MB, "
                          f"{done / 1e6 / max(shown - deadline.start, 1e-6):.1f} MB/s", end="", file=sys.stderr,
                          flush=True)
    except TimeoutError:
        raise MinisvError(f"the download of {name} was still at byte {done} after "
                          f"{deadline.at - deadline.start:.0f} s: the server is stalling — run again to retry, or "
                          "pass a local directory") from None
    except (OSError, HTTPException) as e:
        raise MinisvError(f"the download of {name} failed ({e}) — run again to retry") from e
    finally:
        if shown:
            print(file=sys.stderr)  # end the progress line
    # http.client returns b"" when a connection drops early, so a short count is the only sign of a cut.
    if size is not None and done != size:
        raise MinisvError(f"the download of {name} stopped after {done} of {size} bytes — run again to retry")
    if _HASH.fullmatch(etag) and (digest := _digest(Path(part), etag)) != etag:
        raise MinisvError(f"the download of {name} is corrupt: its hash is {digest}, the hub says {etag}"
                          " — run again to retry")
    if name.endswith(".json"):
        parse_json(Path(part).read_bytes(), f"the download of {name}", ANY)


def _digest(path: Path, etag: str) -> str:
    """The hash of the file that an etag of this length names: sha256 (LFS), or git's blob sha1."""
    digest = hashlib.sha256() if len(etag) == 64 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _record(blob: Path, repo: Path) -> None:
    """Note the size and modification time of a blob just verified, in .verified/{etag}."""
    stat = blob.stat()
    try:
        write_text(repo / ".verified" / blob.name, f"{stat.st_size} {stat.st_mtime_ns}")
    except OSError:
        pass  # a read-only cache (shared on a cluster): its blobs are hashed again on every load instead


def _intact(blob: Path, repo: Path) -> bool:
    """Whether blobs/{etag} exists and still holds what was verified when it was downloaded.

    One stat answers while its size and modification time are those recorded then. A blob that no longer
    matches (truncated, edited, or put there by huggingface_hub, which keeps no record) is hashed again when its
    etag names a hash; if it holds something else it is deleted, with a notice, so it is downloaded again.
    """
    if not blob.is_file():
        return False
    stat, record = blob.stat(), repo / ".verified" / blob.name
    if record.is_file() and record.stat().st_size < 100 and record.read_text(errors="replace") == \
            f"{stat.st_size} {stat.st_mtime_ns}":
        return True
    if _HASH.fullmatch(blob.name) and _digest(blob, blob.name) == blob.name:
        _record(blob, repo)
        return True
    damaged = f"{blob} ({stat.st_size} bytes) is not the file that was downloaded: it was truncated or changed since"
    try:
        blob.unlink()
    except OSError as e:
        raise MinisvError(f"{damaged}, and cannot be deleted ({e.strerror or e}) — delete it, or ask the owner of"
                          " the cache to") from None
    print(f"minisv: {damaged}; deleted it, to download it again", file=sys.stderr)
    return False
