"""W4A4 with QuaRot's online rotations: the Hadamard transform against its dense matrix, the online Hadamard
before down_proj keeps the logits, the KV-cache rotation equals rotating q and k, int4 activations and the
integer GEMM against float oracles, and the rotate+gptq-w4a4 folder reloads exactly."""

import json

import pytest
import torch

import llmpress
from llmpress import compress, load_model
from llmpress.errors import LlmpressError
from llmpress.export import formats
from llmpress.models.archs import arch_for, get_blocks
from llmpress.quant.kvcache import kv_cache_factory
from llmpress.quant.kvgrid import KVCacheConfig, dequantize_kv, fake_quantize_kv, quantize_kv
from llmpress.quant.w4a4 import CLIP_GRID, W4A4Linear, act_clip_errors, int_linear, quantize_act_per_token
from llmpress.quant.w8a8 import W8A8Linear, quantize_a8_per_token
from llmpress.registry import builtin_recipes
from llmpress.rotate import RotateConfig, hadamard, rotate_model
from llmpress.rotate.online import (
    CONFIG_KEY,
    hadamard_transform,
    has_input_hadamard,
    online_hadamard,
    online_record,
    online_split,
)
from llmpress.rotate.spin import SpinQuantConfig, learn_rotation
from tiny_models import random_ids, tiny_model

ONLINE_TYPES = ["llama", "qwen2", "phi3", "mistral"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


@pytest.mark.parametrize("n, split", [(1, (1, 1)), (4, (1, 4)), (12, (12, 1)), (64, (1, 64)), (72, (36, 2)),
                                      (128, (1, 128)), (576, (36, 16)), (1536, (12, 128))])
def test_hadamard_transform_is_the_dense_matrix(n, split):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert online_split(n) == split
    H = online_hadamard(n).double()
    assert set(H.unique().tolist()) <= {-1.0, 1.0} and torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    H = H / n ** 0.5
    assert torch.allclose(hadamard_transform(x), x @ H, atol=1e-12)
    assert torch.allclose(hadamard_transform(x, inverse=True), x @ H.T, atol=1e-12)
    assert torch.allclose(hadamard_transform(hadamard_transform(x), inverse=True), x, atol=1e-12)


@pytest.mark.parametrize("model_type", ONLINE_TYPES)
def test_online_hadamard_before_down_proj_keeps_the_logits(model_type):
    ids = random_ids(2, 16, seed=2)
    base = tiny_model(model_type, seed=1)
    before = _logits(base, ids)
    offline, online = tiny_model(model_type, seed=1), tiny_model(model_type, seed=1)
    rotate_model(offline, arch_for(offline), None, RotateConfig())
    rotate_model(online, arch_for(online), None, RotateConfig(online=True))
    after = _logits(online, ids)
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4), (after - before).abs().max()
    record = online_record(online.config)
    assert record["kv_hadamard"] is True and len(record["input_hadamard"]) == 2 * online.config.num_hidden_layers
    for block_off, block_on in zip(get_blocks(offline, arch_for(offline)), get_blocks(online, arch_for(online))):
        for off, on in ((block_off.mlp.down_proj, block_on.mlp.down_proj),
                        (block_off.self_attn.o_proj, block_on.self_attn.o_proj)):  # QuaRot's H across heads
            assert has_input_hadamard(on) and not has_input_hadamard(off)
            n = off.weight.shape[1]  # the weight absorbed H/√n: W_on = W_off·H/√n
            expected = off.weight.double() @ online_hadamard(n).double() / n ** 0.5
            assert torch.allclose(on.weight.double(), expected, atol=1e-6)
            assert (on.weight - off.weight).abs().max() > 1e-2
    for block in get_blocks(online, arch_for(online)):  # without the run-time half the model is wrong
        block.self_attn.o_proj._forward_pre_hooks.clear()
    assert not torch.allclose(_logits(online, ids), before, atol=1e-2, rtol=1e-2)


