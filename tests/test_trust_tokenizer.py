"""tokenizer.json pre-tokenizers minisv reproduces or refuses: every Split behavior (with and without invert),
String patterns, Sequences, a pattern that skips text and one that backtracks catastrophically. The oracle is
Hugging Face `tokenizers` on the same tokenizer.json, token for token."""
import json

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from minisv.errors import MinisvError
from minisv.tokenizer import Tokenizer

TEXTS = ["HELLO, WORLD!", "the-final--countdown", "--a--", "ab", ", ,", "", "a1b22c333 4444", "x  y\n\nz",
         "Hello, world! It's 3.14; we'll see.", "日本語 テキスト、中文。", "👍🏽 family", "tabs\t\tand\nnewlines\n\n\n",
         "  leading and trailing  ", "12345 67", "a\u00a0b\u2003c"]
BEHAVIORS = ["isolated", "merged_with_previous", "merged_with_next", "contiguous", "removed"]
PATTERNS = [r"\p{L}+", "-", r"\s+", "[a-z]", r"\d", " ?\\p{L}+|\\p{N}", r"[^\s\p{L}\p{N}]+"]


def _save(tmp_path, pre):
    """A byte-level BPE trained with `pre` then ByteLevel(use_regex=False), saved as tokenizer.json."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(TEXTS)] * 3, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("behavior", BEHAVIORS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_split_behaviors_match_tokenizers(tmp_path, pattern, behavior, invert):
    ref = _save(tmp_path, pre_tokenizers.Split(Regex(pattern), behavior=behavior, invert=invert))
    if (behavior, invert) == ("removed", False):       # dropping the matches has no single-regex form
        with pytest.raises(MinisvError, match=r"a Split with behavior Removed .* is not supported"):
            Tokenizer.from_dir(tmp_path)
        return
    tok = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text).ids, repr(text)
    if behavior != "removed":                          # nothing dropped: every text comes back whole
        assert all(tok.decode(tok.encode(text)) == text for text in TEXTS)


def test_text_the_regex_does_not_cover_is_kept(tmp_path):
    """The issue's case: 'HELLO, WORLD!' with a letters-only Isolated Split lost ', ' and '!' (came back as
    'HELLOWORLD'); tokenizers keeps them as pieces of their own."""
    ref = _save(tmp_path, pre_tokenizers.Split(Regex(r"\p{L}+"), behavior="isolated"))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.decode(tok.encode("HELLO, WORLD!")) == ref.decode(ref.encode("HELLO, WORLD!").ids) == "HELLO, WORLD!"


def test_string_patterns_are_literals(tmp_path):
    for literal in ["-", ".*", "a+b", "(", " ", "\\"]:
        ref = _save(tmp_path, pre_tokenizers.Split(literal, behavior="isolated"))
        tok = Tokenizer.from_dir(tmp_path)
        for text in TEXTS + ["x.*y a+b (c) \\d"]:
            assert tok.encode(text) == ref.encode(text).ids, (literal, text)


def test_a_pattern_that_can_match_nothing_is_refused_when_it_would_drop_text(tmp_path):
    """\\p{L}* matches the empty string between letters; tokenizers keeps the text around such a match, a regex
    engine skips it: minisv must give the reference's ids or say it cannot, never drop characters."""
    ref = _save(tmp_path, pre_tokenizers.Split(Regex(r"\p{L}*"), behavior="isolated"))
    tok = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        try:
            ids = tok.encode(text)
        except MinisvError as e:
            assert ("skips characters of this text" in str(e) or "failed on this text" in str(e)) and "\n" not in str(e)
            continue
        assert ids == ref.encode(text).ids, repr(text)
    _save(tmp_path, pre_tokenizers.Split(Regex("(?=a)"), behavior="isolated"))    # an empty match before each a
    with pytest.raises(MinisvError, match="skips characters of this text"):
        Tokenizer.from_dir(tmp_path).encode("bab")


def test_a_catastrophic_regex_is_one_line(tmp_path):
    """A pattern that backtracks exponentially: tiktoken's regex engine gives up, and that must not surface as a
    Rust panic (pyo3's PanicException)."""
    _save(tmp_path, pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"))
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"(\w+\s?)*(?=$)z"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(MinisvError, match="failed on this text .*BacktrackLimitExceeded.*backtracks catastrophically") as e:
        tok.encode("a" * 40 + "!")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("steps, message", [
    ([{"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Isolated", "invert": False},
      {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}], "is not supported"),   # two regexes
    ([{"type": "Digits", "individual_digits": False}, {"type": "ByteLevel", "use_regex": True}], "is not supported"),
    ([{"type": "Whitespace"}, {"type": "ByteLevel", "use_regex": True}], "is not supported"),
    ([{"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}], "is not supported"),
    ([{"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Sideways"}, {"type": "ByteLevel", "use_regex": False}],
     r"behavior is 'Sideways', expected one of"),
    ([{"type": "Split", "pattern": {"Regex": 5}, "behavior": "Isolated"}, {"type": "ByteLevel", "use_regex": False}],
     "Regex is 5, expected a string"),
    ([{"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated"}, {"type": "ByteLevel", "use_regex": False}],
     "does not compile"),
    ([{"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Isolated", "invert": "no"},
      {"type": "ByteLevel", "use_regex": False}], "invert is 'no', expected true or false"),
])
def test_unsupported_sequences_are_refused_in_one_line(tmp_path, steps, message):
    _save(tmp_path, pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"))
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": steps}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(MinisvError, match=message) as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value) and "tokenizer.json" in str(e.value)
