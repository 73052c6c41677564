"""GPTQ, its shared linear algebra and the MSE clip search, checked against plain references written here."""

import math

import pytest
import torch

from llmpress.engine import compress_blocks
from llmpress.errors import LlmpressError
from llmpress.linalg import inverse_cholesky_upper, prepare_hessian
from llmpress.models.archs import arch_for
from llmpress.primitives import compute_qparams, dequantize, quantize, search_qparams
from llmpress.quant.gptq import GPTQConfig, gptq
from llmpress.quant.rtn import RTNConfig, rtn
from llmpress.recipe import load_recipe
from llmpress.registry import get_method
from reference.gptq_reference import gptq_reference
from tiny_models import random_ids, tiny_model


def correlated_inputs(n: int, width: int, seed: int, outliers: int = 3, spread: float = 0.0) -> torch.Tensor:
    """X = Z·A (random mixing) with a few large-magnitude channels; ``spread`` varies channel scales."""
    g = torch.Generator().manual_seed(seed)
    A = 2 * torch.randn(width, width, generator=g) / width ** 0.5 + torch.eye(width)
    X = torch.randn(n, width, generator=g) @ A
    X[:, torch.randperm(width, generator=g)[:outliers]] *= 20
    return X * torch.exp(spread * torch.randn(width, generator=g))


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return 2 / X.shape[0] * X.T @ X


def output_error(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm((W.double() - Wq.double()) @ X.double().T))


@pytest.mark.parametrize("bits, group, sym", [(2, 32, True), (3, 50, False), (4, 64, True), (4, -1, False),
                                              (8, 16, True)])
def test_identity_hessian_equals_rtn(bits, group, sym):
    torch.manual_seed(bits + group)
    W = torch.randn(24, 200) * torch.rand(24, 1)
    got = gptq(W, torch.eye(200), GPTQConfig(bits=bits, group_size=group, sym=sym, block_size=16))
    want = rtn(W, RTNConfig(bits=bits, group_size=group, sym=sym))
    assert torch.equal(got.qweight, want.qweight)
    assert torch.equal(got.weight, want.weight)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)


