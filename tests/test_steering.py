"""One-shot steering vectors: the loss, its prefix-cached gradient, hooks, positions, save/load and the CLI."""
import json
import re

import pytest
import torch

import minisv
from minisv.errors import MinisvError
from minisv.steering import (Datapoint, compare_generations, completion_logprob, prompt_ids, load_vector,
                             optimize_vector, residual_norm, save_vector, steer, steering_hook, steering_loss,
                             success_rate)

PROMPT = [5, 17, 33, 2, 41, 9, 60]
DATAPOINT = Datapoint(PROMPT, promote=[[12, 7, 30], [44]], suppress=[[8, 8]])    # ragged: the batch gets padded


@pytest.fixture(scope="module")
def pair(tiny):
    family, path, ref = tiny
    return minisv.load(path, device="cpu"), ref


def _hf_decoder_layers(ref):
    base = getattr(ref, "model", None) or getattr(ref, "transformer", None) or ref.gpt_neox
    return getattr(base, "layers", None) or base.h


def _reference_losses(ref, datapoints, layers, vector, clamp=None, coldness=0.7, one_minus=True,
                      normalize_length=False, matrix=None):
    """The straightforward way, independent of minisv: for each completion a full transformers forward of
    prompt + completion alone (no padding, no prefix cache), steered by a forward pre-hook at each layer's input
    at the datapoint's positions (torch indexing of the prompt's token indices), then the losses token by token:
    promote −log(p+ε); suppress −log(1−p+ε), or +log(p+ε) without one_minus; optionally ÷ completion length."""
    losses = []
    for dp in datapoints:
        n, u = len(dp.prompt), -vector if dp.negative else vector
        for kind, completion in [("promote", c) for c in dp.promote] + [("suppress", c) for c in dp.suppress]:
            seq = dp.prompt + completion
            where = torch.ones(len(seq), dtype=torch.bool)
            if dp.positions is not None:
                where = torch.zeros(len(seq), dtype=torch.bool)
                where[torch.arange(n)[dp.positions]] = True

            def add(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                y = x + u if clamp is None else x - (x @ (vector / vector.norm()))[..., None] * vector / vector.norm() + clamp * u
                if matrix is not None:
                    y = y + x @ matrix.T
                y = torch.where(where[:, None], y, x)
                return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})
            handles = [_hf_decoder_layers(ref)[l].register_forward_pre_hook(add, with_kwargs=True) for l in layers]
            try:
                probs = (coldness * ref(torch.tensor([seq])).logits[0].float()).softmax(-1)
            finally:
                for h in handles:
                    h.remove()
            loss = 0
            for k, token in enumerate(completion):
                p = probs[n + k - 1, token]
                if kind == "promote":
                    loss = loss - torch.log(p + 1e-6)
                elif one_minus:
                    loss = loss - torch.log(1 - p + 1e-6)
                else:
                    loss = loss + torch.log(p + 1e-6)
            losses.append(loss / len(completion) if normalize_length else loss)
    return torch.stack(losses)


SEVERAL = [DATAPOINT, Datapoint(PROMPT[:4], suppress=[[3, 9]], negative=True),
           Datapoint(PROMPT[2:], promote=[[50], [6, 6]], positions=slice(0, 2))]
