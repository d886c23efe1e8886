"""Atomic file writes: every artifact minisv writes appears whole or not at all.

The data goes to a temporary file in the same directory (so the rename never crosses file systems), and
`os.replace` then swaps it in: a reader, or a crash halfway through a long run, never sees half a file.
"""
import os
from pathlib import Path


def atomic_write(path, write):
    """Call write(tmp_path) to produce the file, then rename it to `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
