"""minisv.files, and every JSON and text file minisv reads for a model, malformed one way at a time.

The oracle is the outcome written down here by hand: each malformed file must end in a one-line MinisvError
that names the file (and the field), quickly, and never in a traceback, a hang or a silently different value.
The special-token rules are checked against transformers' AutoTokenizer on the same small files.
"""
import json
import os
import shutil

import pytest
from helpers import refused
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import minisv
from minisv import hub
from minisv.files import BOOL, COUNT, INT, NUMBER, POSITIVE_INT, STR, field, list_of, one_of, optional, read_json, \
    read_text
from minisv.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<pad>"]


# ------------------------------------------------------------------------------------------- the gate
def test_only_regular_files_of_bounded_size_are_read(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")                   # a plain open() would wait for a writer forever
    os.symlink("/dev/zero", tmp_path / "zero.json")      # endless bytes
    (tmp_path / "dir.json").mkdir()
    with open(tmp_path / "sparse.json", "wb") as f:      # 100 MB that take no disk space
        f.truncate(100 << 20)
    refused(r"fifo.json: it is not a regular file \(a FIFO", read_json, tmp_path / "fifo.json")
    refused(r"zero.json: it is not a regular file", read_json, tmp_path / "zero.json")
    refused(r"dir.json: it is a directory", read_json, tmp_path / "dir.json")
    refused(r"sparse.json: it has 104,857,600 bytes, more than the 67,108,864", read_json, tmp_path / "sparse.json")
    refused(r"nope.json \(No such file or directory\)", read_json, tmp_path / "nope.json")
    (tmp_path / "ok.txt").write_bytes(b"abc")
    refused(r"ok.txt: it has 3 bytes, more than the 2", read_text, tmp_path / "ok.txt", 2)
    assert read_text(tmp_path / "ok.txt", 3) == "abc"


@pytest.mark.parametrize("raw, message", [
    (b'{"a": "caf\xe9"}', "byte 10 is not valid UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
    (b'{"a": 1, "a": 2}', "the key 'a' appears twice"),
    (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON .*integer string conversion"),
    (b"{", "not valid JSON"),
    (b"\xef\xbb\xbf{}", "not valid JSON .*BOM"),        # transformers' json.load refuses a BOM too
    (b"[1]", r"the JSON is \[1\], expected a JSON object"),
    (b"null", "the JSON is None, expected a JSON object"),
])
def test_malformed_json_is_one_line_naming_the_file(tmp_path, raw, message):
    (tmp_path / "x.json").write_bytes(raw)
    assert refused(message, read_json, tmp_path / "x.json").startswith(f"{tmp_path / 'x.json'}: ")


def test_field_checks_type_and_range():
    cfg = {"layer": 3, "flag": True, "k": 2.5, "name": "x", "neg": -5, "nan": float("nan"), "null": None,
           "list": [1, "a"]}
    assert field(cfg, "layer", "c.json", COUNT) == 3 and field(cfg, "missing", "c.json", INT, 7) == 7
    cases = [("flag", INT, "flag is True, expected an integer"),        # a JSON true is no number
             ("k", POSITIVE_INT, "k is 2.5, expected a positive integer"),
             ("name", INT, "name is 'x', expected an integer"),
             ("neg", COUNT, "neg is -5, expected an integer >= 0"),
             ("nan", NUMBER, "nan is nan, expected a finite number"),
             ("layer", BOOL, "layer is 3, expected true or false"),
             ("layer", one_of("a", "b"), "layer is 3, expected one of 'a', 'b'"),
             ("list", list_of(INT), r"list is \[1, 'a'\], expected a list of \(an integer\)"),
             ("null", STR, "null is None, expected a string"),    # a null is not "absent": no default for it
             ("missing", STR, "lacks 'missing' \\(a string\\)")]
    for key, kind, message in cases:
        refused(f"^c.json:? {message}", field, cfg, key, "c.json", kind, *(["default"] if key == "null" else []))
    assert field(cfg, "null", "c.json", optional(STR), "default") is None
    refused(r"c.json: expected a JSON object holding 'a', found \[1\]", field, [1], "a", "c.json", INT)


# ------------------------------------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama checkpoint with a trained byte-level BPE tokenizer.json and the optional JSON files."""
    import torch
    import transformers as tf
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, vocab_size=300, max_position_embeddings=32)
                        ).save_pretrained(path)
    _bpe().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True, "chat_template": "{{ x }}"}))
    (path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    return path


def _bpe():
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the quick brown fox"] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _config(model_dir, **changes):
    return json.dumps({**json.loads((model_dir / "config.json").read_text()), **changes})


def _tokenizer_json(model_dir, change):
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    change(tj)
    return json.dumps(tj)


BAD_UTF8, DEEP = b'{"x": "\xff"}', b"[" * 100_000
# (file, its content or a function of the model directory giving it, what the error says)
TABLE = [
    ("config.json", b"[1, 2]", r"the JSON is \[1, 2\], expected a JSON object"),
    ("config.json", b'"llama"', "the JSON is 'llama', expected a JSON object"),
    ("config.json", BAD_UTF8, "byte 7 is not valid UTF-8"),
    ("config.json", DEEP, "nested too deeply"),
    ("config.json", b'{"model_type": "llama", "model_type": "gpt2"}', "the key 'model_type' appears twice"),
    ("config.json", b'{"model_type": 5}', "model_type is 5, expected a string"),
    ("config.json", lambda d: _config(d, num_hidden_layers=True), "num_hidden_layers is True, expected a positive int"),
    ("config.json", lambda d: _config(d, num_hidden_layers=2.5), "num_hidden_layers is 2.5"),
    ("config.json", lambda d: _config(d, num_hidden_layers="x"), "num_hidden_layers is 'x'"),
    ("config.json", lambda d: _config(d, num_hidden_layers=-5), "num_hidden_layers is -5"),
    ("config.json", lambda d: _config(d, hidden_size=None), "hidden_size is None"),
    ("config.json", lambda d: _config(d, rms_norm_eps=float("nan")), "rms_norm_eps is nan, expected a positive"),
    ("config.json", lambda d: _config(d, rope_theta=float("inf")), "rope_theta is inf, expected a positive number"),
    ("config.json", lambda d: _config(d, rope_parameters=[1]), r"rope_parameters is \[1\], expected a JSON object"),
    ("config.json", lambda d: _config(d, rope_parameters={"rope_type": 5}), "rope_type is 5, expected a string"),
    ("config.json", lambda d: _config(d, rope_parameters={"rope_type": "llama3", "factor": "8"}), "factor is '8'"),
    ("config.json", lambda d: _config(d, tie_word_embeddings="no"), "tie_word_embeddings is 'no', expected true or"),
    ("config.json", lambda d: _config(d, hidden_act=["silu"]), r"hidden_act is \['silu'\], expected a string"),
    ("config.json", lambda d: _config(d, num_key_value_heads=-2), "num_key_value_heads is -2"),
    ("tokenizer.json", b"[]", r"the JSON is \[\], expected a JSON object"),
    ("tokenizer.json", BAD_UTF8, "byte 7 is not valid UTF-8"),
    ("tokenizer.json", DEEP, "nested too deeply"),
    ("tokenizer.json", b'{"model": []}', r"model is \[\], expected a JSON object"),
    ("tokenizer.json", b'{"model": {"vocab": [], "merges": []}}', r"model: vocab is \[\], expected a JSON object"),
    ("tokenizer.json", lambda d: _tokenizer_json(d, lambda t: t["model"]["vocab"].update(a=-1)),
     "token 'a' has id -1, expected a token id in 0..16777215"),
    ("tokenizer.json", lambda d: _tokenizer_json(d, lambda t: t["model"]["vocab"].update(a="1")),
     "token 'a' has id '1'"),
    ("tokenizer.json", lambda d: _tokenizer_json(d, lambda t: t["model"]["vocab"].update(a=10 ** 12)),
     "token 'a' has id 1000000000000"),
    ("tokenizer.json", lambda d: _tokenizer_json(d, lambda t: t["model"].update(merges=[["a"]])),
     r"merge #0 is \['a'\], not a pair of tokens"),
    ("tokenizer.json", lambda d: _tokenizer_json(d, lambda t: t["model"].update(merges={"a": "b"})),
     r"merges is \{'a': 'b'\}, expected a JSON list"),
    ("tokenizer.json", lambda d: _tokenizer_json(d, lambda t: t.update(added_tokens=[{"id": -3, "content": "x"}])),
     "added_tokens is .*, expected a list of"),
    ("tokenizer.json", lambda d: _tokenizer_json(d, lambda t: t.update(pre_tokenizer="ByteLevel")),
     "pre_tokenizer is 'ByteLevel', expected a JSON object or null"),
    ("tokenizer.json", lambda d: _tokenizer_json(d, lambda t: t.update(normalizer=["NFC"])),
     r"normalizer is \['NFC'\], expected a JSON object or null"),
    ("tokenizer_config.json", b"[]", r"the JSON is \[\], expected a JSON object"),
    ("tokenizer_config.json", b'{"bos_token": 5}', "bos_token is 5, expected a token"),
    ("tokenizer_config.json", b'{"eos_token": {"content": 5}}', r"eos_token is \{'content': 5\}, expected a token"),
    ("tokenizer_config.json", b'{"add_bos_token": "false"}', "add_bos_token is 'false', expected true or false"),
    ("tokenizer_config.json", b'{"chat_template": 5}', "chat_template is 5, expected a template string"),
    ("tokenizer_config.json", b'{"chat_template": [{"name": "default"}]}', "chat_template is .*, expected a templ"),
    ("tokenizer_config.json", BAD_UTF8, "byte 7 is not valid UTF-8"),
    ("special_tokens_map.json", b'["<s>"]', r"the JSON is \['<s>'\], expected a JSON object"),
    ("special_tokens_map.json", b'{"pad_token": ["<pad>"]}', r"pad_token is \['<pad>'\], expected a token"),
    ("chat_template.jinja", b"{{ '\xff' }}", "byte 4 is not valid UTF-8"),
]


def _place(model_dir, tmp_path, name, content):
    """A copy of the model directory with `name` replaced by `content` (bytes, or str from a function)."""
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    content = content(model_dir) if callable(content) else content
    (d / name).write_bytes(content.encode() if isinstance(content, str) else content)
    if name == "chat_template.jinja":
        (d / "tokenizer_config.json").write_text("{}")
    return d


@pytest.mark.parametrize("name, content, message", TABLE, ids=[f"{row[0]}-{i}" for i, row in enumerate(TABLE)])
def test_malformed_model_files_are_one_line_naming_the_file(model_dir, tmp_path, name, content, message):
    d = _place(model_dir, tmp_path, name, content)
    call = (lambda: minisv.load(str(d), device="cpu")) if name == "config.json" else lambda: Tokenizer.from_dir(d)
    assert str(d / name) in refused(message, call)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "merges.txt"])