def test_online_o_proj_can_be_left_out():
    ids = random_ids(2, 16, seed=2)
    model = tiny_model("llama", seed=1)
    before = _logits(model, ids)
    rotate_model(model, arch_for(model), None, RotateConfig(online=True, online_o_proj=False))
    assert torch.allclose(_logits(model, ids), before, atol=1e-5, rtol=1e-4)
    names = online_record(model.config)["input_hadamard"]
    assert len(names) == model.config.num_hidden_layers and all(n.endswith("mlp.down_proj") for n in names)
    assert not has_input_hadamard(model.model.layers[0].self_attn.o_proj)


@pytest.mark.parametrize("model_type", ONLINE_TYPES)
def test_rotating_every_linear_input_instead_of_the_residual_keeps_the_logits_and_the_norms(model_type):
    """rotate(online=true, residual=false): no fold, no residual rotation; each linear W ← W·H/√n with an online
    x ← x·H/√n, so the norms' gains stay on the activations the int4 grid rounds."""
    ids = random_ids(2, 16, seed=2)
    base = tiny_model(model_type, seed=1)
    before = _logits(base, ids)
    model = tiny_model(model_type, seed=1)
    rotate_model(model, arch_for(model), None, RotateConfig(online=True, residual=False))
    assert torch.allclose(_logits(model, ids), before, atol=1e-5, rtol=1e-4)
    arch = arch_for(model)
    names = online_record(model.config)["input_hadamard"]
    assert len(names) == len(arch.linear_names) * model.config.num_hidden_layers
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == \
        (base.get_output_embeddings().weight is base.get_input_embeddings().weight)
    for block, block0 in zip(get_blocks(model, arch), get_blocks(base, arch)):
        for norm in ("input_layernorm", "post_attention_layernorm"):  # the gains are not folded
            assert torch.equal(block.get_submodule(norm).weight, block0.get_submodule(norm).weight)
        for name in (*arch.groups[0], *arch.groups[2]):
            if name.endswith(("v_proj", "qkv_proj")):  # the values' output rows are rotated per head too (heads)
                continue
            on, off = block.get_submodule(name), block0.get_submodule(name)
            n = off.weight.shape[1]
            assert has_input_hadamard(on)
            assert torch.allclose(on.weight.double(), off.weight.double() @ online_hadamard(n).double() / n ** 0.5,
                                  atol=1e-6)
    get_blocks(model, arch)[0].get_submodule(arch.groups[0][0])._forward_pre_hooks.clear()  # the run-time half
    assert not torch.allclose(_logits(model, ids), before, atol=1e-3, rtol=1e-3)


def test_residual_false_needs_the_online_transforms():
    with pytest.raises(LlmpressError, match="add online=true"):
        RotateConfig(residual=False)


def test_statistics_hooks_see_the_rotated_input():
    """GPTQ's Hessian must be taken on what down_proj multiplies: the input after the online Hadamard."""
    offline, online = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    rotate_model(offline, arch_for(offline), None, RotateConfig())
    rotate_model(online, arch_for(online), None, RotateConfig(online=True))
    seen = {}
    for key, model in (("off", offline), ("on", online)):
        model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, key=key: seen.__setitem__(key, args[0].detach().clone()))
        _logits(model, random_ids(1, 8, seed=3))
    assert torch.allclose(seen["on"], hadamard_transform(seen["off"]), atol=1e-5)


def test_act_quantization_matches_a_token_by_token_oracle():
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 5, 6)[:, None]
    x[2] = 0
    codes8, scale8 = quantize_act_per_token(x, 8, 1.0)
    ref_codes, ref_scale = quantize_a8_per_token(x)
    assert torch.equal(codes8, ref_codes) and torch.equal(scale8, ref_scale)
    codes, scale = quantize_act_per_token(x, 4, 0.9)
    for t in range(6):
        assert scale[t, 0].item() == pytest.approx(0.9 * x[t].abs().max().item() / 7.5 or 1.0, rel=1e-6)
        s = scale[t, 0].item()
        assert codes[t].tolist() == [max(-8, min(7, round(v / s))) for v in x[t].tolist()]
    assert codes.min() >= -8 and codes.max() <= 7 and (codes == 7).any() and (codes == -8).any()  # clipped


