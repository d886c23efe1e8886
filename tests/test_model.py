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


# ------------------------------------------------------------------ hook points TransformerLens also has
def _transformers_internals(family, ref, x):
    """Inputs/outputs of transformers' own modules during ref(x): each norm's input, the raw q/k (and Llama's
    up-projection), and rotary cos/sin from the model's rotary module."""
    body = ref.get_submodule({"gpt2": "transformer", "neox": "gpt_neox", "llama": "model"}[family])
    layers = body.h if family == "gpt2" else body.layers
    final = {"gpt2": "ln_f", "neox": "final_layer_norm", "llama": "norm"}[family]
    roles = {"gpt2": {"ln1": "ln_1", "ln2": "ln_2", "qkv": "attn.c_attn"},
             "neox": {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "qkv": "attention.query_key_value"},
             "llama": {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "q": "self_attn.q_proj",
                       "k": "self_attn.k_proj", "up": "mlp.up_proj"}}[family]
    seen, handles = {}, []

    def keep(name, module):
        handles.append(module.register_forward_hook(lambda m, args, out: seen.__setitem__(name, (m, args[0], out))))
    keep("ln_final", body.get_submodule(final))
    for l, layer in enumerate(layers):
        for role, path in roles.items():
            keep(f"{l}.{role}", layer.get_submodule(path))
    with torch.no_grad():
        ref(x)
        rope = body.rotary_emb(body.embed_in(x) if family == "neox" else body.embed_tokens(x),
                               position_ids=torch.arange(x.shape[1])[None]) if family != "gpt2" else None
    for h in handles:
        h.remove()
    return seen, rope


