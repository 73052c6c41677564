"""LoRA / QLoRA adapters: exact start, exact merges, merges on the base grid, and the "lora" student."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmpress.distill.lora import LoRALinear, add_lora, merge_lora
from llmpress.distill.trainable import prepare_student
from llmpress.errors import LlmpressError
from llmpress.primitives import dequantize
from llmpress.quant.qlinear import QuantizedLinear
from llmpress.quant.rtn import RTNConfig, rtn
from test_qat import MIXED, compressed_tiny, reference_codes
from tiny_models import random_ids, tiny_model


def _perturb(lora: LoRALinear, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=generator) * 0.05)


def _qlinear(sym=False, bits=3, group=16, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(48, 10)
    result = rtn(linear.weight.detach(), RTNConfig(bits=bits, group_size=group, sym=sym))
    with torch.no_grad():
        linear.weight.copy_(result.weight)
    return linear, result, QuantizedLinear.from_compressed(linear, result)


def test_lora_starts_equal_to_base_and_merges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(40, 12)
    x = torch.randn(5, 40)
    expected = base(x)
    lora = LoRALinear(base, rank=4, alpha=8.0)
    assert torch.equal(lora(x), expected)
    assert not any(p.requires_grad for p in base.parameters())
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    _perturb(lora)
    y = lora(x)
    reference = x @ (base.weight + 2.0 * lora.lora_B @ lora.lora_A).T + base.bias  # alpha / rank = 2
    assert torch.allclose(y, reference, atol=1e-5)
    merged = lora.merged()
    assert type(merged) is nn.Linear and merged.bias is base.bias
    assert torch.allclose(merged(x), y, atol=1e-5)
    with pytest.raises(LlmpressError, match="requantize"):
        lora.merged("requantize")


def test_masked_lora_keeps_pruned_weights_zero_and_merges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(32, 8)
    mask = torch.rand(8, 32) > 0.5
    with torch.no_grad():
        base.weight.mul_(mask)
    lora = LoRALinear(base, rank=2, alpha=2.0, mask=mask)
    _perturb(lora)
    x = torch.randn(4, 32)
    reference = x @ (base.weight + (lora.lora_B @ lora.lora_A) * mask).T + base.bias
    assert torch.allclose(lora(x), reference, atol=1e-5)
    merged = lora.merged()
    assert (merged.weight[~mask] == 0).all()
    assert torch.allclose(merged(x), lora(x), atol=1e-5)


def test_lora_over_conv1d():
    torch.manual_seed(0)
    conv = Conv1D(8, 16)
    nn.init.normal_(conv.weight, std=0.2)
    lora = LoRALinear(conv, rank=2)
    _perturb(lora)
    x = torch.randn(3, 16)
    merged = lora.merged()
    assert isinstance(merged, Conv1D) and torch.allclose(merged(x), lora(x), atol=1e-5)


@pytest.mark.parametrize("sym", [True, False])
def test_qlora_merge_lands_on_the_base_grid(sym):
    linear, result, qlinear = _qlinear(sym)
    x = torch.randn(6, 48)
    lora = LoRALinear(qlinear, rank=4, alpha=16.0)
    assert torch.equal(lora(x), linear(x))  # starts at the quantized layer, exactly
    _perturb(lora, seed=1)
    new = lora.requantized()
    assert torch.equal(new.scale, result.scale) and torch.equal(new.zero, result.zero)
    merged_w = (linear.weight + 4.0 * lora.lora_B @ lora.lora_A).detach()
    assert torch.equal(new.qweight.long(), reference_codes(merged_w, result.scale, result.zero, 3, 16))
    assert not torch.equal(new.qweight, result.qweight)
    packed = lora.merged("requantize")
    dense = lora.merged("dense")
    assert isinstance(packed, QuantizedLinear) and type(dense) is nn.Linear
    on_grid = dequantize(new.qweight, new.scale, new.zero, 16)
    assert torch.equal(packed.dequantized_weight(), on_grid) and torch.equal(dense.weight, on_grid)
    assert torch.equal(lora.merged().dequantized_weight(), on_grid)  # auto = requantize
    assert torch.allclose(lora.merged("float").weight, merged_w, atol=1e-6)


def test_add_and_merge_lora_on_a_model():
    model = tiny_model("llama")
    ids = random_ids(2, 10)
    with torch.no_grad():
        before = model(ids).logits
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert add_lora(model, names, rank=4, alpha=4.0) == names
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        for i, name in enumerate(names):
            _perturb(model.get_submodule(name), seed=i)
        adapted = model(ids).logits
    assert not torch.allclose(adapted, before, atol=1e-3)
    with pytest.raises(LlmpressError, match="already"):
        add_lora(model, names[:1])
    assert merge_lora(model) == names
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, adapted, atol=1e-4)


def test_lora_student_qlora_and_masks():
    model, arch, layers, results = compressed_tiny(MIXED)
    ids = random_ids(2, 12)
    with torch.no_grad():
        before = model(ids).logits
    student = prepare_student(model, arch, layers, results, "lora", lora_rank=2, lora_alpha=4.0)
    assert set(student.lora) == set(layers)
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n, p in model.named_parameters() if p.requires_grad)
    assert len(student.params) == 2 * len(layers)
    quantized = {n for n, m in layers.items() if m.get("bits")}
    assert {n for n, m in student.lora.items() if isinstance(m.base, QuantizedLinear)} == quantized
    assert all(student.lora[n].mask is not None for n in student.masks)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
        for i, module in enumerate(student.lora.values()):
            _perturb(module, seed=i)
        adapted = model(ids).logits
    assert not torch.allclose(adapted, before, atol=1e-3)
    old_codes = {n: results[n].qweight.clone() for n in quantized}
    expected = {}  # the merged weight; on the grid for quantized layers (plain per-element rounding)
    for name, module in student.lora.items():
        merged = module.base.weight + (module.lora_B @ module.lora_A).detach() * 2.0 \
            if name not in quantized else module.merged_weight()
        if name in student.masks:
            merged = merged * student.masks[name]
        if name in quantized:
            r = results[name]
            merged = dequantize(reference_codes(merged, r.scale, r.zero, 4, 32), r.scale, r.zero, 32)
        expected[name] = merged.detach()
    updates = student.finalize(results)
    assert {updates[n]["distilled"] for n in quantized} == {"qlora"}
    assert {updates[n]["distilled"] for n in layers if n not in quantized} == {"lora"}
    for name in quantized:
        module, result = model.get_submodule(name), results[name]
        assert type(module) is nn.Linear
        assert torch.equal(module.weight, dequantize(result.qweight, result.scale, result.zero, 32))
        assert torch.equal(module.weight, expected[name])
        assert not torch.equal(result.qweight, old_codes[name])
    for name in layers:
        assert torch.allclose(model.get_submodule(name).weight, expected[name], atol=1e-6)
    for name, mask in student.masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all()
    assert all(p.requires_grad for p in model.parameters())
