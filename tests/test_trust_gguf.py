"""GGUF files whose header asks for more than the file holds, or names what it should not; and the GGUF
tokenizer's added tokens and BOS against transformers' own GGUF reader. GGUFs are packed by hand here (the gguf
package cannot write overlapping tensors) or written with the gguf package (llama.cpp's writer)."""
import os
import struct

import numpy as np
import pytest
from helpers import limited, refused, write_gguf

from minisv.gguf import read_gguf
from minisv.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
from gguf import GGUFValueType as V  # noqa: E402


def _string(s):
    return struct.pack("<Q", len(s.encode())) + s.encode()


def pack_gguf(path, n_tensors, shape, offset_of=lambda i, nbytes: i * nbytes):
    """A GGUF v3 of n_tensors F32 tensors of `shape` (ne order) whose data start at offset_of(i, bytes of one):
    by default one after the other, as llama.cpp writes them. Returns the file's size."""
    nbytes = 4 * int(np.prod(shape))
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, 0)
    for i in range(n_tensors):
        head += _string(f"t{i}") + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, 0, offset_of(i, nbytes))
    head += b"\0" * (-len(head) % 32)
    n_data = max(offset_of(i, nbytes) for i in range(n_tensors)) + nbytes
    path.write_bytes(head + np.arange(n_data // 4, dtype="<f4").tobytes())
    return len(head) + n_data


def test_tensors_sharing_bytes_are_refused(tmp_path):
    """200 tensors of 256 kB at one offset: 51 MB of floats from a 270 kB file (the 4 MB -> 8 GB file, smaller)."""
    size = pack_gguf(tmp_path / "shared.gguf", 200, (256, 256), lambda i, nbytes: 0)
    assert size < 300_000
    refused(r"shared.gguf: truncated or corrupt GGUF \(the data of tensors 't0' and 't1' overlap\)", read_gguf,
            tmp_path / "shared.gguf")
    pack_gguf(tmp_path / "half.gguf", 2, (64,), lambda i, nbytes: i * nbytes // 2)     # a partial overlap
    refused("the data of tensors 't0' and 't1' overlap", read_gguf, tmp_path / "half.gguf")
    pack_gguf(tmp_path / "ok.gguf", 3, (64,))                                            # the honest layout
    _, tensors = read_gguf(tmp_path / "ok.gguf")
    assert [t[0].item() for t in tensors.values()] == [0, 64, 128]


def test_a_shared_offset_bomb_is_refused_before_allocating(tmp_path):
    """2000 tensors of 1 MB at one offset: 2 GB asked of a 1 MB file, read under a memory limit far below that."""
    pack_gguf(tmp_path / "bomb.gguf", 2000, (512, 512), lambda i, nbytes: 0)
    out = limited(f"""
        try:
            minisv.gguf.read_gguf({str(tmp_path / "bomb.gguf")!r})
            print("loaded")
        except MinisvError as e:
            print("error:", e)
        """)
    assert out.startswith("error:") and "overlap" in out, out


@pytest.mark.parametrize("value", [(True, V.BOOL), (False, V.BOOL), (32.0, V.FLOAT32), (-32, V.INT32),
                                   (0, V.UINT32), (48, V.UINT32), ("32", V.STRING)])
def test_alignment_must_be_a_positive_power_of_two_integer(tmp_path, value):
    write_gguf(tmp_path / "a.gguf", {"w": (np.ones(32, np.float32), gguf.GGMLQuantizationType.F32)},
               {"general.alignment": (*value, None)})
    refused(f"general.alignment is {value[0]!r}, not a power of two", read_gguf, tmp_path / "a.gguf")


def test_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo.gguf")
    refused("fifo.gguf: it is not a regular file", read_gguf, tmp_path / "fifo.gguf")


# ------------------------------------------------------------------------------------------- tokenizer
BYTES = [chr(b) for b in [*range(33, 127), *range(161, 173), *range(174, 256)]]
PRINTABLE = set(BYTES)


def byte_tokens():
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    others = iter(chr(c) for c in range(256, 512))
    return [chr(b) if chr(b) in PRINTABLE else next(others) for b in range(256)]


def tokenizer_gguf(path, extra, bos, template="{{ bos_token }}{{ messages[0]['content'] }}"):
    """A llama GGUF with only tokenizer metadata: the 256 byte tokens, one merge, then `extra` tokens
    {text: token_type}; BOS is token `bos`."""
    tokens = byte_tokens() + ["ab"] + list(extra)
    types = [1] * 257 + list(extra.values())
    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in [("llama.block_count", 1), ("llama.context_length", 8), ("llama.embedding_length", 8),
                       ("llama.feed_forward_length", 8), ("llama.attention.head_count", 1)]:
        w.add_uint32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(bos)
    w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Tokenizer.from_gguf(read_gguf(path)[0])


def test_user_defined_tokens_stay_whole_like_transformers(tmp_path):
    """token_type 4 (user-defined, "<think>") and 3 (control) are matched whole in the text, by llama.cpp and by
    transformers' GGUF reader alike."""
    from transformers import AutoTokenizer
    tok = tokenizer_gguf(tmp_path / "t.gguf", {"<think>": 4, "<|im_start|>": 3}, bos=258)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    for text in ("a<think>b", "<|im_start|>ab<think>", "<thin>k", "x <think> y"):
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert tok.encode("a<think>b") == [ord("a"), 257, ord("b")]          # "<think>" is token 257


def test_a_byte_token_as_bos_decodes_and_chat_says_why_it_cannot(tmp_path):
    """BOS = the byte 0xC3, half of a UTF-8 character: decoding gives what transformers gives (U+FFFD), and a chat
    template that writes bos_token is refused in one line instead of a UnicodeDecodeError."""
    from transformers import AutoTokenizer
    tok = tokenizer_gguf(tmp_path / "t.gguf", {}, bos=0xC3)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    assert tok.bos_id == ref.bos_token_id == 0xC3
    assert tok.decode([0xC3]) == ref.decode([0xC3]) == "\ufffd"
    assert tok.encode("hi", bos=True) == [0xC3, ord("h"), ord("i")]
    refused(r"the chat template writes the BOS token, whose bytes b'\\xc3' are not text", tok.chat, "hi")
    other = tokenizer_gguf(tmp_path / "ok.gguf", {}, bos=0xC3, template="{{ messages[0]['content'] }}")
    assert "BOS" not in refused("not one minisv recognises", other.chat, "hi")    # a template without bos_token