CASES = {       # name: (layers, steering_loss keywords, datapoints)
    "layer 1": ([1], {}, [DATAPOINT]),
    "layers 1 and 2": ([1, 2], {}, [DATAPOINT]),
    "layer 0": ([0], {}, [DATAPOINT]),
    "clamp": ([2], dict(clamp=0.5), [DATAPOINT]),
    "position int": ([1], {}, [Datapoint(PROMPT, promote=[[12, 7]], suppress=[[8]], positions=2)]),
    "position slice": ([1], {}, [Datapoint(PROMPT, promote=[[12, 7]], suppress=[[8]], positions=slice(-3, None))]),
    "position list": ([1], {}, [Datapoint(PROMPT, promote=[[12, 7]], suppress=[[8]], positions=[1, 3])]),
    "negative positions": ([1], {}, [Datapoint(PROMPT, promote=[[12, 7]], positions=[-1, 0])]),
    "one_minus=False": ([1], dict(one_minus=False), [DATAPOINT]),
    "normalize_length": ([1], dict(normalize_length=True), [DATAPOINT]),
    "coldness 1.3": ([1], dict(coldness=1.3), [DATAPOINT]),
    "several datapoints": ([1], {}, SEVERAL),
    "affine": ([1], dict(matrix=True), SEVERAL),
}


@pytest.mark.parametrize("case", CASES)
def test_prefix_cached_batched_loss_and_gradient_equal_independent_reference(pair, case):
    model, ref = pair
    layers, kw, datapoints = CASES[case]
    g = torch.Generator().manual_seed(1)
    vector = torch.randn(model.cfg.d_model, generator=g).requires_grad_()
    params = [vector]
    if kw.get("matrix"):
        kw = dict(kw, matrix=(0.2 * torch.randn(model.cfg.d_model, model.cfg.d_model, generator=g)).requires_grad_())
        params.append(kw["matrix"])
    ours = steering_loss(model, datapoints, layers, vector, **kw)
    grads = torch.autograd.grad(ours.sum(), params)
    theirs = _reference_losses(ref, datapoints, layers, vector, **kw)
    grads_ref = torch.autograd.grad(theirs.sum(), params)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-4, atol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
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


def test_stopping_rules(pair):
    model, _ = pair
    start = steering_loss(model, [DATAPOINT], 1, torch.zeros(model.cfg.d_model))
    total = start.sum().item()
    _, info = optimize_vector(model, [DATAPOINT], 1, lr=0.1, max_iters=100, target_loss=total - 0.3, target_sum=True,
                              starting_norm=0)
    assert info["stop"] == "target_loss" and info["loss"] <= total - 0.3 and 0 < info["iters"] < 100
    # target_loss applies to each completion (the reference's do_target_loss_sum=False) unless target_sum=True:
    # every completion is below max + 0.01 at once, the sum is not
    kw = dict(lr=1e-6, max_iters=5, starting_norm=0)
    each = start.max().item() + 0.01
    assert optimize_vector(model, [DATAPOINT], 1, target_loss=each, **kw)[1]["iters"] == 0
    assert optimize_vector(model, [DATAPOINT], 1, target_loss=each, target_sum=True, **kw)[1]["stop"] == "max_iters"
    below = start.min().item() - 0.01      # ... and not reached while one completion stays above it
    assert optimize_vector(model, [DATAPOINT], 1, target_loss=below, **kw)[1]["stop"] == "max_iters"
    # reached at once; with patience 3 it must hold for 3 evaluations (tiny steps keep it reached)
    assert optimize_vector(model, [DATAPOINT], 1, target_loss=total + 1, patience=3, **kw)[1]["iters"] == 2
    # per-completion targets: every completion must reach its own, whatever the sum does
    reachable = Datapoint(PROMPT, promote=DATAPOINT.promote, promote_targets=(start[:2] + 1).tolist())
    unreachable = Datapoint(PROMPT, promote=DATAPOINT.promote, promote_targets=[start[0].item() + 1, 0.0])
    assert optimize_vector(model, [reachable], 1, **kw)[1]["stop"] == "target_loss"
    assert optimize_vector(model, [unreachable], 1, target_loss=total + 1, target_sum=True, **kw)[1]["stop"] == "max_iters"
    _, info = optimize_vector(model, [DATAPOINT], 1, lr=1e-9, max_iters=50, converge_tol=1e-3, patience=2, seed=0)
    assert info["stop"] == "converged" and info["iters"] == 2
    # the reference's convergence stop (|Δloss| < 1e-6) is on by default: steps too small to change v stop it
    _, info = optimize_vector(model, [DATAPOINT], 1, lr=1e-12, max_iters=50, seed=0)
    assert info["stop"] == "converged" and info["iters"] == 1 and len(info["history"]) == 2
    _, info = optimize_vector(model, [DATAPOINT], 1, lr=1e-12, max_iters=3, converge_tol=None, seed=0)
    assert info["stop"] == "max_iters" and info["iters"] == 3


