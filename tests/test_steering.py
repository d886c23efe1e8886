"""One-shot steering vectors: the loss, its prefix-cached gradient, hooks, positions, save/load and the CLI."""
import json

import pytest
import torch

import minisv
from minisv.errors import MinisvError
from minisv.steering import (Datapoint, compare_generations, completion_logprob, load_vector, optimize_vector,
                             residual_norm, save_vector, steer, steering_hook, steering_loss, success_rate)

PROMPT = [5, 17, 33, 2, 41, 9, 60]
DATAPOINT = Datapoint(PROMPT, promote=[[12, 7, 30], [44]], suppress=[[8, 8]])    # ragged: the batch gets padded


@pytest.fixture(scope="module")
def pair(tiny):
    family, path, ref = tiny
    return minisv.load(path, device="cpu"), ref


def _hf_decoder_layers(ref):
    base = getattr(ref, "model", None) or getattr(ref, "transformer", None) or ref.gpt_neox
    return getattr(base, "layers", None) or base.h


def _reference_losses(ref, dp, layers, vector, clamp=None, coldness=0.7):
    """The straightforward way: for each completion a full transformers forward with v added by a forward
    pre-hook at each layer's input, then the `docs/methods.md` §1.2 losses token by token."""
    def add(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if clamp is None:
            x = x + vector
        else:
            unit = vector / vector.norm()
            x = x - (x @ unit)[..., None] * unit + clamp * vector
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
    handles = [_hf_decoder_layers(ref)[l].register_forward_pre_hook(add, with_kwargs=True) for l in layers]
    losses = []
    try:
        for kind, completion in [("promote", c) for c in dp.promote] + [("suppress", c) for c in dp.suppress]:
            seq = torch.tensor([dp.prompt + completion])
            probs = (coldness * ref(seq).logits[0].float()).softmax(-1)
            loss = 0
            for k, token in enumerate(completion):
                p = probs[len(dp.prompt) + k - 1, token]
                loss = loss - (torch.log(p + 1e-6) if kind == "promote" else torch.log(1 - p + 1e-6))
            losses.append(loss)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(losses)


@pytest.mark.parametrize("layers,clamp", [([1], None), ([1, 2], None), ([0], None), ([2], 0.5)])
def test_prefix_cached_loss_and_gradient_equal_full_forward(pair, layers, clamp):
    model, ref = pair
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1)).requires_grad_()
    ours = steering_loss(model, [DATAPOINT], layers, vector, clamp=clamp)
    grad, = torch.autograd.grad(ours.sum(), vector)
    v_ref = vector.detach().clone().requires_grad_()
    theirs = _reference_losses(ref, DATAPOINT, layers, v_ref, clamp)
    grad_ref, = torch.autograd.grad(theirs.sum(), v_ref)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5)
    assert grad.norm() > 0


def test_steps_lower_the_loss_and_respect_the_norm_bound(pair):
    model, _ = pair
    norms = []
    v, info = optimize_vector(model, [DATAPOINT], 1, lr=0.05, max_iters=6, max_norm=0.8, starting_norm=0.8, seed=0,
                              callback=lambda step, loss, norm: norms.append(norm))
    assert info["iters"] == 6 and info["stop"] == "max_iters" and len(info["history"]) == 7
    assert info["history"][-1] < info["history"][0] and info["history"][1] < info["history"][0]
    assert max(norms) <= 0.8 + 1e-5 and v.norm() <= 0.8 + 1e-5
    # the reported losses are those of the returned vector (no off-by-one step)
    again = steering_loss(model, [DATAPOINT], 1, v).tolist()
    assert [d["loss"] for d in info["losses"]] == pytest.approx(again, rel=1e-5)
    assert [d["kind"] for d in info["losses"]] == ["promote", "promote", "suppress"]


