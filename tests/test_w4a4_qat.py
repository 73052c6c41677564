"""Quantization-aware training of W4A4 layers (weights and per-token activations fake-quantized, LLM-QAT),
and the online Hadamard of a rotated linear surviving every training wrapper (QAT, LoRA) and its removal.

Oracles: a W4A4 layer's QAT forward and gradients against a token-by-token loop; a student prepared and
finalized without a step gives back the same function (the wrappers lose no transform); trained codes are
the grid's rounding of the trained latent weight, on the scales GPTQ chose; the training KV cache gives the
evaluation cache's logits, with gradients."""

import copy

import pytest
import torch

from llmpress import compress, load_model
from llmpress.distill.qat import QATLinear
from llmpress.distill.trainable import prepare_student
from llmpress.errors import LlmpressError
from llmpress.models.archs import arch_for
from llmpress.primitives import dequantize, quantize
from llmpress.quant.kvcache import kv_cache_factory, training_kv_cache
from llmpress.quant.kvgrid import KVCacheConfig
from llmpress.quant.w4a4 import W4A4Linear
from llmpress.recipe import load_recipe
from llmpress.registry import builtin_recipes
from llmpress.rotate.online import _factors, hadamard_transform, has_input_hadamard
from tiny_models import random_ids, tiny_model

ROTATED = ("mlp.down_proj", "self_attn.o_proj")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def _fake_act(x, bits, clip):
    """Per-token symmetric quantize/dequantize, one token at a time."""
    out = torch.empty_like(x)
    qmax = 2 ** (bits - 1) - 1
    for t in range(x.shape[0]):
        scale = clip * float(x[t].abs().max()) / ((2 ** bits - 1) / 2)
        out[t] = torch.clamp(torch.round(x[t] / scale), -qmax - 1, qmax) * scale
    return out


def test_qat_of_a_w4a4_layer_is_its_forward_with_straight_through_gradients():
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(6, 32, generator=g), torch.randn(6, generator=g)
    layer = W4A4Linear.from_float(W, b, bits=4, group_size=16, act_bits=4, act_clip=0.9)
    qat = QATLinear.from_w4a4(layer)
    x = torch.randn(5, 32, generator=g, requires_grad=True)
    y = qat(x)
    Wq, xq = layer.dequantized_weight(), _fake_act(x.detach(), 4, 0.9)
    assert torch.allclose(y.detach(), xq @ Wq.T + b, atol=1e-5)
    assert torch.allclose(y.detach(), layer(x.detach()), atol=1e-5)
    upstream = torch.randn(5, 6, generator=g)
    y.backward(upstream)
    assert torch.allclose(x.grad, upstream @ Wq, atol=1e-5)  # both roundings pass the gradient straight
    assert torch.allclose(qat.weight.grad, upstream.T @ xq, atol=1e-5)
    same, result = qat.finalize()
    assert isinstance(same, W4A4Linear) and same.act_clip == 0.9 and same.group_size == 16
    assert torch.equal(same.weight, layer.weight) and torch.equal(same.weight_scale, layer.weight_scale)
    assert result.grid.act_bits == 4 and torch.equal(result.qweight, layer.weight)
    with torch.no_grad():  # move some latent weights by more than half a step: their codes follow
        qat.weight[0, :8] += 0.6 * layer.weight_scale[0, 0]
        qat.clamp_to_grid_()
    moved, result = qat.finalize()
    zero = torch.zeros_like(layer.weight_scale)
    assert torch.equal(moved.weight, quantize(qat.weight.detach(), layer.weight_scale, zero, 4, 16))
    assert int((moved.weight != layer.weight).sum()) > 0 and torch.equal(result.qweight, moved.weight)


def _tiny(calib, recipe):
    tok, data = calib
    model = tiny_model("llama", seed=3, vocab_size=len(tok), tie_word_embeddings=True)
    return compress(model, recipe, tokenizer=tok, data=data, samples=4, seq_len=32)


@pytest.mark.parametrize("recipe, rotated", [("rotate(online=true)+gptq-w4a4-g64", ROTATED),
                                             ("rotate+gptq-w4a4-g64", "_proj")])  # residual=false: every linear
def test_a_prepared_and_finalized_w4a4_student_is_the_same_model(calib, recipe, rotated):
    result = _tiny(calib, recipe)
    ids = random_ids(2, 16, seed=4)
    before = _logits(result.model, ids)
    student = prepare_student(result.model, arch_for(result.model), result.layers, result.results, "all")
    assert len(student.qat) == 14 and all(type(m) is QATLinear and m.act_bits == 4 for m in student.qat.values())
    for name, module in student.qat.items():
        assert has_input_hadamard(module) == name.endswith(rotated)
    assert torch.allclose(_logits(result.model, ids), before, atol=1e-4)
    student.finalize(result.results)
    assert torch.equal(_logits(result.model, ids), before)
    for name, module in result.model.named_modules():
        if isinstance(module, W4A4Linear):
            assert has_input_hadamard(module) == name.endswith(rotated)