def test_negative_datapoint_sees_minus_v(pair):
    model, _ = pair
    v = torch.randn(model.cfg.d_model)
    neg = Datapoint(PROMPT, promote=[[12, 7, 30]], negative=True)
    plain = Datapoint(PROMPT, promote=[[12, 7, 30]])
    torch.testing.assert_close(steering_loss(model, [neg], 1, v), steering_loss(model, [plain], 1, -v))


def test_minibatches_step_through_fixed_groups(pair):
    model, _ = pair
    v0 = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    first, second = SEVERAL[0], SEVERAL[1]
    # batch_size 1: step 0 sees the first datapoint only, step 1 the second (an Adam loop written out by hand)
    v, info = optimize_vector(model, [first, second], 1, lr=0.05, max_iters=2, starting_vec=v0, batch_size=1)
    w = v0.clone().requires_grad_()
    adam = torch.optim.Adam([w], lr=0.05)
    for dp in (first, second):
        adam.zero_grad()
        steering_loss(model, [dp], 1, w).sum().backward()
        adam.step()
    torch.testing.assert_close(v, w.detach())
    # the reported losses cover every datapoint, at the returned vector
    assert [d["datapoint"] for d in info["losses"]] == [0, 0, 0, 1]
    again = steering_loss(model, [first, second], 1, v).tolist()
    assert [d["loss"] for d in info["losses"]] == pytest.approx(again, rel=1e-5)
    assert info["loss"] == pytest.approx(sum(again), rel=1e-5)


def test_affine_steering_is_initialised_and_clipped_as_the_reference(pair):
    model, _ = pair
    _, info = optimize_vector(model, [DATAPOINT], 1, max_iters=0, affine_rank=2, starting_affine_norm=0.7, seed=0)
    L, R = info["factors"]
    assert L.shape == R.shape == (2, model.cfg.d_model)
    torch.testing.assert_close(L.norm(dim=1), torch.full((2,), 0.7))
    torch.testing.assert_close(R.norm(dim=1), torch.full((2,), 0.7))
    torch.testing.assert_close(info["matrix"], L.T @ R)
    # big steps: rows grow, and are scaled back to max_affine_norm
    v, info = optimize_vector(model, [DATAPOINT], 1, lr=0.5, max_iters=4, affine_rank=2, max_affine_norm=0.8, seed=0)
    L, R = info["factors"]
    assert torch.allclose(torch.cat([L, R]).norm(dim=1).max(), torch.tensor(0.8))
    assert info["history"][-1] < info["history"][0]
    again = steering_loss(model, [DATAPOINT], 1, v, matrix=info["matrix"]).tolist()
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
    # what steering needs comes back: positions (int, list, slice), scale, clamp, the affine matrix
    matrix = torch.randn(32, 32)
    for positions in (3, [1, 4], slice(2, None), slice(0, 8, 2)):
        save_vector(path, v, 1, positions=positions, scale=2.5, matrix=matrix)
        w, meta = load_vector(path)
        assert meta["positions"] == positions and meta["scale"] == 2.5 and meta["kind"] == "affine"
        assert torch.equal(meta["matrix"], matrix) and torch.equal(w, v) and "clamp" not in meta
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
    matrix = torch.randn(model.cfg.d_model, model.cfg.d_model)     # settings load_vector returns are honoured
    gens = compare_generations(model, prompts, v, 1, multipliers=(2.0,), positions=[1, 2], matrix=matrix,
                               clamp=0.5, max_new_tokens=3)
    with steer(model, v, 1, multiplier=2.0, positions=[1, 2], matrix=matrix, clamp=0.5):
        assert gens[2.0] == model.generate(prompts, 3)
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
             (Datapoint(PROMPT, promote=[[3]], positions=[1, 7]), 1, "do not index"),
             (Datapoint("text", promote=["more"]), 1, "no tokenizer")]
    for dp, layer, message in cases:
        with pytest.raises(MinisvError, match=message):
            optimize_vector(model, [dp], layer, max_iters=1)
    with pytest.raises(MinisvError, match="satisfice"):
        optimize_vector(model, [DATAPOINT], 1, satisfice=True, max_iters=1)
    with pytest.raises(MinisvError, match="target_sum"):
        optimize_vector(model, [DATAPOINT], 1, target_sum=True, max_iters=1)
    with pytest.raises(MinisvError, match="shape"):
        steer(model, torch.zeros(7), 1).__enter__()


