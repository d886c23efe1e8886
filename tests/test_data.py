"""minisv.data: text sources, packing into BOS-led rows, token files, the held-out split, the default corpus."""
import collections
import json

import numpy as np
import pytest
import torch

from minisv.data import (default_corpus, eval_sample, load_dataset, load_tokens, paragraphs, read_texts, split_documents,
                         token_rows)
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
    (tmp_path / "b" / "c.md").write_text("one\nstill one\n\n  \ntwo\r\n\r\nthree\n")
    assert read_texts(tmp_path / "b" / "c.md") == ["one\nstill one", "two", "three"]   # one file: its paragraphs
    assert read_texts(tmp_path)[1] == "one\nstill one\n\n  \ntwo\n\nthree\n"              # in a folder: one document


def test_one_text_file_is_a_dataset_of_its_paragraphs(tmp_path):
    """A single .txt gives documents split at blank lines (it used to be one document, which nothing could be held
    out of); whole paragraphs are held out."""
    text = "\n\n".join(f"paragraph {i}: " + "word " * 20 for i in range(40))
    (tmp_path / "book.txt").write_text(text)
    train, held = load_dataset(tmp_path / "book.txt", ByteTokenizer(), ctx=16, held_out=0.1)
    decode = lambda rows: bytes(t - 2 for t in rows[:, 1:].flatten().tolist() if t >= 2).decode()
    held_names = {f"paragraph {i}:" for i in range(40) if f"paragraph {i}:" in decode(held)}
    assert len(held_names) >= 3 and not any(name in decode(train) for name in held_names)
    (tmp_path / "one.txt").write_text("just one paragraph\nof two lines")
    with pytest.raises(MinisvError, match="blank lines between paragraphs"):
        load_dataset(tmp_path / "one.txt", ByteTokenizer(), ctx=4)


@pytest.mark.parametrize("content, message", [("{not json", "line 1: not valid JSON"), ('{"body": "x"}', "line 1 lacks 'text' \\(a string\\)"),
                                              ('[1]', "line 1: .* expected a JSON object"), ('{"text": 5}', "text is 5, expected a string")])
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
    with pytest.raises(MinisvError, match="at least 2 distinct documents"):
        split_documents(docs[:1])


def test_split_drops_exact_duplicates_before_choosing():
    """A document that occurs twice must not end up held out *and* in training."""
    docs = [f"document {i % 30}" + " " * (i // 30) for i in range(60)]          # each twice (once with a space)
    for seed in range(5):
        train, held = split_documents(docs, held_out=0.3, seed=seed)
        assert len(train) + len(held) == 30 and not set(train) & set(held)


def test_default_corpus_is_real_english_and_stable():
    docs = default_corpus()
    assert docs == default_corpus() and len(docs) > 300
    text = " ".join(docs)
    assert len(text) > 1_000_000 and text.count(" the ") > 10_000


def test_no_held_out_paragraph_of_the_default_corpus_is_in_training():
    """The standard library repeats docstrings (whole documents and ~1,600 paragraphs); each paragraph is kept only
    where it first occurs, so no held-out paragraph appears verbatim in training."""
    docs = default_corpus()
    count = collections.Counter(p for d in docs for p in paragraphs(d))
    assert max(count.values()) == 1
    train, held = split_documents(docs)
    assert len(held) > 20 and not {p for d in held for p in paragraphs(d)} & {p for d in train for p in paragraphs(d)}


def test_eval_sample_spreads_over_all_held_out_documents():
    """Evaluation rows are drawn at random from all held-out rows (the first rows are the first few documents),
    and the sample says on how many documents and tokens it rests, counted here by decoding."""
    tok = ByteTokenizer()
    docs = [" ".join(f"d{i}w{j}" for j in range(2 + i // 3)) for i in range(30)]      # every row is different
    rows = token_rows(tok, docs, ctx=16)
    sample, info = eval_sample(rows, n_tokens=16 * 10, bos_id=tok.bos_id, seed=0)
    assert sample.shape == (10, 16) and len(rows) > 50
    # the document of every text byte, from the documents themselves (each is followed by one BOS)
    owner = torch.cat([torch.full((len(tok.encode(d)) + 1,), i) for i, d in enumerate(docs)])
    owner = owner[:rows[:, 1:].numel()].view(len(rows), 15)
    text = rows[:, 1:] != tok.bos_id
    chosen = [i for i in range(len(rows)) if any(torch.equal(rows[i], s) for s in sample)]
    assert len(chosen) == 10 and torch.equal(rows[chosen], sample)                  # whole rows, in order
    assert info["documents"] == len(set(owner[chosen][text[chosen]].tolist()))
    assert info["held_out_documents"] == len(set(owner[text].tolist())) and info["held_out_rows"] == len(rows)
    assert info["tokens"] == 160 and info["held_out_tokens"] == rows.numel()
    first = set(owner[:10][text[:10]].tolist())
    assert info["documents"] > len(first) and max(chosen) > 20                      # not just the first rows
    assert eval_sample(rows, 16 * 10, tok.bos_id, seed=0)[0].equal(sample)           # seeded
    assert not eval_sample(rows, 16 * 10, tok.bos_id, seed=1)[0].equal(sample)
    everything, info = eval_sample(rows, 10 ** 6, bos_id=None)
    assert everything.equal(rows) and info["documents"] is None


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
