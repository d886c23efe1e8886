"""A transcoder: a wide, sparse MLP trained to imitate one MLP of a transformer (`docs/methods.md` §2.1).

It reads the MLP's input x (`blocks.L.ln2.hook_normalized`, the normalized residual before the norm's gain)
and predicts the MLP's output y (`blocks.L.hook_mlp_out`) through d_sae latents of which only a few are active:

    pre = x @ W_enc + b_enc                               [N, d_sae]
    f   = ReLU(pre)                      (architecture "relu", kept sparse by an L1 penalty in training)
        | ReLU(pre) on the k largest pre, 0 elsewhere   (architecture "topk")
    ŷ   = f @ W_dec + b_dec (+ x @ W_skip, optional)      [N, d_out]

Each latent j is a feature with an input direction W_enc[:, j] and an output direction W_dec[j]. A TopK
transcoder never needs the dense f: `encode_sparse` returns (values, indices) [N, k] and `decode_sparse` sums
k rows of W_dec per token with `F.embedding_bag`, O(N·k·d_out) instead of O(N·d_sae·d_out).

Files: a directory with `cfg.json` and `transcoder.safetensors` (W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_out], b_dec [d_out], optional W_skip [d_in, d_out]); names follow SAELens. `save(dir, format=...)`
also writes the layouts SAELens and EleutherAI's sparsify load, and `from_saelens` / `from_sparsify` read them
back. `import_released` converts the released GPT-2 transcoders (pickles) without running any code from the file.
"""
import dataclasses
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, write_text
from .errors import MinisvError
from . import unpickle

WEIGHTS, CONFIG = "transcoder.safetensors", "cfg.json"
SAELENS_WEIGHTS, SPARSIFY_WEIGHTS = "sae_weights.safetensors", "sae.safetensors"
EXPORT_FORMATS = ("minisv", "saelens", "sparsify")
# what the other layouts have no field for, kept under a "minisv" key they ignore, so a round trip loses nothing
_EXTRA_FIELDS = ("model", "layer", "hook_in", "hook_out", "input_convention", "target_centered", "dataset",
                 "training_tokens")


def hook_names(layer):
    """The hooks a transcoder of `layer` reads and predicts: the MLP input before the norm gain, and the MLP output."""
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


@dataclass
class TranscoderConfig:
    d_in: int
    d_out: int
    d_sae: int
    architecture: str = "topk"            # "topk" | "relu"
    k: int = 32                           # active latents per token (topk only)
    skip: bool = False                    # add a dense linear path x @ W_skip
    model: str = ""
    layer: int = 0
    hook_in: str = ""                     # e.g. "blocks.6.ln2.hook_normalized"
    hook_out: str = ""                    # e.g. "blocks.6.hook_mlp_out"
    input_convention: str = "normalized"  # x is the norm's output *before* its gain (and bias)
    target_centered: bool = False         # y is mlp_out minus its mean over d_model (released GPT-2 transcoders)
    dataset: str = ""
    training_tokens: int = 0

    def __post_init__(self):
        if self.architecture not in ("topk", "relu"):
            raise MinisvError(f"unknown transcoder architecture {self.architecture!r}; use 'topk' or 'relu'")
        if min(self.d_in, self.d_out, self.d_sae) < 1 or (self.architecture == "topk" and not 0 < self.k <= self.d_sae):
            raise MinisvError(f"bad transcoder sizes d_in={self.d_in} d_out={self.d_out} d_sae={self.d_sae} "
                              f"k={self.k}; need positive sizes and 0 < k <= d_sae")


