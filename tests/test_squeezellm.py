"""Non-uniform (codebook) quantization: weighted k-means and GPTQ onto per-row tables, checked against plain
per-row / column-by-column references written here; the LUT layer against a dense reference; the codebook
folder round trip; honest bits per weight."""

import json

import pytest
import torch

import llmpress
from llmpress.compressed import Grid
from llmpress.errors import LlmpressError
from llmpress.export import formats
from llmpress.export.base import Folder
from llmpress.linalg import prepare_hessian
from llmpress.measure.size import layer_bytes, size_report
from llmpress.quant.codebook import (
    CodebookLinear,
    lookup,
    lut_matmul,
    nearest_codes,
    pack_codes,
    unpack_codes,
    weighted_kmeans,
    weighted_quantiles,
)
from llmpress.quant.gptq import GPTQConfig, gptq
from llmpress.quant.squeezellm import GPTQLUTConfig, SqueezeLLMConfig, gptq_lut, refit_codebook, squeezellm
from llmpress.recipe import load_recipe
from llmpress.registry import builtin_recipes, get_method
from reference.gptq_reference import dead_inputs_dropped
from tiny_models import random_ids, tiny_model


def correlated_inputs(n: int, width: int, seed: int, outliers: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = 2 * torch.randn(width, width, generator=g) / width ** 0.5 + torch.eye(width)
    X = torch.randn(n, width, generator=g) @ A
    X[:, torch.randperm(width, generator=g)[:outliers]] *= 20
    return X


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return 2 / X.shape[0] * X.T @ X


def output_error(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm((W.double() - Wq.double()) @ X.double().T))


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(rows, cols, 3, generator=g).pow(2).sum(-1)
    return 0.02 * torch.randn(rows, cols, generator=g) / (chi2 / 3).sqrt()


# --- the k-means, against a plain per-row reference -------------------------------------------------------

def reference_kmeans_row(w: list[float], s: list[float], k: int, iterations: int) -> list[float]:
    """One row, the slow way: weighted quantiles (first sorted value whose cumulative weight reaches
    (i + 1/2)/k of the total), then Lloyd steps with explicit sums; an empty cluster keeps its centroid."""
    pairs = sorted(zip(w, s, strict=True), key=lambda p: p[0])
    if sum(p[1] for p in pairs) == 0:
        pairs = [(v, 1.0) for v, _ in pairs]
    total, cumulative, centroids = sum(p[1] for p in pairs), 0.0, []
    cums = []
    for _, weight in pairs:
        cumulative += weight
        cums.append(cumulative)
    for i in range(k):
        target = (i + 0.5) / k * total
        j = next((j for j, c in enumerate(cums) if c >= target), len(pairs) - 1)
        centroids.append(pairs[j][0])
    for _ in range(iterations):
        members = [[] for _ in range(k)]
        for value, weight in zip(w, s, strict=True):
            distances = [abs(value - c) for c in centroids]
            members[distances.index(min(distances))].append((value, weight))
        for i, group in enumerate(members):
            mass = sum(weight for _, weight in group)
            if mass > 0:
                centroids[i] = sum(value * weight for value, weight in group) / mass
    return sorted(centroids)


@pytest.mark.parametrize("rows, cols, k, iterations", [(5, 40, 8, 10), (3, 17, 4, 0), (4, 64, 16, 25), (2, 9, 2, 5)])
def test_kmeans_matches_per_row_reference(rows, cols, k, iterations):
    g = torch.Generator().manual_seed(cols)
    W = heavy_tailed(rows, cols, seed=k).double()
    S = torch.rand(rows, cols, generator=g, dtype=torch.float64) ** 3
    S[0, : cols // 2] = 0  # half a row without weight
    S[-1] = 0  # a row with no weight at all: equally weighted
    got = weighted_kmeans(W, S, k, iterations)
    assert got.shape == (rows, k) and got.dtype == torch.float64
    for r in range(rows):
        want = reference_kmeans_row(W[r].tolist(), S[r].tolist(), k, iterations)
        assert torch.allclose(got[r], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12), r


def test_kmeans_chunks_rows_and_broadcasts_column_weights(monkeypatch):
    W = heavy_tailed(30, 50, seed=1)
    s = torch.rand(50, generator=torch.Generator().manual_seed(0))
    whole = weighted_kmeans(W, s, 8)
    monkeypatch.setattr("llmpress.quant.codebook.ELEMENTS_AT_ONCE", 50 * 8 * 7)  # 7 rows at a time
    assert torch.equal(weighted_kmeans(W, s, 8), whole)
    assert torch.equal(weighted_kmeans(W, s.expand(30, 50), 8), whole)
    assert whole.dtype == torch.float32 and bool((whole.diff(dim=1) >= 0).all())


def test_lloyd_never_increases_the_weighted_error():
    W = heavy_tailed(16, 128, seed=4)
    S = torch.rand(16, 128, generator=torch.Generator().manual_seed(1))

    def error(lut):
        return (S * (W - lookup(nearest_codes(W, lut), lut)) ** 2).sum(dim=1)

    errors = [error(weighted_kmeans(W, S, 8, iterations=i)) for i in (0, 1, 3, 30)]
    for before, after in zip(errors, errors[1:], strict=False):
        assert bool((after <= before + 1e-9).all())
    assert bool((errors[-1] < 0.9 * errors[0]).all())


def test_weighted_quantiles_and_bad_inputs():
    W = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    assert weighted_quantiles(W, torch.ones(1, 4), 2).tolist() == [[1.0, 3.0]]
    assert weighted_quantiles(W, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 2).tolist() == [[4.0, 4.0]]
    with pytest.raises(ValueError, match="non-negative"):
        weighted_kmeans(W, -torch.ones(4), 2)
    with pytest.raises(ValueError):
        weighted_kmeans(W[0], torch.ones(4), 2)


# --- SqueezeLLM and GPTQ onto tables -------------------------------------------------------------------------

@pytest.mark.parametrize("lut_dtype", ["float16", "bfloat16", "float32"])
def test_squeezellm_weight_is_its_stored_table_at_its_codes(lut_dtype):
    X = correlated_inputs(400, 96, seed=0)
    W = heavy_tailed(12, 96, seed=0)
    out = squeezellm(W, hessian_of(X), SqueezeLLMConfig(bits=3, lut_dtype=lut_dtype))
    dtype = getattr(torch, lut_dtype)
    assert out.codebook.shape == (12, 8) and torch.equal(out.codebook.to(dtype).float(), out.codebook)
    assert out.qweight.dtype == torch.uint8 and int(out.qweight.max()) <= 7
    assert torch.equal(out.weight, lookup(out.qweight, out.codebook))
    assert torch.equal(out.qweight.long(), nearest_codes(W, out.codebook))
    assert out.grid == Grid(3, -1, sym=False, codebook=True) and out.scale is None and out.zero is None
    assert out.record() == {"method": "squeezellm", "iterations": 30, "lut_dtype": lut_dtype, "bits": 3,
                            "group_size": -1, "sym": False, "codebook": True}
    delta = (W - out.weight).double()
    assert out.loss == pytest.approx(float(torch.trace(delta @ hessian_of(X).double() @ delta.T)) / 2, rel=1e-4)


def test_identity_hessian_gptq_lut_equals_squeezellm():
    """With H = I there is no error feedback: GPTQ onto the table is nearest rounding onto the same table."""
    W = heavy_tailed(20, 70, seed=3)
    eye = torch.eye(70)
    plain = squeezellm(W, eye, SqueezeLLMConfig(bits=3))
    for act_order in (False, True):
        got = gptq_lut(W, eye, GPTQLUTConfig(bits=3, refit=False, act_order=act_order, block_size=16))
        assert torch.equal(got.qweight, plain.qweight) and torch.equal(got.codebook, plain.codebook)
        assert torch.equal(got.weight, plain.weight)


def reference_gptq_onto_table(W: torch.Tensor, H: torch.Tensor, lut: torch.Tensor, damp: float,
                              act_order: bool) -> torch.Tensor:
    """Optimal Brain Quantization one column at a time onto fixed per-row tables (float64, explicit inverses of
    the damped Hessian restricted to the columns left): codes (out, in)."""
    (W, H), lut = dead_inputs_dropped(W, H), lut.double()
    n = W.shape[1]
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True).tolist() if act_order else list(range(n))
    H = H + damp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype)
    codes = torch.zeros(W.shape, dtype=torch.int64)
    for t, c in enumerate(order):
        rest = order[t:]
        Hinv = torch.linalg.inv(H[rest][:, rest])
        index = (W[:, c:c + 1] - lut).abs().argmin(dim=1)
        codes[:, c] = index
        err = (W[:, c] - lut.gather(1, index[:, None])[:, 0]) / Hinv[0, 0]
        W[:, rest] -= err[:, None] * Hinv[0][None, :]
    return codes


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lut_equals_column_by_column_oracle(act_order):
    X = correlated_inputs(600, 80, seed=1).double()
    X[:, 5] = 0  # a dead channel
    H = hessian_of(X)
    W = torch.randn(10, 80, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for block in (128, 7, 1):
        cfg = GPTQLUTConfig(bits=3, refit=False, act_order=act_order, block_size=block, lut_dtype="float32")
        got = gptq_lut(W, H, cfg)
        want = reference_gptq_onto_table(W, H, got.codebook, cfg.damp, act_order)
        assert torch.equal(got.qweight.long(), want)
        assert torch.equal(got.weight, lookup(got.qweight, got.codebook))


def test_refit_is_the_per_row_least_squares_table_and_lowers_the_loss():
    X = correlated_inputs(500, 64, seed=5).double()
    H, _ = prepare_hessian(hessian_of(X), None, 0.01)
    W = heavy_tailed(6, 64, seed=5).double()
    lut = weighted_kmeans(W, torch.diagonal(H), 8)
    codes = nearest_codes(W, lut)
    codes[:, codes[0] == 7] = 6  # an entry no weight of row 0 uses: it keeps its value
    got = refit_codebook(W, H, codes, lut)
    L = torch.linalg.cholesky(H)  # ‖(w − A c) L‖² = (w − A c) H (w − A c)ᵀ
    for r in range(6):
        A = torch.nn.functional.one_hot(codes[r], 8).double()
        used = A.sum(dim=0) > 0
        c = torch.linalg.lstsq((A[:, used].T @ L).T, (W[r] @ L)[:, None]).solution[:, 0]
        assert torch.allclose(got[r, used], c, rtol=1e-6, atol=1e-9)
        assert torch.equal(got[r, ~used], lut[r, ~used])
    before = gptq_lut(W, H, GPTQLUTConfig(refit=False, lut_dtype="float32"))
    after = gptq_lut(W, H, GPTQLUTConfig(refit=True, lut_dtype="float32"))
    assert torch.equal(before.qweight, after.qweight) and after.loss < before.loss


@pytest.mark.parametrize("bits", [3, 4])
def test_error_feedback_beats_plain_kmeans_and_uniform_gptq(bits):
    """On correlated inputs GPTQ onto per-row tables is below SqueezeLLM's nearest rounding and below uniform
    GPTQ with g64 scales (which spends more bits: 3.25 against 3 + 128/256 = 3.5 here, 3.25 at SmolLM2's 576)."""
    X = correlated_inputs(2000, 256, seed=bits)
    H = hessian_of(X)
    W = heavy_tailed(64, 256, seed=bits)
    e_sq = output_error(W, squeezellm(W, H, SqueezeLLMConfig(bits=bits)).weight, X)
    e_lut = output_error(W, gptq_lut(W, H, GPTQLUTConfig(bits=bits, act_order=True)).weight, X)
    e_gptq = output_error(W, gptq(W, H, GPTQConfig(bits=bits, group_size=64, act_order=True)).weight, X)
    assert e_lut < 0.8 * e_sq
    assert e_lut < 0.9 * e_gptq


@pytest.mark.parametrize("args, needle", [({"bits": 1}, "bits=1"), ({"bits": 9}, "bits=9"),
                                          ({"iterations": -1}, "iterations=-1"), ({"lut_dtype": "int8"}, "int8"),
                                          ({"refit": 1}, "refit=1"), ({"damp": 0}, "damp=0")])
def test_bad_config_is_one_line(args, needle):
    config = SqueezeLLMConfig if set(args) <= {"bits", "iterations", "lut_dtype"} else GPTQLUTConfig
    with pytest.raises(LlmpressError) as info:
        config(**args)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_registered_from_its_own_file_with_recipes():
    for name, fn, config in [("squeezellm", squeezellm, SqueezeLLMConfig), ("gptq-lut", gptq_lut, GPTQLUTConfig)]:
        method = get_method(name)
        assert method.fn is fn and method.config is config and method.fn.__module__ == "llmpress.quant.squeezellm"
        assert method.kind == "quantize" and method.stats == ("hessian",) and method.needs_inputs
    recipes = builtin_recipes()
    assert {"squeezellm-w3", "squeezellm-w4", "gptq-lut-w3", "gptq-lut-w4"} <= set(recipes)
    recipe = load_recipe("gptq-lut-w3")
    assert recipe.stages[0].config == GPTQLUTConfig(bits=3, act_order=True, true_sequential=True)
    assert load_recipe("squeezellm-w3").stages[0].config == SqueezeLLMConfig(bits=3)
    assert load_recipe("gptq-lut(bits=4, refit=false)").stages[0].config == GPTQLUTConfig(bits=4, refit=False)


# --- storage: packed codes, the table, the layer and its matmul ---------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_codes_pack_and_unpack_exactly(bits):
    codes = torch.randint(0, 1 << bits, (7, 45), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-45 * bits // 32))
    assert torch.equal(unpack_codes(packed, bits, 45), codes)
    with pytest.raises(LlmpressError, match="outside"):
        pack_codes(codes + (1 << bits), bits)


def test_layer_dequantizes_and_multiplies_like_the_dense_reference():
    X = correlated_inputs(300, 72, seed=7)
    W = heavy_tailed(40, 72, seed=7)
    result = squeezellm(W, hessian_of(X), SqueezeLLMConfig(bits=3))
    linear = torch.nn.Linear(72, 40)
    linear.weight.data = result.weight.clone()
    layer = CodebookLinear.from_compressed(linear, result)
    assert layer.weight_lut.dtype == torch.float16 and layer.weight_codes.dtype == torch.int32
    assert torch.equal(layer.codes(), result.qweight.long())
    dense = torch.stack([torch.tensor([float(result.codebook[r, int(k)]) for k in result.qweight[r]])
                         for r in range(40)])  # the table read one weight at a time
    assert torch.equal(layer.dequantized_weight(), dense)
    x = torch.randn(3, 5, 72, generator=torch.Generator().manual_seed(0))
    reference = x.double() @ dense.double().T + linear.bias.double()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dense, linear.bias))
    assert torch.allclose(layer(x).double(), reference, rtol=1e-5, atol=1e-5)
    layer.path = "lut"
    assert torch.allclose(layer(x).double(), reference, rtol=1e-5, atol=1e-5)
    assert torch.allclose(lut_matmul(x, layer.codes(), layer.weight_lut).double(), reference - linear.bias.double(),
                          rtol=1e-5, atol=1e-5)
    with pytest.raises(LlmpressError, match="not exact"):
        CodebookLinear.from_compressed(linear, squeezellm(W, hessian_of(X), SqueezeLLMConfig(lut_dtype="float32")))


