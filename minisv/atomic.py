"""Atomic file writes: every artifact minisv writes appears whole or not at all.

The data goes to a temporary file in the same directory (so the rename never crosses file systems), and
`os.replace` then swaps it in: a reader, or a crash halfway through a long run, never sees half a file.

The temporary file is `.{name}.{random}.{pid}.minisv-tmp`, created exclusively (O_EXCL): its name cannot be
guessed, and a file or symlink planted under it makes the creation fail and another name be drawn, instead of
the write going wherever the link points. A process killed mid-write leaves its temporary file behind; the next
write of the same path removes those whose process is gone, and nothing else: a user's `results.tmp2024` has
not this form and is left alone.
"""
import os
import re
import secrets
from pathlib import Path

TMP_SUFFIX = ".minisv-tmp"


def atomic_write(path, write):
    """Call write(tmp_path) to produce the file, then rename it to `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale(folder, name)
    tmp, fd = _create(folder, name)
    try:
        mode = os.fstat(fd).st_mode   # 0666 minus the umask, like any other new file...
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)           # ...which some writers replace: safetensors recreates its file 0600
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _create(folder, name):
    """A new, empty temporary file for `name` in `folder`: (its path, an open descriptor)."""
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.{os.getpid()}{TMP_SUFFIX}")
        try:   # 0o666: the kernel takes the umask off, as for open(); tempfile.mkstemp would give 0600
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue


def _remove_stale(folder, name):
    """Delete the temporary files for `name` that a process now gone left in `folder`."""
    stale = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{16}}\.(\d+){re.escape(TMP_SUFFIX)}")
    for other in os.listdir(folder):
        m = stale.fullmatch(other)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            try:
                os.remove(os.path.join(folder, other))
            except FileNotFoundError:   # another writer of the same path removed it first
                pass


def _alive(pid):
    if os.name != "posix":           # on Windows os.kill(pid, 0) would send Ctrl-C: keep the file
        return True
    try:
        os.kill(pid, 0)              # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:          # it exists, owned by someone else
        return True
    return True


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
