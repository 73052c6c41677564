"""Every output format, read back by plain transformers: the same logits as llmpress, or a refusal.

Each test compresses a tiny random model with ``llmpress.compress(..., out=)``, loads the folder with
``AutoModelForCausalLM.from_pretrained`` (with ``CompressedTensorsConfig(dequantize=True)`` where the
folder is compressed-tensors) and compares logits with ``llmpress.load_model`` of the same folder,
both on eager attention. Tolerances:

* dense, pack-quantized (RTN/GPTQ int4, sym and asym), width- and depth-pruned, low-rank saved
  ``--format dense``: bit-identical logits (``torch.equal``);
* W8A8 (SmoothQuant): bit-identical against llmpress with compressed-tensors' arithmetic swapped in
  (activation codes dequantized, then a float GEMM), which pins every stored code, scale and folded
  norm; against llmpress's own exact int32 GEMM, max |Δlogit| <= 0.25 and top-1 agreement >= 90%
  (measured 0.04 / 98% here; the gap is the float GEMM's rounding flipping a few int8 activation
  codes, see ``llmpress.quant.w8a8``); ``dequantize=True`` equals llmpress without activation
  quantization (W8A16), bit for bit;
* sparse-bitmask, sparse-24-bitmask, low-rank, codebook (lookup tables, vector codebooks) and rotated (online
  Hadamards, W4A4): transformers raises (it would otherwise run with
  random weights), and llmpress's reload equals the in-memory compressed model bit for bit.

``readers(folder)`` is checked against each outcome.
"""

import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import llmpress
from llmpress.export.formats import folder_format, readers
from llmpress.models.loader import load_model
from llmpress.quant import w8a8
from tiny_models import random_ids, tiny_model

IDS = random_ids(2, 24, seed=11)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _transformers(folder, dequantize: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():  # "the model already has a quantization_config": intended
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                    **kwargs).eval()


def _ours(folder):
    loaded = load_model(folder)
    loaded.model.set_attn_implementation("eager")
    return loaded.model


def _compress(calib, tmp_path, recipe, model_type="llama", fmt="auto"):
    tok, spec = calib
    model = tiny_model(model_type, seed=3, vocab_size=len(tok))
    out = tmp_path / "out"
    result = llmpress.compress(model, recipe, tokenizer=tok, out=out, format=fmt, data=spec, samples=8, seq_len=32)
    return result, out


@pytest.mark.parametrize("recipe", ["magnitude-50", "rtn-w4-g64", "rtn-w4-g64-asym", "gptq-w4-g64"])
def test_dense_and_pack_quantized_load_identically(calib, tmp_path, recipe):
    result, out = _compress(calib, tmp_path, recipe)
    config = json.loads((out / "config.json").read_text())
    kind = folder_format(config)
    assert kind == ("dense" if recipe == "magnitude-50" else "pack-quantized")
    ours = _logits(_ours(out))
    assert torch.equal(ours, _logits(result.model))
    assert torch.equal(_logits(_transformers(out, dequantize=kind != "dense")), ours)
    assert "transformers" in readers(out)[1] and "vLLM" in readers(out)
    assert json.loads((out / "llmpress.json").read_text()).get("readers", readers(out)) == readers(out)
    if recipe == "rtn-w4-g64-asym":  # compressed execution refuses asymmetric zero points on CPU
        assert "lm-eval" not in readers(out)
        with pytest.raises(RuntimeError):
            _transformers(out, dequantize=False)


@pytest.mark.parametrize("recipe, model_type", [("width-20", "llama"), ("width-20", "qwen3"),
                                                ("depth-20", "llama"), ("depth-20", "gemma3_text"),
                                                ("svd-90", "llama")])
def test_width_depth_and_densified_low_rank_are_plain_smaller_models(calib, tmp_path, recipe, model_type):
    fmt = "dense" if recipe.startswith("svd") else "auto"
    result, out = _compress(calib, tmp_path, recipe, model_type, fmt)
    base = tiny_model(model_type, seed=3, vocab_size=len(calib[0]))
    plain = _transformers(out, dequantize=False)
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in base.parameters()) or fmt == "dense"
    assert folder_format(json.loads((out / "config.json").read_text())) == "dense"
    ours = _logits(_ours(out))
    assert torch.equal(_logits(plain), ours)
    if fmt == "auto":
        assert torch.equal(ours, _logits(result.model))
    assert readers(out) == ["llmpress", "transformers", "vLLM", "lm-eval"]


