"""SmoothQuant W8A8: the scales, the exact fold, the int8 runtime linear against plain references."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llmpress.engine import compress_blocks
from llmpress.errors import LlmpressError
from llmpress.models.archs import arch_for, block_linears, get_blocks
from llmpress.quant.smoothquant import SmoothQuantConfig, smoothquant_scales
from llmpress.quant.w8a8 import (
    W8A8Linear,
    int8_matmul,
    int_mm_supported,
    is_w8a8_config,
    load_w8a8_folder,
    quantize_a8_per_token,
    quantize_w8,
    w8a8_quantization_config,
)
from llmpress.recipe import Stage, load_recipe
from llmpress.save import save_model
from tiny_models import random_ids, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _smoothquant(model, ids, **args):
    stage = Stage("smoothquant", SmoothQuantConfig(**args))
    return compress_blocks(model, arch_for(model), [stage], ids, batch_size=4)


def reference_codes(X, levels=127.5):
    """Per-row symmetric int8 codes, one row at a time: clamp(round(x / (absmax / 127.5)), -128, 127)."""
    codes, scales = torch.empty(X.shape, dtype=torch.int8), torch.empty(X.shape[0], 1)
    for r in range(X.shape[0]):
        s = X[r].abs().max() / levels
        s = s if s > 0 else torch.tensor(1.0)
        codes[r] = torch.clamp(torch.round(X[r] / s), -128, 127).to(torch.int8)
        scales[r] = s
    return codes, scales


# --- the pure functions ---------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_scales_match_the_formula_channel_by_channel(alpha):
    torch.manual_seed(0)
    act = torch.rand(12) * 10
    act[3] = 0.0  # a channel never used by the calibration data
    weights = [torch.randn(5, 12), torch.randn(7, 12) * 3]
    weights[0][:, 7] = 0.0
    weights[1][:, 7] = 0.0  # a channel no weight reads
    s = smoothquant_scales(act, weights, alpha)
    for j in range(12):
        w_max = max(float(W[k, j].abs()) for W in weights for k in range(W.shape[0]))
        if act[j] == 0 or w_max == 0:
            expected = 1.0
        else:
            expected = float(act[j]) ** alpha / w_max ** (1 - alpha)
        assert s[j].item() == pytest.approx(expected, rel=1e-5), j
    # after smoothing, max|X_j / s_j| = (max|X_j| max|W_j|)^(1-a) and max|W_j s_j| = (...)^a: equal at a = 0.5
    w = torch.stack([W.abs().amax(0) for W in weights]).amax(0)
    live = (act > 0) & (w > 0)
    assert torch.allclose((act / s)[live], (act * w)[live] ** (1 - alpha), rtol=1e-5)
    assert torch.allclose((w * s)[live], (act * w)[live] ** alpha, rtol=1e-5)


def test_scales_are_clamped_away_from_zero():
    s = smoothquant_scales(torch.tensor([1e-12, 1.0]), [torch.tensor([[1e6, 1.0]])], 0.5)
    assert (s >= 1e-5).all() and torch.isfinite(s).all()


def test_weight_and_activation_codes_match_row_loops():
    torch.manual_seed(1)
    W = torch.randn(16, 40) * torch.rand(16, 1)
    W[3] = 0.0
    q, scale = quantize_w8(W)
    ref_q, ref_scale = reference_codes(W)
    assert q.dtype == torch.int8 and torch.equal(q, ref_q) and torch.allclose(scale, ref_scale, rtol=1e-7)
    assert ((q.float() * scale - W).abs() <= scale / 2 + 1e-7).all()
    X = torch.randn(9, 40) * 5
    X[2] = 0.0
    xq, xs = quantize_a8_per_token(X)
    ref_xq, ref_xs = reference_codes(X)
    assert torch.equal(xq, ref_xq) and torch.allclose(xs, ref_xs, rtol=1e-7)


@pytest.mark.parametrize("M,K,N", [(1, 576, 1536), (5, 1, 3), (17, 63, 9), (3, 1024, 8), (33, 2048, 24)])
def test_int8_matmul_is_exact_on_every_path(M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    a[0] = -128  # worst case for the fp32 bound: 128² · K
    b[0] = -128
    exact = a.long() @ b.long().t()
    paths = ["auto", "fp32"] + (["int_mm"] if int_mm_supported(M, K, N, a.device) else [])
    for path in paths:
        out = int8_matmul(a, b, path)
        assert out.dtype == torch.int32 and torch.equal(out.long(), exact), path
    assert exact[0, 0] == 128 * 128 * K


def test_w8a8_linear_equals_float64_integer_math_on_both_paths():
    torch.manual_seed(2)
    weight, bias = torch.randn(24, 1536) / 40, torch.randn(24)
    x = torch.randn(2, 7, 1536)
    x[..., 5] *= 60  # an outlier channel
    layers = {p: W8A8Linear.from_float(weight, bias, path=p) for p in ("int_mm", "fp32")}
    out = layers["int_mm"](x)
    assert out.shape == (2, 7, 24) and out.dtype == torch.float32
    assert torch.equal(out, layers["fp32"](x))  # the int32 accumulator is the same, so is everything after
    wq, ws = reference_codes(weight)
    xq, xs = reference_codes(x.reshape(-1, 1536))
    ref = (xq.double() @ wq.double().t()) * xs.double() * ws.double().t() + bias.double()
    assert torch.allclose(out.reshape(-1, 24).double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(layers["fp32"].weight, wq) and layers["fp32"].weight.dtype == torch.int8
    # without an outlier it approximates the float linear to int8 accuracy (SQNR > 30 dB)
    x = torch.randn(2, 7, 1536)
    exact = torch.nn.functional.linear(x, weight, bias)
    noise = (layers["int_mm"](x) - exact).pow(2).mean()
    assert 0 < noise < 1e-3 * exact.pow(2).mean()


# --- the block adapter on tiny models ------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "opt", "phi3"])
def test_smoothing_alone_leaves_logits_unchanged(model_type):
    model, ids = tiny_model(model_type, seed=3), random_ids(4, 16, seed=4)
    before = _logits(model, ids)
    norm_before = {n: p.clone() for n, p in model.named_parameters() if p.dim() == 1}
    layers = _smoothquant(model, ids, quantize=False)
    assert torch.allclose(_logits(model, ids), before, atol=1e-5, rtol=1e-5)
    changed = [n for n, p in model.named_parameters() if n in norm_before and not torch.equal(p, norm_before[n])]
    assert changed, "no norm or bias was rescaled: the fold did not happen"
    assert all(meta["method"] == "smoothquant" and "bits" not in meta for meta in layers.values())


def _outlier_llama(seed: int, factor: float = 40.0):
    """A tiny Llama whose hidden channel 5 is an activation outlier (norm weight x factor), with the
    consumers' column divided by factor so the float model computes exactly what it did."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        for block in get_blocks(model, arch_for(model)):
            for norm, consumers in ((block.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                    (block.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[5] *= factor
                parent = block.self_attn if consumers[0] == "q_proj" else block.mlp
                for name in consumers:
                    getattr(parent, name).weight[:, 5] /= factor
    return model


def test_smoothquant_beats_plain_w8a8_on_an_outlier_channel():
    ids = random_ids(8, 32, seed=5)
    reference = _logits(_outlier_llama(6), ids)
    errors = {}
    for label, args in {"smoothquant": {"alpha": 0.5}, "plain": {"smooth": False}}.items():
        model = _outlier_llama(6)
        layers = _smoothquant(model, ids, **args)
        assert all(isinstance(m, W8A8Linear) for b in get_blocks(model, arch_for(model))
                   for m in block_linears(b, arch_for(model)).values())
        meta = layers["model.layers.1.mlp.down_proj"]
        assert (meta["bits"], meta["act_bits"], meta["group_size"], meta["shape"]) == (8, 8, -1, [64, 128])
        errors[label] = (_logits(model, ids) - reference).pow(2).mean().item()
    assert errors["smoothquant"] < 0.5 * errors["plain"], errors


def test_calibration_of_the_next_block_sees_the_w8a8_outputs():
    """Block 1 is calibrated on what the W8A8 block 0 really outputs (the engine re-runs it)."""
    model, ids = tiny_model("llama", seed=7), random_ids(4, 16, seed=8)
    seen = []
    block1 = get_blocks(model, arch_for(model))[1]
    handle = block1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    _smoothquant(model, ids)  # calls: capture of the inputs, then block 1's calibration run
    handle.remove()
    assert len(seen) == 2
    truth = []
    handle = block1.register_forward_pre_hook(lambda _m, args: truth.append(args[0].clone()))
    _logits(model, ids)
    handle.remove()
    assert seen[1].dtype == torch.float32
    assert torch.allclose(seen[1], truth[0], atol=1e-5, rtol=1e-5)


def test_config_validation():
    with pytest.raises(LlmpressError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(LlmpressError, match="alpha"):
        SmoothQuantConfig(alpha=-0.1)
    with pytest.raises(LlmpressError, match="alpha"):
        SmoothQuantConfig(alpha=True)
    with pytest.raises(LlmpressError, match="does nothing"):
        SmoothQuantConfig(smooth=False, quantize=False)
    with pytest.raises(LlmpressError, match="path"):
        SmoothQuantConfig(path="gpu")
    with pytest.raises(LlmpressError, match="unknown key"):
        load_recipe({"stages": [{"method": "smoothquant", "args": {"beta": 0.5}}]})
    recipe = load_recipe("smoothquant-w8a8")
    assert recipe.stages[0].method == "smoothquant" and recipe.stages[0].config.alpha == 0.5
    assert recipe.needs_calibration


def test_a_second_w8a8_stage_is_refused():
    model, ids = tiny_model("llama", seed=9), random_ids(2, 8, seed=9)
    stage = Stage("smoothquant", SmoothQuantConfig())
    compress_blocks(model, arch_for(model), [stage], ids)
    with pytest.raises(LlmpressError, match="already W8A8"):
        compress_blocks(model, arch_for(model), [stage], ids)


def test_saved_folder_is_int8_compressed_tensors_and_reloads_exactly(tmp_path):
    model, ids = tiny_model("llama", seed=10), random_ids(2, 16, seed=11)
    layers = _smoothquant(model, ids)
    expected = _logits(model, ids)
    model.config.quantization_config = w8a8_quantization_config(model)
    out = save_model(model, None, tmp_path / "w8a8", {"layers": layers})
    tensors = {}
    for file in out.glob("*.safetensors"):
        tensors.update(load_file(file))
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 1)
    config = json.loads((out / "config.json").read_text())
    assert is_w8a8_config(config["quantization_config"]) and config["quantization_config"]["ignore"] == ["lm_head"]
    assert json.loads((out / "llmpress.json").read_text())["layers"]["model.layers.1.self_attn.q_proj"]["act_bits"] == 8
    reloaded = load_w8a8_folder(out)
    assert isinstance(reloaded.model.layers[1].mlp.up_proj, W8A8Linear)
    assert all(torch.equal(t, reloaded.state_dict()[k]) for k, t in model.state_dict().items())
    # the same attention kernel as tiny_model's: sdpa's last-bit differences can flip an int8 activation code
    reloaded.set_attn_implementation(model.config._attn_implementation)
    assert torch.equal(_logits(reloaded, ids), expected)
    assert w8a8_quantization_config(tiny_model("llama")) is None
