"""What the three scripts share: argparse value checks, output checks, device choice, and the error idiom.

A research tool should reject `--lr -1` or `--coldness nan` where it is parsed, in one line, before any model
is loaded — not save a NaN vector with exit status 0 after ten minutes of work. The `type=` functions below
make argparse do that: a bad value becomes `error: argument --lr: ...` and exit status 2.
"""
import argparse
import math
import os
import sys

import torch

from .errors import MinisvError


def _number(kind, test, what):
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not (math.isfinite(x) and test(x)):
            raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
        return x
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda x: x > 0, "a positive integer")
nonneg_int = _number(int, lambda x: x >= 0, "a non-negative integer")
positive_float = _number(float, lambda x: x > 0, "a positive finite number")
nonneg_float = _number(float, lambda x: x >= 0, "a non-negative finite number")
finite_float = _number(float, lambda x: True, "a finite number")
fraction = _number(float, lambda x: 0 < x < 1, "a number strictly between 0 and 1")


def device(text):
    """Resolve a --device value (None = CUDA when available) into a torch.device, or explain what is wrong."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise MinisvError(f"unknown device {text!r}: use cpu, cuda or cuda:N")
    if dev.type not in ("cpu", "cuda"):
        raise MinisvError(f"unsupported device {text!r}: use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MinisvError(f"--device {text} asked for CUDA but this machine has none: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MinisvError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_writable(path, *, not_suffix=()):
    """Fail now, before the slow part, if `path` cannot be written as a file (so no work is lost later)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise MinisvError(f"{path} is a directory: give a file name")
    if os.path.splitext(path)[1].lower() in not_suffix:
        raise MinisvError(f"{path}: that name is reserved for another output of this run; choose another suffix")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable directory
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise MinisvError(f"cannot write {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise MinisvError(f"cannot write {path}: permission denied")


def main(run, args, cleanup=None):
    """Run a script body; a MinisvError becomes one `error: ...` line on stderr and exit status 2."""
    try:
        return run(args)
    except MinisvError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if cleanup is not None:
            cleanup()
