"""minisv.data: text sources, packing into BOS-led rows, token files, the held-out split, the default corpus."""
import json

import numpy as np
import pytest
import torch

from minisv.data import (default_corpus, load_dataset, load_tokens, read_texts, split_documents, token_rows)
from minisv.errors import MinisvError


class ByteTokenizer:
    """Each UTF-8 byte is a token id + 2; 0 is BOS."""
    bos_id, eos_id = 0, 1

    def encode(self, text, bos=False):
        return [0] * bos + [b + 2 for b in text.encode()]


def test_read_texts_file_folder_jsonl(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b" / "c.md").write_text("second")
    (tmp_path / "b" / "d.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}))
    (tmp_path / "ignored.csv").write_text("x")
    assert read_texts(tmp_path / "a.txt") == ["first"]
    assert read_texts(tmp_path) == ["first", "second", "third", "fourth"]   # sorted by path, recursive


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), ('{"body": "x"}', "no string field 'text'")])
def test_read_texts_bad_jsonl(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(MinisvError, match=message):
        read_texts(tmp_path / "x.jsonl")


def test_read_texts_bad_paths(tmp_path):
    with pytest.raises(MinisvError, match="no such"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(MinisvError, match="unsupported"):
        read_texts(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinisvError, match="no .txt"):
        read_texts(tmp_path / "empty")


def test_token_rows_pack_documents_with_bos():
    tok = ByteTokenizer()
    rows = token_rows(tok, ["abcdefg", "hij"], ctx=4)
    stream = tok.encode("abcdefg") + [0] + tok.encode("hij")           # documents joined by BOS
    assert rows[:, 0].eq(0).all()                                       # every row starts with BOS
    assert rows[:, 1:].flatten().tolist() == stream[:len(rows) * 3]      # then 3 tokens each, tail dropped
    assert len(rows) == len(stream) // 3
    plain = token_rows(tok, ["abcdefg", "hij"], ctx=4, bos=False)
    assert plain.flatten().tolist() == (tok.encode("abcdefg") + tok.encode("hij"))[:8]
    with pytest.raises(MinisvError, match="fewer than one row"):
        token_rows(tok, ["ab"], ctx=8)


def test_load_tokens_bin_and_npy(tmp_path):
    stream = np.arange(20, dtype=np.uint16)
    stream.tofile(tmp_path / "t.bin")
    np.save(tmp_path / "flat.npy", stream.astype(np.int32))
    np.save(tmp_path / "rows.npy", stream[:16].reshape(4, 4))
    assert load_tokens(tmp_path / "t.bin", 5).tolist() == stream.reshape(4, 5).tolist()
    with_bos = load_tokens(tmp_path / "flat.npy", 5, bos_id=99)
    assert with_bos[:, 0].eq(99).all() and with_bos[:, 1:].flatten().tolist() == list(range(20))
    assert load_tokens(tmp_path / "rows.npy", 4).dtype == torch.long
    with pytest.raises(MinisvError, match="rows of 4 tokens but ctx is 8"):
        load_tokens(tmp_path / "rows.npy", 8)
    np.save(tmp_path / "floats.npy", np.zeros(8))
    with pytest.raises(MinisvError, match="expected integer token ids"):
        load_tokens(tmp_path / "floats.npy", 4)


def test_split_documents_is_deterministic_and_disjoint():
    docs = [f"document {i}" for i in range(100)]
    train, held = split_documents(docs, held_out=0.1, seed=3)
    assert (train, held) == split_documents(docs, held_out=0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert train == [d for d in docs if d in set(train)]                  # original order kept
    assert split_documents(docs, held_out=0.1, seed=4)[1] != held
    assert len(split_documents(docs[:3], held_out=0.01)[1]) == 1          # at least one held out
    with pytest.raises(MinisvError, match="at least 2 documents"):
        split_documents(docs[:1])


def test_default_corpus_is_real_english_and_stable():
    docs = default_corpus()
    assert docs == default_corpus() and len(docs) > 300
    text = " ".join(docs)
    assert len(text) > 1_000_000 and text.count(" the ") > 10_000


def test_load_dataset_holds_out_whole_documents(tmp_path):
    docs = [f"doc{i} " + "word " * 40 for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    train, held = load_dataset(tmp_path / "d.jsonl", ByteTokenizer(), ctx=16, held_out=0.25)
    decode = lambda rows: bytes(t - 2 for t in rows[:, 1:].flatten().tolist() if t >= 2).decode()
    train_text, held_text = decode(train), decode(held)
    held_names = {f"doc{i} " for i in range(40) if f"doc{i} " in held_text}
    assert held_names and not any(name in train_text for name in held_names)
    np.save(tmp_path / "tok.npy", np.arange(100))
    train, held = load_dataset(tmp_path / "tok.npy", None, ctx=10, held_out=0.2)
    assert train.shape == (8, 10) and held.tolist() == [list(range(80, 90)), list(range(90, 100))]
