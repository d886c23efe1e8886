"""config.json fields that the conftest checkpoints leave at their defaults, each against transformers' logits:
a rotary base other than 10000 in the old top-level spellings (`rope_theta`, Pythia's `rotary_emb_base` and
`rotary_pct`, what checkpoints on the hub carry), NeoX with sequential blocks (`use_parallel_residual: false`), and
norm epsilons other than the fallbacks, made to matter by residuals of RMS ~ sqrt(eps)."""
import json

import pytest
import torch

import minisv
from conftest import tiny_config


def _reference(family, **overrides):
    """A random transformers model of the conftest family with config overrides, 1-D parameters randomized."""
    import transformers as tf
    base = tiny_config(family)
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(type(base)(**{**base.to_dict(), **overrides})).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "weight" in name else 0.0, 0.1)
    return ref


def _rewrite(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _assert_same_logits(model, ref, scale=1.0):
    x = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x).logits
        assert (model(x) - expected).abs().max() < 1e-4 * scale * (1 + expected.abs().max())


def _old_spelling(family):
    """transformers 4.x wrote the rotary fields at the top level of config.json."""
    def edit(config):
        rope = config.pop("rope_parameters")
        if family == "neox":
            config["rotary_emb_base"], config["rotary_pct"] = rope["rope_theta"], rope["partial_rotary_factor"]
        else:
            config["rope_theta"] = rope["rope_theta"]
    return edit


@pytest.mark.parametrize("family", ["llama", "neox"])
@pytest.mark.parametrize("spelling", ["old", "new"])
def test_rotary_base_is_read_in_both_spellings(family, spelling, tmp_path):
    """Base 500 makes every frequency differ from base 10000's at 40 positions; the neox rotary fraction (0.5,
    not the conftest's 0.25) must come through too."""
    rope = dict(rope_type="default", rope_theta=500.0, **(dict(partial_rotary_factor=0.5) if family == "neox" else {}))
    ref = _reference(family, rope_parameters=rope)
    ref.save_pretrained(tmp_path)
    if spelling == "old":
        _rewrite(tmp_path, _old_spelling(family))
        assert "rope_parameters" not in json.loads((tmp_path / "config.json").read_text())
    model = minisv.load(str(tmp_path), device="cpu")
    assert model.cfg.rope_base == 500.0 and model.cfg.rotary_dim == (4 if family == "neox" else 8)
    _assert_same_logits(model, ref)


def test_neox_with_sequential_blocks(tmp_path):
    ref = _reference("neox", use_parallel_residual=False)
    ref.save_pretrained(tmp_path)
    model = minisv.load(str(tmp_path), device="cpu")
    assert not model.cfg.parallel and "blocks.0.hook_resid_mid" in model.hook_names
    _assert_same_logits(model, ref)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_norm_epsilon_from_the_config(family, tmp_path):
    """eps = 0.01 with embeddings of RMS ~0.01: the norms are far from scale-free, so the epsilon read from the
    config (layer_norm_epsilon, layer_norm_eps, rms_norm_eps) must be the one used."""
    key = {"gpt2": "layer_norm_epsilon", "neox": "layer_norm_eps", "llama": "rms_norm_eps"}[family]
    ref = _reference(family, **{key: 1e-2})
    with torch.no_grad():
        ref.get_input_embeddings().weight.mul_(0.5)        # init std 0.02 -> residual RMS 0.01: eps-dominated
    ref.save_pretrained(tmp_path)
    model = minisv.load(str(tmp_path), device="cpu")
    assert model.cfg.norm_eps == 1e-2
    _assert_same_logits(model, ref)
