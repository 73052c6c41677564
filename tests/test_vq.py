"""GPTVQ (2-D vector quantization with GPTQ's error feedback) against slow references written here: the weighted
2-D k-means, the pair-by-pair OBQ solve with explicit inverses, the least-squares codebook refit; the codebook
folder round trip with exact logits; honest bits per weight; QAT of the codebooks."""

import json

import pytest
import torch

import llmpress
from llmpress.compressed import Grid
from llmpress.errors import LlmpressError
from llmpress.linalg import prepare_hessian
from llmpress.measure.size import layer_bytes, size_report
from llmpress.quant.gptq import GPTQConfig, gptq
from llmpress.quant.squeezellm import GPTQLUTConfig, gptq_lut
from llmpress.quant.vq import VQConfig, VQLinear, refit_vq_codebook, vector_kmeans, vq_gptq, vq_lookup
from llmpress.registry import builtin_recipes
from reference.gptq_reference import dead_inputs_dropped
from test_squeezellm import correlated_inputs, heavy_tailed, hessian_of, output_error
from tiny_models import random_ids, tiny_model

# --- 2-D weighted k-means against a per-group loop -------------------------------------------------------------


def reference_quantiles(values: list[float], weights: list[float], m: int) -> list[float]:
    pairs = sorted(zip(values, weights, strict=True), key=lambda p: p[0])
    if sum(w for _, w in pairs) == 0:
        pairs = [(v, 1.0) for v, _ in pairs]
    total, cums, run = sum(w for _, w in pairs), [], 0.0
    for _, w in pairs:
        run += w
        cums.append(run)
    return [pairs[next((j for j, c in enumerate(cums) if c >= (i + 0.5) / m * total), len(pairs) - 1)][0]
            for i in range(m)]


def reference_vector_kmeans(points: list[list[float]], weights: list[list[float]], m: int,
                            iterations: int) -> list[list[float]]:
    """One group: product grid of weighted quantiles, then Lloyd steps with explicit weighted distances."""
    axes = [reference_quantiles([p[d] for p in points], [w[d] for w in weights], m) for d in range(2)]
    C = [[axes[0][a], axes[1][b]] for a in range(m) for b in range(m)]
    for _ in range(iterations):
        mass = [[0.0, 0.0] for _ in C]
        moment = [[0.0, 0.0] for _ in C]
        for p, w in zip(points, weights, strict=True):
            dist = [sum(w[d] * (p[d] - c[d]) ** 2 for d in range(2)) for c in C]
            k = dist.index(min(dist))
            for d in range(2):
                mass[k][d] += w[d]
                moment[k][d] += w[d] * p[d]
        C = [[moment[k][d] / mass[k][d] if mass[k][d] > 0 else C[k][d] for d in range(2)] for k in range(len(C))]
    return C


