"""A progress line for anything slow: "harvesting: 12/40 chunks · 3.1/s · ETA 9 s", redrawn in place.

It writes to stderr only when stderr is a terminal (a log file or a test gets nothing), at most a few times a
second, and clears itself when the loop ends, so the scripts' own summary lines stay clean.
"""
import sys
import time


def progress(items, what, total=None, unit="", stream=None):
    """Yield from `items`, showing how many are done of `total` (default len(items)), the rate and an ETA."""
    stream = stream or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        yield from items
        return
    total = total if total is not None else len(items) if hasattr(items, "__len__") else None
    start, shown = time.perf_counter(), 0.0
    try:
        for done, item in enumerate(items):
            now = time.perf_counter()
            if done and now - shown > 0.25:
                shown, rate = now, done / (now - start)
                eta = f" · ETA {_duration((total - done) / rate)}" if total else ""
                stream.write(f"\r\033[K{what}: {done}/{total or '?'}{unit} · {rate:.3g}/s{eta}")
                stream.flush()
            yield item
    finally:
        stream.write("\r\033[K")
        stream.flush()


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"
