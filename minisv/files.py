"""Reading files minisv did not write: one gate for every input file, one typed reader for every JSON file.

A path a user or a download hands over may name anything: a FIFO that never ends, a symlink to /dev/zero, 10 GB
of JSON, bytes that are not UTF-8, JSON nested 100,000 deep, a list where an object belongs, `"layer": "x"`.
Each of those ends here, as a one-line MinisvError naming the file (and the field), instead of a hang, exhausted
memory, or a traceback from deep inside the code that used the value.

    check_regular(path, max_bytes)        the path is a regular file of at most max_bytes (for readers that
                                          take a path themselves: torch.load, safetensors, mmap)
    open_regular(path, max_bytes)         ... opened for reading, binary, to stream it
    read_bytes(path, max_bytes)           ... its bytes;   read_text: ... decoded as UTF-8 (strictly)
    read_json(path)                       ... parsed as JSON, whose top level must be an object (k=OBJECT)
    parse_json(text, where)               the same checks on JSON already in memory (a line of a .jsonl file)
    field(obj, key, where, k)             obj[key] if it is of Kind k (type AND range), else the error

For example, a transcoder's cfg.json:

    cfg = read_json(folder / "cfg.json")
    d_in = field(cfg, "d_in", folder / "cfg.json", POSITIVE_INT)
    k = field(cfg, "k", folder / "cfg.json", optional(POSITIVE_INT), default=None)
    arch = field(cfg, "architecture", folder / "cfg.json", one_of("relu", "topk"), default="relu")

A Kind is a test and the words for it; `Kind(test, words)` makes one for a check of the caller's own, e.g.
`Kind(lambda v: type(v) is int and 0 <= v < n_layers, f"a layer in 0..{n_layers - 1}")`. bool is not an int
here (JSON's true is no layer number), and numbers must be finite.
"""
import io
import json
import math
import os
import reprlib
import stat
from typing import Any, Callable, NamedTuple

from .errors import MinisvError

MAX_JSON = 64 << 20   # the largest JSON file read (Llama 3's tokenizer.json is 9 MB); pass max_bytes to change it
_FIX = "fix or replace the file"


def _fail(where, problem) -> MinisvError:
    return MinisvError(f"{where}: {problem}; {_FIX}")


