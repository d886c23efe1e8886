"""Every path the three scripts read or write is checked before any work (minisv.cli.check_paths): an output that
is an input (the model's own files), two outputs with one name, a directory, FIFO or device where a file is
expected, a name no file system holds, a missing or special input. Each is one `error: ...` line, exit status 2,
with the inputs untouched and nothing created; a FIFO never makes a script hang. train_transcoder.py's --overwrite
leaves no stale output of an earlier run, and a failed start leaves nothing behind."""
import json
import os
import re
import shutil
import stat
import threading

import pytest
import torch

import minisv
from minisv import formats
from test_obprop import WORDS, planted                    # noqa: F401  (fixture) the tiny llama with a planted head
from test_steering import chat_model_dir                  # noqa: F401  (fixture) a tiny chat llama, byte tokenizer
from test_training import script_args, tiny_llama, token_file  # noqa: F401  (fixtures) a tiny llama and tokens

LONG = "x" * 256 + ".html"          # one name component of 261 bytes: no file system holds it


# ------------------------------------------------------------------------- helpers the other test_scripts_ files share
def run_script(name, argv):
    """main(argv) of optimize_sv.py, train_transcoder.py or obprop.py."""
    module = __import__(name)
    return module.main(argv)


def fails(name, argv, capsys, message):
    """The script must exit 2 with exactly one `error: ...` line, the last on stderr, that contains `message`."""
    with pytest.raises(SystemExit) as e:
        run_script(name, argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if re.match(r"(\S+: )?error: ", line)]
    assert e.value.code == 2 and len(errors) == 1 and errors[0] == err[-1], err
    assert message in errors[0], errors[0]
    assert not any(line.startswith("Traceback") for line in err)
    return errors[0]


