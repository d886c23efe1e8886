"""A minimal GGUF reader: metadata plus tensors dequantized to float32.

GGUF is llama.cpp's single-file checkpoint format. Versions 2 and 3 are laid out little-endian as

    header    b"GGUF", u32 version, u64 tensor_count, u64 kv_count
    metadata  kv_count x (string key, u32 value_type, value)
    tensors   tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding   up to a multiple of `general.alignment` (default 32)
    data      each tensor's bytes start at data_start + offset

A string is a u64 byte length and then UTF-8 bytes; an array is a u32 element type, a u64 count, and the
elements (possibly strings or arrays themselves). `ne` lists dimensions fastest-varying first, so ne[0] is
the row length and PyTorch's shape is `ne` reversed. Quantized types cut every row into blocks of 32 values:

    Q8_0   f16 d,         32 x int8 q      value = q * d
    Q4_0   f16 d,         16 bytes of q    value = (q - 8) * d
    Q4_1   f16 d, f16 m,  16 bytes of q    value = q * d + m

where byte j of a 4-bit block holds element j in its low nibble and element j + 16 in its high nibble.

The file is memory-mapped and read tensor by tensor, so the only copy made is each float32 result. The bytes
are untrusted: every length and count is checked against what is left of the file before it is used, so a
truncated or corrupt file raises a one-line MinisvError instead of a crash or a huge allocation.
"""
import math
import mmap
import struct

import numpy as np
import torch

from .errors import MinisvError
from .files import open_regular

# Metadata value types by id (GGUF spec); 8 is a string and 9 an array, everything else a fixed-size scalar.
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}

# ggml tensor type names by id, only to name them in errors ("-" marks ids that were retired).
_TYPE_NAMES = ("F32 F16 Q4_0 Q4_1 - - Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ2_XXS IQ2_XS IQ3_XXS "
               "IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 IQ1_M BF16 - - - TQ1_0 TQ2_0 - - - MXFP4").split()

# The types minisv reads: ggml id -> (numpy dtype of one block, values per block). Structured dtypes let
# numpy view a run of blocks straight from the map, e.g. Q8_0 blocks as fields d [n_blocks], q [n_blocks, 32].
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_BLOCKS = {
    F32: (np.dtype("<f4"), 1),
    F16: (np.dtype("<f2"), 1),
    BF16: (np.dtype("<u2"), 1),  # bfloat16 is the top 16 bits of a float32
    Q8_0: (np.dtype([("d", "<f2"), ("q", "i1", 32)]), 32),
    Q4_0: (np.dtype([("d", "<f2"), ("q", "u1", 16)]), 32),
    Q4_1: (np.dtype([("d", "<f2"), ("m", "<f2"), ("q", "u1", 16)]), 32),
}
_MAX_NESTING = 8  # arrays of arrays deeper than this are corruption, not a model


