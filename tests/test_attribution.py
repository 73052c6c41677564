"""Per-layer error attribution: the formulas against plain references, the engine's records against a
computation from scratch on the tiny models, and the compressed weights unchanged by recording them."""

import copy
import json
import math

import pytest
import torch

from llmpress import engine
from llmpress.api import _keep_errors_of_one_segment, compress
from llmpress.calib import hidden_of
from llmpress.engine import compress_blocks
from llmpress.measure.attribution import RelativeError, relative_error, relative_output_error
from llmpress.models.archs import arch_for, block_linears, get_blocks, linear_weight
from llmpress.recipe import load_recipe
from llmpress.stats import ErrorInputStats
from tiny_models import TOKENIZER_TEXT, random_ids, tiny_model, tiny_tokenizer


def _plain_output_error(X, W, W_hat):
    """‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖², straight from the definition, in float64."""
    X, W, W_hat = X.double(), W.double(), W_hat.double()
    return float(((X @ W.T - X @ W_hat.T) ** 2).sum() / ((X @ W.T) ** 2).sum())


def test_relative_output_error_equals_the_definition():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 24, generator=g) * torch.linspace(0.1, 5, 24)  # correlated scales: H far from I
    W = torch.randn(16, 24, generator=g)
    W_hat = W + 0.05 * torch.randn(16, 24, generator=g)
    expected = _plain_output_error(X, W, W_hat)
    assert relative_output_error(W, W_hat, X.T @ X) == pytest.approx(expected, rel=1e-5)
    # any positive multiple of XᵀX (HessianStats keeps 2/n·XᵀX) gives the same ratio
    assert relative_output_error(W, W_hat, 2 / 300 * X.T @ X) == pytest.approx(expected, rel=1e-5)
    # and it is not the weight error: the inputs weigh the columns
    assert relative_error(W, W_hat) != pytest.approx(expected, rel=0.05)
    assert relative_output_error(W, W_hat, torch.eye(24)) == pytest.approx(relative_error(W, W_hat), rel=1e-6)


@pytest.mark.parametrize("tokens", [1000, 3000])  # rows, then a Gram
def test_wide_output_error_in_bfloat16_keeps_three_digits(tokens):
    """Inputs at least BF16_ERROR_MIN wide take bfloat16 products on a CPU: within 5e-3 of the float64 figure."""
    from llmpress.measure.attribution import BF16_ERROR_MIN

    g = torch.Generator().manual_seed(tokens)
    d = BF16_ERROR_MIN
    X = (torch.randn(tokens, d, generator=g) * torch.rand(d, generator=g) * 3).bfloat16()
    W = torch.randn(48, d, generator=g).bfloat16().float()
    W_hat = W + 0.05 * torch.randn(48, d, generator=g)
    Xd = X.double()
    expected = float(((Xd @ (W - W_hat).double().T) ** 2).sum() / ((Xd @ W.double().T) ** 2).sum())
    given = X if tokens < d else X.float().T @ X.float()
    got = relative_output_error(W, W_hat, given)
    assert got == pytest.approx(expected, rel=5e-3)
    assert got != relative_output_error(W.double(), W_hat.double(), given.double())  # the bfloat16 route was taken


def test_relative_output_error_on_input_rows():
    """With fewer tokens than features, the error taken on X itself: the definition, and the Gram's value."""
    torch.manual_seed(1)
    X = (torch.randn(40, 96) * torch.rand(96) * 3).bfloat16()
    W = torch.randn(24, 96)
    W_hat = W + 0.05 * torch.randn(24, 96)
    Xd = X.double()
    want = float(((Xd @ (W - W_hat).double().T) ** 2).sum() / ((Xd @ W.double().T) ** 2).sum())
    got = relative_output_error(W, W_hat, X)
    assert got == pytest.approx(want, rel=1e-5)
    assert got == pytest.approx(relative_output_error(W, W_hat, X.float().T @ X.float()), rel=1e-4)
    with pytest.raises(ValueError, match="tokens < in"):
        relative_output_error(W, W_hat, torch.randn(120, 96))  # more rows than features: pass the Gram