def snapshot(folder):
    """{relative path: bytes} of every regular file under a folder (FIFOs and devices are left out)."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*"))
            if f.is_file() and stat.S_ISREG(f.stat().st_mode)}


def copy_model(source, target):
    shutil.copytree(source, target)
    return target


def fails_without_hanging(name, argv, fifo, message, seconds=120):
    """Run the script in a daemon thread: it must end (SystemExit 2, `message` on stderr) instead of blocking in
    open() on `fifo`. If it blocks (the old behaviour), the test fails, and a writer opened on the FIFO frees it."""
    outcome = {}

    def target():
        try:
            run_script(name, argv)
        except SystemExit as e:
            outcome["code"] = e.code
        except BaseException as e:          # noqa: B036  (reported below)
            outcome["error"] = e
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    hung = worker.is_alive()
    if hung:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a blocked reader now sees end of file
        except OSError:                                            # nobody reads it (yet): nothing to free
            pass
        worker.join(30)
    assert not hung, f"{name} blocked reading the FIFO {fifo}"
    assert outcome.get("code") == 2, outcome
    return message


# ------------------------------------------------------------------------- optimize_sv.py
@pytest.fixture
def sv(chat_model_dir, tmp_path):
    """A copy of the tiny chat model in tmp_path/model and the arguments of a quick run writing into tmp_path."""
    model = copy_model(chat_model_dir, tmp_path / "model")
    return model, ["--model", str(model), "--prompt", "Hi.", "--promote", "No.", "--layer", "1", "--max-iters", "1",
                   "--max-new-tokens", "2", "--eval-prompts", str(_prompts(tmp_path))]


def _prompts(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("What is 2+2?\n")
    return path


@pytest.mark.parametrize("out, message", [
    ("{model}/model.safetensors", "is the file {model}/model.safetensors read by --model"),   # the model's weights
    ("{model}/config.json", "read by --model"),
    ("{tmp}/eval.txt", "is the --eval-prompts input"),
])
def test_optimize_sv_never_writes_over_an_input(sv, tmp_path, capsys, out, message):
    model, args = sv
    before = snapshot(tmp_path)
    fails("optimize_sv", args + ["--out", out.format(model=model, tmp=tmp_path)], capsys,
          message.format(model=model, tmp=tmp_path))
    assert snapshot(tmp_path) == before


def test_optimize_sv_never_writes_over_a_gguf_model_file(tmp_path, capsys):
    """The model given as a file: --out and --gguf may not name it (refused before it is even read)."""
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF standing in for a model")
    for flag in ("--out", "--gguf"):
        fails("optimize_sv", ["--model", str(model), "--layer", "2", "--out", str(tmp_path / "v.safetensors"),
                              flag, str(model)], capsys, "is the --model input")
    assert model.read_bytes() == b"GGUF standing in for a model"


def test_optimize_sv_outputs_must_differ(sv, tmp_path, capsys):
    model, args = sv
    fails("optimize_sv", args + ["--layer", "2", "--out", str(tmp_path / "v.gguf"), "--gguf", str(tmp_path / "v.gguf")],
          capsys, "name the same file")
    assert not (tmp_path / "v.gguf").exists()


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "long name", "nul"])
def test_optimize_sv_refuses_outputs_that_are_no_file(sv, tmp_path, capsys, kind):
    model, args = sv
    out = tmp_path / "v.safetensors"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "device":
        os.mknod(out, stat.S_IFCHR | 0o600, os.makedev(1, 3))       # a copy of /dev/null
    elif kind == "directory":
        out.mkdir()
    message = {"fifo": "is a FIFO", "device": "is a character device", "directory": "is a directory",
               "long name": "255 bytes", "nul": "NUL"}[kind]
    name = {"long name": str(tmp_path / LONG.replace(".html", ".safetensors")), "nul": str(tmp_path / "v\0.st")}
    fails("optimize_sv", args + ["--out", name.get(kind, str(out))], capsys, message)
    if kind in ("fifo", "device"):
        assert stat.S_IFMT(out.stat().st_mode) == (stat.S_IFIFO if kind == "fifo" else stat.S_IFCHR)


def test_optimize_sv_fifo_input_does_not_hang(sv, tmp_path, capsys):
    model, args = sv
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    fails_without_hanging("optimize_sv", args + ["--eval-prompts", str(fifo), "--out", str(tmp_path / "v.safetensors")],
                          fifo, "is a FIFO")
    assert "is a FIFO, not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("flag, make, message", [
    ("--train-file", "missing", "no such file"),
    ("--train-file", "directory", "is a directory; give a file"),
    ("--eval-prompts", "missing", "no such file"),
    ("--train-file", "bad line", "line 1"),
])
def test_optimize_sv_inputs_are_checked_before_the_model_loads(sv, tmp_path, capsys, monkeypatch, flag, make,
                                                               message):
    model, args = sv
    path = tmp_path / "input.jsonl"
    if make == "directory":
        path.mkdir()
    elif make == "bad line":
        path.write_text("not json\n")
    monkeypatch.setattr(minisv, "load", lambda *a, **k: pytest.fail("the model was loaded before the input check"))
    fails("optimize_sv", args + [flag, str(path), "--out", str(tmp_path / "v.safetensors")], capsys, message)


# ------------------------------------------------------------------------- train_transcoder.py
def test_train_transcoder_checks_inputs_before_the_model_loads(tiny_llama, token_file, tmp_path, capsys,
                                                              monkeypatch):
    path, _ = tiny_llama
    (tmp_path / "empty").mkdir()
    fifo = tmp_path / "tokens.npy"
    os.mkfifo(fifo)
    monkeypatch.setattr(minisv, "load", lambda *a, **k: pytest.fail("the model was loaded before the input check"))
    run = tmp_path / "run"
    for extra, message in [(["--data", str(tmp_path / "nope.txt")], "nope.txt: no such file"),
                           (["--data", str(tmp_path / "notes.csv")], "no such file"),
                           (["--data", str(fifo)], "is a FIFO, not a regular file"),
                           (["--load", str(tmp_path / "empty")], "holds no transcoder: no cfg.json"),
                           (["--load", str(tmp_path / "missing")], "holds no transcoder"),
                           (["--import-released", str(tmp_path / "nope.pt")], "nope.pt: no such file")]:
        fails("train_transcoder", script_args(path, token_file, run) + extra, capsys, message)
    (tmp_path / "notes.csv").write_text("a,b\n")
    fails("train_transcoder", script_args(path, tmp_path / "notes.csv", run), capsys, "unsupported file type")
    assert not run.exists()


def test_train_transcoder_checks_the_layer_before_any_data_work(tiny_llama, token_file, tmp_path, capsys,
                                                               monkeypatch):
    import train_transcoder
    path, _ = tiny_llama
    monkeypatch.setattr(train_transcoder, "load_dataset", lambda *a, **k: pytest.fail("data read before --layer"))
    fails("train_transcoder", script_args(path, token_file, tmp_path / "run", "--layer", "7"), capsys,
          "layer 7 is out of range")


@pytest.mark.parametrize("kind", ["file", "fifo", "long name"])
def test_train_transcoder_out_must_be_a_directory(tiny_llama, token_file, tmp_path, capsys, kind):
    path, _ = tiny_llama
    out = tmp_path / "run"
    if kind == "file":
        out.write_text("my notes")
    elif kind == "fifo":
        os.mkfifo(out)
    name = str(tmp_path / ("r" * 300)) if kind == "long name" else str(out)
    fails("train_transcoder", script_args(path, token_file, name), capsys,
          {"file": "is a file; give a directory", "fifo": "is a FIFO; give a directory",
           "long name": "255 bytes"}[kind])
    if kind == "file":
        assert out.read_text() == "my notes"


def test_train_transcoder_model_file_is_never_an_output(tiny_llama, token_file, tmp_path, capsys):
    """The model's files, read from --out itself: training into the model's directory must not replace them."""
    path, _ = tiny_llama
    model = copy_model(path, tmp_path / "model")
    (model / "cfg.json").write_text("{}")           # a model directory that happens to hold a cfg.json
    before = snapshot(model)
    fails("train_transcoder", script_args(model, token_file, model, "--overwrite"), capsys, "read by --model")
    assert snapshot(model) == before


def test_a_failed_start_leaves_nothing_behind(tiny_llama, token_file, tmp_path, capsys, monkeypatch):
    """A run that fails after claiming --out but before writing anything removes the folders it created and its
    lock; in an existing folder it removes only its own lock."""
    import train_transcoder
    path, _ = tiny_llama

    def broken(*args, **kwargs):
        raise minisv.MinisvError("the data is unreadable")
    monkeypatch.setattr(train_transcoder, "load_dataset", broken)
    fails("train_transcoder", script_args(path, token_file, tmp_path / "new" / "deep" / "run"), capsys, "unreadable")
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()
    fails("train_transcoder", script_args(path, token_file, tmp_path / "mine"), capsys, "unreadable")
    assert os.listdir(tmp_path / "mine") == []
    (tmp_path / "mine" / "notes.txt").write_text("my notes")      # refused (it holds files): no lock left there
    fails("train_transcoder", script_args(path, token_file, tmp_path / "mine"), capsys, "already holds notes.txt")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_overwrite_of_a_multi_layer_run_leaves_no_stale_layer(tiny_llama, token_file, tmp_path, capsys):
    """--overwrite of a 2-layer run by a 1-layer run: the old layer_L/ folders, dashboards and exports go (a later
    --load would take them for this run's), the user's own files stay."""
    path, _ = tiny_llama
    run = tmp_path / "run"
    args = script_args(path, token_file, run, "--dash-features", "5", "--export-format", "saelens")
    args[args.index("--layer") + 1:args.index("--layer") + 2] = ["0", "2"]
    run_script("train_transcoder", args)
    assert {"layer_0", "layer_2", "dashboards-L0.html", "dashboards-L2.html"} <= set(os.listdir(run))
    (run / "notes.txt").write_text("mine")
    (run / "layer_2" / "my_plot.png").write_bytes(b"mine too")
    run_script("train_transcoder", script_args(path, token_file, run, "--overwrite", "--seed", "5",
                                               "--dash-features", "0"))
    capsys.readouterr()
    held = set(os.listdir(run))
    assert {"cfg.json", "transcoder.safetensors", "notes.txt", "layer_2"} <= held
    assert not held & {"layer_0", "dashboards-L0.html", "dashboards-L2.html", "saelens"}
    assert os.listdir(run / "layer_2") == ["my_plot.png"]          # ours removed, the user's file kept
    tc = formats.load(run)
    assert tc.cfg.layer == 1 and json.loads((run / "metrics.json").read_text())["train_config"]["seed"] == 5
    # --load of the run now finds the new transcoder, not a stale layer_L/
    shutil.rmtree(run / "layer_2")
    run_script("train_transcoder", ["--model", str(path), "--data", str(token_file), "--ctx", "32", "--load",
                                    str(run), "--out", str(run), "--dash-features", "3", "--dash-tokens", "64"])
    assert "layer 1 transcoder" in capsys.readouterr().out
    assert formats.load(run).cfg.layer == 1 and not any(n.startswith("layer_") for n in os.listdir(run))


def test_load_refuses_a_directory_holding_a_transcoder_and_layer_folders(tiny_llama, token_file, tmp_path, capsys):
    """An old run overwritten before stale folders were cleared: which transcoder is meant is not guessed."""
    path, _ = tiny_llama
    run = tmp_path / "run"
    run_script("train_transcoder", script_args(path, token_file, run, "--dash-features", "0"))
    (run / "layer_2").mkdir()
    for name in ("cfg.json", "transcoder.safetensors"):
        shutil.copy(run / name, run / "layer_2" / name)
    fails("train_transcoder", ["--model", str(path), "--data", str(token_file), "--ctx", "32", "--load", str(run),
                               "--out", str(tmp_path / "a")], capsys, "holds a coder (cfg.json) and per-layer subdirectories")


# ------------------------------------------------------------------------- obprop.py
@pytest.fixture
def obprop_args(planted, tmp_path, monkeypatch):
    monkeypatch.setattr(minisv, "load", lambda spec, device=None: planted)
    (tmp_path / "corpus.txt").write_text(" ".join(WORDS[:40] * 10))
    return ["--observable", "' she' - ' he'", "--observable", "' her' - ' him'", "--template",
            "So, [NAME] really is a great friend, isn't", "--pos-names", "Mary,Anna,Lisa", "--neg-names",
            "John,Mark,Paul", "--pairs", "2", "--top", "2", "--train-examples", "1", "--corpus-tokens", "100",
            "--ctx", "16", "--total-pairs", "0"]


def test_obprop_never_writes_over_the_model_or_one_output_over_another(obprop_args, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    for extra, message in [(["--html", str(model / "model.safetensors")], "read by --model"),
                           (["--html", str(tmp_path / "r.json"), "--json", str(tmp_path / "r.json")],
                            "name the same file"),
                           (["--json", str(tmp_path / "corpus.txt")], "is the --corpus input"),
                           (["--html", str(tmp_path / LONG)], "255 bytes")]:
        fails("obprop", obprop_args + ["--model", str(model), "--corpus", str(tmp_path / "corpus.txt")] + extra,
              capsys, message)
    assert (model / "model.safetensors").read_bytes() == b"weights" and not (tmp_path / "r.json").exists()


def test_obprop_checks_the_corpus_before_the_analysis(obprop_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(minisv, "load", lambda *a, **k: pytest.fail("the model was loaded before the corpus check"))
    fails("obprop", obprop_args + ["--corpus", str(tmp_path / "nope.txt")], capsys, "nope.txt: no such file")


def test_obprop_fifo_corpus_does_not_hang(obprop_args, tmp_path, capsys):
    fifo = tmp_path / "corpus.fifo.txt"
    os.mkfifo(fifo)
    fails_without_hanging("obprop", obprop_args + ["--corpus", str(fifo), "--html", str(tmp_path / "r.html")], fifo,
                          "is a FIFO")
    assert "is a FIFO, not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


# ------------------------------------------------------------------------- the mechanism itself
def test_check_paths_compares_files_not_spellings(tmp_path):
    """A symlink or a hard link to an input, or a path spelled differently, is still that input."""
    from minisv.cli import check_paths
    data = tmp_path / "data.txt"
    data.write_text("x")
    (tmp_path / "link.txt").symlink_to(data)
    os.link(data, tmp_path / "hard.txt")
    for out in ("link.txt", "hard.txt", "./sub/../data.txt"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(minisv.MinisvError, match="is the --data input"):
            check_paths(inputs=[("--data", str(data), "any")], outputs=[("--out", str(tmp_path / out))])
    with pytest.raises(minisv.MinisvError, match="name the same file"):
        check_paths(outputs=[("--a", str(tmp_path / "x.html")), ("--b", str(tmp_path / "sub" / ".." / "x.html"))])
    check_paths(inputs=[("--data", str(data), "any")], outputs=[("--out", str(tmp_path / "new" / "x.html"))])
    assert not (tmp_path / "new").exists()                 # checking creates nothing
