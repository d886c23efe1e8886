"""Read torch.save files (pytorch_model.bin, released transcoders, training checkpoints) without running code,
and without letting a small file claim a large amount of memory.

A torch.save file is a pickle, and unpickling calls whatever callables the file names: `os.system` is one
`__reduce__` away. What the pickle may do is closed down before torch sees the file:

- TorchScript. torch.load hands any zip holding `<archive>/constants.pkl` to torch.jit.load, which runs the
  archive's code (its `__setstate__` methods can write files). Zip stores member names uncompressed, in each
  entry's local header and in the central directory, so searching the raw bytes for the name finds it in
  every place a zip reader could look, whichever reader (Python's zipfile, PyTorch's miniz) parses the file.
  A file that names constants.pkl anywhere is refused.
- Calls. Every global the pickle names goes through `_RestrictedUnpickler.find_class`: the functions that
  rebuild tensors and parameters, OrderedDict, torch.device and torch's dtypes pass (no other torch attribute:
  not torch.save, not torch.load); any other name becomes an inert record class that can be created and given
  attributes (how a pickled config object arrives, by __new__ + state) but refuses to be called.
- State changes. Pickle's BUILD sets attributes on an object, SETITEM(S) / APPEND(S) / ADDITEMS fill one, and
  none of them calls anything; but aimed at an allowed global they change torch itself (a BUILD that sets
  `torch._utils._rebuild_tensor_v2.__defaults__` alters every tensor any later torch.load returns). So each
  is allowed only on the objects a checkpoint builds: attributes on OrderedDicts and inert records, items in
  dicts, lists and sets created by the pickle itself.

Memory. A zip checkpoint keeps each tensor storage in a member `<archive>/data/<key>`, and the pickle names it
with a persistent id ('storage', storage type, key, location, numel). Before torch reads anything:

- every member must be stored uncompressed (torch.save never compresses; a deflated member is a zip bomb to
  torch, which inflates it in memory, or garbage, which torch maps as tensor bytes), and together they must fit
  in the file (overlapping members are the other kind of zip bomb);
- each storage's declared size must fit in its member (a larger one is silently filled with the neighbouring
  bytes), and in the legacy format, whose storages torch allocates before reading them, all of them together
  must fit in the file;
- each tensor must lie inside its storage, and all tensors together may not view more than _EXPANSION times
  the file's size: stride-0 or overlapping views let a 764-byte file describe a 9 GB tensor, which the first
  operation on it would allocate.

What comes back is tensors, plain containers, numbers, strings and inert records; callers check the shape of
what they need. Files are zip archives (torch >= 1.6, memory-mapped) or the older plain pickle stream; the
older-still tar layout extracts members to disk and is refused.
"""
import collections
import math
import mmap
import os
import pickle
import tarfile
import types
import zipfile

import torch

from .errors import MinisvError
from .files import check_regular

_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled 0x1950a86a20f9469cfc6c, after b"\x80" + protocol
# Tensors may view more bytes than the file holds (tied weights are one storage viewed twice), but not more than
# this many times as much, plus _SLACK for tiny files.
_EXPANSION, _SLACK = 4, 1 << 20


class Inert:
    """Stand-in for a class named in a pickle: keeps the state the pickle gives it, executes nothing."""
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):   # reached only when the file *calls* the name (pickle's REDUCE)
        raise MinisvError(f"refusing to load this pickle: it calls {self.qualname}, which is not a tensor-rebuild "
                          f"function (a malicious or unexpected file); nothing from it was executed")