def test_error_inputs_keep_the_smaller_of_rows_and_gram():
    torch.manual_seed(2)
    a, b = torch.randn(2, 3, 16).bfloat16(), torch.randn(2, 4, 16).bfloat16()
    acc = ErrorInputStats()
    acc.add_batch(a)  # 6 rows of 16 features: kept as they are
    rows = acc.result()
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, a.reshape(-1, 16))
    acc = ErrorInputStats()
    acc.add_batch(a)
    acc.add_batch(b)  # 6 + 8 < 16: still rows
    assert torch.equal(acc.result(), torch.cat([a.reshape(-1, 16), b.reshape(-1, 16)]))
    acc = ErrorInputStats()
    for batch in (a, b, a):  # 20 rows ≥ 16 features: the Gram instead, of every row
        acc.add_batch(batch)
    X = torch.cat([t.reshape(-1, 16) for t in (a, b, a)]).float()
    assert torch.allclose(acc.result(), 2 / 20 * X.T @ X, rtol=1e-5, atol=1e-6)
    assert ErrorInputStats().result() is None


def test_relative_error_and_its_accumulation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    expected = float(((b.double() - a.double()) ** 2).sum() / (a.double() ** 2).sum())
    assert relative_error(a, b) == pytest.approx(expected, rel=1e-12)
    total = RelativeError()
    for k in range(5):
        total.add(a[k], b[k])
    assert total.result() == pytest.approx(expected, rel=1e-12)


def test_degenerate_cases():
    W = torch.randn(3, 4)
    assert relative_output_error(W, W, torch.zeros(4, 4)) == 0.0  # never-active input: nothing to lose
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert math.isinf(relative_error(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match="expected"):
        relative_output_error(W, W, torch.eye(3))


def _direct(dense, compressed, ids):
    """Each linear's output error and each block's output change computed from scratch: block i gets the
    inputs the compressed blocks before it give; its linears' X come from the dense block i on them."""
    arch = arch_for(compressed)
    dense_blocks, comp_blocks = get_blocks(dense, arch), get_blocks(compressed, arch)
    prefix = next(n for n, m in compressed.named_modules() if m is comp_blocks) + "."
    linears, blocks = {}, {}
    for i in range(len(comp_blocks)):
        hybrid = copy.deepcopy(compressed)  # compressed blocks, block i dense
        get_blocks(hybrid, arch)[i].load_state_dict(dense_blocks[i].state_dict())
        seen, handles = {}, []

        def keep(key, value, seen=seen):
            seen.setdefault(key, value)  # the first call only; returns None so the hook changes nothing

        for name, module in block_linears(get_blocks(hybrid, arch)[i], arch).items():
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: keep(name, args[0].reshape(-1, args[0].shape[-1]))))
        handles.append(get_blocks(hybrid, arch)[i].register_forward_hook(
            lambda _m, _a, out: keep("dense out", hidden_of(out))))
        handles.append(comp_blocks[i].register_forward_hook(lambda _m, _a, out: keep("compressed out", hidden_of(out))))
        with torch.no_grad():
            hybrid(input_ids=ids, use_cache=False)
            compressed(input_ids=ids, use_cache=False)
        for h in handles:
            h.remove()
        for name, module in block_linears(comp_blocks[i], arch).items():
            W = linear_weight(block_linears(dense_blocks[i], arch)[name], arch)
            linears[f"{prefix}{i}.{name}"] = _plain_output_error(seen[name], W, linear_weight(module, arch))
        d, c = seen["dense out"].double(), seen["compressed out"].double()
        blocks[f"{prefix}{i}"] = float(((c - d) ** 2).sum() / (d ** 2).sum())
    return linears, blocks


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("recipe", ["gptq-w4-g64", "gptq-w4-g64-classic", "sparsegpt-50+gptq-w4"])
def test_recorded_errors_equal_a_direct_computation(model_type, recipe):
    dense = tiny_model(model_type, seed=4)
    model = copy.deepcopy(dense)
    ids = random_ids(4, 16, seed=5)
    block_records = {}
    layers = compress_blocks(model, arch_for(model), list(load_recipe(recipe).stages), ids, batch_size=2,
                             block_records=block_records)
    linears, blocks = _direct(dense, model, ids)
    assert set(linears) == set(layers) and set(blocks) == set(block_records) and len(blocks) == 2
    for name, expected in linears.items():
        assert "weight_error" not in layers[name]
        assert layers[name]["output_error"] == pytest.approx(expected, rel=1e-4), name
    for name, expected in blocks.items():
        assert block_records[name]["output_error"] == pytest.approx(expected, rel=1e-4), name
    assert all(0 < v < 0.5 for v in linears.values())