def test_scale_rotary_scores_and_up_projection_hooks_match_transformers(pair):
    """hook_scale = sqrt(mean(centred x²) + eps) of transformers' norm inputs; hook_rot_q/k = transformers'
    apply_rotary_pos_emb of its q/k projections; hook_attn_scores = q·k/√E with -inf above the diagonal;
    hook_pre_linear = Llama's up_proj output."""
    family, model, ref = pair
    cfg, x = model.cfg, tokens(2, 9)
    seen, rope = _transformers_internals(family, ref, x)
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    B, T, H, K, E = 2, 9, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    for l in range(cfg.n_layers):
        for norm in (f"blocks.{l}.ln1", f"blocks.{l}.ln2") + (("ln_final",) if l == 0 else ()):
            module, inp, _ = seen[norm.removeprefix("blocks.")]
            eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
            centred = inp if family == "llama" else inp - inp.mean(-1, keepdim=True)
            sigma = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()                   # [B, T, 1]
            assert cache[norm + ".hook_scale"].shape == (B, T, 1)
            assert torch.allclose(cache[norm + ".hook_scale"], sigma, rtol=1e-5)
        if family == "llama":
            q, k = seen[f"{l}.q"][2].view(B, T, H, E), seen[f"{l}.k"][2].view(B, T, K, E)
            assert torch.allclose(cache[f"blocks.{l}.mlp.hook_pre_linear"], seen[f"{l}.up"][2], atol=1e-6)
        elif family == "neox":     # fused rows ordered (head, qkv, E)
            q, k, _ = seen[f"{l}.qkv"][2].view(B, T, H, 3, E).unbind(3)
        else:                      # GPT-2: (qkv, head, E)
            q, k, _ = (t.view(B, T, H, E) for t in seen[f"{l}.qkv"][2].chunk(3, -1))
        if rope is not None:
            import importlib
            hf = importlib.import_module(type(ref).__module__)
            q, k = (t.transpose(1, 2) for t in hf.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *rope))
            assert torch.allclose(cache[f"blocks.{l}.attn.hook_rot_q"], q, atol=1e-6)
            assert torch.allclose(cache[f"blocks.{l}.attn.hook_rot_k"], k, atol=1e-6)
        scores = q.transpose(1, 2) @ k.repeat_interleave(H // K, 2).permute(0, 2, 3, 1) / E ** 0.5   # [B, H, T, T]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        ours = cache[f"blocks.{l}.attn.hook_attn_scores"]
        assert torch.equal(ours.isinf(), scores.isinf()) and torch.allclose(ours, scores, atol=1e-5)
    assert ("blocks.0.attn.hook_rot_q" in model.hook_names) == (family != "gpt2")
    assert ("blocks.0.mlp.hook_pre_linear" in model.hook_names) == (family == "llama")


def test_writes_to_scale_and_scores_take_effect(pair):
    """Replacing σ divides the normalized residual by the new value; -inf scores zero the pattern there."""
    _, model, _ = pair
    x = tokens(1, 6)
    with torch.no_grad():
        _, clean = model.run_with_cache(x, names=["blocks.1.ln2.hook_scale", "blocks.1.ln2.hook_normalized"])
        with model.hooks({"blocks.1.ln2.hook_scale": lambda s, name: 2 * s}):
            _, cache = model.run_with_cache(x, names=["blocks.1.ln2.hook_normalized"])
        assert torch.allclose(cache["blocks.1.ln2.hook_normalized"], clean["blocks.1.ln2.hook_normalized"] / 2,
                              atol=1e-6)

        def blind(s, name):   # no query may attend to position 0 (except position 0 itself, to stay finite)
            s = s.clone()
            s[..., 1:, 0] = float("-inf")
            return s
        with model.hooks({"blocks.0.attn.hook_attn_scores": blind}):
            _, cache = model.run_with_cache(x, names=["blocks.0.attn.hook_pattern"])
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert (pattern[..., 1:, 0] == 0).all() and torch.allclose(pattern.sum(-1), torch.ones_like(pattern[..., 0]))


def test_start_at_layer_zero_runs_from_a_residual(pair):
    """As in TransformerLens: model(resid, start_at_layer=0) runs every block from a residual; [T, D] works too."""
    _, model, _ = pair
    x = tokens(2, 7)
    with torch.no_grad():
        embedded = model(x, stop_at_layer=0)
        assert torch.allclose(model(embedded, start_at_layer=0), model(x), atol=1e-5)
        assert torch.allclose(model(embedded[1], start_at_layer=0)[0], model(x)[1], atol=1e-5)
        assert torch.allclose(model(x, start_at_layer=0), model(x))          # token ids still work at layer 0
        doubled = model(embedded * 2, start_at_layer=0)
        assert not torch.allclose(doubled, model(x), atol=1e-3)              # really read the residual


def test_fused_projections_follow_weight_edits_dtype_moves_and_gradients(pair):
    """q/k/v (and gate/up) are one Linear each: edits through the attn.k / mlp.up row views, model.double() and
    gradients w.r.t. the weights must all reach the computation (checked against transformers)."""
    import copy
    family, model, ref = pair
    model, ref = copy.deepcopy(model), copy.deepcopy(ref)
    x = tokens(1, 6)
    with torch.no_grad():
        model.blocks[1].attn.k.weight[:2] *= -3              # in place, through the view
        if family == "llama":
            model.blocks[2].mlp.up.weight[5] = 0
            ref.model.layers[1].self_attn.k_proj.weight[:2] *= -3
            ref.model.layers[2].mlp.up_proj.weight[5] = 0
        elif family == "neox":    # k rows of head 0 sit at 1·E.. in the (head, qkv, E) layout
            E = model.cfg.d_head
            ref.gpt_neox.layers[1].attention.query_key_value.weight[E:E + 2] *= -3
        else:                     # GPT-2's Conv1D: [D, 3D], k columns start at D
            D = model.cfg.d_model
            ref.transformer.h[1].attn.c_attn.weight[:, D:D + 2] *= -3
        assert (model(x) - ref(x).logits).abs().max() < 1e-4
        model, ref = model.double(), ref.double()
        assert (model(x) - ref(x).logits).abs().max() < 1e-6      # (Llama's reference norm stays fp32)
    if family == "llama":
        model.blocks[0].attn.qkv.weight.requires_grad_(True)
        ref.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
        model(x)[0, -1, 3].backward()
        ref(x).logits[0, -1, 3].backward()
        q_rows = model.blocks[0].attn.qkv.weight.grad[:model.cfg.n_heads * model.cfg.d_head]
        assert torch.allclose(q_rows, ref.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-5, atol=1e-9)


def test_weights_used_under_inference_mode_still_support_autograd(pair):
    import copy
    _, model, _ = pair
    model, x = copy.deepcopy(model), tokens(1, 5)
    with torch.inference_mode():
        before = model(x)
    with torch.no_grad():
        model.blocks[0].attn.v.weight[:3] = 0        # in place, outside inference mode
        assert not torch.allclose(model(x), before)
    v = torch.zeros(model.cfg.d_model, requires_grad=True)
    with model.hooks({"blocks.1.hook_resid_pre": lambda a, name: a + v}):
        model(x)[0, -1, 0].backward()
    assert v.grad.abs().sum() > 0


def test_kv_cache_grows_and_matches_a_full_forward(pair):
    """One token at a time through a KVCache that starts empty (buffers double as they fill) == one forward."""
    from minisv import KVCache
    _, model, _ = pair
    x = tokens(2, 11)
    cache = KVCache(model.cfg.n_layers)
    with torch.no_grad():
        steps = torch.cat([model(x[:, t:t + 1], kv_cache=cache) for t in range(11)], 1)
        assert torch.allclose(steps, model(x), atol=1e-5)


def test_generation_never_samples_ids_the_tokenizer_cannot_decode(pair):
    """Pythia's embedding is padded past its tokenizer: ids >= tokenizer.vocab_size are never generated."""
    from types import SimpleNamespace
    _, model, _ = pair
    prompt = tokens(1, 4, seed=7)[0]
    free = model.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    top = max(free)                     # pretend the tokenizer ends just below the largest id generated
    model.tokenizer, saved = SimpleNamespace(vocab_size=top, eos_id=None), model.tokenizer
    try:
        greedy = model.generate(prompt, max_new_tokens=12)
        sampled = model.generate(prompt, max_new_tokens=40, temperature=5.0, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            first = model(prompt)[0, -1, :top].argmax().item()
    finally:
        model.tokenizer = saved
    assert greedy[0] == first and max(greedy) < top and max(sampled) < top


def test_one_line_errors_for_empty_float_and_oversized_inputs(pair):
    _, model, _ = pair
    n_ctx = model.cfg.n_ctx
    with pytest.raises(MinisvError, match="empty input"):
        model(torch.tensor([]))                         # what torch.tensor(encode("")) gives
    with pytest.raises(MinisvError, match="expected integer token ids.*pass start_at_layer"):
        model(torch.ones(1, 3))
    for wrong in (torch.tensor(5), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 1, 3, dtype=torch.long)):
        with pytest.raises(MinisvError, match="expected integer token ids"):
            model(wrong)
    with pytest.raises(MinisvError, match="expected a float residual stream"):
        model(tokens(1, 3), start_at_layer=1)
    with pytest.raises(MinisvError, match="start_at_layer <= stop_at_layer"):
        model(tokens(1, 3), stop_at_layer=model.cfg.n_layers + 1)
    with pytest.raises(MinisvError, match=rf"3-token prompt plus max_new_tokens=100000 exceeds the model's context "
                                          rf"of {n_ctx} tokens; lower max_new_tokens to at most {n_ctx - 3}"):
        model.generate([1, 2, 3], max_new_tokens=100000)
    with pytest.raises(MinisvError, match="max_new_tokens must be"):
        model.generate([1, 2, 3], max_new_tokens=-1)
    assert len(model.generate([1, 2, 3], max_new_tokens=n_ctx - 3, stop_at_eos=False)) == n_ctx - 3


def test_check_layer(pair):
    _, model, _ = pair
    n = model.cfg.n_layers
    assert [model.check_layer(l) for l in range(n)] == list(range(n))
    for bad in (-1, n, 1.0, True, "1"):
        with pytest.raises(MinisvError, match=rf"^transcoder layer {bad!r} is out of range: this model has {n} "
                                              rf"layers, use 0\.\.{n - 1}$".replace("'", "'")):
            model.check_layer(bad, what="transcoder layer")


def test_every_hook_transformer_lens_also_has_matches_it(pair, tmp_path):
    """TransformerLens itself on the same checkpoint (a test-only reference: skipped where it is not installed)."""
    pytest.importorskip("transformer_lens")
    import copy
    import transformers as tf
    from tokenizers import Tokenizer, models
    from transformer_lens.model_bridge import TransformerBridge
    family, model, ref = pair
    # TransformerLens insists on a tokenizer: a word-level one over the 96 ids will do
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t2"))
    tf.PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t0", eos_token="t1", unk_token="t2") \
        .save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(model.cfg.name, hf_model=copy.deepcopy(ref), device="cpu",
                                                 tokenizer=tf.AutoTokenizer.from_pretrained(tmp_path))
    x = tokens(2, 9)
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(x)
        _, ours = model.run_with_cache(x)
    missing = model.hook_names - set(theirs.keys())
    assert all(".hook_rot_" in n for n in missing) and (family != "llama" or not missing), sorted(missing)[:5]
    for name in model.hook_names - missing:
        a, b = theirs[name], ours[name]
        assert a.shape == b.shape and (a[b.isinf()] < -1e30).all(), name    # masked: -inf or TL's float min
        assert torch.allclose(a[b.isfinite()], b[b.isfinite()], atol=1e-5), name
