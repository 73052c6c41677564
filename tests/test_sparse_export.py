"""Sparse storage: compressed-tensors sparse-bitmask / sparse-24-bitmask folders, their bytes, and reloading."""

import json

import pytest
import torch
from safetensors.torch import load_file

import llmpress
from llmpress.errors import LlmpressError
from llmpress.export.sparse import (
    dense_weight,
    pack_bitmask,
    save_sparse,
    sparse_tensors,
    unpack_bitmask,
)
from llmpress.measure.size import layer_bytes
from tiny_models import random_ids, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_bitmask_bit_order_is_little_endian_per_row():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, [0, 3, 9]] = True
    mask[1, 8] = True
    bits = pack_bitmask(mask)
    assert bits.dtype == torch.uint8 and bits.tolist() == [[1 + 8, 2], [0, 1]]
    assert torch.equal(unpack_bitmask(bits, 10), mask)


@pytest.mark.parametrize("layout", ["sparse-bitmask", "sparse-24-bitmask"])
def test_layer_tensors_round_trip_and_keep_masked_zeros(layout):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 16, generator=g)
    mask = torch.rand(6, 4, 4, generator=g).argsort(-1) < 2  # exactly 2 of every 4
    mask = mask.reshape(6, 16)
    W = W * mask
    W[0, mask[0].nonzero()[0, 0]] = 0.0  # a kept weight that is zero stays in the values
    t = sparse_tensors(W, mask, layout)
    assert torch.equal(dense_weight(t), W)
    assert t["compressed"].numel() == int(mask.sum())
    if layout == "sparse-24-bitmask":
        assert t["compressed"].shape == (6, 8) and t["shape"].shape == (2, 1) and "row_offsets" not in t
    else:
        assert t["row_offsets"].tolist() == (torch.cumsum(mask.sum(1), 0) - mask.sum(1)).tolist()
    with pytest.raises(LlmpressError, match="exactly 2 of every 4"):
        sparse_tensors(W, torch.ones_like(mask), "sparse-24-bitmask")


@pytest.mark.parametrize("recipe, layout", [("wanda-50", "sparse-bitmask"), ("wanda-24", "sparse-24-bitmask"),
                                            ("owl-wanda-50", "sparse-bitmask")])
def test_pruned_model_saves_sparse_and_reloads_identically(recipe, layout, calib, tmp_path):
    tok, data = calib
    model = tiny_model("llama", seed=5, vocab_size=len(tok))
    out = tmp_path / "out"
    result = llmpress.compress(model, recipe, tokenizer=tok, data=data, samples=4, seq_len=32, out=out,
                               format="compressed-tensors")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["sparsity_config"]["format"] == layout
    assert sorted(qconfig["sparsity_config"]["targets"]) == sorted(result.layers)
    stored = load_file(out / "sparse.safetensors")  # not model.safetensors: transformers 5 would misread it
    name = "model.layers.1.mlp.down_proj"
    assert f"{name}.weight" not in stored and f"{name}.bitmask" in stored
    reloaded = llmpress.load_model(out)
    saved = reloaded.model.state_dict()
    for key, value in result.model.state_dict().items():
        assert torch.equal(saved[key], value), key
    reloaded.model.set_attn_implementation("eager")
    ids = random_ids(2, 12, seed=1)
    assert torch.equal(_logits(reloaded.model, ids), _logits(result.model, ids))


@pytest.mark.parametrize("recipe, offsets", [("magnitude-50", True), ("magnitude-24", False)])
def test_stored_bytes_are_what_size_report_counts(recipe, offsets, tmp_path):
    model = tiny_model("llama", seed=6).to(torch.bfloat16)
    out = tmp_path / "out"
    result = llmpress.compress(model, recipe, out=out, format="compressed-tensors")
    stored = load_file(out / "sparse.safetensors")  # not model.safetensors: transformers 5 would misread it
    for name, meta in result.layers.items():
        rows = meta["shape"][0]
        parts = {k: v for k, v in stored.items() if k.startswith(f"{name}.") and not k.endswith(".bias")}
        assert stored[f"{name}.compressed"].dtype == torch.bfloat16
        real = sum(v.numel() * v.element_size() for v in parts.values())
        shape_bytes = 2 * 8  # the int64 (rows, cols) record; row offsets are counted by layer_bytes
        assert real == layer_bytes(meta, 16) + shape_bytes
        assert (f"{name}.row_offsets" in stored) == offsets
        if offsets:
            assert stored[f"{name}.row_offsets"].shape == (rows,)


def test_joint_sparse_int4_saves_pack_quantized_with_exact_zeros(calib, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    tok, data = calib
    model = tiny_model("llama", seed=7, vocab_size=len(tok))
    out = tmp_path / "out"
    result = llmpress.compress(model, "sparsegpt-50-w4", tokenizer=tok, data=data, samples=4, seq_len=32, out=out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    weight = result.model.get_submodule("model.layers.0.mlp.up_proj").weight
    assert torch.equal(loaded.get_submodule("model.layers.0.mlp.up_proj").weight, weight)
    assert (weight == 0).float().mean() >= 0.5


def test_auto_keeps_pruned_models_dense_and_refuses_unpruned(tmp_path):
    out = tmp_path / "dense"
    result = llmpress.compress(tiny_model("llama", seed=8), "magnitude-50", out=out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with pytest.raises(LlmpressError, match="no pruned nn.Linear layers"):
        save_sparse(result.model, None, {}, None, tmp_path / "none")