@pytest.mark.parametrize("recipe, fmt, kind", [("magnitude-50", "compressed-tensors", "sparse-bitmask"),
                                               ("magnitude-24", "compressed-tensors", "sparse-24-bitmask"),
                                               ("svd-90", "auto", "low-rank"),
                                               ("svd-llm-90", "auto", "low-rank"),
                                               ("squeezellm-w3", "auto", "codebook"),
                                               ("gptvq-w2", "auto", "codebook"),
                                               ("rotate+gptq-w4a4", "auto", "rotated")])
def test_folders_transformers_cannot_read_are_refused(calib, tmp_path, recipe, fmt, kind):
    result, out = _compress(calib, tmp_path, recipe, fmt=fmt)
    assert folder_format(json.loads((out / "config.json").read_text())) == kind
    for dequantize in (False, True):
        with pytest.raises((OSError, ValueError)):
            _transformers(out, dequantize)
    assert not (out / "model.safetensors").exists()
    assert torch.equal(_logits(_ours(out)), _logits(result.model))
    assert readers(out) == ["llmpress"] == json.loads((out / "llmpress.json").read_text())["readers"]


class _FloatGemm(nn.Module):
    """compressed-tensors' arithmetic for one W8A8 layer: the same int8 codes, dequantized, then a float GEMM."""

    def __init__(self, layer: w8a8.W8A8Linear, activations: bool) -> None:
        super().__init__()
        self.layer, self.activations = layer, activations

    def forward(self, x):
        W = self.layer.weight.float() * self.layer.weight_scale
        if self.activations:
            codes, scale = w8a8.quantize_a8_per_token(x.reshape(-1, x.shape[-1]))
            x = (codes.float() * scale).reshape(x.shape)
        return F.linear(x, W, self.layer.bias)


def _swap_w8a8(model, activations: bool):
    swapped = [n for n, m in model.named_modules() if isinstance(m, w8a8.W8A8Linear)]
    for name in swapped:
        model.set_submodule(name, _FloatGemm(model.get_submodule(name), activations))
    return len(swapped)


def test_w8a8_reads_back_with_the_same_codes_and_scales(calib, tmp_path):
    result, out = _compress(calib, tmp_path, "smoothquant-w8a8")
    assert folder_format(json.loads((out / "config.json").read_text())) == "int-quantized"
    ours = _logits(_ours(out))
    assert torch.equal(ours, _logits(result.model))
    plain = _logits(_transformers(out, dequantize=False))  # activations fake-quantized per token, as ours
    difference = (plain - ours).abs().max().item()
    agreement = (plain.argmax(-1) == ours.argmax(-1)).float().mean().item()
    assert difference <= 0.25 and agreement >= 0.9, (difference, agreement)
    emulated = _ours(out)
    assert _swap_w8a8(emulated, activations=True) == 14
    assert torch.equal(plain, _logits(emulated))  # every code, scale and folded norm as llmpress has them
    w8a16 = _ours(out)
    _swap_w8a8(w8a16, activations=False)
    assert torch.equal(_logits(_transformers(out, dequantize=True)), _logits(w8a16))  # dequantize=True: W8A16
    assert readers(out) == ["llmpress", "transformers (compressed-tensors)", "vLLM", "lm-eval"]


def test_readers_of_configs():
    assert readers({}) == ["llmpress", "transformers", "vLLM", "lm-eval"]
    group = {"format": "pack-quantized", "weights": {"symmetric": True}}
    mixed = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"a": group, "b": group}}}
    assert folder_format(mixed) == "pack-quantized-mixed" and readers(mixed) == ["llmpress", "vLLM"]
    assert readers({"quantization_config": {"quant_method": "gptq"}}) == ["llmpress"]
    assert readers({"llmpress": {"lowrank": {"x": 2}}}) == ["llmpress"]
