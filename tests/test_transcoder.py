"""minisv.transcoder: the TopK sparse paths against dense math, files, and the safe import of released weights."""
import collections
import dataclasses
import os
import subprocess
import sys
import types

import pytest
import torch

from minisv.errors import MinisvError
from minisv import formats
from minisv.formats import import_released
from minisv.transcoder import Transcoder, TranscoderConfig


def random_transcoder(arch="topk", skip=False, d_in=12, d_out=10, d_sae=40, k=5, seed=0):
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(d_in, d_out, d_sae, arch, k, skip, hook_in="blocks.1.ln2.hook_normalized",
                                     hook_out="blocks.1.hook_mlp_out", layer=1))
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_(0, 0.5)          # TopK starts with W_dec = 0; make every parameter matter
    return tc


def dense_topk(tc, x):
    """The textbook TopK transcoder with plain autograd: f = ReLU(TopK(x W_enc + b_enc)), ŷ = f W_dec + b_dec."""
    pre = x @ tc.W_enc + tc.b_enc
    top = pre.topk(tc.cfg.k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    y = f @ tc.W_dec + tc.b_dec
    return (y + x @ tc.W_skip if tc.W_skip is not None else y), f


def test_topk_keeps_exactly_the_k_largest():
    tc = random_transcoder()
    with torch.no_grad():
        tc.b_enc.fill_(100.0)                           # every pre-activation positive: exactly k survive the ReLU
    x = torch.randn(7, 12)
    f = tc.dense(*tc.encode(x))
    assert (f > 0).sum(-1).eq(tc.cfg.k).all()
    expected = (x @ tc.W_enc + tc.b_enc).topk(tc.cfg.k, dim=-1).indices.sort(-1).values
    assert torch.equal(f.nonzero()[:, 1].view(7, -1), expected)


@pytest.mark.parametrize("skip", [False, True])
def test_sparse_forward_and_backward_equal_dense_autograd(skip):
    tc = random_transcoder(skip=skip)
    x = torch.randn(2, 9, 12, requires_grad=True)
    target = torch.randn(2, 9, 10)
    sparse_loss = (tc(x) - target).pow(2).sum()
    sparse_loss.backward()
    sparse = {n: p.grad.clone() for n, p in tc.named_parameters()} | {"x": x.grad.clone()}
    tc.zero_grad()
    x.grad = None
    y, f = dense_topk(tc, x)
    dense_loss = (y - target).pow(2).sum()
    dense_loss.backward()
    torch.testing.assert_close(sparse_loss, dense_loss)
    for name, p in list(tc.named_parameters()) + [("x", x)]:
        torch.testing.assert_close(sparse[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(tc.decode(*tc.encode(x)), dense_topk(tc, x)[0] - (x @ tc.W_skip if skip else 0))


def test_sparse_decode_equals_dense_decode():
    tc = random_transcoder(d_sae=300, k=17)
    values, indices = tc.encode(torch.randn(3, 5, 12))
    f = torch.zeros(3, 5, 300).scatter(-1, indices, values)
    torch.testing.assert_close(tc.decode(values, indices), f @ tc.W_dec + tc.b_dec)


def test_relu_forward_is_the_formula():
    tc = random_transcoder("relu")
    x = torch.randn(6, 12)
    torch.testing.assert_close(tc(x), torch.relu(x @ tc.W_enc + tc.b_enc) @ tc.W_dec + tc.b_dec)


def test_new_transcoders_start_as_documented():
    topk = Transcoder(TranscoderConfig(8, 8, 32, "topk", 4))
    relu = Transcoder(TranscoderConfig(8, 6, 32, "relu"))
    assert topk.W_dec.abs().sum() == 0                                       # zero decoder for TopK
    torch.testing.assert_close(relu.W_dec.norm(dim=1), torch.ones(32))      # unit rows for ReLU
    assert topk.W_enc.t().is_contiguous()                                    # feature-major storage
    with pytest.raises(MinisvError, match="0 < k <= d_sae"):
        TranscoderConfig(8, 8, 4, "topk", k=5)
    with pytest.raises(MinisvError, match="unknown transcoder architecture"):
        TranscoderConfig(8, 8, 4, "gated")


def test_save_and_load_in_a_fresh_process(tmp_path):
    tc = random_transcoder(skip=True)
    formats.save(tc, tmp_path / "tc")
    assert sorted(os.listdir(tmp_path / "tc")) == ["cfg.json", "transcoder.safetensors"]
    x = torch.randn(4, 12)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch; from minisv import formats; "
              "tc = formats.load(sys.argv[1]); torch.save((tc(torch.load(sys.argv[2])), tc.cfg.hook_in, tc.cfg.k), sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "tc"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    y, hook, k = torch.load(tmp_path / "y.pt")
    assert torch.equal(y, tc(x).detach()) and hook == "blocks.1.ln2.hook_normalized" and k == 5


def test_load_errors(tmp_path):
    with pytest.raises(MinisvError, match="not a transcoder directory"):
        formats.load(tmp_path)
    formats.save(random_transcoder(), tmp_path)
    cfg = (tmp_path / "cfg.json").read_text().replace('"d_sae": 40', '"d_sae": 41')
    (tmp_path / "cfg.json").write_text(cfg)
    with pytest.raises(MinisvError, match="W_enc has shape"):
        formats.load(tmp_path)


# ------------------------------------------------------------------------- released GPT-2 transcoders
@pytest.fixture
def released_config_class(monkeypatch):
    """A stand-in for the authors' `sae_training.config.LanguageModelSAERunnerConfig`, importable while saving."""
    package, module = types.ModuleType("sae_training"), types.ModuleType("sae_training.config")

    @dataclasses.dataclass
    class LanguageModelSAERunnerConfig:
        hook_point: str = "blocks.8.ln2.hook_normalized"
        out_hook_point: str = "blocks.8.hook_mlp_out"
        d_in: int = 16
        dtype: torch.dtype = torch.float32
        device: object = None

    LanguageModelSAERunnerConfig.__module__ = module.__name__
    LanguageModelSAERunnerConfig.__qualname__ = "LanguageModelSAERunnerConfig"
    module.LanguageModelSAERunnerConfig = LanguageModelSAERunnerConfig
    monkeypatch.setitem(sys.modules, "sae_training", package)
    monkeypatch.setitem(sys.modules, "sae_training.config", module)
    return LanguageModelSAERunnerConfig


def released_state_dict():
    torch.manual_seed(1)
    return collections.OrderedDict(W_enc=torch.randn(16, 64), b_enc=torch.randn(64), W_dec=torch.randn(64, 16),
                                   b_dec=torch.randn(16), b_dec_out=torch.randn(16))


def test_import_released_layout(tmp_path, released_config_class):
    sd = released_state_dict()
    path = tmp_path / "final_sparse_autoencoder_gpt2-small_blocks.8.ln2.hook_normalized_64.pt"
    torch.save({"cfg": released_config_class(device=torch.device("cpu")), "state_dict": sd}, path)
    tc = import_released(str(path))
    x = torch.randn(5, 16)
    reference = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]) @ sd["W_dec"] + sd["b_dec_out"]
    torch.testing.assert_close(tc(x), reference, rtol=1e-5, atol=1e-4)
    assert (tc.cfg.layer, tc.cfg.hook_in, tc.cfg.hook_out) == (8, "blocks.8.ln2.hook_normalized", "blocks.8.hook_mlp_out")
    assert tc.cfg.target_centered and tc.cfg.architecture == "relu"
    formats.save(tc, tmp_path / "converted")
    torch.testing.assert_close(formats.load(tmp_path / "converted")(x), reference, rtol=1e-5, atol=1e-4)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):          # unpickling this calls os.system("touch MARKER")
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"cfg": Payload(marker), "state_dict": released_state_dict()}, path)
    with pytest.raises(MinisvError, match="refusing to load this pickle: it calls (posix|os|nt).system"):
        import_released(str(path))
    assert not marker.exists()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(MinisvError, match="not a released transcoder"):
        import_released(str(tmp_path / "other.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(MinisvError, match="cannot read"):
        import_released(str(tmp_path / "garbage.pt"))