def test_size_counts_codes_and_tables():
    spec = {"shape": [576, 1536], **Grid(3, -1, sym=False, codebook=True).to_record()}
    assert layer_bytes(spec) == 576 * 1536 * 3 // 8 + 576 * 8 * 2
    spec = {"shape": [1536, 576], **Grid(4, 64, sym=False, codebook=True).to_record()}
    assert layer_bytes(spec) == 1536 * 576 * 4 // 8 + 1536 * 9 * 16 * 2


# --- the codebook folder --------------------------------------------------------------------------------

def _compress(calib, tmp_path, recipe, fmt="auto", name="out"):
    tok, spec = calib
    model = tiny_model("llama", seed=3, vocab_size=len(tok))
    out = tmp_path / name
    result = llmpress.compress(model, recipe, tokenizer=tok, out=out, format=fmt, data=spec, samples=8, seq_len=32)
    return result, out


@pytest.mark.parametrize("recipe", ["squeezellm-w3", "gptq-lut-w3"])
def test_save_reload_gives_identical_logits(calib, tmp_path, recipe):
    result, out = _compress(calib, tmp_path, recipe)
    folder = Folder.of(out)
    assert [f.name for f in formats.FORMATS if f.detect(folder)] == ["codebook"]
    assert formats.folder_format(out) == "codebook" and formats.readers(out) == ["llmpress"]
    assert (out / "codebook.safetensors").is_file() and not (out / "model.safetensors").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())
    from safetensors import safe_open

    with safe_open(out / "codebook.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_lut").dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight_codes" in names
    assert not any(n.endswith("proj.weight") and "layers" in n for n in names)  # no dense copy of a block linear
    reloaded = llmpress.load_model(out).model
    state = reloaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in result.model.state_dict().items())
    reloaded.set_attn_implementation("eager")  # the tiny model was built eager; sdpa rounds differently
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits,
                           result.model(input_ids=ids, use_cache=False).logits)
    kept = formats.load(out, __import__("transformers").AutoConfig.from_pretrained(out))
    assert isinstance(kept.get_submodule("model.layers.0.mlp.up_proj"), torch.nn.Linear)
    meta = json.loads((out / "llmpress.json").read_text())
    assert Grid.of(meta["layers"]["model.layers.0.mlp.up_proj"]) == Grid(3, -1, sym=False, codebook=True)


