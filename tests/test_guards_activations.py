"""Which model training activations come from, where bf16 is fast: a bf16 copy only of a *float32* model. A
float16 model (or a bf16 one) is harvested as it is: copying float16 to bf16 would throw away 3 bits of mantissa
for nothing. Oracle: the dtype of what is harvested, and that it is bit for bit the model's own float16 forward."""
import pytest
import torch

import minisv
from minisv import activations
from minisv.activations import ActivationStream, harvest, harvester
from minisv.transcoder import mlp_hooks


@pytest.mark.parametrize("dtype, harvested", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.bfloat16)])
def test_only_a_float32_model_is_harvested_through_a_bf16_copy(tiny, monkeypatch, dtype, harvested):
    _, path, _ = tiny
    monkeypatch.setattr(activations, "fast_bf16", lambda device: True)
    model = minisv.load(str(path), device="cpu", dtype=dtype)
    source = harvester(model)
    assert source.embed.weight.dtype == harvested
    assert (source is model) == (dtype != torch.float32)
    assert harvester(model, amp=False) is model
    rows = torch.randint(2, 96, (4, 8), generator=torch.Generator().manual_seed(0))
    hooks = {1: mlp_hooks(1)}
    stream = ActivationStream(source, rows, hooks, batch_tokens=8, buffer_tokens=32, seed=0)
    _, _, batch = next(stream.batches())
    x, y = batch[1]
    assert x.dtype == y.dtype == harvested
    if dtype == torch.float16:      # the very activations of the float16 model, no round trip through bf16
        direct = harvest(model, rows, hooks)[1]
        pool = {tuple(v.tolist()) for v in direct[1].flatten(0, 1)}
        assert all(tuple(v.tolist()) in pool for v in y)