def test_stopping_rules_and_negative_datapoints(pair):
    model, _ = pair
    start = steering_loss(model, [DATAPOINT], 1, torch.zeros(model.cfg.d_model))
    total = start.sum().item()
    _, info = optimize_vector(model, [DATAPOINT], 1, lr=0.1, max_iters=100, target_loss=total - 0.3, starting_norm=0)
    assert info["stop"] == "target_loss" and info["loss"] <= total - 0.3 and 0 < info["iters"] < 100
    # reached at once; with patience 3 it must hold for 3 evaluations (tiny steps keep it reached)
    kw = dict(lr=1e-6, max_iters=5, starting_norm=0)
    assert optimize_vector(model, [DATAPOINT], 1, target_loss=total + 1, **kw)[1]["iters"] == 0
    assert optimize_vector(model, [DATAPOINT], 1, target_loss=total + 1, patience=3, **kw)[1]["iters"] == 2
    # per-completion targets: every completion must reach its own, whatever the sum does
    reachable = Datapoint(PROMPT, promote=DATAPOINT.promote, promote_targets=(start[:2] + 1).tolist())
    unreachable = Datapoint(PROMPT, promote=DATAPOINT.promote, promote_targets=[start[0].item() + 1, 0.0])
    assert optimize_vector(model, [reachable], 1, **kw)[1]["stop"] == "target_loss"
    assert optimize_vector(model, [unreachable], 1, target_loss=total + 1, **kw)[1]["stop"] == "max_iters"
    _, info = optimize_vector(model, [DATAPOINT], 1, lr=1e-9, max_iters=50, converge_tol=1e-3, patience=2, seed=0)
    assert info["stop"] == "converged" and info["iters"] == 2
    # a negative datapoint sees −v: its loss at v is the plain datapoint's loss at −v
    v = torch.randn(model.cfg.d_model)
    neg = Datapoint(PROMPT, promote=[[12, 7, 30]], negative=True)
    plain = Datapoint(PROMPT, promote=[[12, 7, 30]])
    torch.testing.assert_close(steering_loss(model, [neg], 1, v), steering_loss(model, [plain], 1, -v))


def test_affine_low_rank_steering(pair):
    model, _ = pair
    v, info = optimize_vector(model, [DATAPOINT], 1, lr=0.05, max_iters=4, affine_rank=2, seed=0)
    matrix = info["matrix"]
    assert matrix.shape == (model.cfg.d_model,) * 2 and torch.linalg.matrix_rank(matrix) == 2
    assert info["history"][-1] < info["history"][0]
    again = steering_loss(model, [DATAPOINT], 1, v, matrix=matrix).tolist()
    assert [d["loss"] for d in info["losses"]] == pytest.approx(again, rel=1e-5)


def test_clamp_sets_the_component_along_v(pair):
    model, _ = pair
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 5, model.cfg.d_model, generator=g) * 3, torch.randn(model.cfg.d_model, generator=g)
    model.positions = torch.arange(5).expand(2, 5)
    for alpha, mult in [(1.0, 1.0), (0.5, -1.0), (2.0, 0.5)]:
        out = steering_hook(model, v, multiplier=mult, clamp=alpha)(x, "blocks.1.hook_resid_pre")
        unit = v / v.norm()
        torch.testing.assert_close(out @ unit, torch.full((2, 5), alpha * mult * v.norm().item()))
        torch.testing.assert_close(out - (out @ unit)[..., None] * unit, x - (x @ unit)[..., None] * unit)
    matrix = torch.randn(model.cfg.d_model, model.cfg.d_model, generator=g)   # affine: M x of the unsteered x
    torch.testing.assert_close(steering_hook(model, v, matrix=matrix)(x, ""), x + v + x @ matrix.T)


def _steering_diffs(model, v, run, **steer_kwargs):
    """Call run() with v steering layer 1; return (steered − unsteered) resid_pre [B, T, D] of every forward."""
    name, before, diffs = "blocks.1.hook_resid_pre", [], []
    with model.hooks({name: lambda x, n: before.append(x)}), steer(model, v, 1, **steer_kwargs), \
            model.hooks({name: lambda x, n: diffs.append(x - before[-1])}):    # hooks run in the order added
        run()
    return diffs


