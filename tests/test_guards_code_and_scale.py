"""Views the mutation run (tests/bench/mutate.py) found open, each against an analytic oracle:

- configs refuse a zero size, whichever size it is (a `max` for `min` in the check went unnoticed);
- `fired` counts a latent only where its value is positive: TopK keeps k latents per token, but a kept latent
  whose ReLU'd value is 0 did not fire;
- the JumpReLU CLT loss carries the sparsity penalty λ · mean over tokens of Σ tanh(c · ‖W_dec‖ · a), with ‖W_dec‖
  a feature's norm over every decoder it has, written out by loops over `decoder(source, feature, target)`;
- the exact norm pullback s·(P u − x̃(x̃·u)) applies per row to a batch u, r [n, D] with n ≠ D: compared with
  autograd's vector-Jacobian product of x̂ = s·P r, row by row."""
import pytest
import torch

import minisv
from minisv.clt import CLTConfig, CrossLayerTranscoder
from minisv.errors import MinisvError
from minisv.pullbacks import centered, norm_scale, through_scale
from minisv.training import TrainConfig, clt_loss
from minisv.transcoder import Transcoder, TranscoderConfig


@pytest.mark.parametrize("zero", range(3))
def test_configs_refuse_any_zero_size(zero):
    sizes = [8, 8, 16]
    sizes[zero] = 0
    with pytest.raises(MinisvError):
        TranscoderConfig(*sizes, "topk", 4)
    with pytest.raises(MinisvError):
        CLTConfig(*sizes)


def test_fired_counts_positive_values_only():
    tc = Transcoder(TranscoderConfig(4, 4, 8, "topk", 3))
    values = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.0, 0.0]])
    indices = torch.tensor([[3, 5, 7], [3, 1, 2]])
    assert tc.fired(values, indices).tolist() == [0, 0, 0, 2, 0, 0, 0, 1]
    clt = CrossLayerTranscoder(CLTConfig(2, 4, 8, k=2))
    values = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])                  # [N=1, L=2, k=2]
    indices = torch.tensor([[[6, 2], [2, 4]]])
    expected = torch.zeros(2, 8)
    expected[0, 6], expected[1, 4] = 1, 1
    assert torch.equal(clt.fired(values, indices), expected)


@pytest.mark.parametrize("window", [0, 1, 2])
def test_jumprelu_loss_carries_the_tanh_sparsity_penalty(window):
    torch.manual_seed(0)
    L, d, F = 3, 4, 5
    clt = CrossLayerTranscoder(CLTConfig(L, d, F, "jumprelu", window=window))
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.5)
    x, y = torch.randn(6, L, d), torch.randn(6, L, d)
    dead = torch.zeros(L, F, dtype=torch.bool)
    cfg = dict(layers=list(range(L)), d_sae=F, architecture="jumprelu", sparsity_c=4.0)
    with torch.no_grad():
        without, _ = clt_loss(clt, x, y, dead, TrainConfig(**cfg, sparsity=0.0))
        with_, _ = clt_loss(clt, x, y, dead, TrainConfig(**cfg, sparsity=0.3))
        a = clt.dense(*clt.encode(x))                                  # [N, L, F]
        penalty = 0.0
        for s in range(L):
            for f in range(F):
                norm = sum(clt.decoder(s, f, t).pow(2).sum() for t in range(s, L)).sqrt()
                penalty += torch.tanh(4.0 * norm * a[:, s, f]).sum()
    assert float(a.gt(0).sum()) > 0
    assert float(with_ - without) == pytest.approx(0.3 * float(penalty) / len(x), rel=1e-4)


def test_exact_norm_pullback_of_a_batch_is_the_vector_jacobian_product(tiny):
    family, path, _ = tiny
    model = minisv.load(str(path), device="cpu")
    torch.manual_seed(0)
    D = model.cfg.d_model
    r, u = torch.randn(D + 3, D, dtype=torch.float64), torch.randn(D + 3, D, dtype=torch.float64)
    got = through_scale(model, u, r, exact=True)
    for i in range(len(r)):
        ri = r[i].clone().requires_grad_()
        x_hat = centered(model, ri) * norm_scale(model, ri)
        (grad,) = torch.autograd.grad(x_hat @ u[i], ri)
        torch.testing.assert_close(got[i], grad, rtol=1e-6, atol=1e-9)
