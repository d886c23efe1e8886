"""llama.cpp control vectors: the file against the `gguf` package, the layer index against transformers.

The oracle for "where does direction.N go" is llama.cpp's own rule (build_cvec after block N) applied to the
transformers reference model with a forward hook on its decoder layer N; minisv must steer identically both
with `steer` at the documented hook_resid_pre and with the loaded file.
"""
import gguf
import numpy as np
import pytest
import torch

import minisv
from minisv.control_vector import load_control_vector, save_control_vector, steer_control_vector
from minisv.errors import MinisvError
from minisv.gguf import read_gguf
from minisv.steering import steer


@pytest.fixture
def loaded(tiny):
    family, path, ref = tiny
    return family, minisv.load(str(path), device="cpu"), ref


def _hf_layers(ref):
    return {"gpt2": lambda: ref.transformer.h, "gpt_neox": lambda: ref.gpt_neox.layers}.get(
        ref.config.model_type, lambda: ref.model.layers)()


def _hf_logits_with_directions(ref, tokens, directions, scale=1.0):
    """llama.cpp's rule on the reference model: direction.N added to decoder layer N's output."""
    def add(v):
        def hook(module, args, out):
            return (out[0] + scale * v,) + tuple(out[1:]) if isinstance(out, tuple) else out + scale * v
        return hook
    handles = [_hf_layers(ref)[n].register_forward_hook(add(v)) for n, v in directions.items()]
    try:
        with torch.no_grad():
            return ref(tokens).logits
    finally:
        for h in handles:
            h.remove()


def test_written_file_reads_back_identically(loaded, tmp_path):
    family, model, _ = loaded
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "v.gguf"
    save_control_vector(model, v, 2, path)
    # minisv's own reader
    metadata, tensors = read_gguf(path)
    hint = {"gpt2": "gpt2", "neox": "gptneox", "llama": "llama"}[family]
    assert metadata == {"general.architecture": "controlvector", "controlvector.model_hint": hint,
                        "controlvector.layer_count": 1}
    assert list(tensors) == ["direction.1"] and torch.equal(tensors["direction.1"], v)
    # the gguf package (llama.cpp's Python reader): same names, types and float32 values
    reader = gguf.GGUFReader(path)
    fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert {name: f.contents() for name, f in fields.items()} == metadata
    assert fields["controlvector.layer_count"].types == [gguf.GGUFValueType.INT32]
    (t,) = reader.tensors
    assert t.name == "direction.1" and t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [v.numel()]
    assert np.array_equal(t.data, v.numpy())
    assert load_control_vector(path).keys() == {2} and torch.equal(load_control_vector(path)[2], v)


def test_direction_n_steers_the_output_of_block_n(loaded, tmp_path):
    """steer(v, layer=L) == the saved file applied by llama.cpp's rule == steer_control_vector(loaded file)."""
    _, model, ref = loaded
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    # about the residual's own size (larger vectors swamp the norms, and every layer then looks alike)
    v = 0.1 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    layer = 2                                    # the tiny models have 3 layers: 2 is the one exportable
    save_control_vector(model, v, layer, tmp_path / "v.gguf")
    want = _hf_logits_with_directions(ref, tokens, {layer - 1: v}, scale=1.5)
    with torch.no_grad():
        assert (model(tokens) - want).abs().max() > 0.05                   # the vector does move the logits
        with steer(model, v, layer, multiplier=1.5):
            assert torch.allclose(model(tokens), want, atol=1e-5)
        with steer_control_vector(model, load_control_vector(tmp_path / "v.gguf"), 1.5):
            assert torch.allclose(model(tokens), want, atol=1e-5)
        with steer(model, v, layer - 1, multiplier=1.5):                   # one block off is far off
            assert (model(tokens) - want).abs().max() > 1e-3


def test_cvector_generator_style_file_with_every_layer(loaded, tmp_path):
    """A file written with the gguf package the way repeng / llama.cpp's cvector-generator write them (u32 layer
    count, direction.1 .. direction.{n-1}, the last one after the final block) steers like llama.cpp."""
    _, model, ref = loaded
    n, d = model.cfg.n_layers, model.cfg.d_model
    g = torch.Generator().manual_seed(2)
    directions = {i: 0.1 * torch.randn(d, generator=g) for i in range(1, n)}
    writer = gguf.GGUFWriter(tmp_path / "cv.gguf", "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(directions))
    for i, v in directions.items():
        writer.add_tensor(f"direction.{i}", v.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded_vectors = load_control_vector(tmp_path / "cv.gguf")
    assert sorted(loaded_vectors) == list(range(2, n + 1))
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), steer_control_vector(model, loaded_vectors, -0.5):
        assert torch.allclose(model(tokens), _hf_logits_with_directions(ref, tokens, directions, -0.5), atol=1e-5)


def test_bad_input_raises(loaded, tmp_path):
    _, model, _ = loaded
    v = torch.ones(model.cfg.d_model)
    for layer in (0, 1, model.cfg.n_layers, [2, 1]):
        with pytest.raises(MinisvError, match="cannot be exported"):
            save_control_vector(model, v, layer, tmp_path / "v.gguf")
    with pytest.raises(MinisvError, match="d_model"):
        save_control_vector(model, torch.ones(3), 2, tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()

    def write(arch, names):
        writer = gguf.GGUFWriter(tmp_path / "bad.gguf", arch)
        for name in names:
            writer.add_tensor(name, np.ones(model.cfg.d_model, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return tmp_path / "bad.gguf"
    with pytest.raises(MinisvError, match="not a control vector"):
        load_control_vector(write("llama", ["direction.1"]))
    for names in (["direction.0"], ["blk.1.attn_q.weight"], []):
        with pytest.raises(MinisvError, match="direction"):
            load_control_vector(write("controlvector", names))
    with pytest.raises(MinisvError, match="do not fit"):
        with steer_control_vector(model, {model.cfg.n_layers + 1: v}):
            pass
