"""Transcoder.save(format=...) writes files SAELens and EleutherAI's sparsify load and run as the same map; minisv
reads them back. With the libraries installed (requirements-dev.txt) they are the oracle; without, the documented
file names, tensor names, shapes and config fields are."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from minisv.errors import MinisvError
from minisv.transcoder import Transcoder, TranscoderConfig, check_export

# every (architecture, skip) each layout can hold
SAELENS = [("relu", False), ("relu", True), ("topk", False)]
SPARSIFY = [("topk", False), ("topk", True)]


def random_transcoder(arch, skip, d=12, d_sae=40, k=5):
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(d, d, d_sae, arch, k, skip, model="smollm2", layer=3,
                                     hook_in="blocks.3.ln2.hook_normalized", hook_out="blocks.3.hook_mlp_out",
                                     target_centered=True, dataset="builtin", training_tokens=1234))
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_(0, 0.5)
    return tc


def inputs():
    return torch.randn(9, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch, skip", SAELENS)
def test_saelens_layout_is_the_documented_one(tmp_path, arch, skip):
    tc = random_transcoder(arch, skip)
    tc.save(tmp_path, format="saelens")
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    weights = load_file(tmp_path / "sae_weights.safetensors")
    expected = {"W_enc": (12, 40), "b_enc": (40,), "W_dec": (40, 12), "b_dec": (12,)} | ({"W_skip": (12, 12)} if skip else {})
    assert {n: tuple(t.shape) for n, t in weights.items()} == expected
    if skip:
        torch.testing.assert_close(weights["W_skip"], tc.W_skip.detach().t())       # SAELens: x @ W_skipᵀ
    assert cfg["architecture"] == {"relu": "skip_transcoder" if skip else "transcoder", "topk": "topk"}[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"], cfg["normalize_activations"]) == (12, 40, False, "none")
    assert cfg.get("k") == (5 if arch == "topk" else None) and cfg.get("d_out") == (None if arch == "topk" else 12)
    meta = cfg["metadata"]
    assert (meta["hook_name"], meta["hook_name_out"], meta["model_name"]) == \
        ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out", "smollm2")
    assert meta["sae_lens_version"] >= "6" and meta["model_from_pretrained_kwargs"]["fold_ln"] is True


@pytest.mark.parametrize("arch, skip", SPARSIFY)
def test_sparsify_layout_is_the_documented_one(tmp_path, arch, skip):
    tc = random_transcoder(arch, skip)
    tc.save(tmp_path, format="sparsify")
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    weights = load_file(tmp_path / "sae.safetensors")
    expected = {"encoder.weight": (40, 12), "encoder.bias": (40,), "W_dec": (40, 12), "b_dec": (12,)} | \
        ({"W_skip": (12, 12)} if skip else {})
    assert {n: tuple(t.shape) for n, t in weights.items()} == expected
    torch.testing.assert_close(weights["encoder.weight"], tc.W_enc.detach().t())     # nn.Linear: [out, in]
    assert {k: cfg[k] for k in ("activation", "num_latents", "k", "skip_connection", "transcode", "d_in")} == \
        {"activation": "topk", "num_latents": 40, "k": 5, "skip_connection": skip, "transcode": True, "d_in": 12}


@pytest.mark.parametrize("fmt, arch, skip", [("saelens", *c) for c in SAELENS] + [("sparsify", *c) for c in SPARSIFY])
def test_round_trip_through_each_layout_is_exact(tmp_path, fmt, arch, skip):
    tc = random_transcoder(arch, skip)
    tc.save(tmp_path, format=fmt)
    back = (Transcoder.from_saelens if fmt == "saelens" else Transcoder.from_sparsify)(tmp_path)
    ignored = {"k"} if arch == "relu" else set()                                       # (k means nothing to ReLU)
    assert {f: v for f, v in vars(back.cfg).items() if f not in ignored} == \
        {f: v for f, v in vars(tc.cfg).items() if f not in ignored}                  # target_centered etc. kept
    assert torch.equal(back(inputs()), tc(inputs()))


@pytest.mark.parametrize("arch, skip", SAELENS)
def test_saelens_runs_the_exported_file_as_the_same_map(tmp_path, arch, skip):
    sae_lens = pytest.importorskip("sae_lens")
    tc = random_transcoder(arch, skip)
    tc.save(tmp_path, format="saelens")
    with pytest.warns(UserWarning, match="model_from_pretrained_kwargs"):          # it asks for fold_ln=True
        sae = sae_lens.SAE.load_from_disk(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(sae(inputs()), tc(inputs()), rtol=1e-5, atol=1e-5)
    sae.save_model(tmp_path / "resaved")                                            # and a file SAELens wrote
    torch.testing.assert_close(Transcoder.from_saelens(tmp_path / "resaved")(inputs()), tc(inputs()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, skip", SPARSIFY)
def test_sparsify_runs_the_exported_file_as_the_same_map(tmp_path, monkeypatch, arch, skip):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    sparsify = pytest.importorskip("sparsify")
    tc = random_transcoder(arch, skip)
    tc.save(tmp_path, format="sparsify")
    coder = sparsify.SparseCoder.load_from_disk(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(coder(inputs()).sae_out, tc(inputs()), rtol=1e-5, atol=1e-5)
    coder.save_to_disk(tmp_path / "resaved")                                         # and a file sparsify wrote
    torch.testing.assert_close(Transcoder.from_sparsify(tmp_path / "resaved")(inputs()), tc(inputs()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "relu"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("d_out", [12, 8])
def test_check_export_states_each_layouts_limits(tmp_path, arch, skip, d_out):
    """What each tool has a class for (the round trips above): SAELens a ReLU transcoder of any sizes, with or
    without skip, and a TopK one only as its 'topk' SAE (d_in = d_out, no skip); sparsify TopK coders with
    d_in = d_out. `save` refuses exactly what `check_export` refuses, with its message and nothing written, and
    the script's flag check (sizes unknown, equal) agrees for d_out = d_in."""
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(12, d_out, 40, arch, 5, skip))
    for fmt, fits in (("saelens", arch == "relu" or (not skip and d_out == 12)),
                      ("sparsify", arch == "topk" and d_out == 12)):
        if fits:
            check_export(fmt, arch, skip, 12, d_out)
            tc.save(tmp_path / fmt, format=fmt)
            continue
        with pytest.raises(MinisvError) as refused:
            check_export(fmt, arch, skip, 12, d_out)
        with pytest.raises(MinisvError, match=re.escape(str(refused.value))):
            tc.save(tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()
        if d_out == 12:
            with pytest.raises(MinisvError, match=re.escape(str(refused.value))):
                check_export(fmt, arch, skip)


def test_layouts_that_cannot_hold_a_transcoder_are_clear_errors(tmp_path):
    with pytest.raises(MinisvError, match="unknown transcoder format 'onnx'"):
        random_transcoder("topk", False).save(tmp_path, format="onnx")
    with pytest.raises(MinisvError, match="sparsify runs only TopK"):
        random_transcoder("relu", False).save(tmp_path, format="sparsify")
    with pytest.raises(MinisvError, match="SAELens has no TopK transcoder"):
        random_transcoder("topk", True).save(tmp_path, format="saelens")
    assert not os.listdir(tmp_path)                                                  # nothing half-written
    random_transcoder("topk", False).save(tmp_path / "a", format="sparsify")
    with pytest.raises(MinisvError, match="needs cfg.json and sae_weights.safetensors"):
        Transcoder.from_saelens(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg | {"transcode": False}))
    with pytest.raises(MinisvError, match="not a TopK transcoder"):
        Transcoder.from_sparsify(tmp_path / "a")
    random_transcoder("relu", False).save(tmp_path / "b", format="saelens")
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg | {"architecture": "jumprelu_transcoder"}))
    with pytest.raises(MinisvError, match="'jumprelu_transcoder'.* is not a transcoder minisv can run"):
        Transcoder.from_saelens(tmp_path / "b")
    random_transcoder("topk", False).save(tmp_path / "c", format="saelens")
    cfg = json.loads((tmp_path / "c" / "cfg.json").read_text())
    del cfg["metadata"]["hook_name_out"]
    (tmp_path / "c" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MinisvError, match="a SAELens TopK SAE .*not a transcoder"):
        Transcoder.from_saelens(tmp_path / "c")
