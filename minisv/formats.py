"""Transcoder files: minisv's own layout, the layouts SAELens and EleutherAI's sparsify load, and the released GPT-2
transcoders (`docs/methods.md` §2.1, §2.4).

    minisv    cfg.json (every TranscoderConfig field) + transcoder.safetensors: W_enc [d_in, d_sae], b_enc [d_sae],
              W_dec [d_sae, d_out], b_dec [d_out], optional W_skip [d_in, d_out]; names follow SAELens
    saelens   cfg.json + sae_weights.safetensors (`SAE.load_from_disk`). ReLU transcoders are its "transcoder" /
              "skip_transcoder" (W_skip stored [d_out, d_in]); ReLU SAEs its "standard" SAE; TopK coders its
              "topk" SAE (SAELens has no TopK transcoder: a TopK transcoder is written as that SAE with
              metadata.hook_name_out, whose forward is exactly the map, so it needs d_in = d_out and no skip)
    sparsify  cfg.json + sae.safetensors (`SparseCoder.load_from_disk`): encoder.weight [d_sae, d_in] (= W_encᵀ),
              encoder.bias, W_dec, b_dec, W_skip [d_out, d_in]; TopK only, d_in = d_out. A sparsify SAE subtracts
              b_dec from its input before encoding, so an SAE is written with that folded into encoder.bias

The layouts differ in what the coder reads. minisv reads the MLP input *before* the norm's gain
(`ln2.hook_normalized`). SAELens coders read TransformerLens hooks, which are minisv's names with the same
meaning. sparsify's own coders hook Hugging Face modules by name ("layers.6.mlp"): a transcoder there reads the
MLP input *after* the norm's gain γ (and bias β), so reading one needs the model to fold them in:
(γ⊙x̂ + β) W = x̂ (diag(γ) W) + β W. Fields the other layouts have no place for are kept under a "minisv" key
they ignore, so a round trip loses nothing. No file can run code: the released GPT-2 pickles go through
minisv.unpickle.
"""
import dataclasses
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import unpickle
from .atomic import atomic_write, write_text
from .errors import MinisvError
from .files import check_regular, read_json
from . import circuit_tracer
from .clt import CLTConfig, CrossLayerTranscoder
from .transcoder import Transcoder, TranscoderConfig, convention_of

CONFIG = "cfg.json"
WEIGHTS = {"minisv": "transcoder.safetensors", "saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors"}
CLT_WEIGHTS = "clt.safetensors"      # a cross-layer transcoder in minisv's layout: cfg.json + this
FORMATS = tuple(WEIGHTS)
# what the other layouts have no field for, kept under a "minisv" key they ignore, so a round trip loses nothing
_EXTRA_FIELDS = ("model", "layer", "hook_in", "hook_out", "input_convention", "target_centered", "dataset",
                 "training_tokens")
# minisv's short names, as the hub ids other tools need
_HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


# ------------------------------------------------------------------------- writing
def save(tc, path, format="minisv"):
    """Write cfg.json and the weights into the directory `path` (each file atomically) in one of FORMATS, in the
    coder's own dtype. A directory holding another layout's files is refused (its cfg.json would be replaced).
    A CrossLayerTranscoder is written in minisv's layout (circuit-tracer's: `minisv.circuit_tracer.save`)."""
    if isinstance(tc, CrossLayerTranscoder):
        return _save_clt(tc, path, format)
    if format not in FORMATS:
        raise MinisvError(f"unknown transcoder format {format!r}; use one of {', '.join(FORMATS)}")
    check_export(format, tc.cfg.architecture, tc.cfg.skip, tc.cfg.d_in, tc.cfg.d_out)
    others = [f for f, w in WEIGHTS.items() if f != format and os.path.exists(os.path.join(path, w))]
    if others:
        raise MinisvError(f"{path} holds a {others[0]} transcoder; write the {format} layout to a folder of its own")
    tensors = {n: p.detach().contiguous().cpu() for n, p in tc.named_parameters()}
    if format == "minisv":
        config = dataclasses.asdict(tc.cfg)
    else:
        tensors, config = (_saelens_layout if format == "saelens" else _sparsify_layout)(tc.cfg, tensors)
        config["minisv"] = {f: getattr(tc.cfg, f) for f in _EXTRA_FIELDS}
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, WEIGHTS[format]), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text(os.path.join(path, CONFIG), json.dumps(config, indent=2) + "\n")


