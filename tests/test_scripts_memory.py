"""Memory stated and checked: each script estimates its peak memory from its settings, prints it at start, says
so in --help, and refuses in one line naming the flag that lowers it when the estimate exceeds the memory
available; the same estimate refuses absurd sizes before anything is allocated."""
import os

import pytest

from minisv import cli
from minisv.errors import MinisvError
from test_obprop import planted                          # noqa: F401  (fixture) the tiny llama with a planted head
from test_scripts_paths import fails, obprop_args, run_script  # noqa: F401  (obprop_args: fixture)
from test_steering import chat_model_dir                  # noqa: F401  (fixture) a tiny chat llama, byte tokenizer
from test_training import script_args, tiny_llama, token_file  # noqa: F401  (fixtures) a tiny llama and tokens

BILLION = "1000000000"


def sv_args(chat_model_dir, tmp_path):
    return ["--model", str(chat_model_dir), "--prompt", "Hi.", "--promote", "No.", "--layer", "1", "--max-iters", "1",
            "--max-new-tokens", "2", "--out", str(tmp_path / "v.safetensors")]


@pytest.mark.parametrize("flag", ["--d-sae", "--batch-tokens"])
def test_absurd_transcoder_sizes_are_refused_before_allocating(tiny_llama, token_file, tmp_path, capsys, flag,
                                                              monkeypatch):
    import train_transcoder
    monkeypatch.setattr(train_transcoder, "load_dataset", lambda *a, **k: pytest.fail("data read before the check"))
    args = script_args(tiny_llama[0], token_file, tmp_path / "run", flag, BILLION, "--tokens", BILLION)
    error = fails("train_transcoder", args, capsys, "TB of memory")
    assert "--d-sae" in error and "--batch-tokens" in error and "(the training)" in error
    assert not (tmp_path / "run").exists()


def test_absurd_affine_rank_is_refused_before_allocating(chat_model_dir, tmp_path, capsys):
    error = fails("optimize_sv", sv_args(chat_model_dir, tmp_path) + ["--affine-rank", BILLION], capsys,
                  "TB of memory")
    assert "lower --batch or --affine-rank (the optimization)" in error
    assert not os.listdir(tmp_path)


def too_little_memory(name, args, capsys, monkeypatch, lower):
    """With 1 MB available, the script stops right after loading the model, naming what to lower."""
    monkeypatch.setattr(cli, "available_memory", lambda device: 1_000_000)
    error = fails(name, args, capsys, lower)
    assert "but 1 MB is available" in error


def test_optimize_sv_refuses_more_memory_than_is_available(chat_model_dir, tmp_path, capsys, monkeypatch):
    too_little_memory("optimize_sv", sv_args(chat_model_dir, tmp_path), capsys, monkeypatch,
                      "--max-new-tokens (or give fewer --eval-prompts)")
    assert os.listdir(tmp_path) == []


def test_train_transcoder_refuses_more_memory_than_is_available(tiny_llama, token_file, tmp_path, capsys,
                                                                monkeypatch):
    import train_transcoder
    monkeypatch.setattr(train_transcoder, "load_dataset", lambda *a, **k: pytest.fail("data read before the check"))
    too_little_memory("train_transcoder", script_args(tiny_llama[0], token_file, tmp_path / "run"), capsys,
                      monkeypatch, "lower --")
    assert os.listdir(tmp_path) == []                      # the run directory it claimed is gone again


def test_obprop_refuses_more_memory_than_is_available(obprop_args, tmp_path, capsys, monkeypatch):
    too_little_memory("obprop", obprop_args + ["--corpus", str(tmp_path / "corpus.txt"), "--html",
                                               str(tmp_path / "r.html")], capsys, monkeypatch, "--corpus-tokens")
    assert os.listdir(tmp_path) == ["corpus.txt"]


def test_the_estimate_is_printed_at_the_start(chat_model_dir, tmp_path, capsys):
    run_script("optimize_sv", sv_args(chat_model_dir, tmp_path))
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(out) if line.startswith("memory: about "))
    assert at < next(i for i, line in enumerate(out) if line.startswith("generating"))
    assert "runtime 300 MB" in out[at] and "available" in out[at]


@pytest.mark.parametrize("name, flags", [("optimize_sv", ["--max-new-tokens", "--batch"]),
                                         ("train_transcoder", ["--ctx", "--batch-tokens", "--d-sae"]),
                                         ("obprop", ["--corpus-tokens"])])
def test_help_states_the_memory_and_what_lowers_it(name, flags, capsys):
    with pytest.raises(SystemExit):
        run_script(name, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    memory = text[text.index("Memory:"):][:500]
    assert "GB" in memory and all(flag in memory for flag in flags), memory


def test_check_memory_adds_the_largest_phase_to_what_is_held():
    said = []
    total = cli.check_memory({"model": 500e6, "runtime": 300e6}, {"a": 2e9, "b": 1e9}, None, {}, said.append)
    assert total == 2.8e9 and said == ["memory: about 2.8 GB at the peak (a 2 GB + model 500 MB + runtime 300 MB)"]
    with pytest.raises(MinisvError, match=r"needs about 2.8 GB .* but 2 GB is available; lower --x \(the a\)"):
        cli.check_memory({"model": 500e6, "runtime": 300e6}, {"a": 2e9, "b": 1e9}, 2e9, {"a": "--x"}, said.append)
    sizes = [cli.size(n) for n in (5e5, 812e6, 6.9e9, 2.1e12, 17e12)]
    assert sizes == ["0.5 MB", "812 MB", "6.9 GB", "2.1 TB", "17 TB"]


def test_available_memory_is_the_kernels_for_cpu_runs_only():
    import torch
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert 0 < cli.available_memory(torch.device("cpu")) <= total
    assert cli.available_memory(torch.device("cuda")) is None         # the GPU's allocator speaks for itself