# ------------------------------------------------------------------------------------------- any input file
def open_regular(path, max_bytes: int | None) -> io.BufferedReader:
    """`path` opened for reading (binary) if it is a regular file of at most max_bytes (None: of any size, for
    weights that are memory-mapped rather than read); a MinisvError if not.

    O_NONBLOCK makes opening a FIFO return at once (a plain open waits for a writer, forever); the checks are
    made on the opened file (fstat), so what is read is what was checked, even if the path changes meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise MinisvError(f"cannot read {path} ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, device or socket)"
            raise MinisvError(f"cannot read {path}: it is {what}; pass a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise MinisvError(f"cannot read {path}: it has {info.st_size:,} bytes, more than the {max_bytes:,} such a "
                              f"file may have; check the path")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path, max_bytes: int | None) -> int:
    """The size of `path` if it is a regular file of at most max_bytes, else a MinisvError (see open_regular)."""
    with open_regular(path, max_bytes) as f:
        return os.fstat(f.fileno()).st_size


def read_bytes(path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes (one that grows while it is read is cut off there)."""
    with open_regular(path, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise MinisvError(f"cannot read {path} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise MinisvError(f"cannot read {path}: it grew past {max_bytes:,} bytes while being read; check the path")
    return data


def read_text(path, max_bytes: int) -> str:
    """The text of a regular file of at most max_bytes, which must be valid UTF-8."""
    return _utf8(read_bytes(path, max_bytes), path)


def _utf8(data: bytes, where) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(where, f"byte {e.start} is not valid UTF-8 (the file is not UTF-8 text)") from None


# ------------------------------------------------------------------------------------------- JSON
class Kind(NamedTuple):
    """What a value must be: test(value) is True; `words` say it in an error ("a positive integer")."""
    test: Callable[[Any], bool]
    words: str


def _is_int(v) -> bool:
    return type(v) is int                                   # not bool, whose type is bool


def _is_number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)     # not bool, NaN or Infinity


ANY = Kind(lambda v: True, "any JSON value")
OBJECT = Kind(lambda v: type(v) is dict, "a JSON object")
LIST = Kind(lambda v: type(v) is list, "a JSON list")
STR = Kind(lambda v: type(v) is str, "a string")
BOOL = Kind(lambda v: type(v) is bool, "true or false")
INT = Kind(_is_int, "an integer")
COUNT = Kind(lambda v: _is_int(v) and v >= 0, "an integer >= 0")
POSITIVE_INT = Kind(lambda v: _is_int(v) and v > 0, "a positive integer")
NUMBER = Kind(_is_number, "a finite number")
POSITIVE_NUMBER = Kind(lambda v: _is_number(v) and v > 0, "a positive number")


def optional(k: Kind) -> Kind:
    """k, or null."""
    return Kind(lambda v: v is None or k.test(v), f"{k.words} or null")


def one_of(*values) -> Kind:
    return Kind(lambda v: any(type(v) is type(x) and v == x for x in values), "one of " + ", ".join(map(repr, values)))


def list_of(k: Kind) -> Kind:
    return Kind(lambda v: type(v) is list and all(k.test(x) for x in v), f"a list of ({k.words})")


def dict_of(k: Kind) -> Kind:
    """An object whose values are all of kind k (JSON keys are always strings)."""
    return Kind(lambda v: type(v) is dict and all(k.test(x) for x in v.values()), f"an object of ({k.words})")


REQUIRED = object()   # field()'s default: the key must be there
_SHORT = reprlib.Repr()     # bounded in depth and length, so that showing a value never costs much
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 30


def shown(value, width=60) -> str:
    """A value for an error message: its repr cut to `width` characters, however large or deep the value is."""
    text = _SHORT.repr(value)
    return text if len(text) <= width else text[:width] + "..."


def field(obj: dict, key: str, where, k: Kind, default=REQUIRED):
    """obj[key] if it is of kind k; `default` when the key is absent (an error when there is none); a one-line
    MinisvError naming `where` (the file, or "file: parent") and the key otherwise. A null is a value like any
    other: it passes only a kind that allows it (optional(...)); it never means "take the default"."""
    if type(obj) is not dict:
        raise _fail(where, f"expected a JSON object holding {key!r}, found {shown(obj)}")
    if key not in obj:
        if default is REQUIRED:
            raise MinisvError(f"{where} lacks {key!r} ({k.words}); {_FIX}")
        return default
    if not k.test(obj[key]):
        raise _fail(where, f"{key} is {shown(obj[key])}, expected {k.words}")
    return obj[key]


def _unique_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {twice!r} appears twice in one object")
    return obj


def parse_json(text: str | bytes, where, k: Kind = OBJECT):
    """JSON text (str, or bytes that must be UTF-8) parsed, checked to be of kind k; errors name `where`.
    Refused: invalid JSON, an object with a key twice (which value is meant?), nesting deep enough to exhaust
    Python's recursion limit (about 1000 levels), an integer of more than 4300 digits."""
    if isinstance(text, bytes):
        text = _utf8(text, where)
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise _fail(where, "the JSON is nested too deeply to be a real file") from None
    except ValueError as e:      # JSONDecodeError, a duplicate key, an integer too long to convert
        raise _fail(where, f"not valid JSON ({str(e).splitlines()[0][:200]})") from None
    if not k.test(value):
        raise _fail(where, f"the JSON is {shown(value)}, expected {k.words}")
    return value


def read_json(path, k: Kind = OBJECT, max_bytes: int = MAX_JSON):
    """The JSON in a regular file of at most max_bytes, which must be UTF-8 and of kind k (see parse_json)."""
    return parse_json(read_bytes(path, max_bytes), path, k)
