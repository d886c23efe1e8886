"""Text in, fixed-length token rows out: the data every training and evaluation loop in minisv reads.

Sources: the built-in offline corpus (`default_corpus`), a .txt/.md file (split into documents at blank lines), a
folder of them (one document per file), a .jsonl file with a "text" field per line (`read_texts`), or a
pre-tokenized token file (`load_tokens`: nanoGPT-style uint16 .bin, or .npy). Documents are packed into rows of
`ctx` tokens that each start with BOS, the way the transcoder paper cut OpenWebText (long documents split into
chunks, each chunk with BOS); packing short documents together wastes no positions on padding.

Held-out text must really be unseen: exact duplicate documents are dropped before the split (and, in the built-in
corpus, every paragraph that already appeared earlier), the split is by *document*, and `eval_sample` draws the
evaluated rows at random from all held-out documents and says how many documents and tokens a figure rests on.
"""
import ast
import functools
import os
import random
import re
import sysconfig

import numpy as np
import torch

from .errors import MinisvError
from .files import STR, field, parse_json, read_text

TEXT_SUFFIXES = (".txt", ".md")
MAX_CORPUS = 8 << 30        # the largest text file read into memory whole
TOKEN_SUFFIXES = (".bin", ".npy")


@functools.lru_cache(maxsize=1)
def _default_corpus():
    import pydoc_data.topics
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    stdlib = sysconfig.get_paths()["stdlib"]
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "idle_test", "__pycache__"))
        for f in sorted(files):
            if f.endswith(".py"):
                docs.append(_docstrings(os.path.join(root, f)))
    # Docstrings repeat themselves across modules ("Internal function.", whole inherited method docs, one module
    # mirrored in two packages): keep each paragraph only where it first appears, so no held-out paragraph can
    # also sit in training. About 7% of the text goes.
    seen, unique = set(), []
    for doc in docs:
        kept = [p for p in paragraphs(doc) if p not in seen]
        seen.update(kept)
        unique.append("\n\n".join(dict.fromkeys(kept)))       # (dict: also drop repeats within the document)
    return tuple(d for d in unique if len(d) > 200)


def default_corpus() -> list[str]:
    """Real English prose that every Python install carries, ~2.1 MB (~500K tokens), in a fixed order: the 79
    language-reference topics behind `help()` (pydoc_data) and, per standard-library module, its docstrings
    (module, classes, functions) joined into one document; no paragraph occurs twice. Same Python version ->
    same corpus."""
    return list(_default_corpus())


def paragraphs(text) -> list[str]:
    """The non-empty blank-line-separated paragraphs of a text, stripped."""
    return [p for p in (q.strip() for q in re.split(r"\n[ \t\r\f\v]*\n", text)) if p]


