"""Cross-layer transcoders: the map against dense formulas, the per-layer set as the window-1 case, the JumpReLU
straight-through gradient, and training through the shared loop (loss falls, raw-unit copy, exact resume)."""
import pytest
import torch

import minisv
from minisv.clt import CLTConfig, CrossLayerTranscoder
from minisv.training import TrainConfig, train
from minisv.transcoder import Transcoder, TranscoderConfig
from test_training import BOS, bench_module, tiny_llama, token_rows  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_clt(arch="topk", window=0, skip=False, L=3, d=8, F=12, k=3, seed=0):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(L, d, F, arch, k, window, skip))
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.5)
        if arch == "jumprelu":
            clt.log_threshold.fill_(-1.0)
    return clt


def dense_reconstruction(clt, x):
    """ŷ_t = Σ_{s ≤ t, t − s < window} a_s W_dec[t][s − s_0(t)] + b_dec[t] + x_t W_skip[t], with every activation dense."""
    cfg = clt.cfg
    acts = []
    for l in range(cfg.n_layers):
        pre = x[:, l] @ clt.W_enc[l].T + clt.b_enc[l]
        if cfg.architecture == "topk":
            top = pre.topk(cfg.k, dim=-1)
            acts.append(torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()))
        elif cfg.architecture == "relu":
            acts.append(pre.relu())
        else:
            acts.append(pre * (pre > clt.log_threshold[l].exp()))
    out = []
    for t in range(cfg.n_layers):
        y = clt.b_dec[t].expand(len(x), -1)
        for s in range(t + 1):
            if not cfg.window or t - s < cfg.window:
                y = y + acts[s] @ clt.W_dec[t][s - clt.cfg.sources(t)[0]]
        out.append(y + (x[:, t] @ clt.W_skip[t] if clt.W_skip is not None else 0))
    return torch.stack(out, 1), torch.stack(acts, 1)


@pytest.mark.parametrize("arch, window, skip", [("topk", 0, False), ("topk", 2, True), ("relu", 0, False),
                                                 ("jumprelu", 1, False)])
def test_forward_and_backward_equal_the_dense_formula(arch, window, skip):
    clt = random_clt(arch, window, skip)
    x = torch.randn(7, 3, 8, requires_grad=True)
    target = torch.randn(7, 3, 8)
    ours = (clt(x) - target).pow(2).sum()
    ours.backward()
    grads = {n: p.grad.clone() for n, p in clt.named_parameters() if n != "log_threshold"} | {"x": x.grad.clone()}
    clt.zero_grad()
    x.grad = None
    y, acts = dense_reconstruction(clt, x)
    (y - target).pow(2).sum().backward()
    torch.testing.assert_close(ours, (y - target).pow(2).sum())
    for name, p in [(n, p) for n, p in clt.named_parameters() if n != "log_threshold"] + [("x", x)]:
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)
    values, indices = clt.encode(x)
    torch.testing.assert_close(clt.dense(values, indices), acts)
    torch.testing.assert_close(clt.fired(values, indices), (acts > 0).sum(0).float())


def test_jumprelu_threshold_gets_the_straight_through_gradient():
    """∂a/∂θ = −(θ/ε)·1[|pre − θ| < ε/2] (Rajamanoharan et al. 2024), chained to log θ: ·θ."""
    clt = random_clt("jumprelu", L=1)
    x = torch.randn(40, 1, 8)
    pre = x[:, 0] @ clt.W_enc[0].T.detach() + clt.b_enc[0].detach()
    theta = clt.log_threshold[0].exp().detach()
    with torch.no_grad():                                   # put a few pre-activations inside the window
        clt.log_threshold[0].copy_(pre[0].log().nan_to_num(-3.0) + 0.001)
    theta = clt.log_threshold[0].exp().detach()
    grad_out = torch.randn(40, 12)
    values, _ = clt.encode_layer(0, x[:, 0])
    (values * grad_out).sum().backward()
    near = ((pre - theta).abs() < clt.BANDWIDTH / 2).float()
    expected = -(theta / clt.BANDWIDTH * near * grad_out).sum(0) * theta
    assert near.sum() >= 3
    torch.testing.assert_close(clt.log_threshold.grad[0], expected, rtol=1e-5, atol=1e-6)


