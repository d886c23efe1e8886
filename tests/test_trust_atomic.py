"""minisv.atomic against a directory prepared by someone else: a symlink planted where a temporary file of the
old naming scheme would go, and user files whose names look like temporary files. The oracle is the bytes of
the files involved, which must be exactly what they were (the victim, the user's file) or what was written."""
import os
import subprocess
import sys

from minisv.atomic import atomic_write, write_text


def test_a_planted_symlink_does_not_redirect_the_write(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "results.json"
    for guess in (f"{out}.tmp{os.getpid()}", f"{out}.tmp", f"{out}.tmp{os.getpid() + 1}"):   # predictable names
        os.symlink(victim, guess)
    write_text(out, "result")
    assert victim.read_text() == "precious" and out.read_text() == "result" and not out.is_symlink()
    assert all(os.path.islink(f"{out}.tmp{suffix}") for suffix in (os.getpid(), "", os.getpid() + 1))


def test_files_of_users_are_never_deleted(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                  # a pid that names no process
    mine = [tmp_path / f"results.tmp{dead.pid}", tmp_path / "results.tmp2024", tmp_path / "results.tmp",
            tmp_path / f".results.{dead.pid}.minisv-tmp", tmp_path / f"results.{'a' * 16}.{dead.pid}.minisv-tmp"]
    for p in mine:
        p.write_text("user data")
    write_text(tmp_path / "results", "x")
    assert all(p.read_text() == "user data" for p in mine)


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "model.bin"
    out.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("disk full")
    try:
        atomic_write(out, fail)
    except RuntimeError:
        pass
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