class _Cursor:
    """Reads little-endian values from the mapped file in order, refusing to step past its end."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 0

    def corrupt(self, why):
        return MinisvError(f"{self.path}: truncated or corrupt GGUF ({why}); re-download or re-export the file")

    def take(self, n, what):
        """Claim the next n bytes and return where they start."""
        if n > len(self.buf) - self.pos:
            raise self.corrupt(f"{what} at byte {self.pos} needs {n} bytes, only {len(self.buf) - self.pos} left")
        self.pos += n
        return self.pos - n

    def scalars(self, vtype, count, what):
        dtype = np.dtype(_SCALARS[vtype])
        return np.frombuffer(self.buf, dtype, count, self.take(count * dtype.itemsize, what))

    def u32(self, what):
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what):
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what):
        n = self.u64(what)
        start = self.take(n, what)
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} is not valid UTF-8") from None

    def value(self, vtype, what, depth=0):
        if vtype in _SCALARS:
            return self.scalars(vtype, 1, what)[0].item()
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.corrupt(f"{what} has unknown value type {vtype}")
        if depth == _MAX_NESTING:
            raise self.corrupt(f"{what} nests arrays more than {_MAX_NESTING} deep")
        item_type, count = self.u32(what), self.u64(what)
        if item_type in _SCALARS:  # one vectorized read, e.g. the 49152 token types
            return self.scalars(item_type, count, what).tolist()
        if count * 8 > len(self.buf) - self.pos:  # every string or array takes at least 8 bytes
            raise self.corrupt(f"{what} claims {count} items, more than the file can hold")
        return [self.value(item_type, what, depth + 1) for _ in range(count)]


def _dequantize(blocks, ggml_type):
    """blocks: [n_blocks] records viewed on the map -> flat float32 array, the one new copy."""
    if ggml_type == F32:
        return blocks.copy()
    if ggml_type == F16:
        return blocks.astype(np.float32)
    if ggml_type == BF16:  # shift the 16 stored bits into the top of a 32-bit word
        bits = blocks.astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    if ggml_type == Q8_0:
        x = blocks["q"].astype(np.float32)                     # [n_blocks, 32]
    else:  # Q4_0 / Q4_1: unpack the nibbles, low ones first
        x = np.empty((len(blocks), 32), np.float32)
        x[:, :16] = blocks["q"] & 0x0F
        x[:, 16:] = blocks["q"] >> 4
        if ggml_type == Q4_0:
            x -= 8
    x *= blocks["d"].astype(np.float32)[:, None]              # one scale per block
    if ggml_type == Q4_1:
        x += blocks["m"].astype(np.float32)[:, None]           # Q4_1's per-block offset
    return x.reshape(-1)


def read_gguf(path):
    """Read a GGUF v2/v3 file -> (metadata, tensors).

    metadata maps each key to a Python value (str, int, float, bool, or a list for arrays); tensors maps
    each name to a float32 torch.Tensor in PyTorch shape order (ne=[576, 49152] -> shape (49152, 576)).
    Everything the header says is checked before any tensor is read: the tensors' bytes must lie inside the
    file and must not overlap, so what is allocated is bounded by the file's size (at most 8 floats per byte).
    """
    cur = _Cursor(_map(path), path)
    cur.pos = 4  # past the magic
    version = cur.u32("version")
    if version not in (2, 3):
        raise MinisvError(f"{path}: unsupported GGUF version {version} (minisv reads little-endian versions 2 "
                          "and 3); re-export the model with a current llama.cpp")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        metadata[key] = cur.value(cur.u32(f"type of {key!r}"), f"value of {key!r}")
    infos = [_tensor_info(cur, path) for _ in range(n_tensors)]
    align = metadata.get("general.alignment", 32)
    if type(align) is not int or align < 1 or align & (align - 1):     # a bool is no alignment (nor is True 1)
        raise cur.corrupt(f"general.alignment is {align!r}, not a power of two")
    _check_layout(cur, infos, cur.pos + -cur.pos % align)
    return metadata, {name: torch.from_numpy(_dequantize(blocks, ggml_type).reshape(ne[::-1]))
                      for name, ne, ggml_type, blocks in infos}


def _map(path):
    """The file memory-mapped, once it is known to be a regular file that starts with GGUF's magic."""
    with open_regular(path, None) as f:
        if f.read(4) != b"GGUF":
            raise MinisvError(f"{path}: not a GGUF file (bad magic); pass a .gguf model file")
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # unmapped once no array views it
        except OSError as e:
            raise MinisvError(f"{path}: cannot read GGUF file ({e.strerror or e})") from None


def _tensor_info(cur, path):
    """One tensor's header entry, checked: [name, ne, ggml type, offset from the data section]."""
    name = cur.string("tensor name")
    n_dims = cur.u32(f"dimensions of tensor {name!r}")
    if not 1 <= n_dims <= 4:
        raise cur.corrupt(f"tensor {name!r} has {n_dims} dimensions, GGUF allows 1 to 4")
    ne = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.take(8 * n_dims, f"shape of tensor {name!r}"))
    ggml_type, offset = cur.u32(f"type of tensor {name!r}"), cur.u64(f"offset of tensor {name!r}")
    if ggml_type not in _BLOCKS:
        known = ggml_type < len(_TYPE_NAMES) and _TYPE_NAMES[ggml_type] != "-"
        kind = f"GGUF type {_TYPE_NAMES[ggml_type]}" if known else f"unknown GGUF type id {ggml_type}"
        raise MinisvError(f"{path}: tensor {name!r} has {kind}, which minisv cannot read; supported: F32, "
                          "F16, BF16, Q8_0, Q4_0, Q4_1; re-export the model with one of those")
    if 0 in ne or ne[0] % _BLOCKS[ggml_type][1]:
        raise cur.corrupt(f"tensor {name!r} has shape {list(ne)}, empty or not whole "
                          f"{_BLOCKS[ggml_type][1]}-value blocks per row")
    return [name, ne, ggml_type, offset]


def _check_layout(cur, infos, data_start):
    """Check that each tensor's bytes lie inside the file, apart from every other tensor's, and replace each
    info's offset by its blocks, viewed on the map (nothing is copied yet)."""
    spans = []
    for info in infos:
        name, ne, ggml_type, offset = info
        block, per_block = _BLOCKS[ggml_type]
        n_blocks = math.prod(ne) // per_block
        start = data_start + offset
        if start + n_blocks * block.itemsize > len(cur.buf):
            raise cur.corrupt(f"data of tensor {name!r} runs past the end of the file")
        spans.append((start, start + n_blocks * block.itemsize, name))
        info[3] = np.frombuffer(cur.buf, block, n_blocks, start)
    if len({name for *_, name in spans}) != len(spans):
        twice = next(name for i, (*_, name) in enumerate(spans) if any(name == s[2] for s in spans[:i]))
        raise cur.corrupt(f"tensor {twice!r} appears twice")
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:      # tensors sharing bytes would let a small file be read as a huge model
            raise cur.corrupt(f"the data of tensors {first!r} and {second!r} overlap")
