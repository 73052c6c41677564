"""The format table (llmpress.export.formats): each entry detects its own folders and only them, refusals are
one line, "auto" chooses as before, and float zero points (HQQ) are stored exactly or refused, never rounded."""

import dataclasses

import pytest
import torch

import llmpress
from llmpress import api
from llmpress.engine import compress_blocks
from llmpress.errors import LlmpressError
from llmpress.export import compressed_tensors, formats
from llmpress.export.base import Folder
from llmpress.models.archs import arch_for
from llmpress.primitives import dequantize
from llmpress.quant.qlinear import QuantizedLinear, integer_zero, packed_tensors
from llmpress.recipe import load_recipe
from tiny_models import random_ids, tiny_model

NAMES = [f.name for f in formats.FORMATS]


def _compress(calib, tmp_path, recipe, fmt="auto", model_type="llama", name="out"):
    tok, spec = calib
    model = tiny_model(model_type, seed=3, vocab_size=len(tok))
    out = tmp_path / name
    result = llmpress.compress(model, recipe, tokenizer=tok, out=out, format=fmt, data=spec, samples=8, seq_len=32)
    return result, out


# (recipe, --format, the entry that must write it and then detect the folder)
WRITTEN = [("magnitude-50", "auto", "dense"), ("rtn-w4-g64", "dense", "dense"),
           ("rtn-w4-g64", "auto", "pack-quantized"), ("rtn-w4-g64-asym", "compressed-tensors", "pack-quantized"),
           ("smoothquant-w8a8", "auto", "int-quantized"), ("magnitude-50", "compressed-tensors", "sparse"),
           ("magnitude-24", "compressed-tensors", "sparse"), ("svd-80", "auto", "low-rank"),
           ("svd-llm-80+rtn-w8", "auto", "low-rank"), ("width-20", "auto", "dense"),
           ("squeezellm-w3", "auto", "codebook"), ("gptq-lut-w4", "dense", "dense")]


@pytest.mark.parametrize("recipe, fmt, entry", WRITTEN)
def test_each_format_detects_its_own_folder_and_only_it(calib, tmp_path, recipe, fmt, entry):
    result, out = _compress(calib, tmp_path, recipe, fmt)
    folder = Folder.of(out)
    assert [f.name for f in formats.FORMATS if f.detect(folder)] == [entry]
    assert formats.detect(out).name == entry and formats.readers(out) == formats.detect(out).readers(folder.config)
    reloaded = llmpress.load_model(out).model.state_dict()  # every entry stores the weights exactly
    assert all(torch.equal(reloaded[k], v) for k, v in result.model.state_dict().items())


def test_auto_order_and_families():
    assert NAMES == ["rotated", "low-rank", "codebook", "pack-quantized", "int-quantized", "sparse", "dense"]
    assert formats.REQUESTS == ("auto", "compressed-tensors", "dense") == api.FORMATS[:-1]
    assert api.FORMATS[-1] == "gguf"  # a file, written by llmpress.export.gguf_write, not a folder entry
    assert [f.name for f in formats.FORMATS if f.auto] == ["rotated", "low-rank", "codebook", "pack-quantized",
                                                           "int-quantized", "dense"]
    with pytest.raises(LlmpressError, match="unknown format 'gguf': use one of auto, compressed-tensors, dense"):
        formats.choose("gguf", tiny_model("llama"), {}, {})


def test_configs_no_entry_claims_are_unknown_and_llmpress_only():
    for config in ({"quantization_config": {"quant_method": "gptq"}},
                   {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                            "config_groups": {"g": {"format": "float-quantized"}}}}):
        assert formats.detect(config) is None
        assert formats.folder_format(config) == "unknown" and formats.readers(config) == ["llmpress"]


def _rtn(model_type="llama", sym=False, seed=0):
    model = tiny_model(model_type, seed=seed)
    results = {}
    stages = [{"method": "rtn", "args": {"bits": 4, "group_size": 32, "sym": sym}}]
    layers = compress_blocks(model, arch_for(model), list(load_recipe({"stages": stages}).stages), None,
                             results=results)
    return model, layers, results


def _float_zeros(model, layers, results, shift=0.25):
    """The RTN model with every zero point moved off the integers (as HQQ's are), weights rewritten to match."""
    for name, result in results.items():
        zero = result.zero + shift
        weight = dequantize(result.qweight, result.scale, zero, 32)
        results[name] = dataclasses.replace(result, zero=zero, meta={**result.meta, "zero_float": True})
        layers[name] = {**layers[name], "zero_float": True}
        model.get_submodule(name).weight.data.copy_(weight)
    return model, layers, results


