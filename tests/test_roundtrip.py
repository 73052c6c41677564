"""Every architecture: RTN and magnitude pruning through the API, saved, reloaded with identical outputs."""

import json

import pytest
import torch

from llmpress import compress, load_model
from llmpress.models.archs import arch_for, block_linears, get_blocks, linear_weight
from tiny_models import TINY_TYPES, random_ids, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("model_type", TINY_TYPES)
@pytest.mark.parametrize("recipe", ["rtn-w4-g64", "magnitude-50"])
def test_compress_save_reload(model_type, recipe, tmp_path):
    model = tiny_model(model_type, seed=7)
    ids = random_ids(2, 16, seed=8)
    before = _logits(model, ids)
    out = tmp_path / "out"
    result = compress(model, recipe, out=out)
    after = _logits(result.model, ids)
    assert not torch.equal(before, after)  # something was compressed
    arch = arch_for(model)
    n_linears = sum(len(block_linears(b, arch)) for b in get_blocks(model, arch))
    assert len(result.layers) == n_linears
    reloaded = load_model(out)
    saved = reloaded.model.state_dict()
    for key, value in result.model.state_dict().items():
        assert torch.equal(saved[key], value), key
    reloaded.model.set_attn_implementation("eager")  # the tiny model was built eager; sdpa rounds differently
    assert torch.equal(_logits(reloaded.model, ids), after)
    config = json.loads((out / "config.json").read_text())
    packed = recipe.startswith("rtn") and model_type != "gpt2"  # GPT-2's Conv1D stays dense
    assert ("quantization_config" in config) == packed
    if packed:
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    meta = json.loads((out / "llmpress.json").read_text())
    assert meta["recipe"]["name"] == recipe and len(meta["layers"]) == n_linears
    assert reloaded.meta["layers"] == meta["layers"]
    for block in get_blocks(reloaded.model, arch):
        for module in block_linears(block, arch).values():
            w = linear_weight(module, arch)
            if recipe == "magnitude-50":
                assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
            else:
                # 4-bit, group 64: at most 16 distinct values in each group of each row
                g = w[:, :64] if w.shape[1] >= 64 else w
                assert max(len(torch.unique(row)) for row in g) <= 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


@pytest.mark.parametrize("recipe", ["smoothquant-w8a8", "gptq-w4-g64", "awq+gptq-w4-g64"])
def test_calibrated_recipes_save_and_reload(recipe, tmp_path):
    from tiny_models import TOKENIZER_TEXT, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=3, vocab_size=len(tok))
    text = tmp_path / "calib.txt"
    text.write_text(TOKENIZER_TEXT * 3)
    ids = random_ids(2, 16, seed=4)
    out = tmp_path / "out"
    result = compress(model, recipe, tokenizer=tok, data=f"text:{text}", samples=4, seq_len=32, out=out)
    after = _logits(result.model, ids)
    reloaded = load_model(out)
    reloaded.model.set_attn_implementation("eager")
    assert torch.equal(_logits(reloaded.model, ids), after)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert reloaded.meta["recipe"]["name"] == recipe
