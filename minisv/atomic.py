"""Atomic file writes: every artifact minisv writes appears whole or not at all.

The data goes to a temporary file `{path}.tmp{pid}` in the same directory (so the rename never crosses file
systems), and `os.replace` then swaps it in: a reader, or a crash halfway through a long run, never sees half
a file. A process killed mid-write leaves its temporary file behind; the next write of the same path removes
those whose process is gone.
"""
import os
from pathlib import Path


def atomic_write(path, write):
    """Call write(tmp_path) to produce the file, then rename it to `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for other in os.listdir(folder):
        pid = other[len(name) + 4:] if other.startswith(name + ".tmp") else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            os.remove(os.path.join(folder, other))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        open(tmp, "wb").close()      # the kernel gives it 0666 minus the umask, like any other file...
        mode = os.stat(tmp).st_mode
        write(tmp)
        os.chmod(tmp, mode)          # ...which some writers replace: safetensors recreates its file 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
