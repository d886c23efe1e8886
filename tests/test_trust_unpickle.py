"""minisv.unpickle against hostile torch.save files built here byte by byte: pickles that change torch's own
state, call torch functions, or describe far more memory than the file holds. The oracles: torch's own state
(unchanged), Python's zipfile (what the archive holds), the sizes written down here, and a memory limit that a
hostile file would break if it were allocated (each such load runs in a subprocess under RLIMIT_AS, so a
regression fails the test instead of exhausting the machine)."""
import os
import pickle
import struct
import zipfile

import pytest
import torch
from helpers import limited, refused

from minisv import unpickle


def rezip(src, dst, replace=None, deflate=()):
    """Copy the torch.save zip `src` to `dst`, with members whose names end in a key of `replace` replaced by its
    bytes (or by a function writing to the member), and the members ending in a name in `deflate` compressed."""
    replace = replace or {}
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for m in z.infolist():
            new = next((v for k, v in replace.items() if m.filename.endswith(k)), None)
            info = zipfile.ZipInfo(m.filename)
            info.compress_type = zipfile.ZIP_DEFLATED if m.filename.endswith(tuple(deflate)) else zipfile.ZIP_STORED
            with out.open(info, "w") as w:
                new(w) if callable(new) else w.write(z.read(m) if new is None else new)
    return dst


def data_pkl(path):
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def with_pickle(tmp_path, raw, name="evil.pt"):
    """A torch.save zip of an empty dict whose data.pkl is `raw`."""
    torch.save({}, tmp_path / "base.pt")
    return rezip(tmp_path / "base.pt", tmp_path / name, {"/data.pkl": raw})


