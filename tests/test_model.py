"""The from-scratch model against transformers on tiny random GPT-2, GPT-NeoX and Llama (GQA) checkpoints."""
import pytest
import torch

import minisv
from minisv import MinisvError


@pytest.fixture(scope="module")
def pair(tiny):
    family, path, ref = tiny
    return family, minisv.load(str(path), device="cpu"), ref


def tokens(n=2, t=17, seed=0):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def test_logits_and_hidden_states_match_transformers(pair):
    family, model, ref = pair
    x = tokens()
    with torch.no_grad():
        expected = ref(x, output_hidden_states=True)
        logits, cache = model.run_with_cache(x, names=[f"blocks.{l}.hook_resid_pre" for l in range(3)])
    assert (logits - expected.logits).abs().max() < 1e-4
    for l in range(3):
        assert torch.allclose(cache[f"blocks.{l}.hook_resid_pre"], expected.hidden_states[l], atol=1e-5)


def test_greedy_generation_matches_transformers(pair):
    family, model, ref = pair
    prompt = tokens(1, 5, seed=1)
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                pad_token_id=0)[0, 5:].tolist()
    assert model.generate(prompt[0], max_new_tokens=20, stop_at_eos=False) == expected


def test_left_padded_batch_generates_like_single_prompts(pair):
    _, model, _ = pair
    prompts = [tokens(1, 3, seed=2)[0].tolist(), tokens(1, 7, seed=3)[0].tolist()]
    batch = model.generate(prompts, max_new_tokens=8, stop_at_eos=False)
    assert batch == [model.generate(p, max_new_tokens=8, stop_at_eos=False) for p in prompts]


def test_stop_then_start_at_layer_reproduces_forward(pair):
    _, model, _ = pair
    x = tokens()
    with torch.no_grad():
        resid = model(x, stop_at_layer=2)
        assert torch.allclose(model(resid, start_at_layer=2), model(x), atol=1e-5)


def test_every_hook_point_fires_with_documented_shapes(pair):
    family, model, _ = pair
    cfg = model.cfg
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens(2, 9))
        assert torch.allclose(logits, model(tokens(2, 9)), atol=1e-5)   # explicit-pattern path == SDPA path
    assert set(cache) == model.hook_names
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, cfg.n_heads, 9, 9)
    assert cache["blocks.1.attn.hook_k"].shape == (2, 9, cfg.n_kv_heads, cfg.d_head)
    assert cache["blocks.1.attn.hook_z"].shape == (2, 9, cfg.n_heads, cfg.d_head)
    assert cache["blocks.0.mlp.hook_post"].shape == (2, 9, cfg.d_mlp)
    assert torch.allclose(cache["blocks.1.attn.hook_pattern"].sum(-1), torch.ones(2, cfg.n_heads, 9))
    normalized = cache["blocks.2.ln2.hook_normalized"]   # before the learned scale: unit RMS
    assert torch.allclose(normalized.pow(2).mean(-1), torch.ones(2, 9), atol=1e-2)
    if family == "gpt2":
        assert "blocks.0.hook_resid_mid" in cache and "hook_pos_embed" in cache
    if family == "neox":
        assert "blocks.0.hook_resid_mid" not in model.hook_names


def test_hook_replaces_activation_and_gradients_flow(pair):
    _, model, _ = pair
    x = tokens(1, 6)
    v = torch.zeros(model.cfg.d_model, requires_grad=True)
    with model.hooks({"blocks.1.hook_resid_pre": lambda a, name: a + v}):
        model(x)[0, -1, 3].backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    with model.hooks({"blocks.0.hook_mlp_out": lambda a, name: torch.zeros_like(a)}):
        with model.hooks({"blocks.0.hook_mlp_out": lambda a, name: a + 1}):     # nested: runs after the outer
            _, cache = model.run_with_cache(x, names=["blocks.0.hook_mlp_out"])
    assert torch.equal(cache["blocks.0.hook_mlp_out"], torch.ones_like(cache["blocks.0.hook_mlp_out"]))
    assert not model._hooks