def check_export(format, architecture, skip, d_in=None, d_out=None):
    """Raise a MinisvError if a transcoder of this architecture and skip path (and sizes; None = equal, as for
    every coder train_transcoder.py trains) has no form in the layout `format`. The one statement of the other
    tools' limits: `save` checks a transcoder's config with it, train_transcoder.py its flags before training."""
    sizes = f" (this one: d_in {d_in}, d_out {d_out})" if d_in != d_out else ""
    if format == "saelens" and architecture == "topk" and (skip or sizes):
        raise MinisvError("SAELens has no TopK transcoder class; a TopK transcoder exports as its 'topk' SAE, which "
                          f"needs d_in = d_out and no skip path{sizes or ' (this one has one: train without --skip)'}"
                          "; export it as 'sparsify' or 'minisv'")
    if format == "sparsify" and architecture != "topk":
        raise MinisvError(f"sparsify runs only TopK coders (it has no {architecture} coder): exporting to sparsify "
                          "needs --arch topk; export this one as 'saelens' or 'minisv'")
    if format == "sparsify" and sizes:
        raise MinisvError(f"sparsify runs only TopK coders with equal input and output sizes{sizes}; export this "
                          "one as 'minisv'")


def _is_sae(cfg):
    return bool(cfg.hook_in) and cfg.hook_in == cfg.hook_out


def _saelens_layout(cfg, tensors):
    """(tensors, cfg.json dict) as SAELens 6 writes them."""
    if cfg.skip:
        tensors["W_skip"] = tensors["W_skip"].t().contiguous()          # SAELens: x @ W_skipᵀ, W_skip [d_out, d_in]
    arch = "topk" if cfg.architecture == "topk" else "standard" if _is_sae(cfg) else \
        "skip_transcoder" if cfg.skip else "transcoder"
    metadata = {"sae_lens_version": "6.0.0", "model_name": _HUB_IDS.get(cfg.model, cfg.model),
                "hook_name": cfg.hook_in, "dataset_path": "" if cfg.dataset == "builtin" else cfg.dataset,
                "prepend_bos": True,
                # TransformerLens: fold_ln makes hook_normalized the pre-gain input; centred writing weights make
                # hook_mlp_out mean-free, the target of a target-centered transcoder
                "model_from_pretrained_kwargs": {"fold_ln": True, "center_writing_weights": cfg.target_centered}}
    if not _is_sae(cfg):
        metadata["hook_name_out"] = cfg.hook_out
    config = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
              "dtype": str(tensors["W_enc"].dtype).removeprefix("torch."), "device": "cpu",
              "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
              "metadata": metadata}
    if cfg.architecture == "topk":
        config |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    elif not _is_sae(cfg):
        config["d_out"] = cfg.d_out
    return tensors, config


def _sparsify_layout(cfg, tensors):
    """(tensors, cfg.json dict) as sparsify's SparseCoder.save_to_disk writes them."""
    sae = _is_sae(cfg)
    b_enc = tensors["b_enc"]
    if sae:        # sparsify encodes x − b_dec: (x − b_dec)·W + (b + b_dec·W) = x·W + b
        b_enc = b_enc + (tensors["b_dec"].double() @ tensors["W_enc"].double()).to(b_enc.dtype)
    out = {"encoder.weight": tensors["W_enc"].t().contiguous(), "encoder.bias": b_enc,
           "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    if cfg.skip:
        out["W_skip"] = tensors["W_skip"].t().contiguous()              # sparsify: x @ W_skipᵀ
    config = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": False,
              "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": cfg.skip,
              "transcode": not sae, "d_in": cfg.d_in}
    return out, config


