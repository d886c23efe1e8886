"""Tokenizers for byte-level BPE models (GPT-2, Pythia/NeoX, SmolLM2, Llama 3, Qwen2), built from the model's files.

Encoding text takes three steps, each reproducing what Hugging Face `tokenizers` does with the same files:

  1. added tokens ("<|im_start|>", Pythia's runs of spaces) are cut out of the raw text, longest first;
  2. every other stretch is (NFC-normalized if the model asks for it and) split into pieces by a regex,
     the pre-tokenizer: words with their leading space, numbers, punctuation runs, whitespace;
  3. each piece, as UTF-8 bytes, is BPE-merged: repeatedly join the adjacent pair that was learned earliest.

tiktoken runs steps 2 and 3 in Rust. It joins the adjacent pair whose joined bytes have the lowest *rank*,
so we rank each token by the position of the merge that first creates it: "lowest rank" is then "learned
earliest", and tiktoken's ids (ranks) are mapped back to the model's ids by `_rank_to_id`. (tiktoken also
joins a pair that spells a token through another split than its merge, and takes a whole piece that is a
token as is; vocabularies from BPE training or converted from tiktoken never reach a state where that differs.)

Files write each token as text through GPT-2's `bytes_to_unicode` table, which gives every byte a printable
character (the space 0x20 is 'Ġ', newline 0x0A is 'Ċ'); we undo it so every token is a byte string.

Added tokens: `lstrip`, `rstrip`, `single_word` flags are ignored (none of the supported families set them),
and all are matched on the raw text, before normalization. Chat prompts (`chat`) are rendered from the model's
own chat template by minisv.chat_template.

Every file is read through minisv.files, and every field is checked where it is read: a malformed file is a
one-line MinisvError naming the file and the field, never a traceback or a tokenizer that is silently wrong.
"""
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import tiktoken

from .chat_template import render_chat
from .errors import MinisvError
from .files import BOOL, LIST, MAX_JSON, OBJECT, STR, Kind, dict_of, field, list_of, one_of, optional, read_json, \
    read_text, shown

