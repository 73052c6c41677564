"""KV-cache quantization: the grid against a plain per-group reference, the cache against
fake quantization, logits on tiny GQA models (Llama, Qwen3, Gemma 3 with sliding windows),
generation against teacher forcing, and the recipe/evaluate wiring."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmpress import compress, evaluate
from llmpress.errors import LlmpressError
from llmpress.quant.kvcache import QuantizedKVCache, QuantizedKVLayer
from llmpress.quant.kvgrid import (
    KVCacheConfig,
    dequantize_kv,
    fake_quantize_kv,
    kv_bytes_per_token,
    kv_config_from_meta,
    pack_codes,
    quantize_kv,
    unpack_codes,
)
from llmpress.recipe import load_recipe
from tiny_models import TOKENIZER_TEXT, random_ids, tiny_model, tiny_tokenizer

GQA_TYPES = ["llama", "qwen3", "gemma3_text"]  # tiny configs: 4 heads / 2 KV heads, head_dim 16


def _kv(shape=(2, 3, 32, 16), seed=0):
    """Keys-like data: per-channel offsets and scales (one-signed channels), plus noise."""
    g = torch.Generator().manual_seed(seed)
    b, h, t, d = shape
    return (torch.randn(shape, generator=g) * torch.rand(1, h, 1, d, generator=g) * 3
            + torch.randn(1, h, 1, d, generator=g) * 5)


def _fp16_directed(value: float, up: bool) -> float:
    h = torch.tensor(value).half()
    if (h.float().item() < value) if up else (h.float().item() > value):
        h = torch.nextafter(h, torch.tensor(float("inf") if up else float("-inf")).half())
    return h.float().item()


def _reference_fake_quantize(x, bits, group, axis):
    """Obviously-correct min-max quantization, one group at a time, plus each element's scale."""
    out, scales = torch.empty_like(x), torch.empty_like(x)
    levels = 2 ** bits - 1
    b, h, t, d = x.shape
    slices = [(slice(i, i + 1), slice(0, d)) for i in range(t)] if axis == "token" else \
        [(slice(i, i + group), slice(c, c + 1)) for i in range(0, t, group) for c in range(d)]
    for bi in range(b):
        for hi in range(h):
            for ts, cs in slices:
                ranges = [cs] if axis == "channel" else [slice(j, j + group) for j in range(0, d, group)]
                for rs in ranges:
                    v = x[bi, hi, ts, rs]
                    off = _fp16_directed(v.min().item(), up=False)
                    s = _fp16_directed((v.max().item() - off) / levels, up=True) or 1.0
                    q = torch.clamp(torch.round((v - off) / s), 0, levels)
                    out[bi, hi, ts, rs] = q * s + off
                    scales[bi, hi, ts, rs] = s
    return out, scales


def test_config_is_validated_with_one_line_messages():
    for bad in ({"bits": 3}, {"bits": 32}, {"bits": True}, {"group_size": 0}, {"group_size": 1.5},
                {"key_axis": "head"}, {"residual_tokens": -1}):
        with pytest.raises(LlmpressError) as info:
            KVCacheConfig(**bad)
        assert "\n" not in str(info.value) and ": " in str(info.value)
    with pytest.raises(LlmpressError, match="divide head_dim"):
        quantize_kv(torch.zeros(1, 1, 2, 48), 8, 32)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis,group", [("token", 8), ("token", 16), ("channel", 8)])
def test_round_trip_matches_reference_within_half_a_step(bits, axis, group):
    x = _kv()
    codes = quantize_kv(x, bits, group, axis)
    assert codes.q.dtype == torch.uint8 and int(codes.q.max()) <= 2 ** bits - 1
    assert codes.scale.dtype == torch.float16 and codes.offset.dtype == torch.float16
    xhat = dequantize_kv(codes, group, axis)
    ref, scales = _reference_fake_quantize(x, bits, group, axis)
    torch.testing.assert_close(xhat, ref, rtol=0, atol=1e-5)
    assert ((x - xhat).abs() <= scales * 0.5 * (1 + 1e-5) + 1e-6).all()
    assert torch.equal(fake_quantize_kv(x, KVCacheConfig(bits, group, key_axis=axis), key=True), xhat)