@pytest.mark.parametrize("recipe,sampled", [("gptq-w4-g64", True), ("rtn-w4-g64", True),
                                            ("gptq-w4-g64-classic", False)])
def test_errors_on_a_token_sample_unless_the_first_stage_reuses_the_pass(recipe, sampled):
    """With attribution_tokens=32 (the first batch of 2 x 16 tokens) the errors are those of the first two
    sequences; classic GPTQ reuses its Hessian pass, so its errors are on all of them."""
    dense = tiny_model("llama", seed=4)
    model = copy.deepcopy(dense)
    ids = random_ids(4, 16, seed=5)
    block_records = {}
    layers = compress_blocks(model, arch_for(model), list(load_recipe(recipe).stages), ids, batch_size=2,
                             block_records=block_records, attribution_tokens=32)
    linears, blocks = _direct(dense, model, ids[:2] if sampled else ids)
    for name, expected in linears.items():
        assert layers[name]["output_error"] == pytest.approx(expected, rel=1e-4), name
    assert {n: r["output_error"] for n, r in block_records.items()} == pytest.approx(blocks, rel=1e-4)


def test_without_samples_the_weight_error_is_recorded():
    dense = tiny_model("qwen2", seed=2)
    model = copy.deepcopy(dense)
    block_records = {}
    layers = compress_blocks(model, arch_for(model), list(load_recipe("rtn-w4-g64").stages), None,
                             block_records=block_records)
    assert block_records == {}
    reference = dict(dense.named_parameters())
    compressed = dict(model.named_parameters())
    for name, meta in layers.items():
        W, W_hat = reference[f"{name}.weight"].detach().double(), compressed[f"{name}.weight"].detach().double()
        assert "output_error" not in meta
        assert meta["weight_error"] == pytest.approx(float(((W - W_hat) ** 2).sum() / (W ** 2).sum()), rel=1e-6)


def test_rtn_with_samples_records_output_errors():
    dense = tiny_model("llama", seed=6)
    model = copy.deepcopy(dense)
    ids = random_ids(4, 16, seed=7)
    block_records = {}
    layers = compress_blocks(model, arch_for(model), list(load_recipe("rtn-w4-g64").stages), ids, batch_size=2,
                             block_records=block_records)
    linears, blocks = _direct(dense, model, ids)
    for name, expected in linears.items():
        assert layers[name]["output_error"] == pytest.approx(expected, rel=1e-4), name
    assert {n: r["output_error"] for n, r in block_records.items()} == pytest.approx(blocks, rel=1e-4)


