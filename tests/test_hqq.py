"""HQQ, checked against a plain per-group loop written here; exactness of the stored grid; error vs RTN."""

import math

import pytest
import torch

from llmpress.config import Config
from llmpress.errors import LlmpressError
from llmpress.primitives import dequantize, qrange
from llmpress.quant.hqq import PARAM_DTYPES, HQQConfig, hqq
from llmpress.quant.rtn import RTNConfig, rtn
from llmpress.recipe import load_recipe
from llmpress.registry import builtin_recipes, get_method


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Student-t (3 degrees of freedom) weights: mostly small, a few large ones per row."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g)
    chi2 = torch.randn(rows, cols, 3, generator=g).pow(2).sum(-1)
    return 0.02 * normal / (chi2 / 3).sqrt()


def reference_group(w: torch.Tensor, bits: int, cfg: HQQConfig) -> tuple[float, float]:
    """One group (1-D) the slow way: scale from min/max, then the proximal zero-point loop of the paper."""
    dtype = PARAM_DTYPES[cfg.param_dtype]
    qmin, qmax = qrange(bits)
    lo, hi = w.min(), w.max()
    span = hi - lo
    if span <= 0:
        span = lo.abs() if lo != 0 else torch.tensor(1.0)
    s = (span / (qmax - qmin)).to(dtype).float()
    z = qmin - lo / s
    beta, best, best_z = float(cfg.beta), math.inf, z
    for _ in range(cfg.iterations):
        q = torch.clamp(torch.round(w / s + z), qmin, qmax)
        e = w - (q - z) * s
        err = float(e.abs().mean())
        if err < best:
            best, best_z = err, z
        elif cfg.early_stop:
            break
        shrunk = torch.sign(e) * torch.clamp(e.abs() - e.abs() ** (cfg.lp_norm - 1) / beta, min=0)
        z = torch.mean(q - (w - shrunk) / s)
        beta *= cfg.kappa
    return float(s), float(best_z.to(dtype).float())


@pytest.mark.parametrize("bits, group, cols, early, dtype", [
    (4, 64, 200, True, "float16"), (3, 32, 96, False, "float32"), (2, -1, 40, True, "bfloat16"),
    (8, 16, 50, True, "float16"),
])
def test_matches_reference_loop(bits, group, cols, early, dtype):
    W = heavy_tailed(6, cols, seed=bits)
    W[1] = -0.03  # constant rows: a negative one and an all-zero one
    W[2] = 0.0
    cfg = HQQConfig(bits=bits, group_size=group, early_stop=early, param_dtype=dtype)
    out = hqq(W, cfg)
    g = cols if group == -1 else group
    starts = list(range(0, cols, g))
    assert out.scale.shape == out.zero.shape == (6, len(starts))
    qmin, qmax = qrange(bits)
    for r in range(6):
        for j, c in enumerate(starts):
            w = W[r, c:c + g]
            s, z = reference_group(w, bits, cfg)
            assert math.isclose(float(out.scale[r, j]), s, rel_tol=0, abs_tol=0)
            assert math.isclose(float(out.zero[r, j]), z, rel_tol=1e-6, abs_tol=1e-6)
            codes = torch.clamp(torch.round(w / s + z), qmin, qmax)
            agree = (codes == out.qweight[r, c:c + g].float()).float().mean()
            assert agree >= 0.98  # a code may flip where w / s + z sits on a rounding boundary
    assert int(out.qweight.min()) >= qmin and int(out.qweight.max()) <= qmax


@pytest.mark.parametrize("dtype", list(PARAM_DTYPES))
def test_weight_is_exactly_what_the_stored_grid_gives(dtype):
    W = heavy_tailed(16, 100, seed=1)  # a partial last group (100 = 64 + 36)
    out = hqq(W, HQQConfig(bits=4, group_size=64, param_dtype=dtype))
    stored_scale = out.scale.to(PARAM_DTYPES[dtype])
    stored_zero = out.zero.to(PARAM_DTYPES[dtype])
    assert torch.equal(stored_scale.float(), out.scale) and torch.equal(stored_zero.float(), out.zero)
    reloaded = dequantize(out.qweight, stored_scale.float(), stored_zero.float(), 64)
    assert out.qweight.dtype == torch.int8 and out.qweight.shape == W.shape
    assert out.weight.dtype == torch.float32 and torch.equal(out.weight, reloaded)
    assert out.record() == {"method": "hqq", "bits": 4, "group_size": 64, "sym": False, "zero_float": True,
                           "param_dtype": dtype}
    assert not torch.equal(out.zero, out.zero.round())  # the zero points are floats, not integers