def test_a_per_layer_set_is_the_window_1_clt():
    torch.manual_seed(0)
    tcs = {}
    for l in range(3):
        tcs[l] = Transcoder(TranscoderConfig(8, 8, 12, "topk", 3, skip=True, layer=l))
        with torch.no_grad():
            for p in tcs[l].parameters():
                p.normal_(0, 0.5)
    clt = CrossLayerTranscoder.from_transcoders(tcs, 3)
    x = torch.randn(5, 3, 8)
    torch.testing.assert_close(clt(x), torch.stack([tcs[l](x[:, l]) for l in range(3)], 1))
    assert clt.cfg.window == 1 and [len(w) for w in clt.W_dec] == [1, 1, 1]


@pytest.mark.parametrize("arch, window", [("topk", 0), ("jumprelu", 2)])
def test_training_through_the_shared_loop(tiny_llama, arch, window):
    """One CLT over all 3 layers from the same stream: the loss falls, every layer's FVU falls, and the returned
    raw-unit CLT, applied to activations harvested here, has the held-out FVU training measured in scaled units."""
    _, model = tiny_llama
    rows, held = token_rows(), token_rows(8, seed=5)
    cfg = TrainConfig(layers=[0, 1, 2], d_sae=32, k=4, lr=1e-2, tokens=256 * 30, batch_tokens=256,
                      buffer_tokens=2048, warmup_steps=3, dead_tokens=2048, bos_id=BOS, clt_window=window,
                      architecture=arch, eval_every=30, sparsity=1e-4)
    coders, summary = train(model, rows, cfg, log=lambda s: None, eval_rows=held)
    clt = coders["clt"]
    history = summary["history"]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"] and history[-1]["fvu"] < 0.8
    names = [n for l in range(3) for n in (f"blocks.{l}.ln2.hook_normalized", f"blocks.{l}.hook_mlp_out")]
    _, cache = model.run_with_cache(held, names=names)
    keep = held != BOS
    x = torch.stack([cache[f"blocks.{l}.ln2.hook_normalized"][keep] for l in range(3)], 1)
    y = torch.stack([cache[f"blocks.{l}.hook_mlp_out"][keep] for l in range(3)], 1)
    with torch.no_grad():
        err = (clt(x) - y).pow(2).sum(0).sum(-1)
    fvu = err / (y - y.mean(0)).pow(2).sum(0).sum(-1)
    measured = summary["held_out"][-1]["fvu"]
    assert [measured[str(l)] for l in range(3)] == pytest.approx(fvu.tolist(), rel=1e-3)


def test_a_clt_must_cover_every_layer(tiny_llama):
    _, model = tiny_llama
    cfg = TrainConfig(layers=[1], d_sae=16, tokens=512, batch_tokens=256, clt_window=0)
    with pytest.raises(minisv.MinisvError, match="replaces every MLP"):
        train(model, token_rows(), cfg, log=lambda s: None)


def clt_for(model, arch="topk", window=0, seed=0, F=16):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(model.cfg.n_layers, model.cfg.d_model, F, arch, 4, window))
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.2)
    return clt


def test_the_replacement_model_replaces_every_mlp_with_what_earlier_features_write(tiny_llama):
    """Spliced in, MLP l's output is ŷ_l of the dense formula applied to the MLP inputs the *replacement* model
    computes (which differ from the clean ones from layer 1 on): checked against a forward where each layer's
    MLP output is replaced by hand, layer by layer."""
    _, model = tiny_llama
    clt = clt_for(model, window=2)
    rows = token_rows(4, seed=3)
    from minisv.pullbacks import splice_hooks
    with torch.no_grad(), model.hooks(splice_hooks(clt)):
        ours = model(rows)
    seen = []

    def read(x, name):
        seen.append(x.flatten(0, 1))

    def write(y, name):
        l = int(name.split(".")[1])
        x = torch.stack(seen + [seen[-1]] * (3 - len(seen)), 1)            # layers > l do not reach ŷ_l
        return dense_reconstruction(clt, x)[0][:, l].view_as(y)
    hooks = {f"blocks.{l}.{h}": fn for l in range(3) for h, fn in (("ln2.hook_normalized", read),
                                                                   ("hook_mlp_out", write))}
    with torch.no_grad(), model.hooks(hooks):
        theirs = model(rows)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - model(rows)).abs().max() > 0.1                       # the replacement changes the logits


