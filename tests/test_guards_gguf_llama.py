"""A tiny *llama* GGUF (the family whose q/k rows llama.cpp permutes), fast, against transformers: the file is
written with the `gguf` package, q_proj / k_proj permuted exactly as llama.cpp's converter does
(convert_hf_to_gguf.py LlamaModel.permute), so minisv must undo it to reproduce transformers' logits."""
import pytest
import torch

import minisv
from conftest import tiny_config
from helpers import write_llama_style_gguf


def test_llama_gguf_with_permuted_rotary_rows_matches_transformers(tmp_path):
    pytest.importorskip("gguf")
    import transformers as tf
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(1.0, 0.1) if p.dim() == 1 else p.normal_(0, 0.2)
    path = tmp_path / "llama.gguf"
    write_llama_style_gguf(path, ref, "llama")
    model = minisv.load(str(path), device="cpu")
    assert model.cfg.n_kv_heads == 2 and not model.cfg.tie_embeddings
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max() < 1e-4
