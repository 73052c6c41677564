"""Packed QuantizedLinear and the compressed-tensors export: same logits as the dense compressed model, small files."""

import json
import warnings

import pytest
import torch
from torch import nn

import llmpress
from llmpress.data import eval_windows
from llmpress.engine import compress_blocks
from llmpress.errors import LlmpressError
from llmpress.export.compressed_tensors import regroup, save_compressed_tensors, storage_group_size
from llmpress.measure import perplexity, size_report
from llmpress.models.archs import arch_for
from llmpress.primitives import dequantize
from llmpress.quant.qlinear import QuantizedLinear, replace_linears
from llmpress.quant.rtn import RTNConfig, rtn
from llmpress.recipe import load_recipe
from llmpress.save import save_model
from tiny_models import random_ids, tiny_model, tiny_tokenizer


def rtn_stage(bits, group, sym, **where):
    return {"method": "rtn", "args": {"bits": bits, "group_size": group, "sym": sym}, **where}


def compressed(model_type, stages, seed=0, **config):
    """A tiny model compressed by the engine, its per-layer meta and its kept results."""
    model = tiny_model(model_type, seed=seed, **config)
    results = {}
    layers = compress_blocks(model, arch_for(model), list(load_recipe({"stages": stages}).stages), None,
                             results=results)
    return model, layers, results


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def reference_weight(result, group, in_features):
    """(q - zero) * scale with each column's group looked up one by one."""
    columns = torch.arange(in_features) // (in_features if group == -1 else group)
    return (result.qweight.float() - result.zero[:, columns]) * result.scale[:, columns]


def from_pretrained_dequantized(path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # "the model already has a quantization_config": intended
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32,
            attn_implementation="eager").eval()


@pytest.mark.parametrize("bits, group, sym", [(4, 64, True), (4, 64, False), (3, 32, False), (8, -1, True),
                                              (2, 40, False)])
