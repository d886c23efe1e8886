"""Transcoder training, evaluation and train_transcoder.py, on tiny random models (one CPU thread each)."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minisv
from conftest import tiny_config
from minisv.errors import MinisvError
from minisv.evals import evaluate
from minisv.training import (ActivationStream, TrainConfig, _fix_decoder_grad, hook_names, lr_at, topk_loss, train)
from minisv.transcoder import Transcoder, TranscoderConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS = 0


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: a second thread only adds synchronization (and stalls badly on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """(directory, minisv model) of a tiny random Llama-style checkpoint with random norm gains."""
    import transformers as tf
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(tiny_config("llama"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1)
    path = tmp_path_factory.mktemp("llama")
    ref.save_pretrained(path)
    return path, minisv.load(str(path), device="cpu")


def token_rows(n=160, ctx=32, seed=0):
    rows = torch.randint(2, 96, (n, ctx), generator=torch.Generator().manual_seed(seed))
    rows[:, 0] = BOS
    rows[::7, 13] = BOS        # a few document separators inside rows: also skipped
    return rows


def config(**overrides):
    base = dict(layers=[1], d_sae=64, k=4, lr=1e-2, tokens=256 * 40, batch_tokens=256, buffer_tokens=2048,
                warmup_steps=5, dead_tokens=2048, bos_id=BOS, checkpoint_every=5)
    return TrainConfig(**(base | overrides))


def weights(tcs):
    return {f"{l}.{n}": p.detach().clone() for l, tc in tcs.items() for n, p in tc.named_parameters()}


# ------------------------------------------------------------------------- streaming
def test_stream_serves_the_hooked_activations_without_bos(tiny):
    family, path, _ = tiny
    model = minisv.load(str(path), device="cpu")
    rows = token_rows(48)
    stream = ActivationStream(model, rows, [0, 2], batch_tokens=128, buffer_tokens=1024, seed=0, bos_id=BOS)

    def beyond(x, name):
        raise AssertionError("harvesting ran past the deepest layer it needs")
    with model.hooks({"blocks.3.hook_resid_pre": beyond} if model.cfg.n_layers > 3 else {}):
        chunk = stream.chunk(0)
    used = rows[stream._row_ids(0)]
    _, cache = model.run_with_cache(used, names=[n for l in (0, 2) for n in hook_names(l)])
    keep = used != BOS
    for l in (0, 2):
        expected = torch.cat([cache[hook_names(l)[0]][keep], cache[hook_names(l)[1]][keep]], 1)
        got = torch.cat(chunk[l], 1)
        assert got.shape == expected.shape == (int(keep.sum()), 64)
        # same (x, y) pairs, shuffled: each streamed pair is exactly one hooked pair
        assert torch.cdist(got, expected, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-5
        assert not torch.equal(got, expected)
    assert torch.equal(chunk[0][0][:50], stream.chunk(0)[0][0][:50])       # a pure function of (seed, chunk)


# ------------------------------------------------------------------------- losses
@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_loss_falls_and_relu_decoder_rows_stay_unit(tiny_llama, arch):
    _, model = tiny_llama
    tcs, summary = train(model, token_rows(), config(architecture=arch, l1=1e-4), log=lambda s: None)
    history = summary["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[0]["fvu"] > 0.95 and history[-1]["fvu"] < 0.7
    if arch == "relu":
        torch.testing.assert_close(tcs[1].W_dec.norm(dim=1), torch.ones(64))
    else:
        assert history[-1]["l0"] <= 4


def test_decoder_gradient_parallel_part_is_removed():
    tc = Transcoder(TranscoderConfig(8, 6, 16, "relu"))
    tc.W_dec.grad = torch.randn(16, 6)
    _fix_decoder_grad(tc)
    torch.testing.assert_close((tc.W_dec.grad * tc.W_dec).sum(1), torch.zeros(16), atol=1e-6, rtol=0)


def test_auxk_revives_planted_dead_latents():
    """Student = a TopK teacher whose last 16 latents were broken (tiny encoder, zero decoder): they never win a
    top-k slot, so the main loss gives them no gradient. AuxK fits the error with them until they fire again."""
    torch.manual_seed(0)
    teacher = Transcoder(TranscoderConfig(32, 32, 64, "topk", 4))
    with torch.no_grad():
        teacher.W_enc.normal_(0, 32 ** -0.5), teacher.b_enc.fill_(1.0), teacher.W_dec.normal_()
    planted = torch.arange(48, 64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[planted] = True
    revived = {}
    for coef in (0.0, 1 / 32):
        torch.manual_seed(1)
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            student.W_enc[:, planted], student.b_enc[planted], student.W_dec[planted] = torch.randn(32, 16) * 0.01, 0.1, 0
        opt = torch.optim.Adam(student.parameters(), lr=1e-2)
        for _ in range(150):
            x = torch.randn(256, 32)
            loss, _ = topk_loss(student, x, teacher(x).detach(), dead, 16, coef)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            revived[coef] = int((student.encode(torch.randn(4096, 32))[:, planted] > 0).any(0).sum())
    assert revived[0.0] == 0 and revived[1 / 32] >= 12


def test_lr_schedule():
    lrs = [lr_at(s, 100, 1.0, warmup=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == pytest.approx(1.0) and lrs[99] == pytest.approx(0.05) and lrs[90] == pytest.approx(0.5)


# ------------------------------------------------------------------------- checkpoints
class Killed(Exception):
    pass


def test_kill_and_resume_gives_the_same_weights(tiny_llama, tmp_path):
    _, model = tiny_llama
    cfg = config(layers=[0, 2], tokens=256 * 16, buffer_tokens=1024)      # 3 batches per chunk: resume mid-chunk
    full, _ = train(model, token_rows(), cfg, log=lambda s: None)

    def kill_at_step_13(step, transcoders, stats):
        if step == 13:
            raise Killed
    with pytest.raises(Killed):
        train(model, token_rows(), cfg, out_dir=tmp_path, log=lambda s: None, on_step=kill_at_step_13)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 10
    lines = []
    resumed, summary = train(model, token_rows(), cfg, out_dir=tmp_path, resume=True, log=lines.append)
    assert lines[0].startswith("resuming at step 10/16")
    full_w, resumed_w = weights(full), weights(resumed)
    for name in full_w:
        torch.testing.assert_close(resumed_w[name], full_w[name], rtol=0, atol=1e-6, msg=name)
    with pytest.raises(MinisvError, match="different settings"):
        train(model, token_rows(), config(layers=[0, 2], tokens=256 * 16, lr=0.5), out_dir=tmp_path, resume=True)


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_llama, tmp_path):
    _, model = tiny_llama

    def poison_at_step_7(step, transcoders, stats):
        if step == 7:
            with torch.no_grad():
                transcoders[1].W_enc.fill_(float("nan"))
    with pytest.raises(MinisvError, match=r"training diverged: loss is nan at step 7; the last good checkpoint"):
        train(model, token_rows(), config(), out_dir=tmp_path, log=lambda s: None, on_step=poison_at_step_7)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and torch.isfinite(state["transcoders"]["1"]["W_enc"]).all()


# ------------------------------------------------------------------------- evaluation
def test_evaluate_matches_hand_computation(tiny):
    family, path, _ = tiny
    model = minisv.load(str(path), device="cpu")
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(32, 32, 48, "topk", 6, layer=1))
    with torch.no_grad():
        tc.W_dec.normal_(0, 0.05)
    rows = token_rows(6, 16)
    m = evaluate(model, rows, {1: tc}, bos_id=BOS, batch_rows=4)
    keep = rows != BOS
    x_name, y_name = hook_names(1)
    _, cache = model.run_with_cache(rows, names=[x_name, y_name])
    x, y = cache[x_name], cache[y_name]
    with torch.no_grad():
        y_hat = tc(x)
    fvu = (y_hat - y)[keep].pow(2).sum() / (y[keep] - y[keep].mean(0)).pow(2).sum()

    def ce(replacement):
        with model.hooks({y_name: lambda out, name: torch.where(keep[..., None], replacement, out)}):
            logits = model(rows)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten()), logits
    clean_logits = model(rows)
    clean = F.cross_entropy(clean_logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten())
    spliced, spliced_logits = ce(y_hat)
    zero, _ = ce(torch.zeros_like(y))
    kl = F.kl_div(spliced_logits[:, :-1].log_softmax(-1), clean_logits[:, :-1].log_softmax(-1), log_target=True,
                  reduction="none").sum(-1).mean()
    r = m["layer_1"]
    assert m["ce_clean"] == pytest.approx(float(clean), rel=1e-5)
    assert r["ce_spliced"] == pytest.approx(float(spliced), rel=1e-5)
    assert r["ce_zero_ablated"] == pytest.approx(float(zero), rel=1e-5)
    assert r["ce_score"] == pytest.approx(float((zero - spliced) / (zero - clean)), rel=1e-3)
    assert r["kl"] == pytest.approx(float(kl), rel=1e-3, abs=1e-7)
    assert r["fvu"] == pytest.approx(float(fvu), rel=1e-4)
    f = tc.encode(x[keep])
    assert r["l0"] == pytest.approx(float((f > 0).sum(-1).float().mean()))
    assert r["dead"] == pytest.approx(float(((f > 0).sum(0) == 0).float().mean()))
    assert sum(r["freq_histogram"]["counts"]) == int(((f > 0).sum(0) > 0).sum())


# ------------------------------------------------------------------------- the script
def script(argv):
    sys.path.insert(0, REPO)
    try:
        import train_transcoder
    finally:
        sys.path.remove(REPO)
    return train_transcoder.main(argv)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(path, torch.randint(2, 96, (160 * 32,), generator=torch.Generator().manual_seed(1)).numpy())
    return path


def script_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--layer", "1", "--d-sae", "64",
            "--k", "4", "--tokens", str(256 * 12), "--batch-tokens", "256", "--ctx", "32", "--eval-tokens", "256",
            "--checkpoint-every", "4", "--lr", "0.01", *extra]


def test_script_end_to_end_writes_loadable_artifacts(tiny_llama, token_file, tmp_path, capsys):
    path, model = tiny_llama
    script(script_args(path, token_file, tmp_path / "run"))
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "CE score" in printed
    assert {"cfg.json", "transcoder.safetensors", "metrics.json", "checkpoint.pt"} <= set(os.listdir(tmp_path / "run"))
    cfg = json.loads((tmp_path / "run" / "cfg.json").read_text())
    assert cfg["hook_in"] == "blocks.1.ln2.hook_normalized" and cfg["hook_out"] == "blocks.1.hook_mlp_out"
    assert cfg["training_tokens"] == 256 * 12 and cfg["architecture"] == "topk" and cfg["d_sae"] == 64
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    tc = Transcoder.load(tmp_path / "run")
    eval_rows = torch.from_numpy(np.load(token_file)).view(-1, 32)[-8:]             # the held-out tail, 8 rows
    again = evaluate(model, eval_rows, {1: tc})
    assert metrics["eval"]["layer_1"]["fvu"] == pytest.approx(again["layer_1"]["fvu"], rel=1e-5)
    assert metrics["eval"]["layer_1"]["ce_score"] == pytest.approx(again["layer_1"]["ce_score"], rel=1e-5)
    assert metrics["train"]["steps"] == 12 and len(metrics["train"]["history"]) >= 1


def test_script_several_layers_share_the_forward_and_are_evaluated_together(tiny_llama, token_file, tmp_path):
    path, _ = tiny_llama
    args = script_args(path, token_file, tmp_path / "run")
    args[args.index("--layer") + 1:args.index("--layer") + 2] = ["0", "2"]
    script(args)
    for layer in (0, 2):
        assert Transcoder.load(tmp_path / "run" / f"layer_{layer}").cfg.hook_in == f"blocks.{layer}.ln2.hook_normalized"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"]
    assert {"layer_0", "layer_2", "all"} <= set(metrics)
    assert metrics["all"]["ce_zero_ablated"] != metrics["layer_0"]["ce_zero_ablated"]     # both MLPs ablated at once


def test_script_bad_input_exits_2(tiny_llama, token_file, tmp_path, capsys):
    path, _ = tiny_llama
    with pytest.raises(SystemExit) as e:
        script(script_args(path, token_file, tmp_path / "run") + ["--layer", "7"])
    assert e.value.code == 2 and "error: layer 7 does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        script(script_args(path, token_file, tmp_path / "run", "--resume"))
    assert e.value.code == 2 and "nothing to resume" in capsys.readouterr().err


def torchrun(script_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script_path), *map(str, args)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


GRADIENT_WORKER = """
import sys, torch, torch.distributed as dist
from minisv.training import relu_loss, topk_loss
from minisv.transcoder import Transcoder, TranscoderConfig


