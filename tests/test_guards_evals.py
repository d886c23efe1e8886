"""evaluate()'s firing statistics that the other tests leave open, against a hand count on activations cached by
the model: the dense fraction (latents firing on more than 10% of the non-BOS tokens), the frequency histogram
per decade, and the L0 of a ReLU transcoder."""
import pytest
import torch

import minisv
from minisv.evals import evaluate
from minisv.transcoder import Transcoder, TranscoderConfig, mlp_hooks

BOS = 0


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_dense_dead_and_histogram_match_a_hand_count(tiny, arch):
    _, path, _ = tiny
    model = minisv.load(str(path), device="cpu")
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(32, 32, 64, arch, 6, layer=1))
    with torch.no_grad():                       # encoder biases spread the firing rates over several decades
        tc.W_enc.normal_(0, 0.3)
        tc.b_enc.copy_(torch.linspace(-3, 0.5, 64))
    rows = torch.randint(2, 96, (12, 16), generator=torch.Generator().manual_seed(1))
    rows[:, 0] = BOS
    m = evaluate(model, rows, {1: tc}, bos_id=BOS, batch_rows=5)["layer_1"]
    _, cache = model.run_with_cache(rows, names=[mlp_hooks(1)[0]])
    with torch.no_grad():
        f = tc.dense(*tc.encode(cache[mlp_hooks(1)[0]][rows != BOS]))                  # [tokens, d_sae]
    freq = (f > 0).double().mean(0)
    assert ((freq > 0.01) & (freq <= 0.1)).any() and (freq > 0.1).any()    # the 10% threshold is exercised
    assert m["dense"] == pytest.approx(float((freq > 0.1).double().mean()))
    assert m["dead"] == pytest.approx(float((freq == 0).double().mean()))
    assert m["l0"] == pytest.approx(float((f > 0).sum(-1).double().mean()))
    live = freq[freq > 0]
    counts = [int(((live >= 10.0 ** e) & (live < 10.0 ** (e + 1))).sum()) for e in range(-8, 0)]
    counts[-1] += int((live == 1).sum())
    assert m["freq_histogram"]["counts"] == counts