@pytest.mark.parametrize("groups, n, m, iterations", [(3, 40, 4, 8), (2, 25, 2, 0), (1, 60, 4, 20)])
def test_vector_kmeans_matches_per_group_reference(groups, n, m, iterations):
    g = torch.Generator().manual_seed(n)
    points = torch.randn(groups, n, 2, generator=g, dtype=torch.float64) ** 3
    weights = torch.rand(groups, n, 2, generator=g, dtype=torch.float64)
    weights[0, : n // 3, 1] = 0  # some coordinates without weight
    got = vector_kmeans(points, weights, m * m, iterations)
    assert got.shape == (groups, m * m, 2)
    for k in range(groups):
        want = reference_vector_kmeans(points[k].tolist(), weights[k].tolist(), m, iterations)
        assert torch.allclose(got[k], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12), k


# --- GPTQ pair by pair against OBQ with explicit inverses ------------------------------------------------------


def reference_vq_obq(W: torch.Tensor, H: torch.Tensor, book: torch.Tensor, rows: int, damp: float) -> torch.Tensor:
    """Quantize column pairs jointly in order: with Hinv the inverse of the damped H restricted to the columns
    left and B its 2×2 leading block, each row takes the codeword minimising (w − c)ᵀB⁻¹(w − c) and the columns
    left move by −(w − c)ᵀB⁻¹Hinv[:2]. float64, one pair at a time. Codes (out, in/2)."""
    W, H = dead_inputs_dropped(W, H)
    out, n = W.shape
    H = H + damp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype)
    codes = torch.zeros(out, n // 2, dtype=torch.int64)
    for p in range(n // 2):
        rest = list(range(2 * p, n))
        Hinv = torch.linalg.inv(H[rest][:, rest])
        Binv = torch.linalg.inv(Hinv[:2, :2])
        for r in range(out):
            C = book[r // rows].double()
            diff = W[r, 2 * p:2 * p + 2] - C  # (K, 2)
            cost = ((diff @ Binv) * diff).sum(dim=1)
            k = int(cost.argmin())
            codes[r, p] = k
            W[r, rest] -= diff[k] @ Binv @ Hinv[:2]
    return codes


@pytest.mark.parametrize("rows", [1, 3])
def test_vq_gptq_equals_pairwise_obq_oracle(rows):
    X = correlated_inputs(600, 40, seed=1).double()
    X[:, 7] = 0  # a dead channel
    H = hessian_of(X)
    W = torch.randn(7, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for block in (128, 6, 2):
        cfg = VQConfig(bits=1, group_rows=rows, block_size=block, refit=False, lut_dtype="float32")
        got = vq_gptq(W, H, cfg)
        assert got.qweight.shape == (7, 20) and got.codebook.shape == (-(-7 // rows), 4, 2)
        want = reference_vq_obq(W, H, got.codebook, rows, cfg.damp)
        assert torch.equal(got.qweight.long(), want), block
        assert torch.equal(got.weight, vq_lookup(got.qweight, got.codebook, rows).to(got.weight.dtype))


def test_refit_is_the_per_group_least_squares_codebook_and_lowers_the_loss():
    X = correlated_inputs(500, 32, seed=5).double()
    H, _ = prepare_hessian(hessian_of(X), None, 0.01)
    W = heavy_tailed(6, 32, seed=5).double()
    plain = vq_gptq(W, H, VQConfig(bits=2, group_rows=3, refit=False, lut_dtype="float32"))
    codes, book = plain.qweight.long(), plain.codebook.double()
    got = refit_vq_codebook(W, H, codes, book, 3)
    L = torch.linalg.cholesky(H)
    for g in range(2):
        design, target = [], []
        for r in range(3 * g, 3 * g + 3):
            A = torch.zeros(32, 32, dtype=torch.float64)  # weight j reads entry 2·code + j % 2
            for j in range(32):
                A[j, 2 * int(codes[r, j // 2]) + j % 2] = 1
            design.append(L.T @ A)
            target.append(L.T @ W[r])
        design, target = torch.cat(design), torch.cat(target)
        used = design.abs().sum(dim=0) > 0
        c = torch.linalg.lstsq(design[:, used], target[:, None]).solution[:, 0]
        assert torch.allclose(got[g].reshape(-1)[used], c, rtol=1e-6, atol=1e-9)
        assert torch.allclose(got[g].reshape(-1)[~used], book[g].reshape(-1)[~used], rtol=1e-12, atol=0)
        assert int((~used).sum()) > 0  # the test covers unused entries
    refit = vq_gptq(W, H, VQConfig(bits=2, group_rows=3, refit=True, lut_dtype="float32"))
    assert torch.equal(refit.qweight, plain.qweight) and refit.loss < plain.loss


def test_two_dimensional_codebooks_beat_per_row_tables_and_uniform_int2():
    """At about the same bits: 2 + 512/(8·256) = 2.25 (VQ), 2 + 64/256 = 2.25 (per-row 4-entry tables), 2.25 (g64)."""
    X = correlated_inputs(3000, 256, seed=2)
    H = hessian_of(X)
    W = heavy_tailed(64, 256, seed=2)
    e_vq = output_error(W, vq_gptq(W, H, VQConfig(bits=2, group_rows=8)).weight, X)
    e_lut = output_error(W, gptq_lut(W, H, GPTQLUTConfig(bits=2, act_order=True)).weight, X)
    e_int2 = output_error(W, gptq(W, H, GPTQConfig(bits=2, group_size=64, act_order=True)).weight, X)
    assert e_vq < 0.8 * e_lut and e_vq < 0.6 * e_int2


@pytest.mark.parametrize("args, needle", [({"bits": 5}, "bits=5"), ({"dim": 3}, "dim=3"),
                                          ({"group_rows": 0}, "group_rows=0"), ({"block_size": 7}, "block_size=7")])
def test_bad_config_is_one_line(args, needle):
    with pytest.raises(LlmpressError) as info:
        VQConfig(**args)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_odd_width_is_refused_in_one_line():
    with pytest.raises(LlmpressError) as info:
        vq_gptq(torch.randn(4, 9), torch.eye(9), VQConfig())
    assert "multiple of dim=2" in str(info.value) and "\n" not in str(info.value)


def test_size_counts_codes_and_codebooks():
    spec = {"shape": [1536, 576], **Grid(2, -1, sym=False, codebook=True, vector=(2, 8)).to_record()}
    assert layer_bytes(spec) == 1536 * 576 * 2 // 8 + 192 * 16 * 2 * 2
    assert Grid.of(spec) == Grid(2, -1, sym=False, codebook=True, vector=(2, 8))
    assert "gptvq-w2" in builtin_recipes()


# --- the layer and the folder ---------------------------------------------------------------------------------


def test_layer_reads_its_codes_like_a_plain_loop():
    X = correlated_inputs(300, 24, seed=7)
    W = heavy_tailed(10, 24, seed=7)
    result = vq_gptq(W, hessian_of(X), VQConfig(group_rows=4))
    linear = torch.nn.Linear(24, 10)
    layer = VQLinear.from_compressed(linear, result)
    dense = torch.tensor([[float(result.codebook[r // 4, int(result.qweight[r, j // 2]), j % 2]) for j in range(24)]
                          for r in range(10)])
    assert torch.equal(layer.dequantized_weight(), dense) and torch.equal(result.weight, dense)
    assert layer.weight_codebook.dtype == torch.float16 and torch.equal(layer.codes(), result.qweight.long())
    x = torch.randn(3, 24)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dense, linear.bias))


def _compress(calib, recipe, out=None):
    tok, spec = calib
    model = tiny_model("llama", seed=3, vocab_size=len(tok))
    return llmpress.compress(model, recipe, tokenizer=tok, out=out, data=spec, samples=8, seq_len=32)


def test_save_reload_gives_identical_logits_and_honest_size(calib, tmp_path):
    result = _compress(calib, "gptvq-w2", tmp_path / "out")
    out = tmp_path / "out"
    from safetensors import safe_open

    with safe_open(out / "codebook.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_codebook").shape == (8, 16, 2)
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_codebook").dtype == torch.float16
    config = json.loads((out / "config.json").read_text())
    assert config["llmpress"]["vq"]["model.layers.0.mlp.up_proj"] == [2, 2, 8]
    reloaded = llmpress.load_model(out).model
    reloaded.set_attn_implementation("eager")
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits,
                           result.model(input_ids=ids, use_cache=False).logits)
    report = size_report(result.model, result.layers)
    shapes = [m["shape"] for m in result.layers.values()]
    bits = sum(o * i * 2 + -(-o // 8) * 16 * 2 * 16 for o, i in shapes)
    assert report["linear_bits_per_weight"] == pytest.approx(bits / sum(o * i for o, i in shapes), rel=1e-3)


def test_qat_trains_the_codebooks_and_reloads_exactly(calib, tmp_path):
    spec = calib[1]
    plain = _compress(calib, "gptvq-w2")
    trained = _compress(calib, f"gptvq-w2+qat(steps=6, lr=1e-3, warmup=0, samples=8, seq_len=32, data='{spec}')",
                        tmp_path / "out")
    name = "model.layers.1.self_attn.o_proj"
    assert torch.equal(plain.results[name].qweight, trained.results[name].qweight)
    assert not torch.equal(plain.results[name].codebook, trained.results[name].codebook)
    reloaded = llmpress.load_model(tmp_path / "out").model
    reloaded.set_attn_implementation("eager")
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits,
                           trained.model(input_ids=ids, use_cache=False).logits)