def test_positions_outside_a_restriction_are_untouched_also_with_kv_cache(pair):
    model, _ = pair
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    prompt = [5, 17, 33, 2, 41]
    diffs = _steering_diffs(model, v, lambda: model.generate(prompt, 4, stop_at_eos=False), positions=[1, 5, 7])
    steered = [d.abs().sum(-1).gt(0)[0].tolist() for d in diffs]
    assert steered == [[False, True, False, False, False], [True], [False], [True]]  # prefill 0-4, then 5, 6, 7
    for d in diffs:
        assert torch.allclose(d[0][d[0].abs().sum(-1) > 0], v)
    # ragged batch, left-padded: position 1 is each row's own second token
    diffs = _steering_diffs(model, v, lambda: model.generate([prompt, [9, 3]], 1), positions=1)
    assert diffs[0].abs().sum(-1).gt(0).tolist() == [[False, True, False, False, False],
                                                     [False, False, False, False, True]]
    # prompt only: generated tokens are never steered
    diffs = _steering_diffs(model, v, lambda: model.generate(prompt, 3, stop_at_eos=False), positions=slice(0, 5))
    assert diffs[0].abs().sum(-1).gt(0).all() and all(d.abs().sum() == 0 for d in diffs[1:])
    with pytest.raises(MinisvError, match="absolute"):
        steer(model, v, 1, positions=slice(-3, None)).__enter__()


def test_save_load_round_trip(tmp_path):
    v = torch.randn(32)
    path = tmp_path / "sub" / "v.safetensors"
    save_vector(path, v, 3, model="tiny", clamp=0.5, prompt="Hi <there>", promote=["I'm sorry"], loss=1.25)
    w, meta = load_vector(path)
    assert torch.equal(v, w)
    assert meta["layer"] == 3 and meta["clamp"] == 0.5 and meta["kind"] == "clamp" and meta["loss"] == 1.25
    assert meta["hook"] == "blocks.3.hook_resid_pre" and meta["prompt"] == "Hi <there>" and meta["promote"] == ["I'm sorry"]
    assert meta["norm"] == pytest.approx(v.norm().item()) and meta["model"] == "tiny"
    save_vector(path, v, [2, 4])
    assert load_vector(path)[1]["layer"] == [2, 4] and [p.name for p in path.parent.iterdir()] == ["v.safetensors"]
    with pytest.raises(MinisvError, match="no such"):
        load_vector(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MinisvError, match="readable"):
        load_vector(tmp_path / "junk.safetensors")


def test_evaluation_helpers(pair):
    model, ref = pair
    prompts = [[5, 17, 33], [9, 3, 4, 21, 2]]
    got = completion_logprob(model, prompts, [12, 7])
    for p, lp in zip(prompts, got):
        logp = ref(torch.tensor([p + [12, 7]])).logits[0].float().log_softmax(-1)
        assert lp == pytest.approx((logp[len(p) - 1, 12] + logp[len(p), 7]).item(), abs=1e-4)
    v = torch.randn(model.cfg.d_model) * 5
    gens = compare_generations(model, prompts, v, 1, max_new_tokens=3)
    assert set(gens) == {0.0, 1.0, -1.0} and gens[0.0] == model.generate(prompts, 3)
    with steer(model, v, 1, multiplier=-1.0):
        assert gens[-1.0] == model.generate(prompts, 3)
    _, cache = model.run_with_cache(torch.tensor([prompts[1]]), names=["blocks.2.hook_resid_pre"])
    assert residual_norm(model, prompts[1], 2) == pytest.approx(
        cache["blocks.2.hook_resid_pre"][0].norm(dim=-1).median().item())
    assert success_rate(["I'm sorry", "Sure", "sorry!"], r"(?i)sorry") == pytest.approx(2 / 3)
    with pytest.raises(MinisvError, match="regular expression"):
        success_rate(["x"], "(")