@pytest.mark.parametrize("positions", [slice(3, 3), slice(10, None), []])
def test_positions_that_select_no_prompt_token_are_refused(pair, positions):
    model, _ = pair     # they would steer nothing: the loss could never move
    with pytest.raises(MinisvError, match="select none"):
        optimize_vector(model, [Datapoint(PROMPT, promote=[[3]], positions=positions)], 1, max_iters=1)


@pytest.mark.parametrize("kw,message", [
    (dict(clamp=1.0, starting_norm=0.0), "non-zero vector"),      # v̂ = v/‖v‖ of v = 0: a NaN vector
    (dict(coldness=float("nan")), "coldness"),
    (dict(coldness=0.0), "coldness"),
    (dict(max_norm=-1.0), "max_norm"),                              # would flip v at every step
    (dict(lr=float("inf")), "lr"),
    (dict(starting_norm=-1.0), "starting_norm"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_iters=-1), "max_iters"),
])
def test_settings_that_would_give_a_nan_or_meaningless_vector_are_refused(pair, kw, message):
    model, _ = pair
    with pytest.raises(MinisvError, match=message):
        optimize_vector(model, [DATAPOINT], 1, **{"max_iters": 1, **kw})


@pytest.fixture(scope="module")
def bos_model(chat_model_dir, tmp_path_factory):
    """The chat fixture's model, with a tokenizer that says add_bos_token (as Llama-family tokenizers do)."""
    import shutil
    path = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(chat_model_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    return minisv.load(path, device="cpu")


def test_text_gets_bos_when_the_tokenizer_adds_it(bos_model):
    model, tok = bos_model, bos_model.tokenizer
    assert tok.add_bos and tok.bos_id == 256
    assert prompt_ids(model, "Hi there") == [256] + tok.encode("Hi there")
    assert prompt_ids(model, "<|endoftext|>Hi") == [256] + tok.encode("Hi")     # a template's own BOS is not doubled
    assert prompt_ids(model, [5, 6]) == [5, 6]                                    # ids are the caller's business
    text = Datapoint("Hi there,", promote=[" no."], suppress=[" sure"], positions=0)
    ids = Datapoint([256] + tok.encode("Hi there,"), promote=[tok.encode(" no.")], suppress=[tok.encode(" sure")],
                    positions=0)
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(steering_loss(model, [text], 1, v, chat=False), steering_loss(model, [ids], 1, v))
    if tok.is_chat:     # by default a text prompt is one user turn of the model's chat template, ids never are
        chat_ids = Datapoint(prompt_ids(model, tok.chat("Hi there,")), promote=[tok.encode(" no.")],
                             suppress=[tok.encode(" sure")], positions=0)
        torch.testing.assert_close(steering_loss(model, [text], 1, v), steering_loss(model, [chat_ids], 1, v))
    assert completion_logprob(model, ["Hi there,"], " no.", chat=False) == pytest.approx(
        completion_logprob(model, [[256] + tok.encode("Hi there,")], tok.encode(" no.")))
    assert residual_norm(model, "Hi", 1, chat=False) == pytest.approx(residual_norm(model, [256] + tok.encode("Hi"), 1))


# ------------------------------------------------------------------------------------------- the script
def write_chat_model(path, n_ctx):
    """A tiny random Llama with a byte-level chat tokenizer (256 byte tokens, no merges, ChatML specials) in `path`,
    with a context of n_ctx tokens."""
    import transformers as tf
    from minisv.tokenizer import _BYTE_OF_CHAR
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=260, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=n_ctx,
                            bos_token_id=256, eos_token_id=258)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps({c: b for c, b in _BYTE_OF_CHAR.items()}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    specials = {256: "<|endoftext|>", 257: "<|im_start|>", 258: "<|im_end|>"}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": t} for i, t in specials.items()},
        "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}))
    return path


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("chat"), 128)