def test_evaluation_of_a_window_1_clt_is_the_per_layer_sets(tiny_llama):
    """evaluate() of a per-layer set with all MLPs replaced, and of the same set as a window-1 CLT, agree on every
    number; top-1 agreement is the fraction of predictions whose argmax matches the clean model's (by hand)."""
    from minisv.evals import evaluate
    _, model = tiny_llama
    torch.manual_seed(1)
    tcs = {}
    for l in range(3):
        tcs[l] = Transcoder(TranscoderConfig(32, 32, 16, "topk", 4, layer=l))
        with torch.no_grad():
            for p in tcs[l].parameters():
                p.normal_(0, 0.2)
    rows = token_rows(6, seed=2)
    per_layer = evaluate(model, rows, tcs, bos_id=BOS, per_row=True)
    as_clt = evaluate(model, rows, CrossLayerTranscoder.from_transcoders(tcs, 3), bos_id=BOS, per_row=True)
    for key in ("ce_spliced", "ce_zero_ablated", "ce_score", "kl", "top1_agreement"):
        assert as_clt["all"][key] == pytest.approx(per_layer["all"][key], rel=1e-5), key
    for l in range(3):
        for key in ("l0", "fvu", "dead"):
            assert as_clt[f"layer_{l}"][key] == pytest.approx(per_layer[f"layer_{l}"][key], rel=1e-5)
    from minisv.pullbacks import splice_hooks
    with torch.no_grad():
        clean = model(rows)[:, :-1].argmax(-1)
        with model.hooks(splice_hooks(tcs, rows != BOS)):
            spliced = model(rows)[:, :-1].argmax(-1)
    assert per_layer["all"]["top1_agreement"] == pytest.approx(float((clean == spliced).float().mean()))
    assert sum(per_layer["rows"]["all"]["nll"]) / per_layer["tokens"] == pytest.approx(per_layer["all"]["ce_spliced"])


def test_files_round_trip_and_corrupt_ones_are_one_line(tmp_path):
    from minisv import formats
    clt = random_clt("jumprelu", window=2, skip=True)
    clt.cfg.model = "tiny"
    formats.save(clt, tmp_path / "c")
    back = formats.load(tmp_path / "c")
    assert back.cfg == clt.cfg
    x = torch.randn(4, 3, 8)
    torch.testing.assert_close(back(x), clt(x), rtol=0, atol=0)
    cfg = (tmp_path / "c" / "cfg.json").read_text()
    (tmp_path / "c" / "cfg.json").write_text(cfg.replace('"d_sae": 12', '"d_sae": 13'))
    with pytest.raises(minisv.MinisvError, match="has shape .* but cfg.json implies"):
        formats.load(tmp_path / "c")
    (tmp_path / "c" / "cfg.json").write_text(cfg.replace('"window": 2', '"window": "2"'))
    with pytest.raises(minisv.MinisvError, match="window is '2', expected an integer"):
        formats.load(tmp_path / "c")


def test_clt_gpu_bench_steps_run_on_cpu():
    """bench_clt_gpu.sh needs a GPU; its Python part runs here with a tiny model (--dry-run): every configuration
    trains (no out-of-memory or error path taken)."""
    results = bench_module("bench_clt_gpu").main(["--dry-run"])
    assert [(r[0], r[1]) for r in results] == [(0, "fp32"), (0, "bf16 autocast"), (4, "bf16 autocast")]
    assert all(r[2] > 0 for r in results)
