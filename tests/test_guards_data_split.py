"""Held-out data that leaks or vanishes, checked by hand: copies of a document that differ only in surrounding
whitespace count as one (the existing test's copies all share their whitespace), a split keeps at least one
training document however large held_out is, and eval_sample does not count the document that a row's final BOS
separator only announces."""
import torch

from minisv.data import eval_sample, split_documents

BOS = 0


def test_whitespace_variants_of_a_document_are_one_document():
    docs = [f"document {i}" for i in range(30)] + [f"  document {i}\n" for i in range(30)] + ["\t", ""]
    for seed in range(5):
        train, held = split_documents(docs, held_out=0.3, seed=seed)
        assert len(train) + len(held) == 30
        assert not {t.strip() for t in train} & {t.strip() for t in held}


def test_a_huge_held_out_fraction_still_leaves_training_data():
    docs = [f"document {i}" for i in range(5)]
    for held_out in (0.9, 0.99, 1.0):
        train, held = split_documents(docs, held_out=held_out, seed=0)
        assert len(train) == 1 and len(held) == 4 and sorted(train + held) == docs


def test_documents_are_counted_by_their_tokens_not_by_separators():
    """Rows [BOS, x, y, BOS]: each row holds two tokens of one document, and its last BOS starts the next document,
    whose tokens are all in the next row. Any one row rests on one document; all rows on one each."""
    n = 6
    rows = torch.tensor([[BOS, 10 + 2 * r, 11 + 2 * r, BOS] for r in range(n)])
    for seed in range(4):
        sample, info = eval_sample(rows, n_tokens=4, bos_id=BOS, seed=seed)
        assert sample.shape == (1, 4) and info["documents"] == 1
    _, info = eval_sample(rows, n_tokens=4 * n, bos_id=BOS)
    assert info["documents"] == info["held_out_documents"] == n