def test_int8_error_is_far_below_int4():
    x = _kv(seed=1)
    err = {b: (fake_quantize_kv(x, KVCacheConfig(bits=b, group_size=16)) - x).pow(2).mean().item() for b in (8, 4, 2)}
    assert err[8] < err[4] / 100 and err[4] < err[2] / 4  # ~ (2^b - 1)^-2: 17^2 / 255^2 and 15^2 / 3^2
    # per-channel key groups beat per-token groups on channel-offset data (KIVI's observation)
    chan = (fake_quantize_kv(x, KVCacheConfig(bits=4, group_size=8, key_axis="channel"), key=True) - x).pow(2).mean()
    assert chan < err[4]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 2 ** bits, (2, 3, 5, 16), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.shape[-1] == 16 * bits // 8 and torch.equal(unpack_codes(packed, bits), q)


@pytest.mark.parametrize("cfg", [
    KVCacheConfig(bits=8, group_size=8),
    KVCacheConfig(bits=4, group_size=16, residual_tokens=2),
    KVCacheConfig(bits=4, group_size=4, key_axis="channel", residual_tokens=3),
])
@pytest.mark.parametrize("window", [None, 6])
def test_cache_returns_fake_quantized_inputs(cfg, window):
    layer = QuantizedKVLayer(cfg, sliding_window=window)
    keys, values = _kv((1, 2, 20, 16), seed=2), _kv((1, 2, 20, 16), seed=3)
    seen = 0
    for step in (5, 1, 1, 7, 1, 3, 2):
        k, v = layer.update(keys[..., seen:seen + step, :], values[..., seen:seen + step, :])
        past, seen = seen, seen + step
        visible = seen if window is None else min(past, window - 1) + step
        assert torch.equal(k, fake_quantize_kv(keys[..., :seen, :], cfg, key=True)[..., -visible:, :])
        assert torch.equal(v, fake_quantize_kv(values[..., :seen, :], cfg)[..., -visible:, :])
        assert layer.get_seq_length() == seen
        assert layer.get_mask_sizes(1) == ((seen + 1, 0) if window is None
                                           else (min(seen, window - 1) + 1, max(seen - window + 1, 0)))


def _logits(model, ids, cfg=None):
    with torch.no_grad():
        if cfg is None:
            return model(input_ids=ids, use_cache=False).logits
        return model(input_ids=ids, past_key_values=QuantizedKVCache(cfg, model.config), use_cache=True).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("model_type", GQA_TYPES)
