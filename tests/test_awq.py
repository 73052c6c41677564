"""AWQ: exact scale folding on every architecture, searches checked against plain token-by-token references."""

import dataclasses
import math

import pytest
import torch

import llmpress.quant.awq as awq_module
from llmpress.engine import compress_blocks
from llmpress.errors import LlmpressError
from llmpress.models.archs import arch_for, block_linears, get_blocks, linear_weight
from llmpress.primitives import fake_quantize
from llmpress.quant.awq import AWQConfig, apply_clip, awq_block, awq_clip, awq_scales, awq_search
from llmpress.quant.smoothing import TokenSample, fold_scales, sample_inputs
from llmpress.recipe import load_recipe
from tiny_models import EXTRA_TYPES, HEADS, TINY_TYPES, random_ids, tiny_model

# Feeds per architecture once GQA is off (num_key_value_heads = num_attention_heads).
FEEDS = {"phi3": 2, "gpt2": 2, "gpt_neox": 2, "phi": 2}


def _sqnr(ref, approx):
    return 10 * math.log10(float(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _block_outputs(model, ids):
    """Logits and the hidden states leaving every block, from one forward."""
    outs, handles = [], []
    for block in get_blocks(model, arch_for(model)):
        handles.append(block.register_forward_hook(
            lambda _m, _a, out: outs.append((out[0] if isinstance(out, tuple) else out).clone())))
    logits = _logits(model, ids)
    for h in handles:
        h.remove()
    return logits, outs


@pytest.mark.parametrize("model_type", TINY_TYPES + tuple(t for t in EXTRA_TYPES if t != "gemma3"))
def test_folding_random_scales_leaves_every_output_unchanged(model_type):
    model = tiny_model(model_type, seed=1, num_key_value_heads=HEADS).double()  # fp64: rounding far below 1e-5
    arch = arch_for(model)
    assert len(arch.feeds) == FEEDS.get(model_type, 4)  # v->o and fc1->fc2 are in where they exist
    ids = random_ids(2, 16, seed=3)
    logits, blocks_before = _block_outputs(model, ids)
    generator = _gen(0)
    block = get_blocks(model, arch)[0]
    weight_before = linear_weight(block.get_submodule(arch.feeds[-1][1][0]), arch).clone()
    for block in get_blocks(model, arch):
        for source, consumers in arch.feeds:
            width = linear_weight(block.get_submodule(consumers[0]), arch).shape[1]
            scales = torch.rand(width, generator=generator, dtype=torch.float64) * 1.5 + 0.5
            fold_scales(block, arch, source, consumers, scales)
    after, blocks_after = _block_outputs(model, ids)
    for b, a in zip(blocks_before, blocks_after):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert torch.allclose(after, logits, atol=1e-5, rtol=1e-5)
    block = get_blocks(model, arch)[0]
    assert not torch.allclose(linear_weight(block.get_submodule(arch.feeds[-1][1][0]), arch), weight_before)


def test_fold_without_the_source_would_change_outputs():
    """The check above can fail: scaling consumers alone (or a wrong Gemma offset) breaks the output."""
    model = tiny_model("gemma3_text", seed=1)
    arch = arch_for(model)
    ids = random_ids(2, 16, seed=3)
    before = _logits(model, ids)
    wrong = dataclasses.replace(arch, norm_offset=0.0)  # Gemma's norm computes x * (1 + w)
    fold_scales(get_blocks(model, arch)[0], wrong, "input_layernorm", arch.feeds[0][1], torch.full((64,), 2.0))
    assert (_logits(model, ids) - before).abs().max() > 1e-3


def _salient(seed, n=2048, d=256, salient=6, gain=15.0):
    X = torch.randn(n, d, generator=_gen(seed))
    X[:, :salient] *= gain
    return X


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("duo", [False, True])
def test_awq_scales_beat_rtn_on_held_out_salient_channels(sym, duo):
    cfg = AWQConfig(bits=4, group_size=64, sym=sym, duo_scaling=duo)
    weights = [torch.randn(o, 256, generator=_gen(o)) / 16 for o in (96, 32)]
    W = torch.cat(weights)
    calib, held_out = _salient(1), _salient(2)
    scales, loss = awq_scales(weights, calib, cfg)
    assert scales.shape == (256,) and bool((scales > 0).all())
    # the reported loss is the plain token-by-token output MSE of the chosen scales
    direct = (calib @ W.T - (calib / scales) @ fake_quantize(W * scales, 4, 64, sym).T).pow(2).mean()
    assert loss == pytest.approx(float(direct), rel=1e-4)
    ref = held_out @ W.T
    rtn = held_out @ fake_quantize(W, 4, 64, sym).T
    awq = (held_out / scales) @ fake_quantize(W * scales, 4, 64, sym).T
    assert _sqnr(ref, awq) >= _sqnr(ref, rtn) + 1.0
    assert scales[:6].min() > 1.5 * scales[6:].max()  # the salient channels are the ones scaled up


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("duo", [False, True])
def test_awq_scales_never_worse_than_rtn(seed, duo):
    """Isotropic inputs (nothing to protect), also fewer tokens than channels (the non-Gram path)."""
    cfg = AWQConfig(bits=3, group_size=32, sym=bool(seed % 2), duo_scaling=duo)
    W = torch.randn(48, 128, generator=_gen(seed))
    for X in (torch.randn(512, 128, generator=_gen(seed + 10)), torch.randn(40, 128, generator=_gen(seed + 20))):
        found = awq_search([W], X, cfg)
        rtn = float((X @ (W - fake_quantize(W, 3, 32, cfg.sym)).T).pow(2).mean())
        assert found.rtn_loss == pytest.approx(rtn, rel=1e-4)
        assert found.loss <= rtn * (1 + 1e-5)
        assert (found.alpha is None or found.alpha == 0.0) == torch.equal(found.scales, torch.ones(128))


def _group_errors(W, Wq, X, group):
    """Per (row, group) output error sum_t (x_t,g · (Wq - W)_g)², one group at a time over the tokens."""
    cols = range(0, W.shape[1], group)
    return torch.stack([(X[:, c:c + group] @ (Wq - W)[:, c:c + group].T).pow(2).sum(0) for c in cols], dim=1)


def _heavy_tailed(rows, cols, seed):
    g = _gen(seed)
    chi2 = torch.randn(3, rows, cols, generator=g).pow(2).sum(0)  # student-t, 3 degrees of freedom
    return torch.randn(rows, cols, generator=g) / (chi2 / 3).sqrt()


@pytest.mark.parametrize("sym", [False, True])
def test_awq_clip_reduces_output_error_and_never_increases_a_group(sym):
    cfg = AWQConfig(bits=4, group_size=64, sym=sym)
    W = _heavy_tailed(96, 200, seed=3)  # 200 columns: a partial last group of 8
    X = torch.randn(1024, 200, generator=_gen(4)) * torch.rand(200, generator=_gen(5))
    max_val = awq_clip(W, X, cfg)
    assert max_val.shape == (96, 4)
    clipped = apply_clip(W, max_val, 64)
    plain, shrunk = fake_quantize(W, 4, 64, sym), fake_quantize(clipped, 4, 64, sym)
    before, after = _group_errors(W, plain, X, 64), _group_errors(W, shrunk, X, 64)
    assert bool((after <= before * (1 + 1e-4) + 1e-6).all())
    assert after.sum() < 0.9 * before.sum()
    assert (X @ (shrunk - W).T).pow(2).sum() < (X @ (plain - W).T).pow(2).sum()
    assert bool((clipped.abs() <= W.abs()).all())


def test_awq_clip_equals_a_brute_force_loop():
    cfg = AWQConfig(bits=3, group_size=16, sym=False, clip_grid=10, max_shrink=0.4)
    W, X = _heavy_tailed(5, 40, seed=7), torch.randn(64, 40, generator=_gen(8))
    max_val = awq_clip(W, X, cfg)
    for r in range(5):
        for k, c in enumerate(range(0, 40, 16)):
            w, x = W[r:r + 1, c:c + 16], X[:, c:c + 16]
            absmax = w.abs().max()
            errors = []
            for i in range(11):
                m = absmax * (1 - i * 0.06)
                q = fake_quantize(w.clamp(-m, m), 3, 16, False)
                errors.append(float((x @ (q - w).T).pow(2).sum()))
            best = min(range(11), key=lambda i: (errors[i], i))
            assert float(max_val[r, k]) == pytest.approx(float(absmax) * (1 - best * 0.06), rel=1e-5)


@pytest.mark.parametrize("sym", [False, True])
def test_grouped_kernel_is_the_shared_fake_quantizer(sym):
    """The searches round with a grouped copy of the grid; it must be the one rtn/gptq use, bit for bit."""
    W = _heavy_tailed(7, 100, seed=9)
    W[0, :64] = 0.0  # an all-zero group
    padded = torch.nn.functional.pad(W, (0, 28)).reshape(7, 2, 64)
    got = awq_module._fake_quantize(padded, AWQConfig(bits=3, group_size=64, sym=sym)).reshape(7, 128)[:, :100]
    assert torch.equal(got, fake_quantize(W, 3, 64, sym))


def test_token_sample_is_a_bounded_uniform_subset():
    rows = torch.arange(300.0).reshape(3, 100, 1).expand(-1, -1, 2)
    everything, some = TokenSample(1000), TokenSample(64)
    for batch in rows:
        everything.add(batch)
        some.add(batch)
    assert torch.equal(everything.result(), rows.reshape(-1, 2))
    picked = some.result()[:, 0]
    assert picked.shape == (64,) and picked.unique().numel() == 64
    assert picked.max() > 200 and picked.min() < 100  # drawn from every batch


def test_captured_inputs_follow_the_folds_like_a_recapture(monkeypatch):
    """awq_block transforms its one capture (x -> x / s); clipping sees what a fresh capture would give."""
    model = tiny_model("llama", seed=2, num_key_value_heads=HEADS)
    arch = arch_for(model)
    block = get_blocks(model, arch)[0]
    modules = block_linears(block, arch)
    ids = random_ids(4, 32, seed=5)

    def run():
        return _logits(model, ids)

    first = sample_inputs(arch, modules, run, 50)
    seen = {}
    monkeypatch.setattr(awq_module, "awq_clip", lambda W, x, cfg: (seen.setdefault(len(seen), x),
                                                                    W.abs().reshape(W.shape[0], -1, 16).amax(-1))[1])
    meta = awq_block(block, arch, modules, run, AWQConfig(group_size=16, max_tokens=50))
    again = sample_inputs(arch, modules, run, 50)
    for i, name in enumerate(modules):
        assert torch.allclose(seen[i], again[name], rtol=1e-4, atol=1e-5), name
        assert not torch.allclose(first[name], again[name])  # every linear's input was rescaled
        assert meta[name]["method"] == "awq" and 0 <= meta[name]["awq_alpha"] < 1


def _with_outlier_channels(model_type, seed):
    """A tiny model whose norms boost a few channels, like the activation outliers of real LLMs."""
    model = tiny_model(model_type, seed=seed)
    arch = arch_for(model)
    with torch.no_grad():
        for block in get_blocks(model, arch):
            for source, _consumers in arch.feeds:
                module = block.get_submodule(source)
                if not isinstance(module, torch.nn.Linear):
                    module.weight[:4] *= 12
    return model, arch


def test_awq_alone_without_clip_keeps_logits():
    model, arch = _with_outlier_channels("qwen2", seed=6)
    model.double()  # the fold is exact: fp64 shows it without fp32 rounding noise
    ids = random_ids(4, 32, seed=7)
    before = _logits(model, ids)
    weight = get_blocks(model, arch)[1].self_attn.q_proj.weight.clone()
    stages = load_recipe({"stages": [{"method": "awq", "args": {"clip": False, "group_size": 32}}]}).stages
    layers = compress_blocks(model, arch, list(stages), ids, batch_size=2)
    assert torch.allclose(_logits(model, ids), before, atol=1e-5, rtol=1e-5)
    assert not torch.equal(get_blocks(model, arch)[1].self_attn.q_proj.weight, weight)
    assert set(layers) == {f"model.layers.{i}.{n}" for i in range(2)
                           for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # GQA: no v->o


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_awq_then_rtn_beats_rtn_end_to_end(model_type):
    calib, held_out = random_ids(16, 64, seed=11), random_ids(4, 64, seed=12)
    reference = _logits(_with_outlier_channels(model_type, seed=8)[0], held_out)
    errors, methods = {}, {}
    for name in ("awq-w4-g64", "rtn-w4-g64-asym"):
        model, arch = _with_outlier_channels(model_type, seed=8)
        layers = compress_blocks(model, arch, list(load_recipe(name).stages), calib, batch_size=8)
        errors[name] = float((_logits(model, held_out) - reference).pow(2).mean())
        methods[name] = {meta["method"] for meta in layers.values()}
        assert all(meta["bits"] == 4 and meta["sym"] is False for meta in layers.values())
    assert methods == {"awq-w4-g64": {"awq+rtn"}, "rtn-w4-g64-asym": {"rtn"}}
    assert errors["awq-w4-g64"] < 0.8 * errors["rtn-w4-g64-asym"], errors


def test_awq_composes_with_gptq():
    calib, held_out = random_ids(16, 64, seed=11), random_ids(4, 64, seed=12)
    reference = _logits(_with_outlier_channels("llama", seed=8)[0], held_out)
    errors, methods = {}, {}
    for name in ("awq+gptq-w4-g64", "rtn-w4-g64-asym"):
        model, arch = _with_outlier_channels("llama", seed=8)
        layers = compress_blocks(model, arch, list(load_recipe(name).stages), calib, batch_size=8)
        errors[name] = float((_logits(model, held_out) - reference).pow(2).mean())
        methods[name] = {meta["method"] for meta in layers.values()}
    assert methods == {"awq+gptq-w4-g64": {"awq+gptq"}, "rtn-w4-g64-asym": {"rtn"}}
    assert errors["awq+gptq-w4-g64"] < 0.8 * errors["rtn-w4-g64-asym"], errors


def test_config_is_validated():
    for bad in ({"n_grid": 0}, {"clip_grid": -1}, {"max_shrink": 0.0}, {"max_shrink": 1.5}, {"bits": 9},
                {"group_size": 0}, {"sym": "yes"}, {"max_tokens": 4}):
        with pytest.raises(LlmpressError):
            AWQConfig(**bad)
    with pytest.raises(LlmpressError, match="valid keys"):
        load_recipe({"stages": [{"method": "awq", "args": {"alpha": 0.5}}]})
    recipe = load_recipe("awq-w4-g64-sym")
    assert [s.method for s in recipe.stages] == ["awq", "rtn"] and recipe.stages[0].config.sym
    assert recipe.stages[1].config.sym and recipe.needs_calibration