# ------------------------------------------------------------------------- reading
def load(path, device=None, model=None):
    """A transcoder (or SAE) from a directory in any of the three layouts, told apart by their weights file (or
    from its cfg.json / weights path); a CrossLayerTranscoder from minisv's or circuit-tracer's layout. A sparsify
    coder trained by sparsify itself, and circuit-tracer's coders, read Hugging Face modules after the norm's
    gain and need `model` to be mapped onto minisv's hooks (see the top of this file)."""
    path = str(path)
    if os.path.isfile(path):
        path = os.path.dirname(path) or "."
    if os.path.isfile(os.path.join(path, CLT_WEIGHTS)) or circuit_tracer.is_layout(path):
        if circuit_tracer.is_layout(path) and model is None:
            raise MinisvError(f"{path} is a circuit-tracer coder, which reads the MLP input after the norm's gain; "
                              f"pass the model so minisv can fold the gain in")
        clt = _load_clt(path) if not circuit_tracer.is_layout(path) else circuit_tracer.load(path, model)
        return clt.to(device) if device is not None else clt
    found = [f for f, w in WEIGHTS.items() if os.path.isfile(os.path.join(path, w))]
    if not found or not os.path.isfile(os.path.join(path, CONFIG)):
        raise MinisvError(f"{path} is not a transcoder directory (needs {CONFIG} and one of "
                          f"{', '.join(WEIGHTS.values())}); train one with train_transcoder.py or import released "
                          f"weights with import_released")
    raw = _read_config(path)
    tc = {"minisv": _from_minisv, "saelens": _from_saelens, "sparsify": _from_sparsify}[found[0]](path, raw, model)
    return tc.to(device) if device is not None else tc


def _save_clt(clt, path, format):
    if format != "minisv":
        raise MinisvError(f"a cross-layer transcoder is written in minisv's layout, or in circuit-tracer's with "
                          f"minisv.circuit_tracer.save (train_transcoder.py --export-format circuit-tracer); not "
                          f"{format!r}")
    tensors = {n: p.detach().contiguous().cpu() for n, p in clt.named_parameters()}      # W_dec.0, W_dec.1, ...
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, CLT_WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text(os.path.join(path, CONFIG), json.dumps({"kind": "clt", **dataclasses.asdict(clt.cfg)}, indent=2) + "\n")


