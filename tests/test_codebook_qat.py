"""QAT of codebook layers (codes frozen, tables and norms trained), against a plain per-entry gradient reference;
the finalized layer on its stored table; ``gptq-lut-w2+qat`` end to end on a tiny model, reloaded exactly."""

import pytest
import torch
from torch import nn

import llmpress
from llmpress.compressed import Compressed, Grid
from llmpress.data import calibration_samples
from llmpress.distill.codebook_qat import CodebookQATLinear, lut_weight
from llmpress.errors import LlmpressError
from llmpress.quant.codebook import lookup
from llmpress.quant.squeezellm import GPTQLUTConfig, gptq_lut
from llmpress.recipe import load_recipe
from llmpress.registry import builtin_recipes
from tiny_models import random_ids, tiny_model


def reference_table_gradient(codes: torch.Tensor, weight_grad: torch.Tensor, entries: int) -> torch.Tensor:
    """d loss / d lut[r, k] = Σ_j 1[codes[r, j] = k] · d loss / d W[r, j], summed one weight at a time."""
    out = torch.zeros(codes.shape[0], entries, dtype=torch.float64)
    for r in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            out[r, int(codes[r, j])] += float(weight_grad[r, j])
    return out


def _layer(rows=12, cols=40, bits=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) / cols ** 0.5
    X = torch.randn(200, cols, generator=g)
    result = gptq_lut(W, 2 / 200 * X.T @ X, GPTQLUTConfig(bits=bits))
    linear = nn.Linear(cols, rows)
    linear.weight.data = result.weight.clone()
    return linear, result


def test_table_gradient_is_the_sum_over_its_weights():
    linear, result = _layer()
    layer = CodebookQATLinear.from_linear(linear, result)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    (layer(x) * upstream).sum().backward()
    weight_grad = upstream.T @ x  # d/dW of Σ upstream ⊙ (x Wᵀ + b)
    want = reference_table_gradient(result.qweight, weight_grad, 4)
    assert torch.allclose(layer.lut.grad.double(), want, rtol=1e-5, atol=1e-6)
    assert layer.codes.requires_grad is False and torch.equal(layer.codes, result.qweight)


def test_starts_as_the_quantized_layer_and_finalizes_on_the_stored_table():
    linear, result = _layer(seed=3)
    layer = CodebookQATLinear.from_linear(linear, result)
    x = torch.randn(4, 40)
    assert torch.equal(layer(x), linear(x))
    with torch.no_grad():
        layer.lut.add_(1e-3 * torch.randn_like(layer.lut))  # a trained table is not fp16-exact
    plain, new = layer.finalize()
    assert type(plain) is nn.Linear and plain.bias is linear.bias
    assert torch.equal(new.codebook.half().float(), new.codebook)  # rounded to its storage dtype
    assert torch.equal(new.qweight, result.qweight) and new.grid == result.grid and new.weight is None
    assert torch.equal(plain.weight, lookup(new.qweight, new.codebook))
    assert not torch.equal(new.codebook, result.codebook)
    assert torch.equal(lut_weight(new.codebook, new.qweight), lookup(new.qweight, new.codebook))


def test_refuses_what_is_not_a_codebook_layer():
    linear, result = _layer()
    uniform = Compressed(weight=None, qweight=torch.zeros(12, 40, dtype=torch.int8), scale=torch.ones(12, 1),
                         grid=Grid(2, -1))
    with pytest.raises(LlmpressError) as info:
        CodebookQATLinear.from_linear(linear, uniform)
    assert "lookup table" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(LlmpressError, match="do not fit"):
        CodebookQATLinear.from_linear(nn.Linear(41, 12), result)


def test_recipes_registered():
    recipes = builtin_recipes()
    assert {"gptq-lut-w2", "gptq-w2-g64"} <= set(recipes)
    assert recipes["gptq-lut-w2"]["stages"][0]["args"]["bits"] == 2
    vq, qat = load_recipe("gptvq-w2+qat").stages
    assert (vq.method, qat.method, qat.config.train, qat.config.qat_lr_scale) == ("gptvq", "distill", "all", 0.3)


def _kl_to(teacher, student, ids) -> float:
    with torch.no_grad():
        p = teacher(input_ids=ids, use_cache=False).logits.log_softmax(-1)
        q = student(input_ids=ids, use_cache=False).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_qat_after_gptq_lut_trains_tables_and_norms_and_reloads_exactly(calib, tmp_path):
    tok, spec = calib
    args = dict(tokenizer=tok, data=spec, samples=8, seq_len=32)
    teacher = tiny_model("llama", seed=3, vocab_size=len(tok))
    plain = llmpress.compress(tiny_model("llama", seed=3, vocab_size=len(tok)), "gptq-lut-w2", **args)
    qat = f"gptq-lut-w2+qat(steps=12, lr=1e-3, warmup=0, samples=8, seq_len=32, data='{spec}')"
    trained = llmpress.compress(tiny_model("llama", seed=3, vocab_size=len(tok)), qat, out=tmp_path / "out", **args)
    name = "model.layers.0.mlp.up_proj"
    before, after = plain.results[name], trained.results[name]
    assert torch.equal(before.qweight, after.qweight)  # the codes are frozen
    assert not torch.equal(before.codebook, after.codebook)  # the tables trained
    assert torch.equal(after.codebook.half().float(), after.codebook)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(plain.model.state_dict()[norm], trained.model.state_dict()[norm])
    assert trained.layers[name]["distilled"] == "qat" and Grid.of(trained.layers[name]).codebook
    text = calibration_samples(tok, spec, 8, 32, 0)  # the text it trained on: closer to the teacher than before
    assert _kl_to(teacher, trained.model, text) < 0.9 * _kl_to(teacher, plain.model, text)
    ids = random_ids(4, 24)
    reloaded = llmpress.load_model(tmp_path / "out").model
    reloaded.set_attn_implementation("eager")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits,
                           trained.model(input_ids=ids, use_cache=False).logits)


def test_lora_on_a_codebook_layer_is_a_one_line_error(calib):
    tok, spec = calib
    with pytest.raises(LlmpressError) as info:
        llmpress.compress(tiny_model("llama", seed=3, vocab_size=len(tok)),
                          f"gptq-lut-w2+distill-lora(steps=1, samples=4, seq_len=16, data='{spec}')",
                          tokenizer=tok, data=spec, samples=8, seq_len=32)
    assert "train=all" in str(info.value) and "\n" not in str(info.value)
