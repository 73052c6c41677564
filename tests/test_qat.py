"""QAT on a fixed grid, and the "all" student (masks kept, quantized layers wrapped), on tiny models."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmpress.compressed import Compressed
from llmpress.distill.qat import QATLinear, fake_quantize_ste
from llmpress.distill.trainable import prepare_student
from llmpress.engine import compress_blocks
from llmpress.errors import LlmpressError
from llmpress.models.archs import arch_for
from llmpress.primitives import compute_qparams, dequantize, quantize
from llmpress.quant.qlinear import QuantizedLinear
from llmpress.quant.rtn import RTNConfig, rtn
from llmpress.recipe import Recipe
from tiny_models import random_ids, tiny_model


def reference_codes(W, scale, zero, bits, group):
    """Plain per-element rounding onto the grid (compressed-tensors conventions)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.empty(W.shape, dtype=torch.int64)
    g = W.shape[1] if group == -1 else group
    for r in range(W.shape[0]):
        for c in range(W.shape[1]):
            s, z = float(scale[r, c // g]), float(zero[r, c // g])
            q[r, c] = int(min(max(round(float(W[r, c]) / s) + z, qmin), qmax))
    return q


@pytest.mark.parametrize("bits,group,sym,cols", [(4, 16, True, 50), (4, 16, True, 64), (3, 20, False, 50),
                                                  (3, 8, False, 64), (2, -1, True, 50), (8, 32, False, 64)])
def test_fake_quant_equals_primitives_and_ste_passes_gradient(bits, group, sym, cols):
    torch.manual_seed(bits + cols)
    grid_of = torch.randn(6, cols)
    scale, zero = compute_qparams(grid_of, bits, None if group == -1 else group, sym)
    W = (1.5 * torch.randn(6, cols)).requires_grad_(True)  # wider than the grid: some codes clamp
    out = fake_quantize_ste(W, scale, zero, bits, group, sym)
    g = None if group == -1 else group
    assert torch.equal(out, dequantize(quantize(W.detach(), scale, zero, bits, g), scale, zero, g))
    codes = reference_codes(W.detach(), scale, zero, bits, group)
    assert torch.equal(quantize(W.detach(), scale, zero, bits, g).long(), codes)
    upstream = torch.randn(6, cols)
    (out * upstream).sum().backward()
    assert torch.equal(W.grad, upstream)  # straight through, everywhere
    # Clipped STE: zero gradient where the unrounded code leaves [qmin, qmax].
    W.grad = None
    (fake_quantize_ste(W, scale, zero, bits, group, sym, clipped=True) * upstream).sum().backward()
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    step = scale.repeat_interleave(cols if g is None else g, dim=1)[:, :cols]
    shift = zero.repeat_interleave(cols if g is None else g, dim=1)[:, :cols]
    raw = torch.round(W.detach() / step) + shift
    inside = (raw >= qmin) & (raw <= qmax)
    assert 0 < int(inside.sum()) < inside.numel()
    assert torch.equal(W.grad, upstream * inside)


def test_fake_quant_is_bit_exact_on_real_sized_weights():
    torch.manual_seed(0)
    for shape, group in (((96, 576), 64), ((64, 1536), 64), ((32, 576), 128)):
        W = torch.randn(shape) * 0.02
        scale, zero = compute_qparams(W * 0.9, 4, group, False)
        expected = dequantize(quantize(W, scale, zero, 4, group), scale, zero, group)
        assert torch.equal(fake_quantize_ste(W, scale, zero, 4, group, False), expected)
        low = W.bfloat16()
        expected = dequantize(quantize(low, scale, zero, 4, group), scale, zero, group).bfloat16()
        assert torch.equal(fake_quantize_ste(low, scale, zero, 4, group, False), expected)


def test_fake_quant_rejects_a_grid_of_the_wrong_shape():
    scale = torch.ones(4, 3)
    with pytest.raises(ValueError, match="do not fit"):
        fake_quantize_ste(torch.randn(4, 64), scale, torch.zeros_like(scale), 4, 16)


def _quantized_linear(bits=4, group=16, sym=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(48, 8)
    result = rtn(linear.weight.detach(), RTNConfig(bits=bits, group_size=group, sym=sym))
    with torch.no_grad():
        linear.weight.copy_(result.weight)
    return linear, result


@pytest.mark.parametrize("sym", [True, False])
def test_qat_trains_and_finalize_lands_on_the_same_grid(sym):
    bits, group = 3, 16
    linear, result = _quantized_linear(bits, group, sym)
    meta = result.record()
    qat = QATLinear.from_linear(linear, result, meta)
    x = torch.randn(32, 48)
    assert torch.equal(qat(x), linear(x))  # starts exactly at the quantized layer
    target = torch.randn(32, 8)
    opt = torch.optim.Adam([qat.weight], lr=0.02)
    for _ in range(30):
        opt.zero_grad()
        loss = (qat(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        qat.clamp_to_grid_()
    start = (linear(x) - target).pow(2).mean()
    module, new = qat.finalize()
    assert isinstance(module, nn.Linear) and module.bias is linear.bias
    assert torch.equal(new.scale, result.scale) and torch.equal(new.zero, result.zero)
    assert new.record() == meta and new.weight is None
    assert new.qweight.dtype == torch.int8
    assert int(new.qweight.min()) >= -(2 ** (bits - 1)) and int(new.qweight.max()) <= 2 ** (bits - 1) - 1
    assert torch.equal(new.qweight.long(), reference_codes(qat.weight.detach(), result.scale, result.zero, bits, group))
    assert not torch.equal(new.qweight, result.qweight)  # training moved some codes
    assert torch.equal(module.weight, dequantize(new.qweight, new.scale, new.zero, group))
    assert (module(x) - target).pow(2).mean() < start
    # The new codes pack into a QuantizedLinear computing the same layer.
    packed = QuantizedLinear.from_compressed(module, new, meta)
    assert torch.equal(packed.dequantized_weight(), module.weight)


def test_clamp_to_grid_keeps_the_latent_weight_in_range():
    linear, result = _quantized_linear(4, 16, False)
    qat = QATLinear.from_linear(linear, result)
    with torch.no_grad():
        qat.weight.mul_(10)
    qat.clamp_to_grid_()
    low = dequantize(torch.full_like(result.qweight, -8), result.scale, result.zero, 16)
    high = dequantize(torch.full_like(result.qweight, 7), result.scale, result.zero, 16)
    assert ((qat.weight >= low) & (qat.weight <= high)).all()
    assert ((qat.weight == low) | (qat.weight == high)).float().mean() > 0.5
    _, new = qat.finalize()
    assert torch.equal(new.qweight, quantize(qat.weight.detach(), result.scale, result.zero, 4, 16))


def test_qat_from_conv1d_keeps_its_layout():
    torch.manual_seed(0)
    conv = Conv1D(8, 32)  # in 32, out 8; weight (32, 8)
    nn.init.normal_(conv.weight, std=0.2)
    result = rtn(conv.weight.detach().t(), RTNConfig(bits=4, group_size=16))
    with torch.no_grad():
        conv.weight.copy_(result.weight.t())
    qat = QATLinear.from_linear(conv, result)
    x = torch.randn(3, 32)
    assert torch.allclose(qat(x), conv(x), atol=1e-6)
    module, new = qat.finalize()
    assert isinstance(module, Conv1D) and torch.equal(module.weight, conv.weight)
    assert torch.equal(new.qweight, result.qweight)


def test_from_linear_rejects_unquantized_or_mismatched():
    linear, result = _quantized_linear()
    with pytest.raises(LlmpressError):
        QATLinear.from_linear(linear, Compressed(weight=linear.weight, meta={}))
    with pytest.raises(LlmpressError, match="do not fit"):
        QATLinear.from_linear(nn.Linear(40, 8), result)


def compressed_tiny(stages, seed=0):
    """A tiny llama compressed by ``stages`` (no calibration), with its layers meta and results."""
    model = tiny_model("llama", seed=seed)
    arch = arch_for(model)
    results: dict = {}
    layers = compress_blocks(model, arch, list(Recipe.from_dict({"stages": stages}).stages), None,
                             results=results)
    return model, arch, layers, results


MIXED = [{"method": "magnitude", "targets": ["*.mlp.*"], "args": {"sparsity": 0.5}},
         {"method": "rtn", "targets": ["*.self_attn.*", "*.mlp.down_proj"], "args": {"bits": 4, "group_size": 32}}]


def test_prepare_student_all_freezes_the_right_things_and_keeps_masks():
    model, arch, layers, results = compressed_tiny(MIXED)
    ids = random_ids(2, 12)
    with torch.no_grad():
        before = model(ids).logits
    student = prepare_student(model, arch, layers, results, "all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in student.params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(n.startswith(("model.embed_tokens", "lm_head", "model.norm.")) for n in trainable)
    quantized = {n for n, m in layers.items() if m.get("bits")}
    pruned = {n for n, m in layers.items() if m.get("sparsity")}
    assert set(student.qat) == quantized and set(student.masks) == pruned
    assert "model.layers.1.mlp.down_proj" in quantized & pruned  # pruned then quantized: QAT and masked
    for name in layers:
        assert f"{name}.weight" in trainable
    assert "model.layers.0.input_layernorm.weight" in trainable
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # wrapping changes nothing
    # One step of a wild update, then after_step: pruned weights are zero again.
    model(ids).logits.float().pow(2).mean().backward()
    with torch.no_grad():
        for p in student.params:
            p.add_(torch.randn_like(p) * 0.05 - 0.1 * p.grad.sign())
    student.after_step()
    for name, mask in student.masks.items():
        module = model.get_submodule(name)
        assert (module.weight[~mask] == 0).all()
    updates = student.finalize(results)
    assert {m["distilled"] for n, m in updates.items() if n in quantized} == {"qat"}
    assert {m["distilled"] for n, m in updates.items() if n not in quantized} == {"full"}
    for name in quantized:
        module, result = model.get_submodule(name), results[name]
        assert type(module) is nn.Linear
        g = layers[name]["group_size"]
        assert torch.equal(module.weight, dequantize(result.qweight, result.scale, result.zero, g))
    for name, mask in student.masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all()
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_prepare_student_norms_and_errors():
    model, arch, layers, results = compressed_tiny(MIXED)
    student = prepare_student(model, arch, layers, results, "norms")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("layernorm" in n for n in names)  # llama linears have no biases
    assert not student.qat and not student.lora
    with pytest.raises(LlmpressError, match="trainable"):
        prepare_student(model, arch, layers, results, "everything")
    with pytest.raises(LlmpressError, match="no integer codes"):
        prepare_student(model, arch, layers, {}, "all")


@pytest.mark.parametrize("group", [16, 24, -1])
def test_qat_on_float_zero_grid_starts_and_ends_on_hqq_codes(group):
    """HQQ's zero points are floats: QAT must round as round(W/s + z), so an untrained layer reproduces
    HQQ's weight exactly and finalizes to HQQ's own codes (round(W/s) + z would leave fractional codes)."""
    from llmpress.quant.hqq import HQQConfig, hqq

    W = torch.randn(8, 48, generator=torch.Generator().manual_seed(3)) * 0.02
    result = hqq(W, HQQConfig(bits=3, group_size=group))
    assert not torch.equal(result.zero, result.zero.round())  # the case this test is about
    layer = nn.Linear(48, 8, bias=False)
    qat = QATLinear.from_linear(layer, result)
    assert torch.equal(qat.quantized_weight().detach(), result.weight)
    module, new = qat.finalize()
    assert torch.equal(new.qweight, result.qweight)
    assert torch.equal(module.weight.detach(), result.weight)