def _load_clt(path):
    """minisv's CLT layout, its cfg.json checked field by field and the tensors' shapes against it before reading."""
    raw = _read_config(path)
    types = {f.name: f.type for f in dataclasses.fields(CLTConfig)}
    fields = {k: v for k, v in raw.items() if k in types}
    for key, value in fields.items():
        if type(value) is not types[key]:
            raise MinisvError(f"{path}/{CONFIG}: {key} is {value!r}, expected {_KINDS[types[key]]}; the file is "
                              f"corrupt")
    missing = [k for k in ("n_layers", "d_model", "d_sae") if k not in fields]
    if missing or raw.get("kind") != "clt":
        raise MinisvError(f"{path}/{CONFIG} is not a cross-layer transcoder's (kind {raw.get('kind')!r}, lacking "
                          f"{', '.join(missing) or 'nothing'})")
    clt = CrossLayerTranscoder(CLTConfig(**fields))
    weights = os.path.join(path, CLT_WEIGHTS)
    try:
        with safe_open(weights, "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:
        raise MinisvError(f"{weights}: truncated or corrupt ({str(e).splitlines()[0][:200]})") from None
    expected = {n: list(p.shape) for n, p in clt.named_parameters()}
    wrong = sorted(n for n in set(shapes) | set(expected) if shapes.get(n) != expected.get(n))
    if wrong:
        raise MinisvError(f"{weights}: {wrong[0]} has shape {shapes.get(wrong[0])} but cfg.json implies "
                          f"{expected.get(wrong[0])} ({len(wrong)} tensors differ); the directory is corrupt or of "
                          f"another minisv version")
    clt.load_state_dict(_tensors(weights))
    return clt


def _read_config(path):
    """cfg.json as a dict, through the one JSON gate (a regular, bounded, well-formed file holding an object)."""
    return read_json(os.path.join(path, CONFIG))


_KINDS = {int: "an integer", str: "a string", bool: "true or false", float: "a number"}


def _config(raw, where, **known):
    """A TranscoderConfig from the cfg.json fields that are TranscoderConfig fields (and `known` ones), each checked
    for its type; a one-line MinisvError naming the field otherwise."""
    types = {f.name: f.type for f in dataclasses.fields(TranscoderConfig)}
    fields = {k: v for k, v in raw.items() if k in types} | known
    for key, value in fields.items():
        if type(value) is not types[key]:
            raise MinisvError(f"{where}: {key} is {value!r}, expected {_KINDS[types[key]]}; the file is corrupt")
    missing = [k for k in ("d_in", "d_out", "d_sae") if k not in fields]
    if missing:
        raise MinisvError(f"{where} is incomplete: it lacks {', '.join(missing)}")
    if fields.get("layer", 0) < 0:
        raise MinisvError(f"{where}: layer is {fields['layer']}, expected a layer number >= 0; the file is corrupt")
    return TranscoderConfig(**fields)


def _from_minisv(path, raw, model):
    """minisv's layout: cfg.json is untrusted, so every field must have its type, and the shapes it implies must be
    those of the tensors in the file, checked on the meta device (nothing allocated) before any weight is read."""
    cfg, weights = _config(raw, os.path.join(path, CONFIG)), os.path.join(path, WEIGHTS["minisv"])
    try:
        with safe_open(weights, "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:   # safetensors reports a truncated or corrupt header as one of several errors
        raise MinisvError(f"{weights}: truncated or corrupt ({str(e).splitlines()[0][:200]})") from None
    with torch.device("meta"):
        assign(Transcoder(cfg), {k: torch.empty(shape) for k, shape in shapes.items()}, weights)
    return assign(Transcoder(cfg), _tensors(weights), weights)


def _from_saelens(path, raw, model):
    """SAELens "transcoder", "skip_transcoder", "standard" and "topk" coders. An SAE with apply_b_dec_to_input
    encodes x − b_dec, folded into b_enc as for the released transcoders."""
    tensors, meta = _tensors(os.path.join(path, WEIGHTS["saelens"])), raw.get("metadata") or {}
    arch, subtract = raw.get("architecture"), raw.get("apply_b_dec_to_input", True)
    hook_in = meta.get("hook_name") if isinstance(meta, dict) else None
    hook_out = meta.get("hook_name_out") or hook_in if isinstance(meta, dict) else None
    if arch not in ("transcoder", "skip_transcoder", "standard", "topk") or (subtract and hook_in != hook_out) \
            or raw.get("normalize_activations", "none") != "none" or raw.get("rescale_acts_by_decoder_norm") \
            or not isinstance(hook_in, str) or not isinstance(hook_out, str):
        raise MinisvError(f"{path}: a SAELens {arch!r} coder with apply_b_dec_to_input={subtract}, "
                          f"normalize_activations={raw.get('normalize_activations')!r}, hook_name={hook_in!r} is not "
                          f"one minisv can run; it reads 'transcoder', 'skip_transcoder', 'standard' and 'topk' "
                          f"without input normalization")
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].t()
    if subtract:        # an SAE: ReLU((x − b_dec) W_enc + b_enc) = ReLU(x W_enc + (b_enc − b_dec W_enc))
        tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ tensors["W_enc"]
    kwargs = meta.get("model_from_pretrained_kwargs") or {}
    known = dict(model=meta.get("model_name") or "", hook_in=hook_in, hook_out=hook_out, layer=_layer_of(hook_in),
                 dataset=meta.get("dataset_path") or "", input_convention=convention_of(hook_in),
                 # TransformerLens centres writing weights unless told not to: its hook_mlp_out is then mean-free
                 target_centered=bool(kwargs.get("center_writing_weights", True)) and hook_out.endswith("mlp_out"))
    known |= {f: v for f, v in (raw.get("minisv") or {}).items() if f in _EXTRA_FIELDS}
    return _from_tensors(path, tensors, "topk" if arch == "topk" else "relu", raw.get("k", 32), known)


# sparsify hooks Hugging Face modules by name: "model.layers.6.mlp" (Llama), "gpt_neox.layers.6.mlp", "h.6.mlp"
_SPARSIFY_HOOK = re.compile(r"(?:.*\.)?(?:layers|h)\.(\d+)(\.mlp)?")


def _from_sparsify(path, raw, model):
    """A sparsify TopK coder. Written by minisv (a "minisv" key in cfg.json): minisv's conventions. Trained by
    sparsify: its folder is named after the hookpoint it read, a transcoder at "layers.L.mlp" reads the gained
    MLP input (folded with `model`'s ln2 gain and bias) and predicts mlp_out; an SAE at "layers.L.mlp" reconstructs
    mlp_out, at "layers.L" the block's output."""
    tensors = _tensors(os.path.join(path, WEIGHTS["sparsify"]))
    if raw.get("activation", "topk") != "topk" or not {"encoder.weight", "encoder.bias"} <= set(tensors):
        raise MinisvError(f"{path}: a sparsify coder with activation={raw.get('activation')!r} is not a TopK coder; "
                          f"minisv reads sparsify's 'topk' coders")
    tensors = {"W_enc": tensors.pop("encoder.weight").t(), "b_enc": tensors.pop("encoder.bias"), **tensors}
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].t()
    _fold_io_norms(tensors)
    transcode, fields = bool(raw.get("transcode")), raw.get("minisv")
    if not transcode:   # sparsify SAEs encode x − b_dec: fold it into the encoder bias
        tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ tensors["W_enc"]
    if isinstance(fields, dict):
        known = {f: v for f, v in fields.items() if f in _EXTRA_FIELDS}
    else:
        known = _sparsify_hooks(path, transcode, tensors, model)
    return _from_tensors(path, tensors, "topk", raw.get("k", 32), known)