# GPT-2's pre-tokenizer: contractions, then letters / numbers / other symbols each with one optional leading
# space, then whitespace. `\s+(?!\S)` leaves a run's last space to the next word: "a   b" -> "a", "  ", " b".
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 (StarCoder's tokenizer) first isolates every digit, then runs GPT-2's regex on the text between.
# As one regex: `\p{N}` comes first, GPT-2's number rule is gone (no digits are left for it), and the
# lookahead treats a digit like the end of text: "a   1" -> "a", "   ", "1" (GPT-2 alone: "a", "  ", " 1").
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# Llama 3 and Qwen2 ship their regex in tokenizer.json; GGUF files only name it.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# `tokenizer.ggml.pre` names (llama.cpp's) -> regex. A file without the key predates it: GPT-2's regex.
_GGUF_PATTERNS = {"gpt-2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN, "llama-bpe": LLAMA3_PATTERN,
                  "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


def _byte_of_char():
    """Inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, and the 68 others
    (control chars, space, 0x7F-0xA0, 0xAD) are written as chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


_BYTE_OF_CHAR = _byte_of_char()


def _unbyte(token: str) -> bytes:
    """A vocabulary entry as bytes. One with a character outside GPT-2's table is plain text (llama.cpp
    stores a few tokens that way; transformers' GGUF reader reads them the same)."""
    if all(c in _BYTE_OF_CHAR for c in token):
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    return token.encode("utf-8")


MAX_TOKEN_ID = (1 << 24) - 1   # far above any real vocabulary (Llama 3 has 128,256 tokens): a larger id is corruption
TOKEN_ID = Kind(lambda v: type(v) is int and 0 <= v <= MAX_TOKEN_ID, f"a token id in 0..{MAX_TOKEN_ID}")
_MAX_TEMPLATE = 1 << 20        # chat_template.jinja; real templates take a few kB


@dataclass(frozen=True)
class Specials:
    """The special tokens a model's files name (None: it has none) and whether its tokenizer prepends BOS."""
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False


class PreTokenizer(NamedTuple):
    """How text is cut into pieces before BPE: NFC-normalized (or not), then split into the matches of `pattern`.
    complete: the matches cover the whole text, so a piece that skips a character is refused (a pattern that can
    match the empty string), never silently dropped; False where dropping text is the format's intent."""
    pattern: str
    nfc: bool = False
    complete: bool = True


class Tokenizer:
    """Text <-> token ids for one model. Build it with `from_dir` or `from_gguf`.

    vocab:  byte string -> id for the BPE vocabulary (bytes, merged tokens; may include special tokens)
    merges: (left, right) byte-string pairs in the order they were learned
    added:  text -> id for tokens matched whole in the raw text before anything else
    """

    def __init__(self, vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]], added: dict[str, int],
                 pre: PreTokenizer, specials: Specials = Specials(), chat_template: str | None = None,
                 name: str = "this model"):
        # Ranks: bytes 0..255 first (every byte needs one, even one the vocabulary lacks, like 0xFF), then each
        # merge's product in merge order. Two merges spelling the same token share the first one's rank.
        ranks = {bytes([b]): b for b in range(256)}
        # None: a byte the vocabulary lacks (SmolLM2 has no 0x04); HF drops it from the output, and so do we.
        self._rank_to_id = [vocab.get(bytes([b])) for b in range(256)]
        for left, right in merges:
            if left + right not in ranks:
                if left + right not in vocab:
                    raise MinisvError(f"{name}: merge {left!r} + {right!r} makes a token missing from the vocabulary; "
                                      "the tokenizer files are inconsistent, download them again")
                ranks[left + right] = len(self._rank_to_id)
                self._rank_to_id.append(vocab[left + right])
        self._rank_len = [len(token) for token in sorted(ranks, key=ranks.get)]   # bytes of each rank's token
        try:
            self._bpe = tiktoken.Encoding("minisv", pat_str=pre.pattern, mergeable_ranks=ranks, special_tokens={})
        except ValueError as e:
            raise MinisvError(f"{name}: the pre-tokenizer regex {shown(pre.pattern)} does not compile "
                              f"({str(e).splitlines()[0][:200]})") from None
        self._pre = pre
        # Longest first, so that Pythia's "    " wins over "  " (re tries alternatives left to right).
        added = {text: i for text, i in added.items() if text}
        self._added = added
        self._added_re = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None

        self.vocab_size = 1 + max([*vocab.values(), *added.values()], default=-1)
        self._id_bytes: list[bytes | None] = [None] * self.vocab_size  # for decode; None: an unused id
        for token, i in vocab.items():
            self._id_bytes[i] = token
        for text, i in added.items():
            self._id_bytes[i] = text.encode("utf-8")
        # add_bos: whether the model's own tokenizer prepends BOS by default; encode(text, bos=tok.add_bos).
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = (specials.bos_id, specials.eos_id, specials.pad_id,
                                                               specials.add_bos)
        # is_chat: the model ships a chat template (chat() renders it, or says why it cannot); name: for errors
        self.is_chat, self._chat_template, self.name = bool(chat_template), chat_template, name

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text`; added tokens written in it ("<|endoftext|>") become their ids.
        bos=True makes the ids start with the BOS id: it is put first unless the text already starts with the
        BOS token's text, as a rendered chat prompt of Llama 3, Mistral or Gemma does (see `chat`)."""
        if not isinstance(text, str):
            raise MinisvError(f"encode expects a str, got {type(text).__name__}; decode bytes to text first")
        if bos and self.bos_id is None:
            raise MinisvError("this tokenizer has no BOS token; call encode without bos=True")
        ids, start = [], 0
        for m in self._added_re.finditer(text) if self._added_re else ():
            ids += self._encode_plain(text[start:m.start()])
            ids.append(self._added[m[0]])
            start = m.end()
        ids += self._encode_plain(text[start:])
        return [self.bos_id] + ids if bos and ids[:1] != [self.bos_id] else ids

    def _encode_plain(self, text: str) -> list[int]:
        if self._pre.nfc:
            text = unicodedata.normalize("NFC", text)
        try:
            ranks = self._bpe.encode_ordinary(text)
        except BaseException as e:
            # tiktoken's regex engine gives up on a pattern that backtracks past its limits, and tiktoken turns
            # that into a Rust panic, which reaches Python as pyo3's PanicException (a BaseException).
            if type(e).__name__ != "PanicException":
                raise
            raise MinisvError(f"{self.name}: the pre-tokenizer regex {shown(self._pre.pattern)} failed on this "
                              f"text ({str(e).split(': ')[-1][:80]}): it backtracks catastrophically or matches the "
                              "empty string, which minisv cannot run; use another tokenizer") from None
        if self._pre.complete and sum(map(self._rank_len.__getitem__, ranks)) != len(text.encode("utf-8")):
            raise MinisvError(f"{self.name}: the pre-tokenizer regex {shown(self._pre.pattern)} skips characters "
                              "of this text (it can match the empty string), which minisv cannot reproduce")
        ids = [self._rank_to_id[r] for r in ranks]
        return [i for i in ids if i is not None]

    def decode(self, ids) -> str:
        """Text of a list (or 1-D tensor / array) of ids; bytes that are not valid UTF-8 become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else ids
        return b"".join(self._bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_str(self, id: int) -> str:
        """One token as readable text; a token holding part of a UTF-8 character shows those bytes as \\xNN."""
        return self._bytes(id).decode("utf-8", errors="backslashreplace")

    def _bytes(self, i) -> bytes:
        if isinstance(i, int) and i >= self.vocab_size:
            # Pythia's embedding has 50304 rows for 50277 tokens (padded for speed): the extra rows are no text
            raise MinisvError(f"cannot decode id {i}: this tokenizer has {self.vocab_size} tokens; ids from "
                              f"{self.vocab_size} up only pad the model's embedding matrix and stand for no text")
        if not isinstance(i, int) or i < 0 or self._id_bytes[i] is None:
            raise MinisvError(f"cannot decode {i!r}: token ids of this tokenizer are ints in 0..{self.vocab_size - 1} "
                              "(pass a flat list or 1-D tensor)")
        return self._id_bytes[i]

    def chat(self, user: str, system: str | None = None) -> str:
        """The prompt text the model's chat template renders for one user turn (after a system turn when
        `system` is given, or the template's default one), ending with the assistant turn's opener: exactly
        `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` for ChatML, Llama 2/3,
        Mistral, Gemma and Phi-3 templates (minisv.chat_template); a template it does not recognise raises.

        BOS: the text starts with the BOS token's text when the template writes it (Llama 2/3, Mistral,
        Gemma); `encode(text, bos=tok.add_bos)` then keeps that single BOS, so the ids match transformers'."""
        if not self.is_chat:
            raise MinisvError(f"{self.name} has no chat template, so chat() cannot format a prompt; "
                              "use a chat (instruct) model or pass plain text to encode()")
        bos = ""
        if self.bos_id is not None and "bos_token" in self._chat_template:
            try:   # a GGUF may name a byte token as BOS: bytes that are no text cannot be written into a prompt
                bos = self._id_bytes[self.bos_id].decode("utf-8")
            except UnicodeDecodeError:
                raise MinisvError(f"{self.name}: the chat template writes the BOS token, whose bytes "
                                  f"{self._id_bytes[self.bos_id]!r} are not text; pass plain text instead "
                                  "(optimize_sv.py --raw)") from None
        return render_chat(self._chat_template, user, system, bos, self.name)

    # ------------------------------------------------------------------ building from files
    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """From a Hugging Face model directory: tokenizer.json, or GPT-2's vocab.json + merges.txt, plus
        tokenizer_config.json / special_tokens_map.json / chat_template.jinja when present."""
        path = Path(path)
        config = _json_if_there(path / "tokenizer_config.json")
        if (path / "tokenizer.json").exists():
            vocab, merges, added, pre = _read_tokenizer_json(path / "tokenizer.json")
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            vocab, merges, added = _read_gpt2_files(path, config)
            pre = PreTokenizer(GPT2_PATTERN)
        else:
            raise MinisvError(f"{path}: no tokenizer.json or vocab.json + merges.txt; "
                              "download the model's tokenizer files too")
        specials = _specials(path, config, _json_if_there(path / "special_tokens_map.json"), vocab, added)
        return cls(vocab, merges, added, pre, specials, _chat_template(path, config), str(path))

    @classmethod
    def from_gguf(cls, metadata: dict) -> "Tokenizer":
        """From the metadata of a GGUF file (`minisv.gguf.read_gguf(path)[0]`); every field read is checked."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise MinisvError(f"GGUF tokenizer {kind!r} is not supported; minisv reads byte-level BPE ('gpt2') "
                              "vocabularies only (GPT-2, SmolLM2, Llama 3, Qwen2)")
        if _gguf_field(metadata, "tokenizer.ggml.add_space_prefix", _is_bool, "true or false", False):
            raise MinisvError("GGUF tokenizer sets add_space_prefix, which minisv does not support; minisv reads "
                              "byte-level BPE without it (GPT-2, SmolLM2, Llama 3, Qwen2)")
        pre = _gguf_field(metadata, "tokenizer.ggml.pre", _is_str, "a string", "gpt-2")
        if pre not in _GGUF_PATTERNS:
            raise MinisvError(f"GGUF pre-tokenizer {pre!r} is not supported; minisv knows {sorted(_GGUF_PATTERNS)}")
        if not metadata.get("tokenizer.ggml.tokens") or metadata.get("tokenizer.ggml.merges") is None:
            raise MinisvError("GGUF metadata lacks tokenizer.ggml.tokens or .merges; this file has no usable "
                              "tokenizer, load the model from its Hugging Face directory instead")
        tokens = _gguf_field(metadata, "tokenizer.ggml.tokens", _is_strs, "a list of strings")
        merges = _gguf_field(metadata, "tokenizer.ggml.merges", _is_strs, "a list of strings")
        n = len(tokens)
        # one entry per token, or none: token_type (3 = control, "<|im_start|>"; 4 = user-defined; llama.cpp matches
        # both whole in text) and the scores minisv does not use, whose length still tells a damaged table
        types = _gguf_field(metadata, "tokenizer.ggml.token_type",
                            lambda v: isinstance(v, list) and len(v) == n and all(type(k) is int for k in v),
                            f"a list of {n} ints, one per token", [1] * n)
        _gguf_field(metadata, "tokenizer.ggml.scores", lambda v: v is None or isinstance(v, list) and len(v) == n,
                    f"a list of {n} numbers, one per token")
        added = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}
        vocab = {_unbyte(t): i for i, (t, kind) in enumerate(zip(tokens, types)) if kind not in (3, 4)}
        pairs = [m.split(" ") for m in merges]
        if any(len(p) != 2 for p in pairs):
            raise MinisvError("GGUF tokenizer.ggml.merges has an entry that is not 'left right'; the file is corrupt")
        ids = [_gguf_field(metadata, f"tokenizer.ggml.{name}_token_id",
                           lambda v: v is None or type(v) is int and 0 <= v < n, f"a token id in 0..{n - 1}")
               for name in ("bos", "eos", "padding")]
        add_bos = _gguf_field(metadata, "tokenizer.ggml.add_bos_token", _is_bool, "true or false", False)
        return cls(vocab, [(_unbyte(a), _unbyte(b)) for a, b in pairs], added, PreTokenizer(_GGUF_PATTERNS[pre]),
                   Specials(*ids, add_bos),
                   _gguf_field(metadata, "tokenizer.chat_template", lambda v: v is None or _is_str(v), "a string"),
                   _gguf_field(metadata, "general.name", _is_str, "a string", "this GGUF model"))


# ------------------------------------------------------------------ Hugging Face files
def _json_if_there(path: Path) -> dict:
    """An optional JSON file (tokenizer_config.json, special_tokens_map.json): {} when absent."""
    return read_json(path) if path.exists() or path.is_symlink() else {}


def _ids(tokens, where) -> dict[bytes, int]:
    """A JSON vocabulary {token text: id}, checked, as {token bytes: id}."""
    if type(tokens) is not dict:
        raise MinisvError(f"{where}: the vocabulary is {shown(tokens)}, expected an object of token: id; "
                          "fix or replace the file")
    for token, i in tokens.items():
        if not TOKEN_ID.test(i):
            raise MinisvError(f"{where}: token {shown(token)} has id {shown(i)}, expected {TOKEN_ID.words}; "
                              "fix or replace the file")
    return {_unbyte(token): i for token, i in tokens.items()}


def _pairs(merges, where) -> list[tuple[bytes, bytes]]:
    """Merges written "left right" (merges.txt, older tokenizer.json) or [left, right] -> byte-string pairs."""
    pairs = [m.split(" ") if type(m) is str else m for m in merges]
    for n, pair in enumerate(pairs):
        if not (type(pair) is list and len(pair) == 2 and all(type(t) is str for t in pair)):
            raise MinisvError(f"{where}: merge #{n} is {shown(merges[n])}, not a pair of tokens ('left right' or "
                              "[left, right]); the tokenizer files are corrupt, download them again")
    return [(_unbyte(a), _unbyte(b)) for a, b in pairs]


_ADDED_TOKEN = Kind(lambda t: type(t) is dict and type(t.get("content")) is str and TOKEN_ID.test(t.get("id")),
                    'objects with a "content" string and an "id" token id')


def _read_tokenizer_json(file: Path):
    """(vocab, merges, added, pre-tokenizer) from a tokenizer.json."""
    tj = read_json(file)
    model = field(tj, "model", file, OBJECT)
    if field(model, "type", f"{file}: model", STR, "BPE") != "BPE":
        raise MinisvError(f"{file} holds a {model['type']} model; minisv reads BPE only")
    vocab = _ids(field(model, "vocab", f"{file}: model", OBJECT), f"{file}: model.vocab")
    merges = _pairs(field(model, "merges", f"{file}: model", LIST), f"{file}: model.merges")
    added = {t["content"]: t["id"] for t in field(tj, "added_tokens", file, list_of(_ADDED_TOKEN), [])}
    nfc = _json_nfc(field(tj, "normalizer", file, optional(OBJECT), None), file)
    return vocab, merges, added, _json_pre_tokenizer(field(tj, "pre_tokenizer", file, optional(OBJECT), None), nfc,
                                                     file)


def _read_gpt2_files(path: Path, config: dict):
    """(vocab, merges, added) from GPT-2's vocab.json and merges.txt (and tokenizer_config.json's added tokens)."""
    vocab = _ids(read_json(path / "vocab.json"), path / "vocab.json")
    lines = read_text(path / "merges.txt", MAX_JSON).splitlines()
    merges = _pairs([line for line in lines if line and not line.startswith("#version")], path / "merges.txt")
    # transformers lists added tokens in tokenizer_config.json as {"id": {"content": ...}}; old GPT-2 repos declare
    # none, but "<|endoftext|>" is special there all the same.
    where = path / "tokenizer_config.json"
    decoder = field(config, "added_tokens_decoder", where, dict_of(Kind(lambda t: type(t) is dict and type(
        t.get("content")) is str, 'an object with a "content" string')), {})
    for i in decoder:
        if not (i.isdecimal() and TOKEN_ID.test(int(i))):
            raise MinisvError(f"{where}: added_tokens_decoder has the key {shown(i)}, expected {TOKEN_ID.words}; "
                              "fix or replace the file")
    added = {t["content"]: int(i) for i, t in decoder.items()}
    if not added and b"<|endoftext|>" in vocab:
        added = {"<|endoftext|>": vocab[b"<|endoftext|>"]}
    return vocab, merges, added


_SPECIAL = Kind(lambda t: t is None or type(t) is str or type(t) is dict and type(t.get("content")) is str,
                'a token, an object with a "content" token, or null')


def _specials(path: Path, config: dict, special_map: dict, vocab: dict, added: dict) -> Specials:
    """BOS, EOS and PAD as transformers reads them: special_tokens_map.json wins over tokenizer_config.json, and a
    null in either means "none" (it does not fall back); with neither file naming one, GPT-2's convention:
    "<|endoftext|>" is both BOS and EOS. A token missing from the vocabulary is None (transformers would add it
    to the vocabulary, past the rows of the model's embedding)."""
    def special_id(key):
        for file, values in (("special_tokens_map.json", special_map), ("tokenizer_config.json", config)):
            if key in values:
                token = field(values, key, path / file, _SPECIAL)
                token = token["content"] if type(token) is dict else token
                return None if token is None else added.get(token, vocab.get(token.encode("utf-8")))
        if key != "pad_token":
            return added.get("<|endoftext|>", vocab.get(b"<|endoftext|>"))
        return None
    add_bos = field(config, "add_bos_token", path / "tokenizer_config.json", BOOL, False)
    return Specials(special_id("bos_token"), special_id("eos_token"), special_id("pad_token"), add_bos)


_TEMPLATES = Kind(lambda t: type(t) is str or type(t) is list and all(
    type(x) is dict and type(x.get("name")) is str and type(x.get("template")) is str for x in t),
    'a template string, or a list of {"name", "template"} objects')


def _chat_template(path: Path, config: dict) -> str | None:
    """tokenizer_config.json's chat_template (the "default" one of a named list), else chat_template.jinja."""
    template = field(config, "chat_template", path / "tokenizer_config.json", optional(_TEMPLATES), None)
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t["template"] for t in template if t["name"] == "default"), None)
    if template is None and (path / "chat_template.jinja").exists():
        template = read_text(path / "chat_template.jinja", _MAX_TEMPLATE)
    return template


# The regex whose matches are the pieces Hugging Face's Split pre-tokenizer cuts text into, by `behavior` and
# `invert`, with P its pattern and G a gap: the run of characters up to where P next matches. Split finds P's
# matches left to right (a gap between two is a piece of its own), then per behavior keeps each match alone
# (Isolated), glues it to the gap before it (MergedWithPrevious) or after it (MergedWithNext), or joins
# adjacent matches (Contiguous); invert swaps the roles of matches and gaps. "Removed" drops the matches: with
# invert it drops the gaps, which is P alone (GPT-2's way); plain Removed has no such regex.
_SPLITS = {("Isolated", False): "{P}|{G}", ("Isolated", True): "{P}|{G}",
           ("Contiguous", False): "(?:{P})+|{G}", ("Contiguous", True): "(?:{P})+|{G}",
           ("MergedWithPrevious", False): "{G}?{P}|{G}", ("MergedWithNext", True): "{G}?{P}|{G}",
           ("MergedWithNext", False): "{P}{G}?|{G}", ("MergedWithPrevious", True): "{P}{G}?|{G}",
           ("Removed", True): "{P}"}


_BYTE_RANKS = {bytes([b]): b for b in range(256)}


def _split_pattern(split: dict, where: str) -> str:
    pattern = field(split, "pattern", where, OBJECT)
    if "String" in pattern:      # a literal: every character but letters and digits escaped as \x{..}
        regex = "".join(c if c.isalnum() else f"\\x{{{ord(c):x}}}" for c in field(pattern, "String", where, STR))
    else:
        regex = field(pattern, "Regex", where, STR)
    try:   # alone first: spliced into the regexes below, a fragment like "a)|(b" would change their meaning
        tiktoken.Encoding("check", pat_str=regex, mergeable_ranks=_BYTE_RANKS, special_tokens={})
    except ValueError as e:
        raise MinisvError(f"{where}: the Split regex {shown(regex)} does not compile ({str(e).splitlines()[0][:200]})"
                          ) from None
    behavior = field(split, "behavior", where, one_of(*sorted({b for b, _ in _SPLITS})))
    invert = field(split, "invert", where, BOOL, False)
    if (behavior, invert) not in _SPLITS:
        raise MinisvError(f"{where}: a Split with behavior Removed (dropping what the regex matches) is not "
                          "supported; minisv reads byte-level BPE tokenizers like GPT-2, Llama 3 and Qwen2")
    p = f"(?:{regex})"
    return _SPLITS[behavior, invert].format(P=p, G=f"(?:(?:(?!{p})(?s:.))+)")


def _json_pre_tokenizer(pre: dict | None, nfc: bool, file: Path) -> PreTokenizer:
    """The regex equivalent to a tokenizer.json pre_tokenizer, for the configurations byte-level BPE models use:
    ByteLevel alone (GPT-2, Pythia), Digits + ByteLevel (SmolLM2), Split + ByteLevel without its own regex (Llama 3,
    Qwen2; any Split behavior but Removed). Anything else, a Sequence of other steps included, is refused."""
    where = f"{file}: pre_tokenizer"
    steps = [] if pre is None else field(pre, "pretokenizers", where, list_of(OBJECT)) \
        if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if kinds[-1:] == ["ByteLevel"] else {}
    use_regex = field(last, "use_regex", where, BOOL, True)
    if last and not field(last, "add_prefix_space", where, BOOL, False):
        if kinds == ["ByteLevel"] and use_regex:
            return PreTokenizer(GPT2_PATTERN, nfc)
        if kinds == ["Digits", "ByteLevel"] and field(steps[0], "individual_digits", where, BOOL, False) and use_regex:
            return PreTokenizer(SMOLLM_PATTERN, nfc)
        if kinds == ["Split", "ByteLevel"] and not use_regex:
            split = steps[0]
            return PreTokenizer(_split_pattern(split, where), nfc, complete=split.get("behavior") != "Removed")
    raise MinisvError(f"{where} {json.dumps(pre)[:200]} is not supported; minisv reads byte-level BPE tokenizers "
                      "like GPT-2, Pythia, SmolLM2, Llama 3 and Qwen2")


def _json_nfc(normalizer: dict | None, file: Path) -> bool:
    if normalizer is None:
        return False
    if normalizer.get("type") == "NFC":
        return True
    raise MinisvError(f"{file}: normalizer {shown(normalizer.get('type'))} is not supported "
                      "(minisv applies none or NFC)")


# ------------------------------------------------------------------ GGUF metadata
def _is_str(value) -> bool:
    return isinstance(value, str)


def _is_strs(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _gguf_field(metadata: dict, key: str, ok, expected: str, default=None):
    """metadata[key] (default when absent) if ok(it), else a one-line MinisvError naming the key."""
    value = metadata.get(key, default)
    if not ok(value):
        raise MinisvError(f"GGUF metadata {key} is {shown(value)}, expected {expected}; the file is corrupt, re-export "
                          "or re-download it")
    return value