def test_model_files_that_never_end_are_refused(model_dir, tmp_path, name):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    if name == "merges.txt":      # the GPT-2 layout
        _bpe().model.save(str(d))
        (d / "tokenizer.json").unlink()
    for target in ("fifo", "/dev/zero"):
        (d / name).unlink()
        os.mkfifo(d / name) if target == "fifo" else os.symlink(target, d / name)
        call = (lambda: minisv.load(str(d), device="cpu")) if name == "config.json" else lambda: Tokenizer.from_dir(d)
        assert str(d / name) in refused("not a regular file", call)


def test_the_model_files_read_right(model_dir):
    """The baseline of the table: the unmodified directory loads, with what its files say."""
    model = minisv.load(str(model_dir), device="cpu")
    tok = model.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 3, True) and model.cfg.n_layers == 1


def test_checkpoint_index_files_are_checked(model_dir, tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    for raw, message in [(b"[]", r"the JSON is \[\], expected a JSON object"), (b"{}", "lacks 'weight_map'"),
                         (b'{"weight_map": ["a"]}', r"weight_map is \['a'\], expected an object of \(a string\)"),
                         (b'{"weight_map": {"w": 5}}', r"weight_map is \{'w': 5\}, expected an object"),
                         (DEEP, "nested too deeply"), (BAD_UTF8, "not valid UTF-8")]:
        index.write_bytes(raw)
        assert str(index) in refused(message, hub.shard_names, index)


# ------------------------------------------------------------------------------------------- special tokens
@pytest.mark.parametrize("config, special_map", [
    ({}, {}),                                                     # GPT-2's convention: <|endoftext|> is BOS and EOS
    ({"bos_token": None}, {}),                                    # null means none: no fallback to the convention
    ({"bos_token": None, "eos_token": None, "pad_token": None}, {}),
    ({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, {}),
    ({"bos_token": None}, {"bos_token": "<s>"}),                  # special_tokens_map.json wins...
    ({"bos_token": "</s>"}, {"bos_token": None}),                 # ...even with a null
    ({"bos_token": "</s>"}, {"bos_token": {"content": "<s>", "lstrip": False}}),
    ({"pad_token": None}, {"pad_token": "<pad>"}),
])
def test_special_tokens_match_transformers(tmp_path, config, special_map):
    from transformers import AutoTokenizer
    _bpe().save(str(tmp_path / "tokenizer.json"))
    # GPT2Tokenizer's own default (<|endoftext|>) is the convention minisv applies when no file names a token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", **config}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    ref, tok = AutoTokenizer.from_pretrained(str(tmp_path)), Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)


def test_bool_fields_are_not_truthiness(model_dir, tmp_path):
    """"add_bos_token": "false" is refused above, and so is 0; the real false and true come through as themselves."""
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    for value in (False, True):
        (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": value}))
        assert Tokenizer.from_dir(d).add_bos is value
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": 0}))
    refused("add_bos_token is 0, expected true or false", Tokenizer.from_dir, d)
