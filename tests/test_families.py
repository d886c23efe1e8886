"""The checkpoint kinds minisv claims beyond the three tiny families of conftest.py, each against transformers:
Llama 3.1's long-context rotary scaling, Qwen2 (q/k/v biases, tied embeddings) from safetensors, from a
`pytorch_model.bin` and from a GGUF file (written with the `gguf` package's GGUFWriter)."""
import pytest
import torch

import minisv
from helpers import write_llama_style_gguf

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def tiny_reference(kind):
    """A random transformers model with every 1-D parameter (norm gains, biases) randomized too."""
    import transformers as tf
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    config = (tf.LlamaConfig(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False, **common) if kind == "llama3"
              else tf.Qwen2Config(tie_word_embeddings=True, **common))
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return ref


def tokens(t=40):
    """Long enough (40 positions vs the original context of 16) for the scaled frequencies to matter."""
    return torch.randint(0, 96, (2, t), generator=torch.Generator().manual_seed(0))


def assert_same_logits(model, ref):
    x = tokens()
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max() < 1e-4
        ours = model.generate(x[0, :5], max_new_tokens=12, stop_at_eos=False)
        theirs = ref.generate(x[:1, :5], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours == theirs[0, 5:].tolist()


def test_llama31_rope_scaling(tmp_path):
    ref = tiny_reference("llama3")
    ref.save_pretrained(tmp_path)
    model = minisv.load(str(tmp_path), device="cpu")
    assert model.cfg.rope_llama3 == (8.0, 1.0, 4.0, 16)
    assert_same_logits(model, ref)


def test_llama31_scaling_changes_the_frequencies_as_transformers_does():
    """minisv's _llama3_scaling against transformers' own rope-init function, factor by factor."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from minisv.model import _llama3_scaling
    ref = tiny_reference("llama3")
    inv_freq = 1.0 / LLAMA3_ROPE["rope_theta"] ** (torch.arange(0, 8, 2).float() / 8)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](ref.config, "cpu")
    ours = _llama3_scaling(inv_freq, 8.0, 1.0, 4.0, 16)
    assert torch.allclose(ours, expected) and not torch.allclose(ours, inv_freq)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_qwen2_with_biases(tmp_path, weights):
    ref = tiny_reference("qwen2")
    ref.save_pretrained(tmp_path)
    if weights == "pytorch_model.bin":   # what transformers 4 wrote (torch.save of the state dict, zip format)
        torch.save(ref.state_dict(), tmp_path / weights)
        (tmp_path / "model.safetensors").unlink()
    model = minisv.load(str(tmp_path), device="cpu")
    assert model.cfg.qkv_bias and not model.cfg.o_bias and model.cfg.tie_embeddings
    assert torch.equal(model.blocks[1].attn.k.bias, ref.model.layers[1].self_attn.k_proj.bias)
    assert_same_logits(model, ref)


def test_qwen2_gguf(tmp_path):
    """A Qwen2 GGUF in float32 as llama.cpp lays it out (no rotary permutation for qwen2, unlike llama)."""
    pytest.importorskip("gguf")
    ref = tiny_reference("qwen2")
    path = tmp_path / "qwen2.gguf"
    write_llama_style_gguf(path, ref, "qwen2")
    model = minisv.load(str(path), device="cpu")
    assert model.cfg.qkv_bias and model.cfg.tie_embeddings and model.tokenizer.vocab_size == 96
    assert_same_logits(model, ref)