@pytest.mark.parametrize("recipe,dtype", [
    ("gptq-w4-g64", None), ("gptq-w4-g64", torch.bfloat16), ("gptq-w4-g64-classic", None),
    ("sparsegpt-50", None), ("sparsegpt-50+gptq-w4", None), ("awq-w4-g64", None), ("wanda-50", None),
    ("rtn-w4-g64", None),
])
def test_recording_changes_no_weight(recipe, dtype):
    """The weights and the methods' own records come out bitwise the same with and without attribution
    (a stage that reuses the reference pass's Grams gets exactly what its own pass would give)."""
    base = tiny_model("llama", seed=8)
    ids = random_ids(4, 16, seed=9)
    runs = []
    for attribute in (False, True):
        model = copy.deepcopy(base)
        results = {}
        layers = compress_blocks(model, arch_for(model), list(load_recipe(recipe).stages), ids, batch_size=2,
                                 results=results, compute_dtype=dtype, attribute=attribute)
        runs.append((model.state_dict(), layers, results))
    (plain, plain_layers, plain_results), (measured, measured_layers, measured_results) = runs
    assert list(plain) == list(measured)
    assert all(torch.equal(plain[k], measured[k]) for k in plain)
    for name, meta in measured_layers.items():
        assert {k: v for k, v in meta.items() if k not in ("output_error", "weight_error")} == plain_layers[name]
    for name, result in plain_results.items():
        assert torch.equal(result.qweight, measured_results[name].qweight) if result.qweight is not None else True


def test_a_hessian_stage_reuses_the_reference_pass(monkeypatch):
    """Classic GPTQ (one pass per block for its Hessians) costs no extra statistics pass."""
    calls = []
    real = engine.collect_stats

    def counting(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "collect_stats", counting)
    ids = random_ids(4, 16, seed=1)
    for attribute in (False, True):
        calls.clear()
        model = tiny_model("llama", seed=1)
        compress_blocks(model, arch_for(model), list(load_recipe("gptq-w4-g64-classic").stages), ids, batch_size=2,
                        attribute=attribute)
        assert calls == [("hessian",)] * 2


def test_smoothing_blocks_get_block_errors_only():
    model = tiny_model("llama", seed=3)
    block_records = {}
    layers = compress_blocks(model, arch_for(model), list(load_recipe("awq-w4-g64").stages), random_ids(4, 16),
                             batch_size=2, block_records=block_records)
    assert not any("output_error" in m or "weight_error" in m for m in layers.values())
    assert len(block_records) == 2 and all(0 < r["output_error"] < 0.1 for r in block_records.values())


def test_errors_of_layers_rewritten_by_two_segments_are_dropped():
    layers = {"model.layers.0.mlp.up_proj": {"output_error": 0.1}, "model.layers.1.mlp.up_proj": {"output_error": 0.2}}
    blocks = {"model.layers.0": {"output_error": 0.01}, "model.layers.1": {"output_error": 0.02}}
    _keep_errors_of_one_segment(layers, blocks, [set(layers), {"model.layers.1.mlp.up_proj"}])
    assert layers == {"model.layers.0.mlp.up_proj": {"output_error": 0.1}, "model.layers.1.mlp.up_proj": {}}
    assert blocks == {"model.layers.0": {"output_error": 0.01}}


def test_compress_writes_the_records_into_llmpress_json(tmp_path):
    tok = tiny_tokenizer()
    text = tmp_path / "calib.txt"
    text.write_text(TOKENIZER_TEXT * 3)
    model = tiny_model("llama", seed=2, vocab_size=len(tok))
    compress(model, "gptq-w4-g64", tokenizer=tok, data=f"text:{text}", samples=4, seq_len=16, out=tmp_path / "gptq")
    meta = json.loads((tmp_path / "gptq" / "llmpress.json").read_text())
    assert set(meta["blocks"]) == {"model.layers.0", "model.layers.1"}
    assert all(rec["output_error"] > 0 for rec in meta["layers"].values())
    plain = compress(tiny_model("llama", seed=2, vocab_size=len(tok)), "rtn-w4-g64", tokenizer=tok)
    assert plain.blocks == {} and all("weight_error" in rec for rec in plain.layers.values())
    calibrated = compress(tiny_model("llama", seed=2, vocab_size=len(tok)), "rtn-w4-g64", tokenizer=tok,
                          data=f"text:{text}", samples=4, seq_len=16)
    assert len(calibrated.blocks) == 2 and all("output_error" in rec for rec in calibrated.layers.values())