def test_distill_trains_w4a4_codes_on_gptqs_scales_and_the_folder_reloads(calib, tmp_path):
    tok, data = calib
    plain = _tiny(calib, "rotate+gptq-w4a4-g64")
    stage = {"method": "distill", "args": {"steps": 4, "lr": 1e-2, "samples": 8, "seq_len": 32, "data": data,
                                           "batch_size": 2, "dtype": "float32", "warmup": 0, "qat_lr_scale": 3.0}}
    recipe = builtin_recipes()["rotate+gptq-w4a4-g64"]
    model = tiny_model("llama", seed=3, vocab_size=len(tok), tie_word_embeddings=True)
    result = compress(model, {**recipe, "stages": [*recipe["stages"], stage]}, tokenizer=tok, data=data, samples=4,
                      seq_len=32, out=tmp_path / "q")
    changed = 0
    for name, meta in result.layers.items():
        module = result.model.get_submodule(name)
        assert isinstance(module, W4A4Linear) and meta["distilled"] == "qat" and meta["act_bits"] == 4
        assert has_input_hadamard(module)  # residual=false: every linear's input is rotated online
        before = plain.model.get_submodule(name)
        assert torch.equal(module.weight_scale, before.weight_scale) and module.act_clip == before.act_clip
        zero = torch.zeros_like(module.weight_scale)
        assert torch.equal(module.dequantized_weight(), dequantize(module.weight, module.weight_scale, zero, 64))
        assert torch.equal(result.results[name].qweight, module.weight)
        changed += int((module.weight != before.weight).sum())
    assert changed > 0
    ids = random_ids(2, 16, seed=4)
    reloaded = load_model(tmp_path / "q")
    reloaded.model.set_attn_implementation("eager")
    result.model.set_attn_implementation("eager")
    assert torch.equal(_logits(reloaded.model, ids), _logits(result.model, ids))


def test_qat_and_lora_keep_a_rotated_linears_online_hadamard(calib):
    result = _tiny(calib, "rotate(online=true)+gptq-w4-g64")
    ids = random_ids(2, 16, seed=4)
    before = _logits(result.model, ids)
    for train in ("all", "lora"):
        model, results = copy.deepcopy(result.model), copy.deepcopy(result.results)
        student = prepare_student(model, arch_for(model), result.layers, results, train)
        wrappers = {**student.qat, **student.lora}
        assert len(wrappers) == 14
        for name, module in wrappers.items():
            assert has_input_hadamard(module) == name.endswith(ROTATED)
            if train == "lora":
                assert not has_input_hadamard(module.base)  # rotated once, for the base and the adapter alike
        assert torch.allclose(_logits(model, ids), before, atol=1e-4)
        student.finalize(results)
        assert torch.allclose(_logits(model, ids), before, atol=1e-4)
        for name, module in model.named_modules():
            if name.endswith(ROTATED):
                assert has_input_hadamard(module) and not isinstance(module, QATLinear)


def test_the_training_kv_cache_is_the_evaluation_cache_with_gradients(calib):
    result = _tiny(calib, "rotate(online=true)+gptq-w4-g64")
    model = result.model
    ids = random_ids(2, 16, seed=5)
    cfg = KVCacheConfig(bits=4)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        evaluated = model(input_ids=ids, past_key_values=kv_cache_factory(model, cfg)(), use_cache=True).logits
    make = training_kv_cache(model, cfg)
    assert make().layers == [] and training_kv_cache(model, KVCacheConfig(bits=16)) is None
    model.requires_grad_(True)
    trained = model(input_ids=ids, past_key_values=make(), use_cache=True).logits
    assert torch.allclose(trained.detach(), evaluated, atol=1e-5) and not torch.allclose(evaluated, plain, atol=1e-3)
    trained.square().sum().backward()
    assert all(float(block.self_attn.k_proj.weight.grad.abs().sum()) > 0 for block in model.model.layers)


def test_distill_with_kv_bits_trains_through_the_kv_rounding(calib):
    tok, data = calib
    recipe = builtin_recipes()["rotate+gptq-w4a4-g64"]
    args = {"steps": 2, "lr": 1e-2, "samples": 4, "seq_len": 32, "data": data, "batch_size": 2,
            "dtype": "float32", "warmup": 0}
    runs = {}
    for kv in (16, 4):
        model = tiny_model("llama", seed=3, vocab_size=len(tok), tie_word_embeddings=True)
        stage = {"method": "distill", "args": {**args, "kv_bits": kv}}
        runs[kv] = compress(model, {**recipe, "stages": [*recipe["stages"], stage]}, tokenizer=tok, data=data,
                            samples=4, seq_len=32)
    name = "model.layers.0.self_attn.k_proj"
    assert not torch.equal(runs[4].model.get_submodule(name).weight, runs[16].model.get_submodule(name).weight)


def test_online_hadamard_factors_cached_in_inference_mode_still_train():
    _factors.cache_clear()
    with torch.inference_mode():  # the engine's first use of an online transform
        hadamard_transform(torch.randn(2, 24))
    x = torch.randn(2, 24, requires_grad=True)
    hadamard_transform(x).square().sum().backward()
    assert torch.allclose(x.grad, 2 * x.detach(), atol=1e-5)  # an orthogonal map keeps the squared norm


def test_the_w4a4_qat_recipe_trains_after_the_w4a4_stage_with_a_4_bit_kv_cache():
    recipe = load_recipe("rotate+gptq-w4a4-g64+qat")
    assert [s.method for s in recipe.stages] == ["rotate", "gptq", "w4a4", "distill"]
    train = recipe.stages[-1].config
    assert train.train == "all" and train.kv_bits == 4 and train.lr * train.qat_lr_scale < 1e-3


def test_lora_on_w4a4_layers_is_refused_in_one_line(calib):
    result = _tiny(calib, "rotate+gptq-w4a4")
    with pytest.raises(LlmpressError, match="train=all") as info:
        prepare_student(result.model, arch_for(result.model), result.layers, result.results, "lora")
    assert "\n" not in str(info.value)