def test_every_refusal_is_one_line():
    model, layers, results = _rtn()
    plain = tiny_model("llama")
    gpt2, gpt2_layers, gpt2_results = _rtn("gpt2")
    float_model, float_layers, float_results = _float_zeros(*_rtn(seed=1))
    reasons = [entry.can_save(plain, {}, {}) for entry in formats.FORMATS if entry.name != "dense"]
    reasons += [compressed_tensors.can_save(gpt2, gpt2_layers, gpt2_results),
                compressed_tensors.can_save(model, {**layers, "x": {"bits": 8, "act_bits": 8}}, results),
                compressed_tensors.can_save(float_model, float_layers, float_results)]
    assert len(reasons) == len(formats.FORMATS) - 1 + 3
    for reason in reasons:
        assert isinstance(reason, str) and reason and "\n" not in reason, reason
    assert [e.name for e in formats.FORMATS if e.can_save(model, layers, results) is None] == ["pack-quantized",
                                                                                                "dense"]
    with pytest.raises(LlmpressError, match="no quantized nn.Linear layers"):
        formats.choose("compressed-tensors", plain, {}, {})


def test_float_zero_points_are_refused_by_pack_quantized_and_saved_dense_by_auto(tmp_path, caplog):
    model, layers, results = _float_zeros(*_rtn(seed=2))
    name = next(iter(results))
    assert not integer_zero(results[name].zero) and integer_zero(results[name].zero.round())
    reason = compressed_tensors.can_save(model, layers, results)
    assert "float zero points" in reason and "--format dense" in reason
    assert compressed_tensors.fits(model, layers, results)  # auto tries it first, then falls back
    assert formats.choose("auto", model, layers, results).name == "dense"
    with pytest.raises(LlmpressError, match="float zero points"):
        formats.choose("compressed-tensors", model, layers, results)
    with pytest.raises(LlmpressError, match="not integers"):  # never rounded silently
        packed_tensors(results[name], 4, 32, False, torch.float32)
    with pytest.raises(LlmpressError, match="not integers"):
        QuantizedLinear.from_compressed(model.get_submodule(name), results[name], layers[name])
    ids = random_ids(2, 12)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    out = formats.save(model, None, tmp_path / "auto", {"layers": layers}, layers, results, "auto")
    assert formats.folder_format(out) == "dense"
    assert any("pack-quantized cannot store this model exactly" in r.message for r in caplog.records)
    back = llmpress.load_model(out).model
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    back.set_attn_implementation("eager")  # the tiny model was built eager; sdpa rounds differently
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, use_cache=False).logits, expected)


def test_integer_valued_float_zero_points_still_pack():
    model, layers, results = _rtn(seed=4)  # RTN's zero points: floats holding whole numbers
    assert all(r.zero.is_floating_point() and integer_zero(r.zero) for r in results.values())
    assert formats.choose("auto", model, layers, results).name == "pack-quantized"


def test_compressed_tensors_cannot_read_a_float_zero_point():
    """Why pack-quantized refuses rather than storing zp_dtype=float: its decompressor unpacks int32 words only."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    with pytest.raises(ValueError, match="int32"):
        helpers.unpack_from_int32(torch.full((1, 2), 0.25), 4, torch.Size([8, 2]), packed_dim=0)


def test_hqq_is_saved_dense_and_reloads_exactly(tmp_path):
    from llmpress.registry import get_method

    try:
        get_method("hqq")
    except LlmpressError:
        pytest.skip("no hqq method in this tree")
    model = tiny_model("llama", seed=5)
    recipe = {"stages": [{"method": "hqq", "args": {"bits": 4, "group_size": 32}}]}
    result = llmpress.compress(model, recipe, out=tmp_path / "hqq")
    assert formats.folder_format(result.out) == "dense"
    back = llmpress.load_model(result.out).model.state_dict()
    assert all(torch.equal(back[k], v) for k, v in result.model.state_dict().items())
    with pytest.raises(LlmpressError, match="float zero points"):
        llmpress.compress(tiny_model("llama", seed=5), recipe, out=tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_w8a8_models_are_not_written_dense(calib, tmp_path):
    result, out = _compress(calib, tmp_path, "smoothquant-w8a8", "compressed-tensors")
    assert formats.folder_format(out) == "int-quantized"
    reason = formats.FORMATS[-1].can_save(result.model, result.layers, result.results)
    assert "W8A8" in reason and "\n" not in reason
    with pytest.raises(LlmpressError, match="a dense folder cannot hold"):
        formats.save(result.model, None, tmp_path / "dense", result.meta, result.layers, result.results, "dense")
    assert not (tmp_path / "dense").exists()


def test_cli_refusal_is_exit_2_and_one_line(tmp_path, capsys):
    from llmpress.cli import main
    from llmpress.registry import get_method

    try:
        get_method("hqq")
    except LlmpressError:
        pytest.skip("no hqq method in this tree")
    tiny_model("llama", seed=6).save_pretrained(tmp_path / "tiny")
    capsys.readouterr()
    code = main(["compress", str(tmp_path / "tiny"), "--recipe", "hqq-w4-g64", "--out", str(tmp_path / "o"),
                 "--format", "compressed-tensors", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "float zero points" in err, err
    assert not (tmp_path / "o").exists()
