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
"""
import json
import re
import unicodedata
from pathlib import Path

import tiktoken

from .chat_template import render_chat
from .errors import MinisvError

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


class Tokenizer:
    """Text <-> token ids for one model. Build it with `from_dir` or `from_gguf`.

    vocab:  byte string -> id for the BPE vocabulary (bytes, merged tokens; may include special tokens)
    merges: (left, right) byte-string pairs in the order they were learned
    added:  text -> id for tokens matched whole in the raw text before anything else
    """

    def __init__(self, vocab: dict[bytes, int], merges: list[tuple[bytes, bytes]], added: dict[str, int],
                 pattern: str, nfc: bool = False, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, add_bos: bool = False, chat_template: str | None = None,
                 name: str = "this model"):
        # Ranks: bytes 0..255 first (every byte needs one, even one the vocabulary lacks, like 0xFF), then each
        # merge's product in merge order. Two merges spelling the same token share the first one's rank.
        ranks = {bytes([b]): b for b in range(256)}
        # None: a byte the vocabulary lacks (SmolLM2 has no 0x04); HF drops it from the output, and so do we.
        self._rank_to_id = [vocab.get(bytes([b])) for b in range(256)]
        for left, right in merges:
            if left + right not in ranks:
                if left + right not in vocab:
                    raise MinisvError(f"merge {left!r} + {right!r} makes a token missing from the vocabulary; "
                                      "the tokenizer files are inconsistent, download them again")
                ranks[left + right] = len(self._rank_to_id)
                self._rank_to_id.append(vocab[left + right])
        try:
            self._bpe = tiktoken.Encoding("minisv", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        except ValueError as e:
            raise MinisvError(f"the pre-tokenizer regex {pattern!r} does not compile ({e})") from None
        self._nfc = nfc
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
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos
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
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        ids = [self._rank_to_id[r] for r in self._bpe.encode_ordinary(text)]
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
        bos = self._id_bytes[self.bos_id].decode("utf-8") if self.bos_id is not None else ""
        return render_chat(self._chat_template, user, system, bos, self.name)

    # ------------------------------------------------------------------ building from files
    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """From a Hugging Face model directory: tokenizer.json, or GPT-2's vocab.json + merges.txt, plus
        tokenizer_config.json / special_tokens_map.json / chat_template.jinja when present."""
        path = Path(path)
        config, special_map = _read_json(path / "tokenizer_config.json"), _read_json(path / "special_tokens_map.json")
        if (path / "tokenizer.json").exists():
            tj = _read_json(path / "tokenizer.json")
            try:
                pattern, nfc = _json_pattern(tj.get("pre_tokenizer")), _json_nfc(tj.get("normalizer"))
                model = tj["model"]
                if model.get("type", "BPE") != "BPE":
                    raise MinisvError(f"tokenizer.json holds a {model['type']} model; minisv reads BPE only")
                vocab = {_unbyte(token): i for token, i in model["vocab"].items()}
                merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
                added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
            except (KeyError, TypeError, AttributeError) as e:
                raise MinisvError(f"{path / 'tokenizer.json'}: unexpected layout ({e!r}); "
                                  "re-save it with a current `tokenizers`") from None
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            vocab = {_unbyte(token): i for token, i in _read_json(path / "vocab.json").items()}
            lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
            pattern, nfc = GPT2_PATTERN, False
            # transformers lists added tokens in tokenizer_config.json; old GPT-2 repos declare none, but
            # "<|endoftext|>" is special there all the same.
            added = {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
            if not added and b"<|endoftext|>" in vocab:
                added = {"<|endoftext|>": vocab[b"<|endoftext|>"]}
        else:
            raise MinisvError(f"{path}: no tokenizer.json or vocab.json + merges.txt; "
                              "download the model's tokenizer files too")
        if any(len(m) != 2 for m in merges):
            raise MinisvError(f"{path}: a merge is not a pair of tokens; the tokenizer files are corrupt")
        merges = [(_unbyte(a), _unbyte(b)) for a, b in merges]

        def special_id(key):
            # tokenizer_config.json wins, even with null; with neither file naming it, GPT-2's convention:
            # "<|endoftext|>" is both BOS and EOS. Tokens given as {"content": ...} dicts or plain strings.
            default = "<|endoftext|>" if key in ("bos_token", "eos_token") else None
            token = config[key] if key in config else special_map.get(key, default)
            token = token.get("content") if isinstance(token, dict) else token
            return added.get(token, vocab.get(token.encode("utf-8"))) if isinstance(token, str) else None

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(vocab, merges, added, pattern, nfc, special_id("bos_token"), special_id("eos_token"),
                   special_id("pad_token"), bool(config.get("add_bos_token", False)), template, str(path))

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
        return cls(vocab, [(_unbyte(a), _unbyte(b)) for a, b in pairs], added, _GGUF_PATTERNS[pre], False, *ids,
                   _gguf_field(metadata, "tokenizer.ggml.add_bos_token", _is_bool, "true or false", False),
                   _gguf_field(metadata, "tokenizer.chat_template", lambda v: v is None or _is_str(v), "a string"),
                   _gguf_field(metadata, "general.name", _is_str, "a string", "this GGUF model"))


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
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:60] + "..."
        raise MinisvError(f"GGUF metadata {key} is {shown}, expected {expected}; the file is corrupt, re-export or "
                          "re-download it")
    return value


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinisvError(f"{path}: not valid JSON ({e}); download the file again") from None


def _json_pattern(pre: dict | None) -> str:
    """The one regex equivalent to a tokenizer.json pre_tokenizer, for the configurations byte-level BPE
    models use: ByteLevel alone (GPT-2, Pythia), Digits + ByteLevel (SmolLM2), Split + ByteLevel (Llama 3, Qwen2)."""
    steps = (pre.get("pretokenizers") or [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    if not any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return SMOLLM_PATTERN
        if (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {}) and not steps[0].get("invert")
                and steps[0].get("behavior") == "Isolated" and not steps[1].get("use_regex", True)):
            return steps[0]["pattern"]["Regex"]
    raise MinisvError(f"tokenizer.json pre_tokenizer {json.dumps(pre)[:200]} is not supported; minisv reads "
                      "byte-level BPE tokenizers like GPT-2, Pythia, SmolLM2, Llama 3 and Qwen2")


def _json_nfc(normalizer: dict | None) -> bool:
    if normalizer is None:
        return False
    if normalizer.get("type") == "NFC":
        return True
    raise MinisvError(f"tokenizer.json normalizer {normalizer.get('type')!r} is not supported "
                      "(minisv applies none or NFC)")