@pytest.mark.parametrize("group_size, sym", [(-1, True), (16, True), (24, False)])  # 24: a partial last group
def test_w4a4_linear_is_the_float_product_of_its_codes_on_both_paths(group_size, sym):
    g = torch.Generator().manual_seed(1)
    weight, bias, x = torch.randn(48, 72, generator=g), torch.randn(48, generator=g), torch.randn(2, 5, 72, generator=g)
    layer = W4A4Linear.from_float(weight, bias, bits=4, group_size=group_size, act_bits=4, act_clip=0.9)
    if not sym:  # asymmetric codes: zero points subtracted per group inside the integer GEMM
        zero = torch.randint(-3, 4, layer.weight_scale.shape, generator=g, dtype=torch.int8)
        codes = (layer.weight.to(torch.int16) + zero.repeat_interleave(24, dim=1)[:, :72]).clamp(-8, 7)
        layer = W4A4Linear.from_codes(codes, layer.weight_scale, zero, bias, bits=4, group_size=group_size,
                                      act_bits=4, act_clip=0.9)
        assert not layer.sym
    codes_x, scale_x = quantize_act_per_token(x.reshape(-1, 72), 4, 0.9)
    oracle = (codes_x.double() * scale_x.double()) @ layer.dequantized_weight().double().T + bias.double()
    outputs = []
    for path in ("int_mm", "fp32"):
        layer.path = path
        outputs.append(layer(x))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.allclose(outputs[0].reshape(-1, 48).double(), oracle, rtol=1e-5, atol=1e-5)
    if sym:  # round to nearest: within half a step of the weight
        step = layer.weight_scale.repeat_interleave(72 if group_size < 0 else group_size, dim=1)[:, :72]
        assert ((layer.dequantized_weight() - weight).abs() <= step / 2 + 1e-6).all()


def test_int_linear_at_8_bits_is_w8a8():
    g = torch.Generator().manual_seed(2)
    weight, x = torch.randn(32, 64, generator=g), torch.randn(10, 64, generator=g)
    w8a8 = W8A8Linear.from_float(weight)
    codes, scale = quantize_act_per_token(x, 8, 1.0)
    assert torch.equal(int_linear(codes, scale, w8a8.weight, w8a8.weight_scale, None, -1), w8a8(x))