class _SelectedPreacts(torch.autograd.Function):
    """pre[n, idx[n, j]] for a few selected latents per token, with a backward that touches only those.

    The selection needs every pre-activation, so the forward's dense x @ W_enc is unavoidable; but the
    gradient is nonzero for just N·k of the N·d_sae entries. Dense autograd would spend another two
    N·d_in·d_sae matmuls on zeros; here grad W_enc is a sparse [d_sae, N] × dense [N, d_in] product and
    grad x an embedding_bag over the selected encoder rows, both O(N·k·d_in)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, pre, indices):   # pre: the dense pre-activations, computed without grad
        ctx.save_for_backward(x, W_enc, indices)
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx, grad):                           # grad [N, m] w.r.t. the selected pre-activations
        x, W_enc, indices = ctx.saved_tensors
        N, m = indices.shape
        grad = grad.to(W_enc.dtype)
        tokens = torch.arange(N, device=x.device).repeat_interleave(m)
        scatter = torch.sparse_coo_tensor(torch.stack([indices.flatten(), tokens]), grad.flatten(),
                                          (W_enc.shape[1], N), check_invariants=False)
        grad_W = torch.sparse.mm(scatter, x.to(W_enc.dtype)).t()      # [d_in, d_sae], feature-major like W_enc
        grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(
            0, indices.flatten(), grad.flatten())
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.t(), per_sample_weights=grad, mode="sum").to(x.dtype)
        return grad_x, grad_W, grad_b, None, None


def selected_preacts(x, W_enc, b_enc, pre, indices):
    """Differentiable pre-activations of the latents in `indices` [N, m]; `pre` [N, d_sae] = x @ W_enc + b_enc
    computed under no_grad (the TopK forward needs it anyway to choose the indices)."""
    return _SelectedPreacts.apply(x, W_enc, b_enc, pre, indices)


class Transcoder(nn.Module):
    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_out, d_sae = cfg.d_in, cfg.d_out, cfg.d_sae
        # W_enc is [d_in, d_sae] but stored feature-major (its transpose is contiguous), so each latent's
        # encoder vector is one contiguous row for the sparse backward's gathers and scatters.
        bound = d_in ** -0.5
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_in).uniform_(-bound, bound).t())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        # TopK: the decoder starts at zero, so the first steps learn the output map before a random decoder can
        # push the encoder around (sparsify's choice for transcoders). ReLU: random unit rows (the L1 penalty
        # is only meaningful with the decoder norms fixed).
        W_dec = torch.zeros(d_sae, d_out) if cfg.architecture == "topk" else torch.randn(d_sae, d_out)
        self.W_dec = nn.Parameter(W_dec if cfg.architecture == "topk" else W_dec / W_dec.norm(dim=1, keepdim=True))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out)) if cfg.skip else None

    # ---------------------------------------------------------------- the map
    def preacts(self, x):
        return F.linear(x, self.W_enc.t(), self.b_enc)     # x @ W_enc + b_enc, the bias fused into the matmul

    def encode(self, x):
        """Feature activations f [..., d_sae] (dense; mostly zeros)."""
        if self.cfg.architecture == "relu":
            return F.relu(self.preacts(x))
        values, indices = self.encode_sparse(x)
        return torch.zeros(*x.shape[:-1], self.cfg.d_sae, dtype=values.dtype, device=values.device) \
            .scatter(-1, indices, values)

    def encode_sparse(self, x):
        """TopK only: (values, indices), each [..., k]; values = ReLU of the k largest pre-activations."""
        x2 = x.reshape(-1, self.cfg.d_in)
        with torch.no_grad():
            pre = self.preacts(x2)
        indices = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
        values = selected_preacts(x2, self.W_enc, self.b_enc, pre, indices).relu()
        return values.view(*x.shape[:-1], -1), indices.view(*x.shape[:-1], -1)

    def decode(self, f):
        """f [..., d_sae] -> f @ W_dec + b_dec (without the skip path, which needs x)."""
        return f @ self.W_dec + self.b_dec

    def decode_sparse(self, values, indices):
        """Σ_j values[n, j] · W_dec[indices[n, j]] + b_dec: k rows per token, gathered by embedding_bag."""
        shape = values.shape[:-1]
        out = F.embedding_bag(indices.reshape(-1, indices.shape[-1]), self.W_dec, mode="sum",
                              per_sample_weights=values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype))
        return out.view(*shape, -1) + self.b_dec

    def forward(self, x):
        """x [..., d_in] -> ŷ [..., d_out]."""
        if self.cfg.architecture == "topk":
            y = self.decode_sparse(*self.encode_sparse(x))
        else:
            y = self.decode(self.encode(x))
        return y + x @ self.W_skip if self.W_skip is not None else y

    # ---------------------------------------------------------------- files
    def save(self, path, format="minisv"):
        """Write cfg.json and the weights into the directory `path` (each file atomically), in one of three layouts:

            "minisv"    transcoder.safetensors as described at the top of this file; `Transcoder.load` reads it
            "saelens"   SAELens ≥ 6 (`SAE.load_from_disk`): sae_weights.safetensors with W_enc, b_enc, W_dec, b_dec
                        as here; ReLU -> architecture "transcoder", with a skip path "skip_transcoder" (W_skip stored
                        [d_out, d_in]). SAELens has no TopK transcoder: TopK is written as its "topk" SAE with
                        apply_b_dec_to_input false, whose forward is exactly this map (needs d_in = d_out, no skip)
            "sparsify"  EleutherAI sparsify (`SparseCoder.load_from_disk`): sae.safetensors with encoder.weight
                        [d_sae, d_in] (= W_encᵀ), encoder.bias, W_dec, b_dec, W_skip [d_out, d_in]; transcode=true.
                        TopK only (sparsify has no ReLU coder), d_in = d_out

        Every layout keeps this transcoder's input convention: x is the MLP input *before the norm's gain*
        (hook_in; TransformerLens's hook_normalized with fold_ln, which the SAELens metadata asks for), not the
        gained input sparsify's own transcoders read at `layers.L.mlp`."""
        if format not in EXPORT_FORMATS:
            raise MinisvError(f"unknown transcoder format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
        tensors = {n: p.detach().float().contiguous().cpu() for n, p in self.named_parameters()}
        if format == "minisv":
            weights, config = WEIGHTS, dataclasses.asdict(self.cfg)
        else:
            weights, tensors, config = (_saelens_layout if format == "saelens" else _sparsify_layout)(self.cfg, tensors)
            config["minisv"] = {f: getattr(self.cfg, f) for f in _EXTRA_FIELDS}
        os.makedirs(path, exist_ok=True)
        atomic_write(os.path.join(path, weights), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        write_text(os.path.join(path, CONFIG), json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_saelens(cls, path, device=None):
        """A transcoder from a SAELens directory (cfg.json + sae_weights.safetensors): architecture "transcoder",
        "skip_transcoder" or, written by `save(format="saelens")`, "topk"."""
        raw, tensors = _read_layout(path, SAELENS_WEIGHTS)
        arch, meta = raw.get("architecture"), raw.get("metadata") or {}
        if arch not in ("transcoder", "skip_transcoder", "topk") or raw.get("apply_b_dec_to_input") \
                or raw.get("normalize_activations", "none") != "none" or raw.get("rescale_acts_by_decoder_norm"):
            raise MinisvError(f"{path}: SAELens architecture {arch!r} with apply_b_dec_to_input="
                              f"{raw.get('apply_b_dec_to_input')}, normalize_activations="
                              f"{raw.get('normalize_activations')!r} is not a transcoder minisv can run; it reads "
                              f"'transcoder', 'skip_transcoder' and 'topk' without input bias or normalization")
        if arch == "topk" and not meta.get("hook_name_out"):
            raise MinisvError(f"{path} is a SAELens TopK SAE (no metadata.hook_name_out), not a transcoder")
        if "W_skip" in tensors:
            tensors["W_skip"] = tensors["W_skip"].t()
        hook_in = meta.get("hook_name") or ""
        known = dict(model=meta.get("model_name") or "", hook_in=hook_in, hook_out=meta.get("hook_name_out") or "",
                     dataset=meta.get("dataset_path") or "", layer=_layer_of(hook_in))
        return cls._from_layout(path, tensors, "topk" if arch == "topk" else "relu", raw.get("k", 32),
                                known | (raw.get("minisv") or {}), device)

    @classmethod
    def from_sparsify(cls, path, device=None):
        """A transcoder from an EleutherAI sparsify directory (cfg.json + sae.safetensors) with transcode=true and
        the topk activation."""
        raw, tensors = _read_layout(path, SPARSIFY_WEIGHTS)
        if not raw.get("transcode") or raw.get("activation", "topk") != "topk":
            raise MinisvError(f"{path}: a sparsify coder with transcode={raw.get('transcode')}, activation="
                              f"{raw.get('activation')!r} is not a TopK transcoder (an SAE subtracts b_dec from its "
                              f"input); minisv reads transcode=true with activation 'topk'")
        renamed = {"encoder.weight": "W_enc", "encoder.bias": "b_enc"}
        tensors = {renamed.get(n, n): t.t() if n in ("encoder.weight", "W_skip") else t for n, t in tensors.items()}
        return cls._from_layout(path, tensors, "topk", raw.get("k", 32), raw.get("minisv") or {}, device)

    @classmethod
    def _from_layout(cls, path, tensors, architecture, k, fields, device):
        """Build the transcoder whose sizes the tensors give, and load them (names and shapes checked)."""
        if not {"W_enc", "W_dec"} <= set(tensors):
            raise MinisvError(f"{path} holds tensors {sorted(tensors)}; a transcoder needs W_enc and W_dec")
        (d_in, d_sae), d_out = tensors["W_enc"].shape, tensors["W_dec"].shape[-1]
        cfg = TranscoderConfig(d_in, d_out, d_sae, architecture, k, "W_skip" in tensors,
                               **{f: v for f, v in fields.items() if f in _EXTRA_FIELDS})
        tc = cls(cfg)
        tc.load_tensors(tensors, path)
        return tc.to(device) if device is not None else tc

    @classmethod
    def load(cls, path, device=None):
        """Load a transcoder directory written by `save` (or its cfg.json / .safetensors path).

        cfg.json is untrusted: every field must have its type, and the shapes it implies must be those of the
        tensors in the file, checked on the meta device (nothing allocated) before any weight is read."""
        path = os.path.dirname(path) if str(path).endswith((WEIGHTS, CONFIG)) else str(path)
        config, weights = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
        if not os.path.isfile(config) or not os.path.isfile(weights):
            raise MinisvError(f"{path} is not a transcoder directory (needs {CONFIG} and {WEIGHTS}); train one "
                              f"with train_transcoder.py or import released weights with import_released")
        try:
            with open(config, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise MinisvError(f"{config} is not readable JSON ({e}); the transcoder directory is corrupt") from None
        if not isinstance(raw, dict):
            raise MinisvError(f"{config} holds a JSON {type(raw).__name__}, not an object; the file is corrupt")
        types = {f.name: f.type for f in dataclasses.fields(TranscoderConfig)}
        for key, value in raw.items():
            if key in types and type(value) is not types[key]:
                kind = {int: "an integer", str: "a string", bool: "true or false"}[types[key]]
                raise MinisvError(f"{config}: {key} is {value!r}, expected {kind}; the file is corrupt")
        missing = [k for k in ("d_in", "d_out", "d_sae") if k not in raw]
        if missing:
            raise MinisvError(f"{config} is incomplete: it lacks {', '.join(missing)}")
        cfg = TranscoderConfig(**{k: v for k, v in raw.items() if k in types})
        try:
            with safe_open(weights, "pt") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except Exception as e:   # safetensors reports a truncated or corrupt header as one of several errors
            raise MinisvError(f"{weights}: truncated or corrupt ({str(e).splitlines()[0][:200]})") from None
        with torch.device("meta"):
            cls(cfg).load_tensors({k: torch.empty(shape) for k, shape in shapes.items()}, weights)
        tc = cls(cfg)
        try:
            tc.load_tensors(load_file(weights), weights)
        except MinisvError:
            raise
        except Exception as e:   # the header was whole but the data is not
            raise MinisvError(f"{weights}: truncated or corrupt ({str(e).splitlines()[0][:200]})") from None
        return tc.to(device) if device is not None else tc

    def load_tensors(self, tensors, source):
        """Copy tensors {name: tensor} into the parameters, checking names and shapes."""
        params = dict(self.named_parameters())
        if set(tensors) != set(params):
            raise MinisvError(f"{source} holds tensors {sorted(tensors)} but a {self.cfg.architecture} transcoder "
                              f"with skip={self.cfg.skip} needs {sorted(params)}")
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise MinisvError(f"{source}: {name} has shape {list(tensors[name].shape)}, cfg says {list(p.shape)}")
            with torch.no_grad():
                p.copy_(tensors[name])


# ------------------------------------------------------------------------- other tools' layouts
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


def _saelens_layout(cfg, tensors):
    """(weights file, tensors, cfg.json dict) as SAELens 6 writes them."""
    check_export("saelens", cfg.architecture, cfg.skip, cfg.d_in, cfg.d_out)
    if cfg.skip:
        tensors["W_skip"] = tensors["W_skip"].t().contiguous()          # SAELens: x @ W_skipᵀ, W_skip [d_out, d_in]
    config = {"architecture": "topk" if cfg.architecture == "topk" else "skip_transcoder" if cfg.skip else "transcoder",
              "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
              "normalize_activations": "none", "reshape_activations": "none",
              "metadata": {"sae_lens_version": "6.0.0", "model_name": cfg.model, "hook_name": cfg.hook_in,
                           "hook_name_out": cfg.hook_out, "dataset_path": cfg.dataset, "prepend_bos": True,
                           # TransformerLens: fold_ln makes hook_normalized the pre-gain input; centred writing
                           # weights make hook_mlp_out mean-free, the target of a target-centered transcoder
                           "model_from_pretrained_kwargs": {"fold_ln": True,
                                                            "center_writing_weights": cfg.target_centered}}}
    if cfg.architecture == "topk":
        config |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    else:
        config["d_out"] = cfg.d_out
    return SAELENS_WEIGHTS, tensors, config


def _sparsify_layout(cfg, tensors):
    """(weights file, tensors, cfg.json dict) as sparsify's SparseCoder.save_to_disk writes them."""
    check_export("sparsify", cfg.architecture, cfg.skip, cfg.d_in, cfg.d_out)
    out = {"encoder.weight": tensors["W_enc"].t().contiguous(), "encoder.bias": tensors["b_enc"],
           "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    if cfg.skip:
        out["W_skip"] = tensors["W_skip"].t().contiguous()              # sparsify: x @ W_skipᵀ
    config = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": False,
              "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": cfg.skip,
              "transcode": True, "d_in": cfg.d_in}
    return SPARSIFY_WEIGHTS, out, config


def _read_layout(path, weights):
    """(cfg.json as a dict, {name: tensor}) of an exported transcoder directory."""
    path = str(path)
    if not os.path.isfile(os.path.join(path, CONFIG)) or not os.path.isfile(os.path.join(path, weights)):
        raise MinisvError(f"{path} is not a transcoder directory of this layout (needs {CONFIG} and {weights})")
    try:
        with open(os.path.join(path, CONFIG)) as f:
            raw = json.load(f)
        tensors = load_file(os.path.join(path, weights))
    except (ValueError, OSError, SafetensorError) as e:                 # (JSONDecodeError is a ValueError)
        raise MinisvError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise MinisvError(f"{path}/{CONFIG} is not a JSON object")
    return raw, {n: t.float() for n, t in tensors.items()}


def _layer_of(hook):
    """5 for "blocks.5.ln2.hook_normalized"; 0 when the name says nothing."""
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else 0


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
                           input_convention="normalized", target_centered=True, dataset="openwebtext",
                           training_tokens=0)
    tc = Transcoder(cfg)
    tc.load_tensors({"W_enc": W_enc, "b_enc": sd["b_enc"].float() - sd["b_dec"].float() @ W_enc, "W_dec": W_dec,
                     "b_dec": sd["b_dec_out"].float()}, path)
    return tc