def test_logits_identical_at_16_bits_close_at_8_further_at_4(model_type):
    model = tiny_model(model_type, seed=3)
    ids = random_ids(2, 24, seed=4)  # longer than gemma3's sliding window of 8
    plain = _logits(model, ids)
    cache = QuantizedKVCache(KVCacheConfig(bits=16), model.config)
    if model_type == "gemma3_text":
        assert cache.is_sliding == [True, False]
    assert torch.equal(_logits(model, ids, KVCacheConfig(bits=16)), plain)
    int8 = _rel(_logits(model, ids, KVCacheConfig(bits=8)), plain)
    int4 = _rel(_logits(model, ids, KVCacheConfig(bits=4)), plain)
    assert 0 < int8 < 1e-2 and int4 > 4 * int8


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_generation_matches_teacher_forced_logits(model_type):
    model = tiny_model(model_type, seed=5)
    ids = random_ids(2, 10, seed=6)
    cfg = KVCacheConfig(bits=4)
    out = model.generate(ids, past_key_values=QuantizedKVCache(cfg, model.config), max_new_tokens=6,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    generated = torch.stack(out.logits, dim=1)
    teacher = _logits(model, out.sequences, cfg)[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(generated, teacher, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(teacher, _logits(model, out.sequences)[:, ids.shape[1] - 1:-1], atol=1e-4)


def test_stored_bytes_match_the_analytic_count():
    model = tiny_model("llama", seed=7)
    for cfg in (KVCacheConfig(bits=8), KVCacheConfig(bits=4, group_size=8),
                KVCacheConfig(bits=4, group_size=8, key_axis="channel")):
        cache = QuantizedKVCache(cfg, model.config)
        with torch.no_grad():
            model(input_ids=random_ids(1, 32), past_key_values=cache, use_cache=True)
        assert cache.nbytes() == pytest.approx(32 * kv_bytes_per_token(cfg, model.config)["bytes_per_token"])
    # SmolLM2-135M's shape (30 layers, 3 KV heads, head_dim 64): codes plus fp16 scale and offset per group
    smol = type("Cfg", (), {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                            "head_dim": 64, "hidden_size": 576})()
    for bits in (8, 4):
        got = kv_bytes_per_token(KVCacheConfig(bits=bits), smol)
        assert got["bytes_per_token"] == 30 * 2 * 3 * (64 * bits / 8 + 2 + 2)
        assert got["fp16_bytes_per_token"] == 30 * 2 * 3 * 64 * 2


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), hidden_size=128, intermediate_size=256, head_dim=32)
    text = tmp_path_factory.mktemp("kv") / "text.txt"
    text.write_text(TOKENIZER_TEXT * 4)
    return model, tok, f"text:{text}"


def _reference_perplexity(model, tok, data, cfg, seq_len=32, windows=2):
    ids = tok(open(data[5:]).read(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    batch = ids[: windows * seq_len].reshape(windows, seq_len)
    nll = [F.cross_entropy(_logits(model, batch[i:i + 1], cfg)[0, :-1], batch[i, 1:], reduction="sum").item()
           for i in range(windows)]
    return math.exp(sum(nll) / (windows * (seq_len - 1)))


def test_evaluate_applies_an_explicit_kv_setting(tiny_eval):
    model, tok, data = tiny_eval
    args = dict(tokenizer=tok, seq_len=32, max_windows=2, measure_speed=False)
    plain = evaluate(model, data, **args)
    int4 = evaluate(model, data, kv_cache={"bits": 4, "group_size": 32}, **args)
    assert "kv_cache" not in plain and int4["kv_cache"]["bits"] == 4 and int4["kv_cache"]["ratio"] > 3
    assert int4["perplexity"] != plain["perplexity"]
    ref = _reference_perplexity(model, tok, data, KVCacheConfig(bits=4, group_size=32))
    assert int4["perplexity"] == pytest.approx(ref, rel=1e-5)
    with pytest.raises(LlmpressError, match="bits"):
        evaluate(model, data, kv_cache=5, **args)


def test_kv_recipe_leaves_weights_alone_and_evaluate_reads_it(tiny_eval):
    model, tok, data = tiny_eval
    stage = load_recipe("kv-int4").stages[0]
    assert stage.method == "kv-cache" and stage.config == KVCacheConfig(bits=4, group_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress(model, "kv-int4", tokenizer=tok)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert kv_config_from_meta(result.meta) == KVCacheConfig(bits=4)
    args = dict(tokenizer=tok, seq_len=32, max_windows=2, measure_speed=False)
    from_recipe = evaluate(result, data, **args)
    assert from_recipe["perplexity"] == pytest.approx(_reference_perplexity(model, tok, data, KVCacheConfig(bits=4)),
                                                      rel=1e-5)
    assert evaluate(result, data, kv_cache=16, **args)["perplexity"] == pytest.approx(
        evaluate(model, data, **args)["perplexity"], rel=1e-9)
    assert kv_config_from_meta({"kv_cache": {"bits": 8}}) == KVCacheConfig(bits=8)
    assert kv_config_from_meta({"recipe": {"stages": [{"method": "rtn", "args": {}}]}}) is None


@pytest.mark.real
def test_real_model_int8_kv_is_nearly_free_int4_costs_more():
    args = dict(seq_len=1024, max_windows=1, measure_speed=False)
    from llmpress.models.loader import load_model

    loaded = load_model("smollm2-135m")
    ppl = {bits: evaluate(loaded, "austen:eval", kv_cache=bits, **args)["perplexity"] for bits in (16, 8, 4)}
    assert ppl[8] == pytest.approx(ppl[16], rel=0.01)
    assert ppl[4] > ppl[8]