def test_hooks_see_absolute_positions_during_cached_generation(pair):
    _, model, _ = pair
    seen = []
    with model.hooks({"blocks.0.hook_resid_pre": lambda a, name: seen.append(model.positions[0].tolist())}):
        model.generate([5, 6, 7], max_new_tokens=3, stop_at_eos=False)
    assert seen == [[0, 1, 2], [3], [4]]


def test_bad_input_errors(pair):
    _, model, _ = pair
    with pytest.raises(MinisvError, match="outside the vocabulary"):
        model(torch.tensor([[1, 500]]))
    with pytest.raises(MinisvError, match="longer than the model's context"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(MinisvError, match="unknown hook name"):
        with model.hooks({"blocks.9.hook_resid_pre": print}):
            pass


def test_load_errors(tmp_path, tiny):
    family, path, _ = tiny
    with pytest.raises(MinisvError, match="no such GGUF"):
        minisv.load(str(tmp_path / "missing.gguf"))
    with pytest.raises(MinisvError, match="no config.json"):
        minisv.load(str(tmp_path))
    with pytest.raises(MinisvError, match="unknown model"):
        minisv.load("not a model!")
    (tmp_path / "config.json").write_text((path / "config.json").read_text().replace('"n_embd": 32', '"n_embd": 64')
                                          .replace('"hidden_size": 32', '"hidden_size": 64'))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(MinisvError, match=r"tensor '.*' has shape"):
        minisv.load(str(tmp_path))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MinisvError, match="corrupt"):
        minisv.load(str(tmp_path))


def test_fuzzed_safetensors_load_or_fail_cleanly(tmp_path, tiny):
    """Truncated and bit-flipped checkpoints: a clean MinisvError (or, for flips inside tensor data, a load)."""
    _, path, _ = tiny
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    rng = torch.Generator().manual_seed(0)
    header = 8 + int.from_bytes(data[:8], "little")
    cuts = list(range(0, header + 16, 7)) + torch.randint(header, len(data), (10,), generator=rng).tolist()
    flips = torch.randint(0, header, (60,), generator=rng).tolist()
    for i, cut in enumerate(cuts + flips):
        broken = bytearray(data[:cut]) if i < len(cuts) else bytearray(data)
        if i >= len(cuts):
            broken[cut] ^= 1 << (cut % 8)
        (tmp_path / "model.safetensors").write_bytes(bytes(broken))
        try:
            minisv.load(str(tmp_path), device="cpu")
        except MinisvError as e:
            assert "\n" not in str(e)


def test_half_precision_forward_is_close(tiny):
    _, path, _ = tiny
    x = tokens(1, 9)
    full = minisv.load(str(path), device="cpu")
    for dtype in (torch.bfloat16, torch.float16):
        half = minisv.load(str(path), device="cpu", dtype=dtype)
        with torch.no_grad():
            assert half.embed.weight.dtype == dtype
            assert (half(x).float() - full(x)).abs().max() < 0.05 * full(x).abs().max()


def test_sampling_filters(pair):
    """top_k=1 and a vanishing top_p leave only the argmax; plain sampling follows the softmax."""
    _, model, _ = pair
    prompt = tokens(1, 4, seed=5)[0]
    greedy = model.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    g = torch.Generator().manual_seed(0)
    assert model.generate(prompt, 6, temperature=1.0, top_k=1, stop_at_eos=False, generator=g) == greedy
    assert model.generate(prompt, 6, temperature=1.0, top_p=1e-6, stop_at_eos=False, generator=g) == greedy
    from minisv.model import _sample
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]])
    draws = _sample(logits.expand(20000, 4), 1.0, None, None, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=4) / 20000
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.01)
    top2 = _sample(logits.expand(2000, 4), 1.0, 2, None, torch.Generator().manual_seed(2))
    assert set(top2.tolist()) == {1, 2}