def test_kv_hadamard_is_the_attention_of_rotated_queries_and_keys():
    """rotate → quantize → dequantize → rotate back in the cache = QuaRot's q·H, quantize(k·H), for keys and values."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(3))
    k[..., 5] += 8  # an outlier channel, as keys have
    cfg = KVCacheConfig(bits=4, group_size=16, hadamard=True)
    H = hadamard(16).float() / 4

    def rounded(x):  # the plain per-token min-max grid of the rotated tensor
        return dequantize_kv(quantize_kv(x, 4, 16), 16)

    scores = q @ fake_quantize_kv(k, cfg, key=True).transpose(-1, -2)
    assert torch.allclose(scores, (q @ H) @ rounded(k @ H).transpose(-1, -2), atol=1e-4)
    weights = torch.softmax(scores, dim=-1)
    assert torch.allclose(weights @ fake_quantize_kv(v, cfg), (weights @ rounded(v @ H)) @ H.T, atol=1e-5)
    plain = KVCacheConfig(bits=4, group_size=16, hadamard=False)
    assert (fake_quantize_kv(k, cfg, key=True) - k).norm() < 0.7 * (fake_quantize_kv(k, plain, key=True) - k).norm()


def test_kv_hadamard_follows_the_model_unless_given():
    rotated, plain = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    rotate_model(rotated, arch_for(rotated), None, RotateConfig(online=True))
    for model, expected in ((rotated, True), (plain, False)):
        assert kv_cache_factory(model, KVCacheConfig(bits=4))().cfg.hadamard is expected
        assert kv_cache_factory(model, KVCacheConfig(bits=4, hadamard=not expected))().cfg.hadamard is not expected
    assert kv_cache_factory(rotated, KVCacheConfig(bits=16)) is None


def _compress(calib, recipe, out=None, **kw):
    tok, data = calib
    model = tiny_model("llama", seed=3, vocab_size=len(tok), tie_word_embeddings=True)
    return compress(model, recipe, tokenizer=tok, data=data, samples=4, seq_len=32, out=out, **kw)


@pytest.mark.parametrize("recipe", ["rotate+gptq-w4a4", "gptq-w4a4", "rotate(online=true)+w4a4(act_bits=6)",
                                    "rotate(online=true)+gptq-w4-g64", "rotate+gptq-w4a4-g64",
                                    "rotate(online=true)+gptq-w4a4-g64"])
def test_w4a4_folder_reloads_with_identical_logits(calib, tmp_path, recipe):
    out = tmp_path / "out"
    result = _compress(calib, recipe, out)
    ids = random_ids(2, 16, seed=4)
    after = _logits(result.model, ids)
    reloaded = load_model(out)
    reloaded.model.set_attn_implementation("eager")
    assert torch.equal(_logits(reloaded.model, ids), after)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlmpressRotatedForCausalLM"] and "quantization_config" not in config
    assert (out / "rotated.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert formats.detect(out).name == "rotated" and formats.readers(out) == ["llmpress"]
    online = recipe.startswith("rotate")
    assert bool(config.get(CONFIG_KEY)) == online
    inputs = recipe == "rotate+gptq-w4a4-g64"  # rotate(online=true, residual=false): every linear's input
    for name, module in reloaded.model.named_modules():
        if name.endswith(("mlp.down_proj", "self_attn.o_proj")):
            assert has_input_hadamard(module) == online
        if name.endswith(("self_attn.q_proj", "mlp.up_proj")):
            assert has_input_hadamard(module) == inputs
    assert (reloaded.model.lm_head.weight is reloaded.model.get_input_embeddings().weight) == (not online or inputs)
    int_layers = [m for m in reloaded.model.modules() if isinstance(m, W4A4Linear)]
    assert len(int_layers) == (0 if recipe.endswith("gptq-w4-g64") else 14)
    if recipe == "rotate+gptq-w4a4-g64":  # groups of 64 and a searched clip per linear, saved and reloaded
        assert all(m.group_size == 64 for m in int_layers) and len({m.act_clip for m in int_layers}) > 1
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(),
                                                 reloaded.model.state_dict().values()))
    from safetensors import safe_open

    with safe_open(out / "rotated.safetensors", "pt") as f:  # int4 codes eight to an int32 word on disk
        for name, module in reloaded.model.named_modules():
            if isinstance(module, W4A4Linear):
                packed = f.get_tensor(f"{name}.weight_packed")
                assert packed.dtype == torch.int32 and f"{name}.weight" not in f.keys()
                assert packed.shape == (module.out_features, -(-module.in_features * module.bits // 32))


def test_w4a4_keeps_the_codes_gptq_chose(calib):
    recipe = builtin_recipes()["gptq-w4a4"]
    assert [s["method"] for s in recipe["stages"]] == ["gptq", "w4a4"]
    gptq = _compress(calib, {**recipe, "stages": recipe["stages"][:1]})  # the same GPTQ, without w4a4
    w4a4 = _compress(calib, "gptq-w4a4")
    for name, module in w4a4.model.named_modules():
        if isinstance(module, W4A4Linear):
            assert torch.equal(module.dequantized_weight(), gptq.model.get_submodule(name).weight)
            assert w4a4.layers[name]["method"] == "gptq+w4a4" and w4a4.layers[name]["act_bits"] == 4
    assert "act_clip" in w4a4.layers["model.layers.0.mlp.down_proj"]


def test_kv4_evaluation_of_a_rotated_folder_rotates_the_cache(calib, tmp_path):
    tok, data = calib
    out = tmp_path / "out"
    _compress(calib, "rotate+gptq-w4a4", out)
    args = dict(tokenizer=tok, seq_len=32, max_windows=2, measure_speed=False)
    auto = llmpress.evaluate(str(out), data, kv_cache=4, **args)
    off = llmpress.evaluate(str(out), data, kv_cache={"bits": 4, "hadamard": False}, **args)
    assert auto["kv_cache"]["hadamard"] is True and off["kv_cache"]["hadamard"] is False
    assert auto["perplexity"] != off["perplexity"]


def test_formats_that_would_drop_the_online_transforms_refuse(calib, tmp_path):
    for fmt in ("compressed-tensors", "dense"):
        with pytest.raises(LlmpressError, match="online rotations or W4A4"):
            _compress(calib, "rotate(online=true)+gptq-w4-g64", tmp_path / fmt, format=fmt)
    with pytest.raises(LlmpressError, match="llama.cpp"):
        _compress(calib, "rotate(online=true)", tmp_path / "m.gguf", format="gguf")
    result = _compress(calib, "rotate(online=true)")
    result.model.model.layers[0].mlp.down_proj._forward_pre_hooks.clear()  # as if a stage had replaced the module
    with pytest.raises(LlmpressError, match="online Hadamard before model.layers.0.mlp.down_proj is gone"):
        formats.choose("auto", result.model, {}, {})


def test_smoothing_skips_the_rotated_down_proj_and_w8a8_keeps_the_hadamard(calib, tmp_path):
    out = tmp_path / "out"
    result = _compress(calib, "rotate(online=true)+smoothquant-w8a8", out)
    assert result.layers["model.layers.0.mlp.down_proj"]["smoothed"] is False
    assert result.layers["model.layers.0.mlp.gate_proj"]["smoothed"] is True
    down = result.model.model.layers[0].mlp.down_proj
    assert isinstance(down, W8A8Linear) and has_input_hadamard(down)
    ids = random_ids(2, 16, seed=4)
    reloaded = load_model(out).model
    reloaded.set_attn_implementation("eager")
    assert torch.equal(_logits(reloaded, ids), _logits(result.model, ids))


def test_spinquant_learns_an_orthogonal_rotation_that_keeps_the_float_function(calib):
    tok, data = calib
    result = _compress(calib, "rotate(online=true)+spinquant(steps=3,samples=2,seq_len=16)")
    base = tiny_model("llama", seed=3, vocab_size=len(tok), tie_word_embeddings=True)
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(_logits(result.model, ids), _logits(base, ids), atol=1e-4, rtol=1e-4)
    R, losses = learn_rotation(result.model, arch_for(result.model), ids, SpinQuantConfig(steps=2, seq_len=16))
    assert torch.allclose(R @ R.T, torch.eye(R.shape[0], dtype=torch.float64), atol=1e-5)
    assert len(losses) == 2 and (R - torch.eye(R.shape[0], dtype=torch.float64)).abs().max() > 1e-3
    assert torch.allclose(_logits(result.model, ids), _logits(base, ids), atol=1e-4, rtol=1e-4)  # hooks removed
    for recipe in ("spinquant(steps=1,seq_len=16)", "rotate(online=true,residual=false)+spinquant(steps=1,seq_len=16)"):
        with pytest.raises(LlmpressError, match=r"put rotate\(online=true\) \(without residual=false"):
            _compress(calib, recipe)


def test_act_clip_errors_match_a_plain_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 24, generator=gen) * torch.linspace(0.2, 3, 24)
    W = torch.randn(5, 24, generator=gen)
    clips = (0.5, 0.8, 0.95)  # (not 1: the absmax lands on x/s = 7.5 exactly, a tie float rounding decides)
    found = act_clip_errors(x, W, 4, clips)
    for k, clip in enumerate(clips):
        total = 0.0
        for t in range(7):
            s = clip * x[t].abs().max().item() / 7.5
            xq = torch.tensor([max(-8, min(7, round(v / s))) * s for v in x[t].tolist()])
            total += float(((xq - x[t]) @ W.T).pow(2).sum())
        assert found[k].item() == pytest.approx(total, rel=1e-4)


def test_w4a4_clip_search_picks_a_clip_per_linear(calib):
    result = _compress(calib, "rotate(online=true)+w4a4(clip_search=true,clip_tokens=64)")
    chosen = {name: record["act_clip"] for name, record in result.layers.items()}
    assert len(chosen) == 14 and set(chosen.values()) <= set(CLIP_GRID)
    for name, clip in chosen.items():
        assert result.model.get_submodule(name).act_clip == clip
    tok, _ = calib
    with pytest.raises(LlmpressError, match="clip_search=true\\) needs calibration data"):
        compress(tiny_model("llama", seed=3, vocab_size=len(tok)), "w4a4(clip_search=true)", tokenizer=tok)