def test_folder_keeps_layers_when_asked_and_sizes_are_honest(calib, tmp_path):
    from transformers import AutoConfig

    from llmpress.export.codebook import load_codebook_folder

    result, out = _compress(calib, tmp_path, "squeezellm-w3")
    layered = load_codebook_folder(out, AutoConfig.from_pretrained(out), dense=False)
    module = layered.get_submodule("model.layers.1.self_attn.o_proj")
    assert isinstance(module, CodebookLinear) and module.weight_lut.dtype == torch.float16
    layered.set_attn_implementation("eager")
    ids = random_ids(1, 12)
    with torch.no_grad():  # the same weights through the LUT layer: the same logits
        assert torch.equal(layered(input_ids=ids, use_cache=False).logits,
                           result.model(input_ids=ids, use_cache=False).logits)
    report = size_report(result.model, result.layers)
    shapes = [m["shape"] for m in result.layers.values()]
    codes = sum(o * i * 3 for o, i in shapes)
    tables = sum(o * 8 * 16 for o, _ in shapes)
    assert report["linear_bits_per_weight"] == pytest.approx((codes + tables) / sum(o * i for o, i in shapes),
                                                             rel=1e-3)


def test_other_formats_refuse_or_store_dense(calib, tmp_path):
    with pytest.raises(LlmpressError) as info:
        _compress(calib, tmp_path, "squeezellm-w3", fmt="compressed-tensors", name="ct")
    assert "lookup table" in str(info.value) and "\n" not in str(info.value)
    result, out = _compress(calib, tmp_path, "squeezellm-w3", fmt="dense", name="dense")
    assert formats.detect(out).name == "dense"
    state = llmpress.load_model(out).model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in result.model.state_dict().items())


def test_gguf_refuses_lookup_table_layers(calib, tmp_path):
    """No GGUF type holds a per-row lookup table: the writer refuses rather than writing those layers dense."""
    from llmpress.export.gguf_write import write_gguf

    result, _ = _compress(calib, tmp_path, "squeezellm-w3")
    target = tmp_path / "model.gguf"
    with pytest.raises(LlmpressError) as info:
        write_gguf(result.model, calib[0], target, result.results, result.layers, requantize="Q4_0")
    assert "lookup tables" in str(info.value) and "\n" not in str(info.value)
    assert not target.exists()
