"""Magnitude pruning: exact sparsity, and the kept weights are the largest ones."""

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.prune.magnitude import MagnitudeConfig, magnitude


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_layer_scope_exact_count_and_threshold(sparsity):
    torch.manual_seed(1)
    W = torch.randn(33, 70)
    r = magnitude(W, MagnitudeConfig(sparsity=sparsity))
    k = int(W.numel() * sparsity)
    assert int((~r.mask).sum()) == k
    assert torch.equal(r.weight, W * r.mask)
    if 0 < k < W.numel():
        assert W[~r.mask].abs().max() <= W[r.mask].abs().min()
    assert r.sparsity.fraction == pytest.approx(k / W.numel())


def test_row_scope_exact_per_row():
    torch.manual_seed(2)
    W = torch.randn(10, 64) * torch.arange(1, 11).unsqueeze(1)  # rows of very different scale
    r = magnitude(W, MagnitudeConfig(sparsity=0.25, scope="row"))
    assert ((~r.mask).sum(dim=1) == 16).all()
    layer = magnitude(W, MagnitudeConfig(sparsity=0.25))
    assert (~layer.mask[0]).sum() > 16  # layer scope prunes the small-scale row harder


def test_ties_still_give_exact_sparsity():
    W = torch.ones(4, 8)
    r = magnitude(W, MagnitudeConfig(sparsity=0.5))
    assert int((~r.mask).sum()) == 16


@pytest.mark.parametrize("kwargs, needle", [
    ({"sparsity": 1.0}, "sparsity=1.0 is out of range"),
    ({"sparsity": -0.1}, "sparsity=-0.1 is out of range"),
    ({"sparsity": "half"}, "sparsity='half' is out of range"),
    ({"scope": "block"}, "scope='block' is invalid"),
])
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(LlmpressError, match=needle):
        MagnitudeConfig(**kwargs)