def _docstrings(path):
    """The docstrings of one module file, read with `ast` (nothing is imported or executed)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    return "\n\n".join(d for node in _definitions(tree) if (d := ast.get_docstring(node)))


def _definitions(node):
    """The module, then its classes and functions, depth first (only bodies: a full ast.walk is 10x slower)."""
    yield node
    for child in node.body:
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _definitions(child)


def read_texts(path) -> list[str]:
    """Documents from a folder of .txt/.md files (one document per file, recursively, sorted by path) and .jsonl
    files (one document per line, from its "text" field), from one .jsonl file, or from one .txt/.md file, whose
    blank-line-separated paragraphs are its documents (a single text has no other boundaries to hold out by)."""
    path = str(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs
                       if f.endswith(TEXT_SUFFIXES + (".jsonl",)))
        if not files:
            raise MinisvError(f"folder {path} holds no .txt, .md or .jsonl files; point --data at your text")
        return [doc for f in files for doc in (_read_jsonl(f) if f.endswith(".jsonl") else [_read_text(f)])]
    if not os.path.isfile(path):
        raise MinisvError(f"no such data file or folder: {path}")
    if path.endswith(".jsonl"):
        return _read_jsonl(path)
    if not path.endswith(TEXT_SUFFIXES):
        raise MinisvError(f"unsupported data file {path}: use .txt, .md, .jsonl (a 'text' field per line), "
                          f"a folder of them, or pre-tokenized .bin/.npy tokens")
    return paragraphs(_read_text(path))


def _read_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _read_jsonl(path):
    """The 'text' field of every line of a .jsonl file, each line read through the one JSON gate."""
    lines = read_text(path, MAX_CORPUS).splitlines()
    return [field(parse_json(line, f"{path} line {i}"), "text", f"{path} line {i}", STR)
            for i, line in enumerate(lines, 1) if line.strip()]


def token_rows(tokenizer, texts, ctx, bos=True) -> torch.Tensor:
    """Pack documents into rows [N, ctx] (LongTensor). With bos: documents are joined with BOS between them
    and cut into chunks of ctx-1 tokens, each row = [BOS] + chunk; without: plain chunks of ctx tokens.
    The incomplete tail is dropped. tokenizer: anything with encode(text, bos=False) and bos_id."""
    if bos and tokenizer.bos_id is None:
        raise MinisvError("this tokenizer has no BOS token; build the rows with bos=False")
    stream = []
    for doc in texts:
        if bos and stream:
            stream.append(tokenizer.bos_id)
        stream.extend(tokenizer.encode(doc, bos=False))
    return _rows(torch.tensor(stream, dtype=torch.long), ctx, tokenizer.bos_id if bos else None)


def load_tokens(path, ctx, bos_id=None) -> torch.Tensor:
    """Rows [N, ctx] from a pre-tokenized file: a flat uint16 .bin (nanoGPT layout) or a .npy holding either a
    flat token stream or rows already [N, ctx]. A flat stream is cut like `token_rows` (BOS-led rows of ctx-1
    tokens when bos_id is given)."""
    path = str(path)
    if not os.path.isfile(path):
        raise MinisvError(f"no such token file: {path}")
    if path.endswith(".bin"):
        if os.path.getsize(path) % 2:
            raise MinisvError(f"{path} has an odd number of bytes; a .bin token file is a flat array of uint16 ids")
        array = np.memmap(path, dtype=np.uint16, mode="r")
    elif path.endswith(".npy"):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise MinisvError(f"{path} is not a plain .npy array ({e}); save token ids with np.save") from None
    else:
        raise MinisvError(f"unsupported token file {path}: use a uint16 .bin or a .npy")
    if array.dtype.kind not in "iu" or array.ndim not in (1, 2):
        raise MinisvError(f"{path} holds a {array.ndim}-d {array.dtype} array; expected integer token ids, "
                          f"flat or [rows, ctx]")
    tokens = torch.from_numpy(np.array(array, dtype=np.int64))     # a copy: the memmap is read-only
    if tokens.ndim == 2:
        if tokens.shape[1] != ctx:
            raise MinisvError(f"{path} holds rows of {tokens.shape[1]} tokens but ctx is {ctx}; pass --ctx "
                              f"{tokens.shape[1]} or save a flat token stream")
        return tokens
    return _rows(tokens, ctx, bos_id)


def _rows(stream, ctx, bos_id):
    """Cut a token stream into rows [N, ctx] (BOS-led rows of ctx-1 tokens when bos_id is given). The last,
    partial row is dropped: fewer than ctx tokens of the whole stream, since documents are packed, not padded.
    Keeping it as a shorter row would need padding that every loss and CE figure must then mask, and refilling it
    with earlier tokens would count those twice."""
    width = ctx - 1 if bos_id is not None else ctx
    n = len(stream) // width
    if n == 0:
        raise MinisvError(f"only {len(stream)} tokens of data, fewer than one row of {ctx}; give more text or a "
                          f"smaller ctx")
    rows = stream[:n * width].view(n, width)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], 1)
    return rows


def split_documents(texts, held_out=0.05, seed=0):
    """Deterministic train / held-out split by document. Exact duplicates (up to surrounding whitespace) and empty
    documents are dropped first, since a copy left in training would make its twin not held out; then a seeded
    shuffle picks round(held_out·n) documents (at least one when there are two or more) for evaluation. Both lists
    keep the original order."""
    texts = [t for t in dict.fromkeys(t.strip() for t in texts) if t]
    n = len(texts)
    if n < 2:
        raise MinisvError(f"need at least 2 distinct documents to hold some out for evaluation, got {n}; give more "
                          f"text (a folder or .jsonl of documents, or a text file with blank lines between "
                          f"paragraphs)")
    chosen = set(random.Random(seed).sample(range(n), min(n - 1, max(1, round(held_out * n)))))
    return [t for i, t in enumerate(texts) if i not in chosen], [t for i, t in enumerate(texts) if i in chosen]


def load_dataset(data, tokenizer, ctx, held_out=0.05, seed=0, bos=True):
    """(train_rows, held_out_rows), each [N, ctx], from `data`: None (the default corpus), a text source for
    `read_texts`, or a token file (its last rows are held out, since it has no document boundaries). The held-out
    rows are in document order; take evaluation rows from them with `eval_sample`."""
    if data is not None and str(data).endswith(TOKEN_SUFFIXES):
        rows = load_tokens(data, ctx, tokenizer.bos_id if bos and tokenizer is not None else None)
        n_eval = max(1, round(held_out * len(rows)))
        if len(rows) < 2:
            raise MinisvError(f"{data} gives only {len(rows)} row of {ctx} tokens; need at least 2 to hold one out")
        return rows[:-n_eval], rows[-n_eval:]
    if tokenizer is None:
        raise MinisvError("this model has no tokenizer; give pre-tokenized data (--data tokens.bin or .npy)")
    train, held = split_documents(default_corpus() if data is None else read_texts(data), held_out, seed)
    return token_rows(tokenizer, train, ctx, bos), token_rows(tokenizer, held, ctx, bos)


def eval_sample(rows, n_tokens, bos_id=None, seed=0):
    """(sample [n, ctx], info): about n_tokens tokens of held-out `rows` (as `load_dataset` returns them), whole rows
    drawn at random from all of them (the first rows would cover only the first few documents), kept in order.
    info says what a figure measured on the sample rests on: {"rows", "tokens", "documents"} of the sample and
    {"held_out_rows", "held_out_tokens", "held_out_documents"} of all the held-out rows. Documents are counted
    from the BOS tokens that separate them inside rows (None without bos_id)."""
    n, ctx = rows.shape
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max(1, n_tokens // ctx)].sort().values
    info = {"rows": len(chosen), "tokens": len(chosen) * ctx, "documents": None,
            "held_out_rows": n, "held_out_tokens": n * ctx, "held_out_documents": None}
    if bos_id is not None:
        # document number of every token = separators so far in the stream (a row's leading BOS is not one)
        sep = rows[:, 1:] == bos_id                                                          # [n, ctx-1]
        doc = sep.flatten().cumsum(0).view(n, ctx - 1)
        info["documents"] = len(torch.unique(doc[chosen][~sep[chosen]]))
        info["held_out_documents"] = len(torch.unique(doc[~sep]))
    return rows[chosen], info
