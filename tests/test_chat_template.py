"""Tokenizer.chat against transformers' apply_chat_template, on the real templates of each family.

One tiny BPE tokenizer holding every family's special tokens is trained here; each model gets a directory with
it and a tokenizer_config.json carrying that model's real template (tests/chat_templates.py) and BOS/EOS.
"""
import json

import pytest
from chat_templates import REAL, UNRECOGNISED
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minisv.errors import MinisvError
from minisv.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
            "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "[INST]", "[/INST]"]
# (user, system): no system, multi-line texts with spaces to strip, markup and quotes that must pass through
# untouched, and an empty system prompt
CASES = [("Hi\n there", None), ("  What's 2+2? ", "You are a pirate.\nSpeak like one."),
         ("<b>a & b</b> {{ x }} 'q' \"dq\" {% if %} 日本 👍\n", " Be terse. "), ("x", "")]
NO_SYSTEM = {"google/gemma-7b-it", "microsoft/Phi-3-medium-128k-instruct"}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["You are a pirate. Speak like one. What's 2+2? Hi there, be terse."] * 5, trainer=trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path.read_text()


def _model_dir(tmp_path, tokenizer_json, model, bos, eos, template):
    d = tmp_path / model.replace("/", "--")
    d.mkdir()
    (d / "tokenizer.json").write_text(tokenizer_json)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos, "chat_template": template}))
    return d


@pytest.mark.parametrize("model", REAL)
def test_chat_matches_apply_chat_template(model, tokenizer_json, tmp_path):
    from transformers import AutoTokenizer
    bos, eos, template = REAL[model]
    d = _model_dir(tmp_path, tokenizer_json, model, bos, eos, template)
    tok, ref = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    assert tok.is_chat
    for user, system in CASES:
        if system is not None and model in NO_SYSTEM:
            with pytest.raises(MinisvError, match="no system role"):
                tok.chat(user, system)
            continue
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}]
        want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.chat(user, system) == want, (user, system)
        # the rendered text written once, as ids: BOS (when the template writes it) exactly once
        ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert tok.encode(want, bos="bos_token" in template) == ids
        assert ids.count(tok.bos_id) == ("bos_token" in template)


def test_families_render_their_own_format(tokenizer_json, tmp_path):
    """Spot checks written out by hand, independent of transformers: the family markers and the BOS."""
    def chat(model, system="Sys"):
        return Tokenizer.from_dir(_model_dir(tmp_path, tokenizer_json, model, *REAL[model])).chat("Hi", system)
    assert chat("meta-llama/Meta-Llama-3-8B-Instruct") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat("meta-llama/Llama-3.1-8B-Instruct").startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nSys<|eot_id|>")
    assert chat("meta-llama/Llama-2-7b-chat-hf") == "<s>[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST]"
    assert chat("mistralai/Mistral-7B-Instruct-v0.3") == "<s>[INST] Sys\n\nHi[/INST]"
    assert chat("google/gemma-3-1b-it") == "<bos><start_of_turn>user\nSys\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert chat("microsoft/Phi-3-mini-4k-instruct") == "<|system|>\nSys<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert chat("Qwen/Qwen2.5-3B-Instruct", None) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("model", UNRECOGNISED)
def test_unrecognised_template_raises_naming_the_model(model, tokenizer_json, tmp_path):
    d = _model_dir(tmp_path, tokenizer_json, model, *UNRECOGNISED[model])
    tok = Tokenizer.from_dir(d)
    assert tok.is_chat          # a template is there: chat() must say it cannot render it, not fall back to raw
    with pytest.raises(MinisvError, match=f"^{d}: .*--raw"):
        tok.chat("Hi")


def test_no_template_raises(tokenizer_json, tmp_path):
    tok = Tokenizer.from_dir(_model_dir(tmp_path, tokenizer_json, "base", "<s>", "</s>", None))
    assert not tok.is_chat
    with pytest.raises(MinisvError, match="has no chat template"):
        tok.chat("Hi")