class _Limits:
    """What one file may ask for: its storages checked against the zip members holding them (records: key ->
    member size; None for the legacy format), its tensors against the file's size."""

    def __init__(self, path, size, records):
        self.path, self.size, self.records = path, size, records
        self.declared = {}           # storage key -> bytes declared, each storage counted once
        self.viewed = 0              # bytes all tensors rebuilt so far span

    def refuse(self, why):
        return MinisvError(f"refusing to load {self.path}: {why} (a corrupt or malicious file); download or save it "
                           "again")

    def storage(self, pid):
        """Check a persistent id before torch acts on it (allocates, for the legacy format)."""
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")
                and isinstance(getattr(pid[1], "dtype", None), torch.dtype) and type(pid[4]) is int and pid[4] >= 0):
            raise self.refuse(f"the pickle names a storage as {str(pid)[:80]}, not as torch.save does")
        key, nbytes = str(pid[2]), pid[4] * pid[1].dtype.itemsize
        if self.records is not None and nbytes > self.records.get(key, -1):
            held = f"its record holds {self.records[key]:,}" if key in self.records else "there is no such record"
            raise self.refuse(f"storage {key} declares {nbytes:,} bytes, but {held}")
        self.declared.setdefault(key, nbytes)
        if sum(self.declared.values()) > self.size:
            raise self.refuse(f"its storages declare {sum(self.declared.values()):,} bytes, more than the file's "
                              f"{self.size:,}")

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad, hooks, metadata=None):
        """torch._utils._rebuild_tensor_v2, once the view it describes is checked to be sane and affordable."""
        ints = (lambda xs: type(xs) in (tuple, list, torch.Size) and all(type(x) is int and x >= 0 for x in xs))
        if not (isinstance(storage, torch.storage.TypedStorage) and type(offset) is int and offset >= 0
                and ints(size) and ints(stride) and len(size) == len(stride) and type(requires_grad) is bool
                and isinstance(hooks, dict) and not hooks and not metadata):
            raise self.refuse("a tensor is described with arguments torch.save never writes")
        numel = math.prod(size)
        if numel and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size():
            raise self.refuse(f"a tensor of shape {list(size)} reaches past the end of its storage")
        self.viewed += numel * storage.element_size()
        if self.viewed > _EXPANSION * self.size + _SLACK:
            raise self.refuse(f"its tensors span {self.viewed:,} bytes, absurd for a file of {self.size:,} "
                              "(stride-0 or overlapping views)")
        return torch._utils._rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), requires_grad, hooks)