def test_script_end_to_end(chat_model_dir, tmp_path, capsys):
    from optimize_sv import main
    prompts = tmp_path / "eval.txt"
    prompts.write_text("Say <b>hello</b> & bye\n\nWhat is 2+2?\n")
    out = tmp_path / "run" / "v.safetensors"
    main(["--model", str(chat_model_dir), "--prompt", "Tell me a joke.", "--promote", "No way.", "--suppress", "Sure",
          "--layer", "1", "--lr", "0.1", "--max-iters", "4", "--seed", "0", "--eval-prompts", str(prompts),
          "--success", "No", "--out", str(out), "--max-new-tokens", "5", "--clamp-at-inference"])
    printed = capsys.readouterr().out
    vector, meta = load_vector(out)
    assert vector.shape == (32,) and meta["layer"] == 1 and meta["promote"] == ["No way."]
    assert meta["suppress"] == ["Sure"] and meta["prompt"] == "Tell me a joke." and meta["iters"] == 4
    assert meta["clamp"] == 1.0 and meta["kind"] == "clamp" and "train_clamp" not in meta and meta["scale"] == 1.0
    assert "step   4" in printed and "What is 2+2?" in printed and "success" in printed
    report = out.with_suffix(".html").read_text()
    assert "Say &lt;b&gt;hello&lt;/b&gt; &amp; bye" in report and "<b>hello" not in report
    assert report.count("<tr>") == 2 + 1 + 2 + 1   # vectors: header + 1; generations: header, 2 eval, training


def test_script_many_prompts_and_a_layer_sweep(chat_model_dir, tmp_path, capsys):
    from optimize_sv import main
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "Tell me a story.", "promote": "No way."}\n\n'
                     '{"prompt": "Sing a song.", "promote": ["No way.", "No."], "suppress": "Sure"}\n')
    out = tmp_path / "v.safetensors"
    main(["--model", str(chat_model_dir), "--prompt", "Tell me a joke.", "--promote", "No way.", "--train-file",
          str(train), "--layer", "0", "2", "--max-iters", "2", "--batch", "2", "--out", str(out),
          "--max-new-tokens", "3"])
    printed = capsys.readouterr().out
    assert "3 training prompt(s), 5 completion(s)" in printed
    for layer in (0, 2):
        vector, meta = load_vector(tmp_path / f"v_layer{layer}.safetensors")
        assert meta["layer"] == layer and meta["n_datapoints"] == 3 and meta["iters"] == 2
        assert re.search(rf"layer {layer:2d} .* unsteered \d/12, \+1v \d/12, −1v \d/12", printed)
    assert not out.exists()
    assert f"vectors -> {tmp_path / 'v_layer0.safetensors'}, {tmp_path / 'v_layer2.safetensors'}; report -> " in printed
    report = out.with_suffix(".html").read_text()
    assert "held-out success vs layer" in report and "Sing a song." in report
    chart = report[report.index("held-out success vs layer"):report.index("</svg>")]
    points = re.findall(r"<(?:circle|rect|polygon) [^>]*><title>(.*?)</title>", chart)   # hover: column: layer, success
    printed_rates = re.findall(r"layer +(\d+) .*?unsteered (\d+)/12, \+1v (\d+)/12, −1v (\d+)/12", printed)
    assert sorted(points) == sorted(f"{name}: {layer}, {int(n) / 12:.3g}" for layer, *counts in printed_rates
                                    for name, n in zip(("unsteered", "+1v", "−1v"), counts))


