"""The training losses against their hand-written formulas, on targets with a large mean (where mean-centring,
norms and signs all show): TopK FVU + AuxK, and the paper's ReLU loss."""
import pytest
import torch

from minisv.training import relu_loss, topk_loss
from minisv.transcoder import Transcoder, TranscoderConfig


def setup(arch, n=64, d_in=16, d_out=12, d_sae=48, k=5, seed=0):
    """A random transcoder and a batch whose targets have mean 4 per dimension and std ≈ 1."""
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(d_in, d_out, d_sae, arch, k))
    with torch.no_grad():
        tc.W_dec.normal_(0, 0.3)
        tc.b_dec.fill_(3.0)
    x, y = torch.randn(n, d_in), 4.0 + torch.randn(n, d_out)
    return tc, x, y


@torch.no_grad()
def dense(tc, x, k):
    """Pre-activations, the TopK code f and ŷ = f W_dec + b_dec, with plain dense torch."""
    pre = x @ tc.W_enc + tc.b_enc
    top = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return pre, f, f @ tc.W_dec + tc.b_dec


def fvu(target, prediction):
    return (target - prediction).pow(2).sum() / (target - target.mean(0)).pow(2).sum()


def test_topk_loss_is_the_fvu_of_the_batch():
    tc, x, y = setup("topk")
    loss, stats = topk_loss(tc, x, y, torch.zeros(48, dtype=torch.bool), k_aux=6, aux_coef=0.5)
    _, f, y_hat = dense(tc, x, 5)
    expected = fvu(y, y_hat)
    assert 0.1 < float(expected) < 10                        # against Σ‖y‖² it would be ~17× smaller
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["fvu"], expected, rtol=1e-5, atol=0)
    assert float(stats["l0"]) == pytest.approx(float((f > 0).sum(-1).float().mean()))


@pytest.mark.parametrize("n_dead", [3, 30])
def test_auxk_fits_the_error_with_the_most_active_dead_latents(n_dead):
    """AuxK = min(n_dead / k_aux, 1) · Σ‖ê − e‖² / Σ‖e − ē‖², with e = y − ŷ (the error the live latents leave) and
    ê the decoder rows (no b_dec) of the k_aux largest dead pre-activations, ReLU'd."""
    tc, x, y = setup("topk")
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    with torch.no_grad():
        tc.W_dec[dead] *= 10                                 # an ê as large as e: AuxK weighs in the loss
    k_aux, coef = 6, 0.5
    loss, _ = topk_loss(tc, x, y, dead, k_aux=k_aux, aux_coef=coef)
    pre, _, y_hat = dense(tc, x, 5)
    e = (y - y_hat).detach()
    top = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ tc.W_dec.detach()
    expected = fvu(y, y_hat) + coef * min(n_dead / k_aux, 1.0) * fvu(e, e_hat)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    flipped = fvu(y, y_hat) + coef * min(n_dead / k_aux, 1.0) * fvu(-e, e_hat)
    assert abs(float(flipped - expected)) > 0.05 * float(expected)      # the sign of e matters on this batch


def test_relu_loss_is_the_papers_normalized_mse_plus_l1():
    """mean over tokens and dimensions of (ŷ − y)² / ‖y‖ (the norm, not its square) + l1 · mean_tokens Σ_j f_j."""
    tc, x, y = setup("relu")
    l1 = 3e-3
    loss, stats = relu_loss(tc, x, y, torch.zeros(48, dtype=torch.bool), l1)
    with torch.no_grad():
        f = (x @ tc.W_enc + tc.b_enc).relu()
        y_hat = f @ tc.W_dec + tc.b_dec
    mse = ((y_hat - y).pow(2) / y.norm(dim=-1, keepdim=True)).mean()
    torch.testing.assert_close(loss.detach(), mse + l1 * f.sum(-1).mean(), rtol=1e-5, atol=0)
    assert y.norm(dim=-1).min() > 10                         # ‖y‖ and ‖y‖² differ by more than 10×
    torch.testing.assert_close(stats["fvu"], fvu(y, y_hat), rtol=1e-5, atol=0)


def test_fvu_denominator_survives_a_mean_far_above_the_spread():
    """Σ‖y − ȳ‖² from Σ‖y‖² − ‖Σy‖²/n cancels catastrophically in float32 when the mean dwarfs the spread; the
    loss must still be the FVU computed in float64 from centred targets."""
    tc, x, _ = setup("topk", n=512)
    y = 3000.0 + torch.randn(512, 12)
    loss, stats = topk_loss(tc, x, y, torch.zeros(48, dtype=torch.bool), k_aux=6, aux_coef=0.5)
    _, _, y_hat = dense(tc, x, 5)
    y64 = y.double()
    expected = (y64 - y_hat.double()).pow(2).sum() / (y64 - y64.mean(0)).pow(2).sum()
    torch.testing.assert_close(stats["fvu"].double(), expected, rtol=1e-4, atol=0)


def test_a_change_to_encode_reaches_the_training_loss_and_the_evaluation(monkeypatch):
    """The README's exercise 3 swaps TopK for BatchTopK in `Transcoder.encode`. Training's loss, the held-out FVU
    and the evaluation all go through the coder's own methods, so the swap must reach each of them: the loss is
    the FVU of the BatchTopK reconstruction, computed here densely by hand."""
    from minisv.evals import _reconstruction_stats, _Stats
    from minisv.training import held_out_fvu, TrainState
    tc, x, y = setup("topk")

    def batch_topk(self, x):      # the N·k largest pre-activations of the whole batch, as (values, indices) [N, d_sae]
        pre = self.preacts(x)
        keep = pre.flatten().topk(len(pre) * self.cfg.k).indices
        return torch.zeros_like(pre).flatten().scatter(0, keep, pre.flatten()[keep]).view_as(pre).relu(), None
    with torch.no_grad():
        pre = x @ tc.W_enc + tc.b_enc
        threshold = pre.flatten().topk(len(pre) * 5).values.min()
        f = torch.where(pre >= threshold, pre, 0).relu()
        expected = fvu(y, f @ tc.W_dec + tc.b_dec)
        assert (f > 0).sum(-1).float().std() > 0.5                  # tokens now have different numbers of latents
        assert abs(float(expected - fvu(y, dense(tc, x, 5)[2]))) > 0.01   # and the swap changes the FVU
    monkeypatch.setattr(Transcoder, "encode", batch_topk)
    loss, stats = topk_loss(tc, x, y, torch.zeros(48, dtype=torch.bool), k_aux=6, aux_coef=0.5)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    state = TrainState({0: tc}, None, {}, scale={0: (1.0, 1.0)})
    assert held_out_fvu(state, {0: (x, y)})["0"] == pytest.approx(float(expected), rel=1e-5)
    evaluation = {0: _Stats(48)}
    _reconstruction_stats({0: tc}, None, evaluation, {0: ("x", "y")}, {"x": x, "y": y}, torch.ones(64, dtype=bool))
    assert evaluation[0].result()["fvu"] == pytest.approx(float(expected), rel=1e-5)