ORACLE_CASES = {
    "sym-g32-partial": dict(bits=4, group_size=32, sym=True),
    "asym-g40-partial": dict(bits=4, group_size=40, sym=False),
    "3bit-g64": dict(bits=3, group_size=64, sym=True),
    "per-channel": dict(bits=4, group_size=-1, sym=False),
    "act-order-static": dict(bits=4, group_size=32, sym=True, act_order=True),
    "act-order-asym": dict(bits=3, group_size=40, sym=False, act_order=True),
    "mse": dict(bits=4, group_size=32, sym=True, mse=True),
    "mse-act-order": dict(bits=4, group_size=40, sym=False, act_order=True, mse=True),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_blocked_equals_column_by_column_oracle(case):
    kwargs = ORACLE_CASES[case]
    X = correlated_inputs(600, 150, seed=1, spread=1.0).double()
    X[:, 7] = 0  # a dead channel
    H = hessian_of(X)
    W = torch.randn(20, 150, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    codes, scale, zero, loss = gptq_reference(W, H, **kwargs)
    group = None if kwargs["group_size"] == -1 else kwargs["group_size"]
    results = [gptq(W, H, GPTQConfig(**kwargs, block_size=b)) for b in (128, 7, 1)]
    for r in results:
        assert torch.equal(r.qweight, codes)
        assert torch.equal(r.scale, scale) and torch.equal(r.zero, zero)
        assert torch.allclose(r.weight.double(), dequantize(codes, scale, zero, group).double(), rtol=0, atol=1e-10)
        assert torch.equal(r.weight, dequantize(r.qweight, r.scale, r.zero, group))
        assert r.loss == pytest.approx(loss, rel=1e-9)
    assert torch.equal(results[0].qweight, results[1].qweight)


def test_loss_is_the_damped_objective():
    """Σ (w − q)²/d² equals tr(ΔHΔᵀ) for the damped H: the OBS increments add up exactly."""
    X = correlated_inputs(500, 96, seed=3).double()
    H = hessian_of(X)
    W = torch.randn(16, 96, dtype=torch.float64)
    cfg = GPTQConfig(bits=3, group_size=32, damp=0.05, block_size=20)
    result = gptq(W, H, cfg)
    damped, _ = prepare_hessian(H, None, cfg.damp)
    delta = W - result.weight.double()
    assert 2 * result.loss == pytest.approx(float(torch.trace(delta @ damped @ delta.T)), rel=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
def test_correlated_inputs_beat_rtn(bits):
    X = correlated_inputs(2000, 256, seed=bits)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    cfg = dict(bits=bits, group_size=64, sym=True)
    e_rtn = output_error(W, rtn(W, RTNConfig(**cfg)).weight, X)
    e_gptq = output_error(W, gptq(W, hessian_of(X), GPTQConfig(**cfg)).weight, X)
    e_act = output_error(W, gptq(W, hessian_of(X), GPTQConfig(**cfg, act_order=True)).weight, X)
    # in natural order the outlier channels' own rounding errors cannot all be compensated; with
    # act_order they go first and the rest of the row absorbs them
    assert e_gptq < 0.85 * e_rtn
    assert e_act < 0.6 * e_rtn


def test_act_order_not_worse_when_diag_varies():
    ratios = []
    for seed in range(3):
        X = correlated_inputs(2000, 192, seed=10 + seed, outliers=0, spread=1.5)
        W = torch.randn(48, 192, generator=torch.Generator().manual_seed(seed))
        H = hessian_of(X)
        plain = output_error(W, gptq(W, H, GPTQConfig(bits=3, group_size=64)).weight, X)
        ordered = output_error(W, gptq(W, H, GPTQConfig(bits=3, group_size=64, act_order=True)).weight, X)
        ratios.append(ordered / plain)
    assert max(ratios) < 0.9


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_input_channel_gives_zero_column(act_order):
    X = correlated_inputs(300, 64, seed=5)
    X[:, [0, 17]] = 0
    W = torch.randn(8, 64)
    result = gptq(W, hessian_of(X), GPTQConfig(bits=4, group_size=16, act_order=act_order))
    assert torch.isfinite(result.weight).all() and math.isfinite(result.loss)
    assert (result.weight[:, [0, 17]] == 0).all()
    assert torch.equal(result.weight, dequantize(result.qweight, result.scale, result.zero, 16))


def test_prepare_hessian_and_inverse_cholesky():
    X = correlated_inputs(200, 40, seed=6).double()
    X[:, 3] = 0
    H = hessian_of(X)
    W = torch.ones(5, 40, dtype=torch.float64)
    damped, dead = prepare_hessian(H, W, 0.1)
    assert dead.tolist() == [j == 3 for j in range(40)]
    assert (W[:, 3] == 0).all() and (W[:, :3] == 1).all()
    diag = H.diagonal().clone()
    diag[3] = 1
    assert torch.allclose(damped.diagonal(), diag + 0.1 * diag.mean())
    U = inverse_cholesky_upper(damped)
    assert torch.equal(U, U.triu()) and (U.diagonal() > 0).all()
    assert torch.allclose(U.T @ U, torch.linalg.inv(damped), rtol=1e-8, atol=1e-12)


def test_inverse_cholesky_retries_then_fails_with_advice(caplog):
    indefinite = torch.diag(torch.tensor([-0.005, 1.0, 1.0, 1.0], dtype=torch.float64))
    U = inverse_cholesky_upper(indefinite)  # 0.01·mean(diag) more damping makes it definite
    fixed = indefinite + 0.01 * indefinite.diagonal().mean() * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(U.T @ U, torch.linalg.inv(fixed))
    assert "extra damping" in caplog.text
    with pytest.raises(LlmpressError, match="increase damp"):
        inverse_cholesky_upper(-torch.eye(4))
    with pytest.raises(LlmpressError, match="NaN"):
        inverse_cholesky_upper(torch.full((4, 4), float("nan")))


def reference_search(W, bits, group, sym, grid=100, max_shrink=0.8, norm=2.4):
    """Per (row, group) and per shrink factor, written as loops; returns the best Lp error per (row, group)."""
    rows, cols = W.shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    best = torch.full((rows, -(-cols // group)), math.inf, dtype=torch.float64)
    for r in range(rows):
        for k, c0 in enumerate(range(0, cols, group)):
            w = W[r, c0:c0 + group].double()
            lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
            for step in range(int(max_shrink * grid)):
                p = 1 - step / grid
                if sym:
                    s, z = max(-p * lo, p * hi) / ((qmax - qmin) / 2), 0.0
                else:
                    s = (p * hi - p * lo) / (qmax - qmin)
                s = s if s > 0 else 1.0
                if not sym:
                    z = min(max(round(qmin - p * lo / s), qmin), qmax)
                q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
                best[r, k] = min(best[r, k], float(((q - z) * s - w).abs().pow(norm).sum()))
    return best


def lp_error(W, scale, zero, bits, group, norm=2.4):
    deq = dequantize(quantize(W, scale, zero, bits, group), scale, zero, group)
    err = (deq - W).abs().pow(norm)
    err = torch.nn.functional.pad(err, (0, scale.shape[1] * group - W.shape[1]))
    return err.reshape(W.shape[0], -1, group).sum(-1)


@pytest.mark.parametrize("sym", [True, False])
def test_mse_search_finds_the_best_clip_and_never_loses(sym):
    g = torch.Generator().manual_seed(7)
    W = torch.distributions.StudentT(3.0).sample((6, 80)) if sym else torch.randn(6, 80, generator=g) + 0.5
    scale, zero = search_qparams(W, 3, 32, sym)
    plain_scale, plain_zero = compute_qparams(W, 3, 32, sym)
    searched = lp_error(W, scale, zero, 3, 32)
    assert (searched <= lp_error(W, plain_scale, plain_zero, 3, 32) * (1 + 1e-6)).all()  # exp/log vs pow
    assert torch.allclose(searched.double(), reference_search(W, 3, 32, sym), rtol=1e-4)


def test_rtn_mse_lowers_weight_error_on_heavy_tails():
    torch.manual_seed(8)
    W = torch.distributions.StudentT(2.5).sample((64, 256))
    for sym in (True, False):
        plain = rtn(W, RTNConfig(bits=4, group_size=64, sym=sym))
        searched = rtn(W, RTNConfig(bits=4, group_size=64, sym=sym, mse=True))
        assert torch.linalg.norm(W - searched.weight) < 0.98 * torch.linalg.norm(W - plain.weight)
        assert searched.meta["mse"] is True and "mse" not in plain.meta


@pytest.mark.parametrize("kwargs, needle", [
    ({"bits": 1}, "bits=1 is out of range"),
    ({"bits": 9}, "bits=9 is out of range"),
    ({"damp": 0}, "damp=0 is invalid"),
    ({"damp": -0.1}, "damp=-0.1 is invalid"),
    ({"block_size": 0}, "block_size=0 is invalid"),
    ({"group_size": 0}, "group_size=0 is invalid"),
    ({"act_order": "yes"}, "act_order='yes' is invalid"),
])
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(LlmpressError, match=needle):
        GPTQConfig(**kwargs)


def test_registry_and_builtin_recipes():
    assert get_method("gptq").stats == ("hessian",)
    cfg = load_recipe("gptq-w4-g64-mse").stages[0].config
    assert cfg == GPTQConfig(bits=4, group_size=64, act_order=True, mse=True, true_sequential=True)
    assert load_recipe("gptq-w4-g64").calibration.dtype == "auto"
    assert load_recipe("rtn-w4-g64-mse").stages[0].config == RTNConfig(bits=4, group_size=64, mse=True)
    for name in ("gptq-w4-g64", "gptq-w4-g64-asym", "gptq-w3-g64", "gptq-w4-g64-classic"):
        assert load_recipe(name).needs_calibration


def test_engine_gptq_beats_rtn_on_tiny_model():
    ids, held_out = random_ids(64, 32, seed=11), random_ids(4, 32, seed=12)
    original = tiny_model("llama", seed=13)
    with torch.no_grad():
        reference = original(input_ids=held_out).logits
    errors, layers = {}, {}
    for method in ("gptq", "rtn"):
        model = tiny_model("llama", seed=13)
        stages = load_recipe({"stages": [{"method": method, "args": {"bits": 4, "group_size": 32}}]}).stages
        layers[method] = compress_blocks(model, arch_for(model), list(stages), samples=ids, batch_size=8)
        with torch.no_grad():
            errors[method] = float((model(input_ids=held_out).logits - reference).pow(2).mean())
    assert len(layers["gptq"]) == 14
    assert all(m["method"] == "gptq" and m["loss"] > 0 and m["bits"] == 4 for m in layers["gptq"].values())
    assert errors["gptq"] < 0.85 * errors["rtn"]
