"""RTN and the integer grid, checked against plain per-group loops written here."""

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.primitives import compute_qparams, dequantize, group_count, quantize
from llmpress.quant.rtn import RTNConfig, rtn


def reference_rtn(W, bits, group, sym):
    """Per-row, per-group loops: the textbook definition (compressed-tensors conventions), in fp32."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = torch.empty_like(W)
    g = W.shape[1] if group == -1 else group
    zero = torch.tensor(0.0)
    for r in range(W.shape[0]):
        for c0 in range(0, W.shape[1], g):
            w = W[r, c0:c0 + g]
            lo, hi = torch.minimum(w.min(), zero), torch.maximum(w.max(), zero)
            if sym:
                s = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
                z = zero
            else:
                s = (hi - lo) / (qmax - qmin)
            s = s if s > 0 else torch.tensor(1.0)
            if not sym:
                z = torch.clamp(torch.round(qmin - lo / s), qmin, qmax)
            q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
            out[r, c0:c0 + g] = (q - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [64, 128, 50, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_loop_reference(bits, group, sym):
    torch.manual_seed(bits * 7 + group)
    W = torch.randn(12, 576) * torch.rand(12, 1)
    result = rtn(W, RTNConfig(bits=bits, group_size=group, sym=sym))
    ref = reference_rtn(W, bits, group, sym)
    assert torch.equal(result.weight, ref)
    # The codes and qparams reproduce the weight exactly.
    back = dequantize(result.qweight, result.scale, result.zero, None if group == -1 else group)
    assert torch.equal(back, result.weight)
    assert result.qweight.min() >= -(2 ** (bits - 1)) and result.qweight.max() <= 2 ** (bits - 1) - 1


def test_partial_last_group_has_its_own_scale():
    W = torch.randn(4, 576)
    W[:, 512:] *= 100  # the partial last group (64 of 128 columns) is much larger
    scale, _ = compute_qparams(W, 4, 128, True)
    assert scale.shape == (4, group_count(576, 128)) == (4, 5)
    assert torch.allclose(scale[:, 4], W[:, 512:].abs().amax(dim=1) / 7.5)
    assert (scale[:, 4] > 50 * scale[:, :4].max(dim=1).values).all()


def test_error_bounded_by_half_step_and_shrinks_with_bits():
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    errors = {}
    for bits in (3, 4, 8):
        r = rtn(W, RTNConfig(bits=bits, group_size=64))
        step = r.scale.repeat_interleave(64, dim=1)
        assert ((W - r.weight).abs() <= step / 2 + 1e-6).all()
        errors[bits] = (W - r.weight).pow(2).mean().item()
    assert errors[8] < errors[4] < errors[3]


def test_zero_stays_zero_and_all_zero_group_is_safe():
    W = torch.zeros(2, 128)
    W[0, :64] = torch.linspace(-1, 1, 64)
    for sym in (True, False):
        r = rtn(W, RTNConfig(bits=4, group_size=64, sym=sym))
        assert torch.isfinite(r.weight).all()
        assert (r.weight[W == 0] == 0).all()


def test_quantize_is_idempotent():
    W = torch.randn(8, 128)
    r1 = rtn(W, RTNConfig(bits=4, group_size=32, sym=False))
    r2 = rtn(r1.weight, RTNConfig(bits=4, group_size=32, sym=False))
    assert torch.allclose(r1.weight, r2.weight, atol=1e-6)
    scale, zero = compute_qparams(r1.weight, 4, 32, False)
    assert torch.equal(quantize(r1.weight, scale, zero, 4, 32), r1.qweight)


@pytest.mark.parametrize("kwargs, needle", [
    ({"bits": 1}, "bits=1 is out of range"),
    ({"bits": 9}, "bits=9 is out of range"),
    ({"bits": 4.0}, "bits=4.0 is out of range"),
    ({"group_size": 0}, "group_size=0 is invalid"),
    ({"group_size": -2}, "group_size=-2 is invalid"),
])
def test_rtn_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(LlmpressError, match=needle):
        RTNConfig(**kwargs)