def unicode(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


# ------------------------------------------------------------------------------------------- state and calls
def test_a_refused_file_cannot_change_torch(tmp_path):
    """BUILD on the global _rebuild_tensor_v2 would set its defaults: metadata {'neg': True} for every tensor any
    later torch.load rebuilds (here: minisv's own), flipping their sign."""
    rebuild = torch._utils._rebuild_tensor_v2
    defaults = rebuild.__defaults__
    state = pickle.dumps((None, {"__defaults__": ({"neg": True},)}), protocol=2)[2:-1]
    evil = with_pickle(tmp_path, b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + state + b"b0}.")
    torch.save({"w": torch.ones(3)}, tmp_path / "good.pt")
    try:
        refused("refusing to load .*evil.pt: the pickle sets the state", unpickle.load, evil)
        assert rebuild.__defaults__ == defaults
        assert torch.equal(unpickle.load(tmp_path / "good.pt")["w"], torch.ones(3))
    finally:
        rebuild.__defaults__ = defaults


@pytest.mark.parametrize("target, state", [
    (b"ctorch._utils\n_rebuild_parameter\n", {"x": 1}),                  # a global function
    (b"ctorch\ndevice\n", {"x": 1}),                                      # a global class
    (b"ccollections\nOrderedDict\n)R", {"__class__": 1}),                 # its own object, but a dunder
    (b"cos\nsystem\n", {"x": 1}),                                         # an inert class (not an instance)
])
def test_state_is_set_only_on_objects_the_pickle_built(tmp_path, target, state):
    raw = b"\x80\x02" + target + pickle.dumps(state, protocol=2)[2:-1] + b"b."
    refused(r"refusing to load .*: the pickle (sets the state|changes the)", unpickle.load, with_pickle(tmp_path, raw))


def test_items_go_only_into_containers_the_pickle_built(tmp_path):
    for raw in (b"\x80\x02ccollections\nOrderedDict\n(K\x01K\x02u.",      # SETITEMS on the class itself
                b"\x80\x02ctorch\nfloat32\nK\x01K\x02s.",                 # SETITEM on a dtype
                b"\x80\x02ctorch\ndevice\n(K\x01e."):                     # APPENDS on a class
        refused("the pickle changes the", unpickle.load, with_pickle(tmp_path, raw))


@pytest.mark.parametrize("name", ["save", "load", "tensor", "from_file", "Tensor", "_utils"])
def test_only_dtypes_come_from_torch(tmp_path, name):
    """torch.save(obj, path) written into the pickle must not run (it would create the marker)."""
    marker = tmp_path / "pwned"
    raw = b"\x80\x02ctorch\n" + name.encode() + b"\n}" + unicode(str(marker)) + b"\x86R."
    refused(f"refusing to load this pickle: it calls torch.{name}", unpickle.load, with_pickle(tmp_path, raw))
    assert not marker.exists()
    raw = b"\x80\x02ctorch\nfloat16\n."                                  # a dtype is allowed
    assert unpickle.load(with_pickle(tmp_path, raw, "dtype.pt")) is torch.float16


# ------------------------------------------------------------------------------------------- sizes
def test_a_storage_larger_than_its_record_is_refused(tmp_path):
    """data.pkl of an 8-float tensor, its record data/0 holding 4 floats: torch would map the 16 bytes after it."""
    torch.save(torch.arange(8.0), tmp_path / "eight.pt")
    torch.save(torch.arange(4.0), tmp_path / "four.pt")
    with zipfile.ZipFile(tmp_path / "four.pt") as z:
        four = z.read(next(n for n in z.namelist() if n.endswith("/data/0")))
    assert len(four) == 16
    bad = rezip(tmp_path / "eight.pt", tmp_path / "bad.pt", {"/data/0": four})
    refused(r"storage 0 declares 32 bytes, but its record holds 16", unpickle.load, bad)
    assert torch.equal(unpickle.load(tmp_path / "eight.pt"), torch.arange(8.0))


@pytest.mark.parametrize("member", ["/data/0", "/data.pkl"])
def test_compressed_members_are_refused(tmp_path, member):
    """A deflated data/0 would be mapped as if it held the floats; a deflated data.pkl is inflated in memory."""
    torch.save(torch.arange(64.0), tmp_path / "t.pt")
    bad = rezip(tmp_path / "t.pt", tmp_path / "bad.pt", deflate=[member])
    refused(rf"{member.lstrip('/')} is compressed, which torch.save never does", unpickle.load, bad)


def test_members_claiming_more_than_the_file_are_refused(tmp_path):
    """The central directory says data/0 holds 1 MB of a 5 kB file (what overlapping members, a zip bomb, add to)."""
    torch.save(torch.zeros(1000), tmp_path / "t.pt")
    raw = bytearray((tmp_path / "t.pt").read_bytes())
    entry = raw.index(b"PK\x01\x02")           # central-directory entries: sizes at +20 and +24, name at +46
    while not raw[entry + 46:entry + 46 + struct.unpack_from("<H", raw, entry + 28)[0]].endswith(b"/data/0"):
        entry = raw.index(b"PK\x01\x02", entry + 4)
    struct.pack_into("<II", raw, entry + 20, 1 << 20, 1 << 20)
    (tmp_path / "bad.pt").write_bytes(raw)
    with zipfile.ZipFile(tmp_path / "bad.pt") as z:       # the oracle: what Python's zipfile reads
        assert sum(m.file_size for m in z.infolist()) > len(raw)
    refused(r"its members hold [\d,]+ bytes, more than the file's", unpickle.load, tmp_path / "bad.pt")


LOAD = """
    try:
        obj = minisv.unpickle.load({path!r})
        print("loaded", json.dumps({{k: list(t.shape) for k, t in obj.items()}} if isinstance(obj, dict) else str(obj)))
    except MinisvError as e:
        print("error:", e)
"""


def test_an_inflating_data_pkl_is_refused_before_it_is_inflated(tmp_path):
    """300 MB of padding after a tiny pickle, deflated to 300 kB: torch would inflate it all to read data.pkl."""
    torch.save({}, tmp_path / "base.pt")
    pickled = data_pkl(tmp_path / "base.pt")

    def bomb(w):
        w.write(pickled)
        for _ in range(300):
            w.write(bytes(1 << 20))
    bad = rezip(tmp_path / "base.pt", tmp_path / "bomb.pt", {"/data.pkl": bomb}, deflate=["/data.pkl"])
    assert bad.stat().st_size < 2 << 20
    assert limited(LOAD.format(path=str(bad))).startswith("error: refusing to load")


@pytest.mark.parametrize("shape", [(48_000, 48_000), (2, 3_000_000_000)])
def test_a_tiny_file_cannot_describe_a_huge_tensor(tmp_path, shape):
    """A released-transcoder-like file of ~1 kB whose W_enc is one float viewed with stride 0 as ~9 GB."""
    path = tmp_path / "released.pt"
    torch.save({"W_enc": torch.zeros(1).expand(*shape), "b_enc": torch.zeros(4)}, path)
    assert path.stat().st_size < 2000
    message = refused(r"its tensors span [\d,]+ bytes, absurd for a file of [\d,]+", unpickle.load, path)
    assert f"{4 * shape[0] * shape[1]:,}" in message
    assert limited(LOAD.format(path=str(path))).startswith("error: refusing to load")


def test_many_views_of_one_storage_are_refused_but_shared_weights_load(tmp_path):
    base = torch.randn(4096)
    torch.save({f"w{i}": base.view(-1) for i in range(300)}, tmp_path / "views.pt")   # 300 x 16 kB, a ~40 kB file
    refused("its tensors span", unpickle.load, tmp_path / "views.pt")
    torch.save({"embed": base, "unembed": base, "norm": torch.ones(8)}, tmp_path / "tied.pt")   # tied weights
    loaded = unpickle.load(tmp_path / "tied.pt")
    assert torch.equal(loaded["embed"], base) and torch.equal(loaded["unembed"], base)


def test_a_tensor_past_the_end_of_its_storage_is_refused(tmp_path):
    torch.save(torch.arange(8.0), tmp_path / "t.pt")
    raw = data_pkl(tmp_path / "t.pt")
    assert raw.count(b"K\x08") == 2             # numel 8 of the storage and size (8,) of the tensor, as BININT1
    bad = raw[::-1].replace(b"K\x08"[::-1], b"K\x09"[::-1], 1)[::-1]          # the tensor's size, the last one
    refused("a tensor of shape \\[9\\] reaches past the end of its storage", unpickle.load,
            rezip(tmp_path / "t.pt", tmp_path / "bad.pt", {"/data.pkl": bad}))


def test_legacy_storages_declaring_more_than_the_file_are_refused_before_allocation(tmp_path):
    """The legacy format allocates each storage at its declared size before reading it: 4 GB here."""
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    declared = raw.index(b"K\x04N")             # numel 4, then view_metadata None, in the persistent id
    path.write_bytes(raw[:declared] + b"J" + struct.pack("<i", 1 << 30) + raw[declared + 2:])
    refused("its storages declare 4,294,967,296 bytes, more than the file's", unpickle.load, path)
    assert "more than the file's" in limited(LOAD.format(path=str(path)))
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(unpickle.load(path)["w"], torch.arange(4.0))


def test_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo.pt")
    refused("fifo.pt: it is not a regular file", unpickle.load, tmp_path / "fifo.pt")