def gradients(rank, world):
    grads = {}
    for arch in ("topk", "relu"):
        torch.manual_seed(0)
        tc = Transcoder(TranscoderConfig(16, 12, 48, arch, 5))
        with torch.no_grad():
            tc.W_dec.normal_(0, 0.3)
        x, y = torch.randn(64, 16), torch.randn(64, 12)
        part = slice(64 // world * rank, 64 // world * (rank + 1))
        dead = torch.arange(48) >= 40
        if arch == "topk":
            loss, _ = topk_loss(tc, x[part], y[part], dead, 6, 0.5)
        else:
            loss, _ = relu_loss(tc, x[part], y[part], dead, 1e-2)
        loss.backward()
        for name, p in tc.named_parameters():
            if world > 1:
                dist.all_reduce(p.grad)
            grads[f"{arch}.{name}"] = p.grad
    return grads


if __name__ == "__main__":
    dist.init_process_group("gloo")
    grads = gradients(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        torch.save(grads, sys.argv[1])
    dist.destroy_process_group()
"""


def test_two_gloo_processes_give_the_gradient_of_the_global_batch(tmp_path):
    """Each process computes the loss on its half of the batch (FVU / MSE denominators, AuxK and ghost-grad
    statistics all-reduced); summing gradients over processes must give the whole batch's gradient."""
    worker = tmp_path / "worker.py"
    worker.write_text(GRADIENT_WORKER)
    torchrun(worker, tmp_path / "split.pt")
    namespace = {}
    exec(GRADIENT_WORKER, namespace)
    whole, split = namespace["gradients"](0, 1), torch.load(tmp_path / "split.pt")
    for name in whole:
        assert whole[name].abs().max() > 0, name
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_gloo_processes_train_like_one_process(tiny_llama, token_file, tmp_path):
    """train_transcoder.py under torchrun, 2 CPU processes each taking half of every global batch, follows the
    single-process run on the same global batches. (Not bit for bit: Adam turns the float noise of the first
    step's ~0 gradient of b_dec, which starts at the batch mean, into full-size steps.)"""
    path, _ = tiny_llama
    script(script_args(path, token_file, tmp_path / "single", "--eval-tokens", "32"))
    stdout = torchrun(os.path.join(REPO, "train_transcoder.py"),
                      *script_args(path, token_file, tmp_path / "ddp", "--eval-tokens", "32"))
    assert stdout.count("step 12/12") == 1          # only rank 0 reports
    history = [json.loads((tmp_path / run / "metrics.json").read_text())["train"]["history"] for run in ("single", "ddp")]
    assert [h["step"] for h in history[0]] == [h["step"] for h in history[1]] == list(range(1, 13))
    for a, b in zip(*history):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-3)
    single, ddp = Transcoder.load(tmp_path / "single"), Transcoder.load(tmp_path / "ddp")
    for (name, a), (_, b) in zip(single.named_parameters(), ddp.named_parameters()):
        assert (a - b).abs().max() < 0.05 * a.abs().max(), name
