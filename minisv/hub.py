"""Download a model from the Hugging Face hub into the standard HF cache, with the standard library only.

The layout is huggingface_hub's, so a cache filled by transformers is reused here and the other way round:

    $HF_HUB_CACHE/models--{org}--{name}/
        blobs/{etag}                        file contents, named by git blob sha1 or LFS sha256
        snapshots/{commit}/{filename}   ->  ../../blobs/{etag}   (relative symlink)
        refs/{revision}                     the commit a branch or tag resolved to
        .no_exist/{commit}/{filename}       empty marker: the repo has no such file at that commit

A revision whose commit is in refs/ is answered from the cache without any network request, so a model
downloaded once keeps working offline; the price is that `main` stays pinned until refs/main is deleted.
"""

import json
import os
import re
import shutil
import sys
import time
import urllib.request
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import quote, urljoin, urlsplit

from .errors import MinisvError

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # either may be split into {name}.index.json + shards
_EXTRAS = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
           "generation_config.json")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_CHUNK = 1 << 20            # stream 1 MiB at a time: a 500 MB checkpoint never sits in memory
_PROGRESS_BYTES = 10 << 20  # smaller files download silently
_TIMEOUT = 30               # seconds of silence from the server before giving up


def snapshot(repo_id: str, revision: str = "main") -> Path:
    """Local directory holding the model's files for repo_id@revision, downloading what is missing."""
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise MinisvError(f"'{repo_id}' is not a Hugging Face model id — expected 'org/name' or a local directory")
    if not revision or revision.startswith("/") or ".." in revision.split("/"):  # it becomes a path under refs/
        raise MinisvError(f"'{revision}' is not a revision — expected a branch, tag or commit hash")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    repo = Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")).expanduser()
    repo /= "models--" + repo_id.replace("/", "--")
    ref = repo / "refs" / revision
    commit = revision if _COMMIT.fullmatch(revision) else ref.read_text().strip() if ref.is_file() else None
    where = f"'{repo_id}' (revision {revision})"

    def fetch(name: str, required: bool = False) -> bool:
        """Make snapshots/{commit}/{name} exist if the repo has that file; False if it has not."""
        nonlocal commit
        if Path(name).is_absolute() or ".." in Path(name).parts:  # shard names come from a downloaded index
            raise MinisvError(f"{where} lists a file outside the repo, '{name}' — the checkpoint index is corrupt")
        if commit and (repo / "snapshots" / commit / name).is_file():
            return True
        if not (commit and (repo / ".no_exist" / commit / name).is_file()):
            if offline:
                if not required:
                    return False
                raise MinisvError(f"{name} of {where} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
                                  " — unset HF_HUB_OFFLINE to download it, or pass a local directory")
            # Once the commit is known, ask for it rather than the branch: every file then comes from one commit.
            got = _download(f"{endpoint}/{repo_id}/resolve/{quote(commit or revision, safe='')}/{name}", repo, name)
            if got:
                if commit is None and got != revision:
                    ref.parent.mkdir(parents=True, exist_ok=True)
                    ref.write_text(got)
                commit = got
                return True
            if commit:
                (repo / ".no_exist" / commit / name).parent.mkdir(parents=True, exist_ok=True)
                (repo / ".no_exist" / commit / name).touch()
        if required:
            raise MinisvError(f"model '{repo_id}' not found at {endpoint} (revision {revision}): it has no {name}"
                              " — check the name, or pass a local directory")
        return False

    fetch("config.json", required=True)
    for weights in _WEIGHTS:
        if fetch(weights):
            break
        if fetch(weights + ".index.json"):
            index = repo / "snapshots" / commit / f"{weights}.index.json"
            try:  # {"weight_map": {tensor name: shard file}}; every shard is needed
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise MinisvError(f"{index} is not a valid checkpoint index ({e!r}) — delete it and retry") from e
            for shard in sorted(shards):
                fetch(shard, required=True)
            break
    else:
        raise MinisvError(f"the weights of {where} are not in the Hugging Face cache and HF_HUB_OFFLINE is set"
                          " — unset HF_HUB_OFFLINE to download them, or pass a local directory" if offline else
                          f"{where} at {endpoint} has no model.safetensors or pytorch_model.bin"
                          " — pass a local directory")
    for name in _EXTRAS:
        fetch(name)
    return repo / "snapshots" / commit


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None  # urllib then raises the 3xx as an HTTPError, whose headers _open reads


_opener = urllib.request.build_opener(_NoRedirects)  # also honours https_proxy & co. from the environment


def _open(url: str):
    """GET a hub URL: (the hub's headers, a response streaming the body), or None on a 404.

    The hub answers an LFS file with a 302 to a signed CDN URL. X-Repo-Commit and X-Linked-Etag are on that 302,
    not on the CDN's answer, and the token must not travel there. So redirects are followed by hand, like
    huggingface_hub does: those on the hub's host (a renamed repo) keep the token; the jump off it gives the headers.
    """
    host, meta, token = urlsplit(url).netloc, None, os.environ.get("HF_TOKEN")
    try:
        for _ in range(10):
            auth = {"Authorization": f"Bearer {token}"} if token and urlsplit(url).netloc == host else {}
            try:
                response = _opener.open(urllib.request.Request(url, headers=auth), timeout=_TIMEOUT)
                return meta or response.headers, response
            except HTTPError as e:
                if e.code not in (301, 302, 303, 307, 308):
                    raise
                e.close()
                target = urljoin(url, e.headers["Location"])
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
        raise MinisvError(f"could not reach the Hugging Face hub at {host} ({getattr(e, 'reason', e)}) — pass a local"
                          " directory, or fill the cache on another machine and set HF_HUB_OFFLINE=1") from e


def _download(url: str, repo: Path, name: str) -> str | None:
    """Fetch one file into blobs/ and link it as snapshots/{commit}/{name}; the commit, or None on a 404."""
    opened = _open(url)
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
        if not blob.is_file():
            blob.parent.mkdir(parents=True, exist_ok=True)
            _stream(response, blob, name)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    try:
        link.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:  # no symlinks here (Windows without developer mode): a copy does the job
        shutil.copyfile(blob, link)
    return commit


def _stream(response, blob: Path, name: str) -> None:
    """Write the body to blobs/{etag}.incomplete and rename it into place only once every byte has arrived."""
    size = int(response.headers.get("Content-Length", -1))
    part = blob.with_name(blob.name + ".incomplete")
    done, start, shown = 0, time.monotonic(), 0.0
    try:
        with open(part, "wb") as f:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                done += len(chunk)
                if size >= _PROGRESS_BYTES and (time.monotonic() - shown > 0.25 or done == size):
                    shown = time.monotonic()  # \r redraws one line, about four times a second
                    print(f"\r{name}: {done / 1e6:.1f} / {size / 1e6:.1f} MB, "
                          f"{done / 1e6 / max(shown - start, 1e-6):.1f} MB/s", end="", file=sys.stderr, flush=True)
        # http.client returns b"" when a connection drops early, so a short count is the only sign of a cut.
        if size >= 0 and done != size:
            raise MinisvError(f"the download of {name} stopped after {done} of {size} bytes — run again to retry")
        os.replace(part, blob)
    except (OSError, HTTPException) as e:
        raise MinisvError(f"the download of {name} failed ({e}) — run again to retry") from e
    finally:
        part.unlink(missing_ok=True)  # gone after os.replace; otherwise a partial file nobody would resume
        if shown:
            print(file=sys.stderr)  # end the progress line
