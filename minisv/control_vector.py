"""Steering vectors in and out of minisv as llama.cpp control vectors (GGUF files).

A control vector file is a GGUF with three metadata keys and one F32 tensor per steered layer:

    general.architecture       "controlvector"
    controlvector.model_hint   the model's llama.cpp architecture ("llama", "qwen2", "gpt2", "gptneox")
    controlvector.layer_count  i32, the number of direction tensors (as llama.cpp's cvector-generator writes it)
    direction.N                F32 [d_model], N >= 1

Where llama.cpp adds direction.N (read from its source):
  * common_control_vector_load_one (common/common.cpp) parses N from the name and puts the tensor at
    data[(N - 1) * n_embd]; llama_adapter_cvec::apply (src/llama-adapter.cpp) copies data[(il - 1) * n_embd]
    into tensors[il] for il = 1 .. n_layer - 1 ("there's never a tensor for layer 0");
  * every model graph (e.g. src/models/llama.cpp) ends block il with `cur = build_cvec(cur, il)`, which is
    llama_adapter_cvec::apply_to: cur + tensors[il].
So direction.N is added to the OUTPUT of block N (0-based), the residual minisv calls blocks.{N}.hook_resid_post
= blocks.{N+1}.hook_resid_pre. A minisv vector at blocks.{L}.hook_resid_pre is therefore written as
direction.{L-1}, and L = 0 (the embeddings) and L = 1 (direction.0) cannot be exported. llama.cpp does not
refuse a file with direction.0: common_control_vector_load_one calls N = 0 invalid and drops the whole file,
but common_init_from_params only logs that and goes on, so the model runs unsteered (the file's valid
directions are dropped too). minisv refuses to write such a file, and to read one.

llama.cpp adds the vector at every position, scaled by the strength given with it:
`llama-completion -m model.gguf --control-vector-scaled v.gguf:1.5` (FNAME:SCALE; current llama.cpp rejects the
older two-argument form `--control-vector-scaled v.gguf 1.5`) is minisv's `steer(..., multiplier=1.5)`.
Clamped, affine or position-restricted steering has no control-vector form: export the additive vector only.
"""
import struct
from contextlib import contextmanager

import numpy as np
import torch

from .atomic import atomic_write
from .errors import MinisvError
from .gguf import read_gguf
from .steering import steering_hook

_ALIGN = 32                                   # GGUF's default alignment of the tensor data
_STRING, _INT32, _F32 = 8, 5, 0               # GGUF metadata value types; ggml tensor type F32


def exportable_layers(layer, n_layers=None):
    """The layers of `layer` (an int or a list of ints) if each has a control-vector form, 2 <= L < n_layers
    (no upper bound without n_layers: a script checks before loading the model), else a MinisvError."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    n = n_layers if n_layers is not None else float("inf")
    if not layers or any(not isinstance(l, int) or not 2 <= l < n for l in layers):
        which = f"2..{n_layers - 1} for this {n_layers}-layer model" if n_layers is not None else "2 and later"
        raise MinisvError(f"layer {layer!r} cannot be exported: llama.cpp adds direction.N after block N >= 1, "
                          f"which is minisv's hook_resid_pre of layers {which}")
    return layers


def save_control_vector(model, vector, layer, path):
    """Write `vector` [d_model], steering blocks.{layer}.hook_resid_pre (layer: an int or a list of ints, the
    same vector at each), as a llama.cpp control vector GGUF at `path`."""
    layers = exportable_layers(layer, model.cfg.n_layers)
    vector = torch.as_tensor(vector).detach().float().cpu()
    if vector.shape != (model.cfg.d_model,) or not vector.isfinite().all():   # llama.cpp would add NaN silently
        raise MinisvError(f"control vector must be {model.cfg.d_model} finite numbers (d_model), got shape "
                          f"{tuple(vector.shape)}{'' if vector.isfinite().all() else ' with NaN or infinite values'}")
    # llama.cpp's names for the families; Qwen2 is the Llama-family model with q/k/v biases
    hint = {"gpt2": "gpt2", "neox": "gptneox"}.get(model.cfg.family, "qwen2" if model.cfg.qkv_bias else "llama")
    metadata = {"general.architecture": "controlvector", "controlvector.model_hint": hint,
                "controlvector.layer_count": len(layers)}
    tensors = {f"direction.{l - 1}": vector.numpy() for l in sorted(set(layers))}
    atomic_write(str(path), lambda tmp: _write_gguf(tmp, metadata, tensors))


def load_control_vector(path) -> dict[int, torch.Tensor]:
    """Read a llama.cpp control vector (minisv's, repeng's or llama.cpp cvector-generator's) ->
    {L: vector [d_model] float32}, where L is the minisv layer whose hook_resid_pre receives the vector
    (direction.N -> L = N + 1). L ranges over 2..n_layers: L = n_layers (after the last block) is
    reachable with `steer_control_vector`, not with `steer`."""
    metadata, tensors = read_gguf(path)
    if metadata.get("general.architecture") != "controlvector":
        raise MinisvError(f"{path}: not a control vector (general.architecture is "
                          f"{metadata.get('general.architecture')!r}, expected 'controlvector')")
    vectors = {}
    for name, t in tensors.items():
        prefix, _, index = name.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) == 0 or t.dim() != 1:
            raise MinisvError(f"{path}: tensor {name!r} is not a direction.N (N >= 1) vector; llama.cpp would "
                              "reject this file too")
        vectors[int(index) + 1] = t
    if not vectors or len({t.numel() for t in vectors.values()}) != 1:
        raise MinisvError(f"{path}: a control vector needs direction tensors, all of one size")
    return dict(sorted(vectors.items()))


@contextmanager
def steer_control_vector(model, vectors, multiplier=1.0):
    """Within the block, add each loaded vector {L: v} where llama.cpp does: on the output of block L − 1
    (blocks.{L-1}.hook_resid_post, the residual that enters block L), times `multiplier` (llama.cpp's
    strength), at every position."""
    n = model.cfg.n_layers
    if any(not 1 <= l <= n for l in vectors):
        raise MinisvError(f"control vector layers {sorted(vectors)} do not fit this {n}-layer model (1..{n})")
    device = model.embed.weight.device
    with model.hooks({f"blocks.{l - 1}.hook_resid_post": steering_hook(model, v.to(device), multiplier)
                      for l, v in vectors.items()}):
        yield model


def _write_gguf(path, metadata: dict, tensors: dict):
    """A GGUF v3 file (the layout minisv.gguf reads): header, metadata (str or int values), tensor infos,
    then each F32 tensor's data at a multiple of 32 bytes from the start of the data section."""
    def string(s):
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        out += [string(key), struct.pack("<I", _STRING) + string(value) if isinstance(value, str)
                else struct.pack("<Ii", _INT32, value)]
    offset, data = 0, []
    for name, array in tensors.items():     # 1-D tensors: one dimension, ne[0] = d_model
        out += [string(name), struct.pack("<IQIQ", 1, array.size, _F32, offset)]
        chunk = np.ascontiguousarray(array, "<f4").tobytes()
        data.append(chunk + b"\0" * (-len(chunk) % _ALIGN))
        offset += len(data[-1])
    head = b"".join(out)
    with open(path, "wb") as f:
        f.write(head + b"\0" * (-len(head) % _ALIGN) + b"".join(data))