def test_partial_last_group_is_fitted_on_its_own_columns():
    W = heavy_tailed(4, 70, seed=2)
    whole = hqq(W, HQQConfig(group_size=64))
    tail = hqq(W[:, 64:], HQQConfig(group_size=64))
    assert torch.equal(whole.zero[:, 1:], tail.zero) and torch.equal(whole.scale[:, 1:], tail.scale)
    assert torch.equal(whole.weight[:, 64:], tail.weight)


@pytest.mark.parametrize("bits", [3, 4])
def test_error_not_above_rtn_asymmetric(bits):
    W = heavy_tailed(64, 256, seed=bits)
    h = hqq(W, HQQConfig(bits=bits, group_size=64))
    r = rtn(W, RTNConfig(bits=bits, group_size=64, sym=False))
    start = hqq(W, HQQConfig(bits=bits, group_size=64, iterations=1))  # min/max scale, float zero, no steps
    for name, err in [("l1", lambda E: E.abs().mean()), ("l2", lambda E: E.pow(2).mean()),
                      ("lp", lambda E: E.abs().pow(0.7).mean())]:
        assert err(W - h.weight) <= err(W - r.weight), name
        assert err(W - h.weight) < err(W - start.weight), name


def test_more_iterations_never_worse_per_group():
    W = heavy_tailed(32, 128, seed=5)
    errors = []
    for iterations in (1, 5, 40):
        out = hqq(W, HQQConfig(bits=3, group_size=32, iterations=iterations, early_stop=False, param_dtype="float32"))
        errors.append((W - out.weight).abs().reshape(32, 4, 32).mean(-1))
    assert bool((errors[1] <= errors[0] + 1e-9).all() and (errors[2] <= errors[1] + 1e-9).all())
    assert bool((errors[2] < errors[0]).any())


@pytest.mark.parametrize("args, needle", [
    ({"bits": 1}, "bits=1"), ({"bits": 9}, "bits=9"), ({"bits": 4.0}, "bits=4.0"),
    ({"group_size": 0}, "group_size=0"), ({"group_size": -2}, "group_size=-2"),
    ({"iterations": 0}, "iterations=0"), ({"iterations": True}, "iterations=True"),
    ({"lp_norm": 0}, "lp_norm=0"), ({"lp_norm": 1.5}, "lp_norm=1.5"), ({"lp_norm": "0.7"}, "lp_norm='0.7'"),
    ({"beta": 0}, "beta=0"), ({"beta": float("inf")}, "beta=inf"), ({"kappa": 0.9}, "kappa=0.9"),
    ({"early_stop": 1}, "early_stop=1"), ({"param_dtype": "int8"}, "param_dtype='int8'"),
])
def test_bad_config_is_one_line(args, needle):
    with pytest.raises(LlmpressError) as info:
        HQQConfig(**args)
    message = str(info.value)
    assert needle in message and "\n" not in message and "use" in message


def test_config_messages_name_the_fix():
    assert issubclass(HQQConfig, Config)
    with pytest.raises(LlmpressError, match=r"^hqq lp_norm=1.5 is invalid: use a number in \(0, 1\], e.g. 0.7$"):
        HQQConfig(lp_norm=1.5)
    with pytest.raises(LlmpressError, match=r"^bits=9 is out of range: use an integer from 2 to 8$"):
        HQQConfig(bits=9)
    with pytest.raises(LlmpressError,
                       match=r"^hqq param_dtype='fp16' is invalid: use one of float16, bfloat16, float32$"):
        HQQConfig(param_dtype="fp16")


def test_registered_from_its_own_file_with_recipes():
    method = get_method("hqq")
    assert method.fn is hqq and method.config is HQQConfig
    assert method.fn.__module__ == method.config.__module__ == "llmpress.quant.hqq"
    assert method.kind == "quantize" and method.stats == () and not method.needs_inputs
    recipes = builtin_recipes()
    for name, bits in [("hqq-w4-g64", 4), ("hqq-w3-g64", 3)]:
        recipe = load_recipe(name)
        assert recipes[name]["stages"][0]["method"] == "hqq"
        assert [s.method for s in recipe.stages] == ["hqq"] and recipe.stages[0].config == HQQConfig(bits=bits)
        assert not recipe.needs_calibration
    combined = load_recipe("hqq-w4-g64+qat")  # composition with a built-in name is automatic
    assert [s.method for s in combined.stages] == ["hqq", *[s.method for s in load_recipe("qat").stages]]