def test_quantized_linear_equals_dense_linear(bits, group, sym):
    torch.manual_seed(bits + group)
    linear = nn.Linear(96, 40)  # 96 columns: group 64 leaves a partial last group of 32
    result = rtn(linear.weight.detach(), RTNConfig(bits=bits, group_size=group, sym=sym))
    assert torch.equal(result.weight, reference_weight(result, group, 96))
    linear.weight.data = result.weight
    for cache in (False, True):
        q = QuantizedLinear.from_compressed(linear, result, cache_weight=cache)
        assert torch.equal(q.dequantized_weight(), linear.weight)
        x = torch.randn(3, 5, 96)
        assert torch.equal(q(x), linear(x)) and torch.equal(q(x), linear(x))
    assert q.weight_packed.dtype == torch.int32 and q.weight_packed.shape == (40, -(-96 * bits // 32))
    assert ("weight_zero_point" in dict(q.named_buffers())) == (not sym)
    assert q.weight_shape.tolist() == [40, 96] and q.bias is linear.bias


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_replace_linears_keeps_logits_and_packs_weights(model_type):
    model, layers, results = compressed(model_type, [rtn_stage(4, 32, False)])
    ids = random_ids(2, 12)
    before = logits(model, ids)
    dense_params = sum(p.numel() for p in model.parameters())
    replace_linears(model, results, layers)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == len(results) == 2 * len(arch_for(model).linear_names)
    assert torch.equal(logits(model, ids), before)
    assert sum(p.numel() for p in model.parameters()) < dense_params - len(results) * 64 * 64 // 2


def test_replace_linears_converts_gpt2_conv1d():
    model, layers, results = compressed("gpt2", [rtn_stage(4, 32, True)])
    ids = random_ids(2, 12)
    before = logits(model, ids)
    replace_linears(model, results, layers)
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantizedLinear)
    assert torch.allclose(logits(model, ids), before, atol=1e-5, rtol=1e-5)


def test_regroup_for_partial_groups_keeps_the_weight():
    assert storage_group_size(64, [96, 128]) == 32
    assert storage_group_size(128, [576, 1536]) == 64
    assert storage_group_size(64, [576, 1536]) == 64
    assert storage_group_size(-1, [100]) is None
    W = torch.randn(8, 96)
    result = rtn(W, RTNConfig(bits=4, group_size=64, sym=False))
    split = regroup(result, 64, 32)
    assert split.scale.shape == (8, 3)
    assert torch.equal(dequantize(split.qweight, split.scale, split.zero, 32), result.weight)
    with pytest.raises(LlmpressError, match="must divide both"):
        regroup(result, 64, 48)


CASES = {  # model_type, stages, config overrides: each exported and reloaded by transformers
    "llama-w4-g64-sym-partial": ("llama", [rtn_stage(4, 64, True)], {"hidden_size": 96, "head_dim": 24}),
    "llama-w4-g64-asym-partial": ("llama", [rtn_stage(4, 64, False)], {"hidden_size": 96, "head_dim": 24}),
    "qwen2-w8-channel-asym": ("qwen2", [rtn_stage(8, -1, False)], {}),
    "qwen2-w3-g32-sym": ("qwen2", [rtn_stage(3, 32, True)], {}),
    "opt-w4-g32-asym": ("opt", [rtn_stage(4, 32, False)], {}),
}


@pytest.mark.parametrize("case", CASES)
def test_export_reloads_in_transformers_with_identical_logits(case, tmp_path):
    pytest.importorskip("compressed_tensors")
    model_type, stages, overrides = CASES[case]
    model, layers, results = compressed(model_type, stages, seed=1, **overrides)
    ids = random_ids(2, 16, seed=3)
    expected = logits(model, ids)
    out = save_compressed_tensors(model, None, layers, results, tmp_path / "ct", {"recipe": stages})
    assert not hasattr(model.config, "quantization_config")  # the model is left as it was
    assert torch.equal(logits(model, ids), expected)
    loaded = from_pretrained_dequantized(out)
    assert not hasattr(loaded.config, "quantization_config")
    assert torch.equal(logits(loaded, ids), expected)
    assert json.loads((out / "llmpress.json").read_text())["layers"] == layers


def test_config_and_tensors_follow_compressed_tensors_schema(tmp_path):
    ct = pytest.importorskip("compressed_tensors.quantization")
    from safetensors.torch import load_file

    model, layers, results = compressed("llama", [rtn_stage(4, 64, False)], hidden_size=96, head_dim=24)
    out = save_compressed_tensors(model, None, layers, results, tmp_path / "ct")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = ct.QuantizationConfig.model_validate(qconfig)
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    assert parsed.ignore == ["lm_head"] and list(parsed.config_groups) == ["group_0"]
    scheme = parsed.config_groups["group_0"]
    assert scheme.targets == ["Linear"] and scheme.weights.strategy == "group"
    assert scheme.weights.group_size == 32 and scheme.weights.num_bits == 4 and not scheme.weights.symmetric
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert f"{name}.weight" not in tensors and tensors[f"{name}.weight_packed"].shape == (96, 12)
    assert tensors[f"{name}.weight_scale"].dtype == torch.float32 and tensors[f"{name}.weight_scale"].shape == (96, 3)
    assert tensors[f"{name}.weight_zero_point"].shape == (12, 3)
    assert tensors[f"{name}.weight_shape"].tolist() == [96, 96]
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (96, 4)  # 128 columns, group 32
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32


def test_mixed_schemes_get_one_group_each_and_load_model_reads_them(tmp_path):
    stages = [rtn_stage(4, 32, True, ignore=["*.down_proj"]), rtn_stage(8, -1, False, targets=["*.down_proj"])]
    model, layers, results = compressed("qwen2", stages, seed=2)
    ids = random_ids(2, 16, seed=4)
    expected = logits(model, ids)
    tokenizer = tiny_tokenizer()
    out = save_compressed_tensors(model, tokenizer, layers, results, tmp_path / "mixed", {"notes": ["mixed"]})
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [len(g["targets"]) for g in groups.values()] == [12, 2]
    assert groups["group_1"]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert groups["group_1"]["weights"]["strategy"] == "channel" and groups["group_1"]["weights"]["num_bits"] == 8
    loaded = llmpress.load_model(out)
    loaded.model.config._attn_implementation = "eager"
    assert torch.equal(logits(loaded.model, ids), expected)
    assert loaded.meta["layers"] == layers and loaded.meta["notes"] == ["mixed"] and loaded.tokenizer is not None


def test_load_model_single_scheme_and_compressed_execution(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, layers, results = compressed("llama", [rtn_stage(4, 32, True)], seed=3)
    ids = random_ids(2, 16, seed=5)
    expected = logits(model, ids)
    out = save_compressed_tensors(model, None, layers, results, tmp_path / "ct")
    loaded = llmpress.load_model(out)
    loaded.model.config._attn_implementation = "eager"
    assert torch.equal(logits(loaded.model, ids), expected) and loaded.meta["layers"] == layers
    # default (compressed) execution also works on CPU for symmetric schemes
    packed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert torch.equal(logits(packed, ids), expected)


def test_packed_bytes_are_bits_over_16_of_fp16_and_disk_shrinks(tmp_path):
    from safetensors.torch import load_file

    big = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
    model, layers, results = compressed("llama", [rtn_stage(4, 64, True)], **big)
    out = save_compressed_tensors(model, None, layers, results, tmp_path / "ct")
    tensors = load_file(out / "model.safetensors")
    numel = sum(r.qweight.numel() for r in results.values())
    packed = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(".weight_packed"))
    scales = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(".weight_scale"))
    assert packed == numel * 4 // 8  # exactly 4/16 of the fp16 bytes
    assert scales == numel // 64 * 4  # one fp32 scale per 64 weights
    assert (packed + scales) / (numel * 2) == pytest.approx(4 / 16 + 2 / 64, rel=0.01)
    dense = save_model(model, None, tmp_path / "dense", {})
    report = size_report(model, layers, out)
    linear_fp32 = numel * 4
    shrink = linear_fp32 - packed - scales
    assert report["disk_bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    dense_bytes = size_report(model, layers, dense)["disk_bytes"]
    assert dense_bytes - report["disk_bytes"] == pytest.approx(shrink, rel=0.02)


def test_exporter_refuses_what_it_cannot_write(tmp_path):
    model, layers, results = compressed("llama", [{"method": "magnitude", "args": {"sparsity": 0.5}}])
    with pytest.raises(LlmpressError, match="no quantized nn.Linear layers"):
        save_compressed_tensors(model, None, layers, results, tmp_path / "a")
    model, layers, results = compressed("llama", [rtn_stage(4, 32, True)])
    with pytest.raises(LlmpressError, match="quantizes activations"):
        save_compressed_tensors(model, None, {**layers, "x": {"bits": 8, "act_bits": 8}}, results, tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(LlmpressError, match="already exists"):
        save_compressed_tensors(model, None, layers, results, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing half-written


@pytest.mark.real
def test_smollm2_w4_export_reloads_with_the_same_weights_and_perplexity(tmp_path):
    loaded = llmpress.load_model("smollm2-135m")
    recipe = load_recipe("rtn-w4-g64")
    results = {}
    layers = compress_blocks(loaded.model, arch_for(loaded.model), list(recipe.stages), None, results=results)
    out = save_compressed_tensors(loaded.model, loaded.tokenizer, layers, results, tmp_path / "w4",
                                  {"recipe": recipe.to_dict()})
    back = llmpress.load_model(out)
    reloaded = back.model.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in loaded.model.state_dict().items())
    windows = eval_windows(loaded.tokenizer, "austen:eval", 1024, 1)
    assert perplexity(back.model, windows)["perplexity"] == perplexity(loaded.model, windows)["perplexity"]
    disk = size_report(back.model, back.meta["layers"], back.folder)["disk_bytes"]
    assert disk < 180e6  # dense fp32 folder: 538 MB; the fp32 embedding alone is 113 MB