def _checked(opcode, kinds, target):
    """The dispatch entry for a pickle opcode that changes an object (`target(unpickler)` finds it): refused
    unless that object is of one of `kinds` (Inert: any inert record), then run as Python's unpickler runs it."""
    run = pickle._Unpickler.dispatch[opcode[0]]

    def load(self):
        obj = target(self)
        if not any(type(obj) is k or k is Inert and isinstance(obj, Inert) for k in kinds):
            raise self.limits.refuse(f"the pickle changes the {type(obj).__name__} {str(obj)[:60]}, which is not an "
                                     "object it built")
        run(self)
    return load


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's own unpickler (its opcodes can be intercepted; the C one's cannot), restricted as described above.
    A subclass per file sets `limits`."""
    limits: _Limits
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.limits.rebuild_tensor
        if (module, name) in {("torch._utils", "_rebuild_parameter"), ("collections", "OrderedDict"),
                              ("torch", "device")} or module == "torch" and isinstance(getattr(torch, name, None),
                                                                                        torch.dtype):
            return super().find_class(module, name)
        return type(name, (Inert,), {"qualname": f"{module}.{name}"})

    def _persistent(self):
        self.limits.storage(self.stack[-1])
        pickle._Unpickler.dispatch[pickle.BINPERSID[0]](self)

    def _build(self):
        state = self.stack[-1]    # plain attributes only: no (state, slots) pair, no __setstate__ or __class__
        if not (type(state) is dict and all(type(k) is str and not k.startswith("__") for k in state)):
            raise self.limits.refuse(f"the pickle sets the state {str(state)[:60]}, not plain attributes")
        self._set_attributes()

    # the object each opcode changes: under the state or item it pops, or the one below its MARK
    _set_attributes = _checked(pickle.BUILD, [collections.OrderedDict, Inert], lambda self: self.stack[-2])
    dispatch[pickle.BUILD[0]] = _build
    dispatch[pickle.BINPERSID[0]] = _persistent
    dispatch[pickle.SETITEM[0]] = _checked(pickle.SETITEM, [dict, collections.OrderedDict], lambda self: self.stack[-3])
    dispatch[pickle.SETITEMS[0]] = _checked(pickle.SETITEMS, [dict, collections.OrderedDict],
                                            lambda self: self.metastack[-1][-1])
    dispatch[pickle.APPEND[0]] = _checked(pickle.APPEND, [list], lambda self: self.stack[-2])
    dispatch[pickle.APPENDS[0]] = _checked(pickle.APPENDS, [list], lambda self: self.metastack[-1][-1])
    dispatch[pickle.ADDITEMS[0]] = _checked(pickle.ADDITEMS, [set], lambda self: self.metastack[-1][-1])


def _pickle_module(limits):
    """The pickle machinery torch.load is given for one file: torch reads the zip container and the storages
    itself (resolving storage types such as torch.FloatStorage on its own) and unpickles everything else with it."""
    unpickler = type("Unpickler", (_RestrictedUnpickler,), {"limits": limits})
    module = types.ModuleType("minisv_restricted_pickle")
    module.Unpickler = unpickler
    module.load = lambda f, **kwargs: unpickler(f, **kwargs).load()   # the legacy format's header pickles
    return module


def _zip_records(path, size):
    """Storage key -> member size, for the members `<archive>/data/<key>`, once the archive is checked as above."""
    with zipfile.ZipFile(path) as z:
        members = z.infolist()
    names = [m.filename for m in members]
    if not members or len(set(names)) != len(names):
        why = "is empty" if not members else "names a member twice"
        raise MinisvError(f"refusing to load {path}: its zip archive {why} (a corrupt or malicious file); download or "
                          "save it again")
    compressed = next((m.filename for m in members if m.compress_type != zipfile.ZIP_STORED), None)
    if compressed or sum(m.file_size for m in members) > size:
        why = f"{compressed} is compressed, which torch.save never does" if compressed else \
            f"its members hold {sum(m.file_size for m in members):,} bytes, more than the file's {size:,}"
        raise MinisvError(f"refusing to load {path}: {why} (a zip bomb, or a corrupt file); download or save it again")
    prefix = names[0].split("/")[0] + "/data/"
    return {m.filename[len(prefix):]: m.file_size for m in members if m.filename.startswith(prefix)}


def load(path, map_location="cpu"):
    """The object a torch.save file holds, read as described above; a one-line MinisvError for anything else."""
    try:
        size = check_regular(path, None)
        with open(path, "rb") as f:
            head = f.read(16)
            zipped = head.startswith(b"PK\x03\x04")
            if zipped:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
                    if raw.find(b"constants.pkl") >= 0:
                        raise MinisvError(f"refusing to load {path}: it is a TorchScript archive, which carries "
                                          f"code that would run on loading; export its tensors with safetensors")
        if not zipped and (head[:1] != b"\x80" or head[2:14] != _LEGACY_MAGIC or tarfile.is_tarfile(path)):
            raise MinisvError(f"cannot read {path}: not a torch.save file (neither a zip archive nor a pickle stream); "
                              f"check the path, or download it again")
        limits = _Limits(path, size, _zip_records(path, size) if zipped else None)
        # TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 asks torch.load to run no code from any file; it does so by refusing
        # every pickle_module, this one too, which runs none either. The variable is set aside for this one call.
        forced = os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        try:
            return torch.load(path, map_location=map_location, pickle_module=_pickle_module(limits),
                              weights_only=False, mmap=zipped)
        finally:
            if forced is not None:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = forced
    except MinisvError:
        raise
    except OSError as e:
        raise MinisvError(f"cannot read {path} ({e.strerror or e})") from None
    except Exception as e:  # torch's own errors for a truncated or corrupt file span many types and lines
        raise MinisvError(f"cannot read {path} as a torch checkpoint, it is truncated or corrupt "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                          f"download or save it again") from None
