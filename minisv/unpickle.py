"""Read torch.save files (pytorch_model.bin, released transcoders, training checkpoints) without running code.

A torch.save file is a pickle, and unpickling calls whatever callables the file names: `os.system` is one
`__reduce__` away. Two doors are closed here before torch sees the file:

- TorchScript. torch.load hands any zip holding `<archive>/constants.pkl` to torch.jit.load, which runs the
  archive's code (its `__setstate__` methods can write files). Zip stores member names uncompressed, in each
  entry's local header and in the central directory, so searching the raw bytes for the name finds it in
  every place a zip reader could look, whichever reader (Python's zipfile, PyTorch's miniz) parses the file.
  A file that names constants.pkl anywhere is refused.
- Pickled callables. Every global the pickle names goes through `_RestrictedUnpickler.find_class`: the few
  functions that rebuild tensors pass; any other name becomes an inert record class that can be created and
  given attributes (how a pickled config object arrives, by __new__ + state) but refuses to be called.

What comes back is tensors, plain containers, numbers, strings and inert records; callers check the shape of
what they need. Files are zip archives (torch >= 1.6, memory-mapped) or the older plain pickle stream; the
older-still tar layout extracts members to disk and is refused.
"""
import mmap
import os
import pickle
import tarfile
import types

import torch

from .errors import MinisvError

_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
            ("collections", "OrderedDict"), ("torch", "device")}
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled 0x1950a86a20f9469cfc6c, after b"\x80" + protocol


class Inert:
    """Stand-in for a class named in a pickle: keeps the state the pickle gives it, executes nothing."""
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):   # reached only when the file *calls* the name (pickle's REDUCE)
        raise MinisvError(f"refusing to load this pickle: it calls {self.qualname}, which is not a tensor-rebuild "
                          f"function (a malicious or unexpected file); nothing from it was executed")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        return type(name, (Inert,), {"qualname": f"{module}.{name}"})


# torch.load reads the zip container and the tensor storages itself and takes the pickle machinery from this
# module (storage types such as torch.FloatStorage it resolves itself), so every other global goes through
# _RestrictedUnpickler.find_class.
_restricted_pickle = types.ModuleType("minisv_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda f, **kwargs: _RestrictedUnpickler(f, **kwargs).load()   # the legacy format


def load(path, map_location="cpu"):
    """The object a torch.save file holds, read as described above; a one-line MinisvError for anything else."""
    try:
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
        # TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 asks torch.load to run no code from any file; it does so by refusing
        # every pickle_module, this one too, which runs none either. The variable is set aside for this one call.
        forced = os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        try:
            return torch.load(path, map_location=map_location, pickle_module=_restricted_pickle, weights_only=False,
                              mmap=zipped)
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