def test_script_exports_a_llama_cpp_control_vector(chat_model_dir, tmp_path, capsys):
    from optimize_sv import main
    from minisv.control_vector import load_control_vector
    out, gguf = tmp_path / "v.safetensors", tmp_path / "v.gguf"
    main(["--model", str(chat_model_dir), "--promote", "No way.", "--layer", "2", "--max-iters", "2", "--out", str(out),
          "--gguf", str(gguf), "--max-new-tokens", "2"])
    summary = capsys.readouterr().out.splitlines()[-1]     # names every file the run wrote
    assert summary.startswith(f"vector -> {out}; llama.cpp control vector -> {gguf}; report -> {tmp_path / 'v.html'};")
    vector, _ = load_vector(out)
    loaded = load_control_vector(gguf)
    assert list(loaded) == [2]                          # read back at the hook_resid_pre it was trained for
    torch.testing.assert_close(loaded[2], vector, rtol=0, atol=0)


@pytest.fixture
def artifacts(tmp_path):
    """An earlier run's outputs, which a refused run must leave as they are."""
    vector, report = tmp_path / "v.safetensors", tmp_path / "v.html"
    save_vector(vector, torch.ones(32), 1)
    report.write_text("earlier report")
    return {p: p.read_bytes() for p in (vector, report)}


@pytest.mark.parametrize("args,message", [
    (["--promote", ""], "empty"),
    (["--layer", "3"], "out of range"),
    (["--eval-prompts", "/no/such/file.txt"], "eval-prompts"),
    (["--success", "("], "regular expression"),
    (["--lr", "-1"], "argument --lr"),
    (["--coldness", "nan"], "argument --coldness"),
    (["--max-norm", "-1"], "argument --max-norm"),
    (["--scale", "0"], "argument --scale"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["--max-new-tokens", "100000"], "lower --max-new-tokens"),
    (["--layer", "-1"], "argument --layer"),
    (["--clamp", "1", "--starting-norm", "0"], "starting-norm"),
    (["--raw", "--prompt", ""], "prompt is empty"),
    (["--device", "tpu"], "device"),
    (["--out", "{tmp}/v.html"], "HTML report"),
    (["--out", "{tmp}"], "directory"),
    (["--out", "{tmp}/v.safetensors/w.safetensors"], "is a file"),
    (["--train-file", "{tmp}/v.html"], "is the --train-file input"),   # the report would overwrite it
    (["--gguf", "{tmp}/v.gguf"], "cannot be exported"),
    (["--gguf", "{tmp}/v.gguf", "--layer", "2", "--clamp", "1"], "no clamp"),
])
def test_script_bad_input(chat_model_dir, tmp_path, capsys, artifacts, args, message):
    from optimize_sv import main
    base = ["--model", str(chat_model_dir), "--promote", "No.", "--layer", "1", "--max-iters", "1",
            "--out", str(tmp_path / "v.safetensors")]
    with pytest.raises(SystemExit) as e:
        main(base + [a.format(tmp=tmp_path) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and message in errors[0] and err.strip().endswith(errors[0])
    assert {p: p.read_bytes() for p in artifacts} == artifacts


def test_script_unknown_model(monkeypatch, capsys, tmp_path):
    from optimize_sv import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["--model", "nobody/no-such-model", "--out", str(tmp_path / "v.safetensors")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")
