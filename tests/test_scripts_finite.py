"""No NaN with exit status 0: a model whose config overflows (rope_theta 1e-300 gives inf frequencies and NaN
logits), an observable weight beyond float32, or any NaN or infinity in a result stops each script with one
`error: ...` line naming the cause, and no result file holds it."""
import json
import os
import re

import pytest
import torch

import minisv
from minisv import cli
from test_obprop import planted                          # noqa: F401  (fixture) the tiny llama with a planted head
from test_scripts_paths import fails, obprop_args, run_script, snapshot  # noqa: F401  (obprop_args: fixture)
from test_steering import chat_model_dir                  # noqa: F401  (fixture) a tiny chat llama, byte tokenizer
from test_training import script_args, tiny_llama, token_file  # noqa: F401  (fixtures) a tiny llama and tokens


def overflowing(source, target):
    """A copy of a Hugging Face model directory whose config.json says rope_theta = 1e-300: every weight is fine,
    but the rotary frequencies 1/theta^(2i/d) overflow to inf and the logits are NaN."""
    import shutil
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["rope_theta"] = 1e-300
    if isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"]["rope_theta"] = 1e-300
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_optimize_sv_refuses_a_model_with_nan_logits(chat_model_dir, tmp_path, capsys):
    model = overflowing(chat_model_dir, tmp_path / "model")
    fails("optimize_sv", ["--model", str(model), "--prompt", "Hi.", "--promote", "No.", "--layer", "1",
                          "--max-iters", "1", "--max-new-tokens", "2",
                          "--out", str(tmp_path / "out" / "v.safetensors")],
          capsys, "non-finite logits (nan) on a first forward")
    assert not (tmp_path / "out").exists()


def test_train_transcoder_refuses_a_model_with_nan_logits(tiny_llama, token_file, tmp_path, capsys):
    model = overflowing(tiny_llama[0], tmp_path / "model")
    fails("train_transcoder", script_args(model, token_file, tmp_path / "run"), capsys, "non-finite logits")
    assert not (tmp_path / "run").exists()                  # a failed start leaves nothing


def test_obprop_refuses_a_model_with_nan_logits(chat_model_dir, tmp_path, capsys):
    model = overflowing(chat_model_dir, tmp_path / "model")
    fails("obprop", ["--model", str(model), "--observable", "'a' - 'b'", "--pos-prompt", "x a", "--neg-prompt", "x b",
                     "--html", str(tmp_path / "r.html")], capsys, "non-finite logits")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("spec, message", [
    ("1e309*' she' - ' he'", "has a weight beyond float32's range"),          # inf when parsed
    ("1e39*' she' - ' he'", "has a weight beyond float32's range"),           # finite in Python, inf in float32
    ("3e38*' she' - 3e38*' he'", "the results: observables[0]"),              # finite weights, overflowing features
])
def test_obprop_refuses_an_observable_that_overflows(obprop_args, tmp_path, capsys, spec, message):
    out = [str(tmp_path / "r.html"), str(tmp_path / "r.json")]
    args = obprop_args[:]
    args[args.index("' she' - ' he'")] = spec
    error = fails("obprop", args + ["--corpus", str(tmp_path / "corpus.txt"), "--html", out[0], "--json", out[1]],
                  capsys, message)
    assert "inf" in error or "nan" in error
    assert not any(os.path.exists(p) for p in out)


def test_obprop_refuses_a_nan_result(obprop_args, tmp_path, capsys, monkeypatch):
    """Whatever computation goes wrong (here: patching returns NaN), the report is not written."""
    import obprop
    real = obprop.ob.patch_heads
    monkeypatch.setattr(obprop.ob, "patch_heads", lambda *a: real(*a) * float("nan"))
    fails("obprop", obprop_args + ["--corpus", str(tmp_path / "corpus.txt"), "--html", str(tmp_path / "r.html")],
          capsys, "the results: observables[0].patching[0][0] is nan")
    assert not (tmp_path / "r.html").exists()


def test_optimize_sv_refuses_a_nan_vector_and_a_nan_result(chat_model_dir, tmp_path, capsys, monkeypatch):
    import optimize_sv
    base = ["--model", str(chat_model_dir), "--prompt", "Hi.", "--promote", "No.", "--layer", "1", "--max-iters", "1",
            "--max-new-tokens", "2", "--out", str(tmp_path / "v.safetensors")]
    real = optimize_sv.optimize_vector
    monkeypatch.setattr(optimize_sv, "optimize_vector",
                        lambda *a, **k: (lambda v, info: (v * float("inf"), info))(*real(*a, **k)))
    fails("optimize_sv", base, capsys, "layer 1: vector holds ")
    assert not (tmp_path / "v.safetensors").exists() and not (tmp_path / "v.html").exists()
    monkeypatch.setattr(optimize_sv, "optimize_vector", real)
    monkeypatch.setattr(optimize_sv, "residual_norm", lambda *a, **k: float("nan"))
    fails("optimize_sv", base, capsys, "the results: [0].resid_norm is nan")
    assert (tmp_path / "v.safetensors").exists() and not (tmp_path / "v.html").exists()


def test_train_transcoder_refuses_nan_metrics(tiny_llama, token_file, tmp_path, capsys, monkeypatch):
    import train_transcoder
    real = train_transcoder.evaluate

    def nan_fvu(*args, **kwargs):
        metrics = real(*args, **kwargs)
        metrics["layer_1"]["fvu"] = float("nan")
        return metrics
    monkeypatch.setattr(train_transcoder, "evaluate", nan_fvu)
    run = tmp_path / "run"
    fails("train_transcoder", script_args(tiny_llama[0], token_file, run, "--dash-features", "0"), capsys,
          "the evaluation: layer_1.fvu is nan")
    held = os.listdir(run)
    assert "transcoder.safetensors" in held and "metrics.json" not in held and "report.html" not in held


def test_check_finite_names_the_first_bad_number():
    assert cli.check_finite({"a": [1.0, torch.ones(2)], "b": "text", "c": None}, "x") is not None
    for value, where in [({"a": [1.0, float("inf")]}, "a[1] is inf"), ([{"t": torch.tensor([0.0, float("nan")])}],
                                                                       "[0].t holds nan")]:
        with pytest.raises(minisv.MinisvError, match="^x: " + re.escape(where)):
            cli.check_finite(value, "x")


def test_the_multi_layer_table_prints_no_nan(tiny_llama, token_file, tmp_path, capsys):
    """The "all" row (every coder spliced in at once) has no L0, FVU or dead fraction of its own: "–", not nan."""
    args = script_args(tiny_llama[0], token_file, tmp_path / "run", "--dash-features", "0")
    args[args.index("--layer") + 1:args.index("--layer") + 2] = ["0", "2"]
    run_script("train_transcoder", args)
    table = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("layer ", "all "))]
    assert len(table) == 3 and not any("nan" in line for line in table), table
    assert table[-1].split()[:3] == ["all", "–", "–"] and table[-1].split()[-1] == "–"
