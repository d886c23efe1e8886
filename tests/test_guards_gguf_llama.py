"""A tiny *llama* GGUF (the family whose q/k rows llama.cpp permutes), fast, against transformers: the file is
written with the `gguf` package, q_proj / k_proj permuted exactly as llama.cpp's converter does
(convert_hf_to_gguf.py LlamaModel.permute), so minisv must undo it to reproduce transformers' logits."""
import numpy as np
import pytest
import torch

import minisv
from conftest import tiny_config

NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w, n_head):
    """llama.cpp's converter: each head's rows (first half, second half) -> interleaved rotary pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_llama_gguf_with_permuted_rotary_rows_matches_transformers(tmp_path):
    gguf = pytest.importorskip("gguf")
    import transformers as tf
    torch.manual_seed(0)
    cfg = tiny_config("llama")
    ref = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(1.0, 0.1) if p.dim() == 1 else p.normal_(0, 0.2)
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(3, cfg.vocab_size)])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(1)
    for name, t in ref.state_dict().items():
        module, _, leaf = name.rpartition(".")
        t = t.numpy().astype(np.float32)
        if module.startswith("model.layers."):
            layer, sub = module.removeprefix("model.layers.").split(".", 1)
            if sub in ("self_attn.q_proj", "self_attn.k_proj"):
                t = llama_cpp_permute(t, cfg.num_attention_heads if sub.endswith("q_proj") else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{layer}.{NAMES[sub]}.{leaf}", t)
        else:
            w.add_tensor(f"{NAMES[module]}.{leaf}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = minisv.load(str(path), device="cpu")
    assert model.cfg.n_kv_heads == 2 and not model.cfg.tie_embeddings
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max() < 1e-4
