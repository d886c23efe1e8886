"""A control vector that is not finite is never written: llama.cpp would add its NaN to every position without a
word. The oracle is the file system (nothing at the path) and the hand-written message."""
import math

import pytest
import torch
from helpers import refused

import minisv
from minisv.control_vector import save_control_vector


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_vector_that_is_not_finite_is_never_saved(tiny_one, tmp_path, bad):
    model = minisv.load(str(tiny_one[1]), device="cpu")
    v = torch.ones(model.cfg.d_model)
    v[3] = bad
    refused("must be 32 finite numbers .* with NaN or infinite values", save_control_vector, model, v, 2,
            tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists() and list(tmp_path.iterdir()) == []
    save_control_vector(model, torch.ones(model.cfg.d_model), 2, tmp_path / "v.gguf")   # a finite one is
    assert (tmp_path / "v.gguf").exists()