def test_bad_input_is_a_clear_error(pair):
    model, _ = pair
    cases = [(Datapoint(PROMPT, promote=[[]]), 1, "empty"),
             (Datapoint(PROMPT, promote=[[3]]), 7, "out of range"),
             (Datapoint(PROMPT, promote=[[3]]), -1, "out of range"),
             (Datapoint(PROMPT), 1, "no completions"),
             (Datapoint(PROMPT, promote=[[3]], promote_targets=[1.0, 2.0]), 1, "one each"),
             (Datapoint(PROMPT, promote=[[3]], positions=slice(0, 2, 0)), 1, "positions"),
             (Datapoint("text", promote=["more"]), 1, "no tokenizer")]
    for dp, layer, message in cases:
        with pytest.raises(MinisvError, match=message):
            optimize_vector(model, [dp], layer, max_iters=1)
    with pytest.raises(MinisvError, match="satisfice"):
        optimize_vector(model, [DATAPOINT], 1, satisfice=True, max_iters=1)
    with pytest.raises(MinisvError, match="shape"):
        steer(model, torch.zeros(7), 1).__enter__()


# ------------------------------------------------------------------------------------------- the script
@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level chat tokenizer (256 byte tokens, no merges, ChatML specials)."""
    import transformers as tf
    from minisv.tokenizer import _BYTE_OF_CHAR
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=260, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                            bos_token_id=256, eos_token_id=258)
    path = tmp_path_factory.mktemp("chat")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps({c: b for c, b in _BYTE_OF_CHAR.items()}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    specials = {256: "<|endoftext|>", 257: "<|im_start|>", 258: "<|im_end|>"}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": t} for i, t in specials.items()},
        "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}))
    return path


def test_script_end_to_end(chat_model_dir, tmp_path, capsys):
    from optimize_sv import main
    prompts = tmp_path / "eval.txt"
    prompts.write_text("Say <b>hello</b> & bye\n\nWhat is 2+2?\n")
    out = tmp_path / "run" / "v.safetensors"
    main(["--model", str(chat_model_dir), "--prompt", "Tell me a joke.", "--promote", "No way.", "--suppress", "Sure",
          "--layer", "1", "--lr", "0.1", "--max-iters", "4", "--seed", "0", "--eval-prompts", str(prompts),
          "--success", "No", "--out", str(out), "--max-new-tokens", "5"])
    printed = capsys.readouterr().out
    vector, meta = load_vector(out)
    assert vector.shape == (32,) and meta["layer"] == 1 and meta["promote"] == ["No way."]
    assert meta["suppress"] == ["Sure"] and meta["prompt"] == "Tell me a joke." and meta["iters"] == 4
    assert "step   4" in printed and "What is 2+2?" in printed and "success" in printed
    report = out.with_suffix(".html").read_text()
    assert "Say &lt;b&gt;hello&lt;/b&gt; &amp; bye" in report and "<b>hello" not in report
    assert report.count("<tr>") == 1 + 2 + 1        # header, two eval prompts, the training prompt


@pytest.mark.parametrize("args,message", [
    (["--promote", ""], "empty"),
    (["--layer", "3"], "out of range"),
    (["--eval-prompts", "/no/such/file.txt"], "eval-prompts"),
    (["--success", "("], "regular expression"),
])
def test_script_bad_input(chat_model_dir, tmp_path, capsys, args, message):
    from optimize_sv import main
    base = ["--model", str(chat_model_dir), "--promote", "No.", "--layer", "1", "--max-iters", "1",
            "--out", str(tmp_path / "v.safetensors")]
    with pytest.raises(SystemExit) as e:
        main(base + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_script_unknown_model(monkeypatch, capsys, tmp_path):
    from optimize_sv import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["--model", "nobody/no-such-model", "--out", str(tmp_path / "v.safetensors")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")
