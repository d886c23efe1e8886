"""The real SmolLM2-135M-Instruct GGUF: minisv against transformers loading the same file."""
import os

import pytest
import torch

import minisv
from conftest import SMOLLM2_GGUF, needs_smollm2

pytestmark = needs_smollm2


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(SMOLLM2_GGUF)
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return minisv.load("smollm2", device="cpu"), ref, ref_tok


def test_logits_match_to_float32_accuracy(models):
    model, ref, _ = models
    x = torch.randint(0, model.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max() < 1e-4


def test_greedy_chat_answers_identical(models):
    model, ref, ref_tok = models
    for question in ["What is the capital of France?", "Write a haiku about rain."]:
        prompt = model.tokenizer.encode(model.tokenizer.chat(question))
        expected = ref_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        assert prompt == list(expected)
        with torch.no_grad():
            ref_out = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
        ours = model.generate(prompt, max_new_tokens=24)
        assert ours == ref_out.tolist()[:len(ours)] and (len(ours) == 24 or ours[-1] == model.tokenizer.eos_id)
