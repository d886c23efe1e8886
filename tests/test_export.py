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
from minisv import formats
from minisv.formats import check_export
from minisv.transcoder import Transcoder, TranscoderConfig

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
    formats.save(tc, tmp_path, format="saelens")
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
        ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert meta["sae_lens_version"] >= "6" and meta["model_from_pretrained_kwargs"]["fold_ln"] is True


@pytest.mark.parametrize("arch, skip", SPARSIFY)
def test_sparsify_layout_is_the_documented_one(tmp_path, arch, skip):
    tc = random_transcoder(arch, skip)
    formats.save(tc, tmp_path, format="sparsify")
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
    formats.save(tc, tmp_path, format=fmt)
    back = (formats.load if fmt == "saelens" else formats.load)(tmp_path)
    ignored = {"k"} if arch == "relu" else set()                                       # (k means nothing to ReLU)
    assert {f: v for f, v in vars(back.cfg).items() if f not in ignored} == \
        {f: v for f, v in vars(tc.cfg).items() if f not in ignored}                  # target_centered etc. kept
    assert torch.equal(back(inputs()), tc(inputs()))


@pytest.mark.parametrize("arch, skip", SAELENS)
def test_saelens_runs_the_exported_file_as_the_same_map(tmp_path, arch, skip):
    sae_lens = pytest.importorskip("sae_lens")
    tc = random_transcoder(arch, skip)
    formats.save(tc, tmp_path, format="saelens")
    with pytest.warns(UserWarning, match="model_from_pretrained_kwargs"):          # it asks for fold_ln=True
        sae = sae_lens.SAE.load_from_disk(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(sae(inputs()), tc(inputs()), rtol=1e-5, atol=1e-5)
    sae.save_model(tmp_path / "resaved")                                            # and a file SAELens wrote
    torch.testing.assert_close(formats.load(tmp_path / "resaved")(inputs()), tc(inputs()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, skip", SPARSIFY)
def test_sparsify_runs_the_exported_file_as_the_same_map(tmp_path, monkeypatch, arch, skip):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    sparsify = pytest.importorskip("sparsify")
    tc = random_transcoder(arch, skip)
    formats.save(tc, tmp_path, format="sparsify")
    coder = sparsify.SparseCoder.load_from_disk(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(coder(inputs()).sae_out, tc(inputs()), rtol=1e-5, atol=1e-5)
    coder.save_to_disk(tmp_path / "resaved")       # a file sparsify wrote has lost minisv's fields: its own coders
    with pytest.raises(MinisvError, match="cannot map to its hooks"):       # are named by the module they hooked
        formats.load(tmp_path / "resaved")


def hf_mlp_io(ref, tokens, layer):
    """(input, output) of the transformers model's MLP module of `layer`: what a sparsify transcoder reads there."""
    blocks = ref.transformer.h if hasattr(ref, "transformer") else ref.base_model.layers
    seen = {}
    handle = blocks[layer].mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        ref(tokens)
    handle.remove()
    return seen["x"][0], seen["y"][0]


def test_a_transcoder_sparsify_trained_reads_the_gained_mlp_input(tiny, tmp_path, monkeypatch):
    """sparsify's own transcoders hook Hugging Face modules ("model.layers.1.mlp"): they read the MLP input after
    the norm's gain and bias. Read with the model, the gain and bias are folded in, so minisv's coder on
    ln2.hook_normalized computes what sparsify computes on the module's input; without the model it is refused."""
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    sparsify = pytest.importorskip("sparsify")
    import minisv
    family, path, ref = tiny
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(32, sparsify.SparseCoderConfig(num_latents=64, k=4, transcode=True,
                                                                 skip_connection=True))
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_(0, 0.3)
    hookpoint = {"gpt2": "transformer.h.1.mlp", "neox": "gpt_neox.layers.1.mlp", "llama": "model.layers.1.mlp"}
    coder.save_to_disk(tmp_path / hookpoint[family])
    tokens = torch.tensor([[0, 5, 17, 3, 42, 8, 91]])
    x, y = hf_mlp_io(ref, tokens, 1)
    with pytest.raises(MinisvError, match="pass the model"):
        formats.load(tmp_path / hookpoint[family])
    model = minisv.load(str(path), device="cpu")
    tc = formats.load(tmp_path / hookpoint[family], model=model)
    assert (tc.cfg.layer, tc.cfg.hook_in, tc.cfg.hook_out) == (1, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    _, cache = model.run_with_cache(tokens, names=["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"])
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"][0], y, rtol=1e-5, atol=1e-5)   # the same hook point
    with torch.no_grad():
        torch.testing.assert_close(tc(cache["blocks.1.ln2.hook_normalized"][0]), coder(x).sae_out,
                                   rtol=1e-4, atol=1e-4)


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
            formats.save(tc, tmp_path / fmt, format=fmt)
            continue
        with pytest.raises(MinisvError) as refused:
            check_export(fmt, arch, skip, 12, d_out)
        with pytest.raises(MinisvError, match=re.escape(str(refused.value))):
            formats.save(tc, tmp_path / fmt, format=fmt)
        assert not (tmp_path / fmt).exists()
        if d_out == 12:
            with pytest.raises(MinisvError, match=re.escape(str(refused.value))):
                check_export(fmt, arch, skip)


def test_layouts_that_cannot_hold_a_transcoder_are_clear_errors(tmp_path):
    with pytest.raises(MinisvError, match="unknown transcoder format 'onnx'"):
        formats.save(random_transcoder("topk", False), tmp_path, format="onnx")
    with pytest.raises(MinisvError, match="sparsify runs only TopK"):
        formats.save(random_transcoder("relu", False), tmp_path, format="sparsify")
    with pytest.raises(MinisvError, match="SAELens has no TopK transcoder"):
        formats.save(random_transcoder("topk", True), tmp_path, format="saelens")
    assert not os.listdir(tmp_path)                                                  # nothing half-written
    formats.save(random_transcoder("topk", False), tmp_path / "a", format="sparsify")
    with pytest.raises(MinisvError, match="holds a sparsify transcoder; write the saelens layout to a folder"):
        formats.save(random_transcoder("relu", False), tmp_path / "a", format="saelens")   # its cfg.json stays
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg | {"activation": "groupmax"}))
    with pytest.raises(MinisvError, match="not a TopK coder"):
        formats.load(tmp_path / "a")
    formats.save(random_transcoder("relu", False), tmp_path / "b", format="saelens")
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg | {"architecture": "jumprelu_transcoder"}))
    with pytest.raises(MinisvError, match="'jumprelu_transcoder' coder .* is not one minisv can run"):
        formats.load(tmp_path / "b")
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg | {"apply_b_dec_to_input": True}))
    with pytest.raises(MinisvError, match="apply_b_dec_to_input=True.* is not one minisv can run"):
        formats.load(tmp_path / "b")               # a transcoder's b_dec is on the output side: nothing to fold