def _fold_io_norms(tensors):
    """EleutherAI's normalize_io coders scale their input by √d / in_norm and their output by out_norm / √d
    (in_norm, out_norm: the mean token norms of the first training batch, stored as tensors): fold both into
    the weights, so the coder maps raw activations. A no-op without them."""
    if "in_norm" not in tensors and "out_norm" not in tensors:
        return
    d = tensors["W_enc"].shape[0]
    scale_in = d ** 0.5 / float(tensors.pop("in_norm", torch.tensor(d ** 0.5)))
    scale_out = float(tensors.pop("out_norm", torch.tensor(d ** 0.5))) / d ** 0.5
    tensors["W_enc"] = tensors["W_enc"] * scale_in
    for name in ("W_dec", "b_dec"):
        tensors[name] = tensors[name] * scale_out
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"] * scale_in * scale_out


def _sparsify_hooks(path, transcode, tensors, model):
    """minisv's fields for a coder sparsify trained, from its hookpoint folder name; folds the gain in place."""
    hookpoint = os.path.basename(os.path.normpath(path))
    m = _SPARSIFY_HOOK.fullmatch(hookpoint)
    if not m or (transcode and not m[2]):
        raise MinisvError(f"{path}: sparsify trained this coder on hookpoint {hookpoint!r}, which minisv cannot map to "
                          f"its hooks; it reads transcoders of 'layers.L.mlp' and SAEs of 'layers.L.mlp' or 'layers.L'")
    layer = int(m[1])
    if not transcode:
        hook = f"blocks.{layer}.hook_mlp_out" if m[2] else f"blocks.{layer}.hook_resid_post"
        return dict(layer=layer, hook_in=hook, hook_out=hook, input_convention="raw")
    if model is None:
        raise MinisvError(f"{path}: sparsify's transcoders read the MLP input after the norm's gain; pass the model "
                          f"(load(path, model=...), train_transcoder.py --load does) so minisv can fold the gain in")
    ln = model.blocks[model.check_layer(layer, f"{path}: the hookpoint's layer")].ln2
    gain, bias = ln.weight.detach().float().cpu(), ln.bias
    for name in ("W_enc", "W_skip"):     # (γ⊙x̂ + β) W = x̂ (diag(γ) W) + β W
        if name in tensors:
            if bias is not None:
                out = "b_enc" if name == "W_enc" else "b_dec"
                tensors[out] = tensors[out] + bias.detach().float().cpu() @ tensors[name]
            tensors[name] = gain[:, None] * tensors[name]
    return dict(layer=layer, hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out")


def _from_tensors(path, tensors, architecture, k, fields):
    """The transcoder whose sizes the tensors give, with the tensors loaded (names and shapes checked)."""
    if not {"W_enc", "W_dec"} <= set(tensors) or tensors["W_enc"].dim() != 2 or tensors["W_dec"].dim() != 2:
        raise MinisvError(f"{path} holds tensors {sorted(tensors)}; a transcoder needs 2-d W_enc and W_dec")
    (d_in, d_sae), d_out = tensors["W_enc"].shape, tensors["W_dec"].shape[-1]
    cfg = _config(dict(fields, d_in=d_in, d_out=d_out, d_sae=d_sae, architecture=architecture, k=k,
                       skip="W_skip" in tensors), path)
    return assign(Transcoder(cfg), tensors, path)


def _tensors(weights):
    check_regular(weights, None)          # not a FIFO or a device: safetensors would wait or read forever
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise MinisvError(f"{weights}: truncated or corrupt ({str(e).splitlines()[0][:200]})") from None


def assign(tc, tensors, source):
    """Copy tensors {name: tensor} into tc's parameters (names and shapes checked); the parameters take the
    tensors' dtype (all must share one). Returns tc."""
    params = dict(tc.named_parameters())
    if set(tensors) != set(params):
        raise MinisvError(f"{source} holds tensors {sorted(tensors)} but a {tc.cfg.architecture} transcoder with "
                          f"skip={tc.cfg.skip} needs {sorted(params)}")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1 or not next(iter(dtypes)).is_floating_point:
        raise MinisvError(f"{source}: the tensors have dtypes {sorted(map(str, dtypes))}; expected one float dtype")
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise MinisvError(f"{source}: {name} has shape {list(tensors[name].shape)}, cfg says {list(p.shape)}")
        with torch.no_grad():
            p.copy_(tensors[name])
    return tc.to(next(iter(dtypes)))


def _layer_of(hook):
    """5 for "blocks.5.ln2.hook_normalized"; 0 when the name says nothing."""
    m = re.match(r"blocks\.(\d+)\.", hook or "")
    return int(m[1]) if m else 0


# ------------------------------------------------------------------------- released GPT-2 transcoders
# `pchlenski/gpt2-transcoders` files are torch.save pickles of {"cfg": LanguageModelSAERunnerConfig, "state_dict":
# {W_enc, b_enc, W_dec, b_dec (an input pre-bias), b_dec_out}}; minisv.unpickle reads them without running code
# (the config object comes back as an inert record that keeps its attributes).
def import_released(path, layer=None) -> Transcoder:
    """Convert a released GPT-2 transcoder `.pt` (`docs/methods.md` §2.4) to a minisv Transcoder, folding the input
    pre-bias into the encoder bias: ReLU((x − b_dec) W_enc + b_enc) = ReLU(x W_enc + (b_enc − b_dec W_enc))."""
    if not os.path.isfile(path):
        raise MinisvError(f"no such file: {path}")
    obj = unpickle.load(path)
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    need = {"W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out"}
    if not isinstance(sd, dict) or not need <= set(sd) or not all(isinstance(sd[n], torch.Tensor) for n in need):
        raise MinisvError(f"{path} is not a released transcoder: expected a 'state_dict' with tensors {sorted(need)}")
    W_enc, W_dec = sd["W_enc"].float(), sd["W_dec"].float()
    d_in, d_sae = W_enc.shape if W_enc.dim() == 2 else (0, 0)
    shapes = {"W_enc": [d_in, d_sae], "b_enc": [d_sae], "W_dec": [d_sae, W_dec.shape[-1]], "b_dec": [d_in],
              "b_dec_out": [W_dec.shape[-1]]}
    for name, shape in shapes.items():
        if list(sd[name].shape) != shape or 0 in shape:
            raise MinisvError(f"{path}: {name} has shape {list(sd[name].shape)}, expected {shape} (W_enc is "
                              f"[d_in, d_sae], W_dec [d_sae, d_out]); the file is not a released transcoder")
    hook = getattr(obj.get("cfg"), "hook_point", None)     # e.g. "blocks.8.ln2.hook_normalized"
    found = re.search(r"blocks\.(\d+)\.", hook if isinstance(hook, str) else os.path.basename(path))
    if layer is None and not found:
        raise MinisvError(f"cannot tell the layer of {path}; pass layer=")
    layer = int(found[1]) if layer is None else layer
    cfg = TranscoderConfig(d_in, W_dec.shape[1], d_sae, "relu", model="gpt2", layer=layer,
                           hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out",
                           input_convention="normalized", target_centered=True, dataset="openwebtext")
    return assign(Transcoder(cfg), {"W_enc": W_enc, "b_enc": sd["b_enc"].float() - sd["b_dec"].float() @ W_enc,
                                    "W_dec": W_dec, "b_dec": sd["b_dec_out"].float()}, path)
