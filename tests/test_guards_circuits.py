"""Circuit attribution on a model the conftest families do not cover: Qwen2, grouped-query attention *with* value
biases (4 query heads sharing 2 value heads, each with its own b_V). Oracle: the direct terms of a logit difference
must add up to transformers' own logit difference, and a head's terms through the value bias must use its group's
b_V; a wrong head -> group mapping of b_V changes the sum."""
import pytest
import torch

import minisv
from minisv.circuits import Circuit


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    import transformers as tf
    from conftest import tiny_config
    base = tiny_config("llama").to_dict()
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings", "bos_token_id", "eos_token_id")
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(tf.Qwen2Config(tie_word_embeddings=False,
                                                             **{k: base[k] for k in keep})).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.5 if "bias" in name else 0.1)
            else:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("qwen2")
    ref.save_pretrained(path)
    return minisv.load(str(path), device="cpu"), ref


def test_logit_terms_add_up_to_transformers_logit_difference(qwen2):
    model, ref = qwen2
    assert model.cfg.n_kv_heads < model.cfg.n_heads and model.blocks[0].attn.v.bias is not None
    tokens = torch.randint(2, 96, (9,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ref(tokens[None]).logits[0, -1].double()
    c = Circuit(model, {}, tokens)
    root = c.logit(5, 7)
    expected = float(logits[5] - logits[7])
    assert root.value == pytest.approx(expected, rel=1e-4, abs=1e-4)
    kids = c.children(root)
    scale = sum(abs(k.value) for k in kids)
    biases = [k for k in kids if k.kind == "bias"]
    assert max(abs(k.value) for k in biases) > 1e-3 * scale          # the value biases weigh in
    assert abs(sum(k.value for k in kids) - expected) <= 1e-4 * (1 + scale)
    # one level down: a head term, read at its source token, splits into its own terms as exactly
    head = max((k for k in kids if k.kind == "head" and k.layer == 2), key=lambda k: abs(k.value))
    sub = c.children(head)
    assert abs(sum(k.value for k in sub) - head.value) <= 1e-6 * (1 + sum(abs(k.value) for k in sub))