def random_sae(arch, hook="blocks.3.hook_mlp_out"):
    tc = random_transcoder(arch, False)
    tc.cfg.hook_in = tc.cfg.hook_out = hook
    tc.cfg.target_centered, tc.cfg.input_convention = False, "raw"
    return tc


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_an_sae_is_written_as_an_sae_and_each_library_runs_it(tmp_path, monkeypatch, arch):
    """hook_in == hook_out is a sparse autoencoder: SAELens gets its "standard" / "topk" SAE without
    hook_name_out, sparsify transcode=false, whose encoder subtracts b_dec from its input (folded into the
    encoder bias). Each library's own forward on the same input is the oracle."""
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    sae_lens, sparsify = pytest.importorskip("sae_lens"), pytest.importorskip("sparsify")
    sae = random_sae(arch)
    formats.save(sae, tmp_path / "saelens", format="saelens")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}[arch] and "hook_name_out" not in cfg["metadata"]
    with pytest.warns(UserWarning):
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"))
    with torch.no_grad():
        torch.testing.assert_close(theirs(inputs()), sae(inputs()), rtol=1e-5, atol=1e-5)
    if arch == "topk":
        formats.save(sae, tmp_path / "sparsify", format="sparsify")
        assert json.loads((tmp_path / "sparsify" / "cfg.json").read_text())["transcode"] is False
        coder = sparsify.SparseCoder.load_from_disk(tmp_path / "sparsify")
        with torch.no_grad():
            torch.testing.assert_close(coder(inputs()).sae_out, sae(inputs()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(formats.load(tmp_path / "sparsify")(inputs()), sae(inputs()), rtol=1e-5, atol=1e-5)


def test_saelens_sae_that_subtracts_b_dec_from_its_input_is_folded_exactly(tmp_path):
    """SAELens' default SAEs encode x − b_dec (apply_b_dec_to_input): minisv folds it into b_enc, as for the
    released transcoders, and runs SAELens' own file as SAELens does."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    torch.manual_seed(3)
    theirs = StandardSAE(StandardSAEConfig(d_in=12, d_sae=40, apply_b_dec_to_input=True,
                                           metadata=sae_lens.saes.sae.SAEMetadata(hook_name="blocks.2.hook_resid_pre")))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.5)
    theirs.save_model(tmp_path)
    ours = formats.load(tmp_path)
    assert (ours.cfg.hook_in, ours.cfg.hook_out, ours.cfg.layer, ours.cfg.input_convention) == \
        ("blocks.2.hook_resid_pre", "blocks.2.hook_resid_pre", 2, "raw")
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs()), theirs(inputs()), rtol=1e-5, atol=1e-5)
        without_fold = torch.relu(inputs() @ theirs.W_enc + theirs.b_enc) @ theirs.W_dec + theirs.b_dec
    assert (without_fold - theirs(inputs())).abs().max() > 0.1        # the fold matters on this SAE


def test_exports_name_hub_ids_and_the_centring_they_need(tmp_path):
    """Other tools read model_name / dataset_path as hub ids (minisv's alias 'smollm2' means nothing to them) and
    center_writing_weights as the TransformerLens option that makes hook_mlp_out mean-free, which a
    target-centered transcoder predicts; the minisv key keeps minisv's own names for the way back."""
    tc = random_transcoder("relu", False)
    for centred in (True, False):
        tc.cfg.target_centered = centred
        formats.save(tc, tmp_path / str(centred), format="saelens")
        meta = json.loads((tmp_path / str(centred) / "cfg.json").read_text())["metadata"]
        assert meta["model_from_pretrained_kwargs"]["center_writing_weights"] is centred
        assert (meta["model_name"], meta["dataset_path"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "")
        back = formats.load(tmp_path / str(centred))
        assert (back.cfg.model, back.cfg.dataset, back.cfg.target_centered) == ("smollm2", "builtin", centred)


def test_a_bf16_coder_is_written_in_bf16_and_runs_on_float32_input(tmp_path):
    tc = random_transcoder("topk", False).to(torch.bfloat16)
    for fmt in formats.FORMATS:
        formats.save(tc, tmp_path / fmt, format=fmt)
        back = formats.load(tmp_path / fmt)
        assert back.W_enc.dtype == torch.bfloat16
        torch.testing.assert_close(back(inputs()), tc(inputs().bfloat16()), rtol=0, atol=0)


def test_a_normalize_io_coder_is_folded_to_raw_units(tmp_path, monkeypatch):
    """EleutherAI's normalize_io transcoders compute on x·√d/in_norm and scale their output by out_norm/√d (both
    norms stored in the file): read back, minisv's coder on the raw input gives that computation by hand."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    d, F, k = 12, 40, 5
    t = {"encoder.weight": torch.randn(F, d), "encoder.bias": torch.randn(F), "W_dec": torch.randn(F, d),
         "b_dec": torch.randn(d), "W_skip": torch.randn(d, d), "in_norm": torch.tensor(7.0), "out_norm": torch.tensor(0.3)}
    folder = tmp_path / "coder"
    folder.mkdir()
    save_file(t, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": k, "transcode": True, "d_in": d,
                                                 "minisv": {"layer": 0, "hook_in": "a", "hook_out": "b"}}))
    tc = formats.load(folder)
    x = inputs()
    xn = x * d ** 0.5 / 7.0
    pre = xn @ t["encoder.weight"].T + t["encoder.bias"]
    top = pre.relu().topk(k, dim=-1)
    y = torch.zeros_like(pre).scatter(-1, top.indices, top.values) @ t["W_dec"] + t["b_dec"] + xn @ t["W_skip"].T
    torch.testing.assert_close(tc(x), y * 0.3 / d ** 0.5, rtol=1e-4, atol=1e-5)
