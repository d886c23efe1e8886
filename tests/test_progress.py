"""The progress line: silent unless stderr is a terminal; on one, done/total, the rate and an ETA from them."""
import io

from minisv import progress as progress_module
from minisv.progress import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_silent_when_the_stream_is_not_a_terminal():
    out = io.StringIO()
    assert list(progress(range(5), "work", stream=out)) == [0, 1, 2, 3, 4] and out.getvalue() == ""


def test_on_a_terminal_it_shows_count_rate_and_eta_then_clears(monkeypatch):
    clock = iter([0.0, 0.0, 1.0, 2.0, 3.0])               # start and item 0 at 0 s, then one second per item
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    out = Terminal()
    assert list(progress(range(4), "harvesting", unit=" chunks", stream=out)) == [0, 1, 2, 3]
    lines = out.getvalue().split("\r\033[K")
    # 1 of 4 done after 1 s: 1 item/s, 3 left -> ETA 3 s; then 2 s, 1 s; cleared at the end
    assert lines[1:] == ["harvesting: 1/4 chunks · 1/s · ETA 3 s", "harvesting: 2/4 chunks · 1/s · ETA 2 s",
                         "harvesting: 3/4 chunks · 1/s · ETA 1 s", ""]
