"""Non-uniform (codebook) weight quantization: SqueezeLLM's sensitivity-weighted k-means, alone and with GPTQ.

``squeezellm`` (Kim et al. 2023, "SqueezeLLM: Dense-and-Sparse Quantization", arXiv:2306.07629, §3): every output
row gets its own table of 2^b values, fitted by weighted k-means over the row's weights
(``llmpress.quant.codebook.weighted_kmeans``), and each weight becomes the index of its nearest entry. SqueezeLLM
weighs weight w_rj by the diagonal Fisher information of the model loss (squared gradients on calibration data),
which needs backward passes through the whole model. We weigh it instead by H_jj, the diagonal of the layer
Hessian H = 2/n·XᵀX that GPTQ uses (``llmpress.stats.HessianStats``): the second derivative of the layer's output
error ‖(W − Ŵ)X‖² in w_rj, i.e. the Fisher-style sensitivity of the *layer* objective with cross terms dropped
(the same per-column weight for every row; SqueezeLLM's dense-and-sparse outlier split is not done). The
Hessians come from the calibration pass the engine already runs, so the method costs what GPTQ's statistics cost.

``gptq-lut``: the table is fitted as above from the original row, then the row is rounded column by column to its
nearest table entry with GPTQ's error feedback through the inverse Hessian (Frantar et al., arXiv:2210.17323,
Alg. 1, the shared loop ``llmpress.quant.gptq.solve_nearest``; act-order and true-sequential as in ``gptq``).
With ``refit`` the table is then re-solved for the codes chosen, minimising ½·tr(ΔHΔᵀ) (Δ = W − Ŵ) exactly: per
row, the 2^b values c solve (AᵀHA) c = AᵀH w with A the one-hot (in, 2^b) code matrix; an entry no weight uses
keeps its value. This is the "codebook update" of GPTVQ (van Baalen et al. 2024, arXiv:2402.15319, §3), done in
closed form instead of by gradient steps.

Tables are stored in ``lut_dtype`` (fp16 by default, as SqueezeLLM's): they are rounded to it before the final
codes and the dequantized weight are computed, so ``weight == lut[codes]`` holds exactly for the stored table
(``llmpress.export.codebook`` writes codes + tables and reads them back bit for bit). Bits per weight: b for the
codes plus 2^b·16 bits per row for the table (3.22 for 3 bits on a 576-wide row; ``llmpress.measure.size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from ..compressed import Compressed, Grid
from ..config import Check, Config
from ..linalg import damped_hessian, inverse_cholesky_upper
from ..registry import Method, register
from .codebook import ELEMENTS_AT_ONCE, LUT_DTYPES, lookup, nearest_codes, weighted_kmeans
from .gptq import solve_nearest
from .rtn import Bits

Iterations = Annotated[int, Check(ge=0, advice="use an integer >= 0, e.g. 30")]


@dataclass(frozen=True)
class SqueezeLLMConfig(Config):
    """bits: 2–8 (2^bits table entries per row); iterations: Lloyd steps of the weighted k-means;
    lut_dtype: the dtype the tables are stored in (see the module docstring)."""

    label = "squeezellm"

    bits: Bits = 3
    iterations: Iterations = 30
    lut_dtype: Literal["float16", "bfloat16", "float32"] = "float16"


@dataclass(frozen=True)
class GPTQLUTConfig(Config):
    """bits: 2–8; iterations: Lloyd steps fitting the tables; act_order: columns by decreasing diag(H);
    damp: λ = damp·mean(diag H); block_size: columns per lazy batch update; true_sequential: as ``gptq``'s;
    refit: re-solve the tables for the chosen codes (module docstring); lut_dtype: the tables' stored dtype."""

    label = "gptq-lut"

    bits: Bits = 3
    iterations: Iterations = 30
    act_order: bool = False
    damp: Annotated[float, Check(gt=0, advice="use a positive number such as 0.01")] = 0.01
    block_size: Annotated[int, Check(ge=1, advice="use a positive integer such as 128")] = 128
    true_sequential: bool = False
    refit: bool = True
    lut_dtype: Literal["float16", "bfloat16", "float32"] = "float16"


def _stored(lut: Tensor, name: str) -> Tensor:
    """``lut`` rounded to the storage dtype ``name`` and back to its own dtype."""
    return lut.to(LUT_DTYPES[name]).to(lut.dtype)


def _half_trace(delta: Tensor, H: Tensor) -> float:
    """½·tr(Δ H Δᵀ)."""
    return float(((delta @ H) * delta).sum()) / 2


def _result(codes: Tensor, lut: Tensor, meta: dict, bits: int, loss: float) -> Compressed:
    lut = lut.float()
    return Compressed(weight=lookup(codes, lut), qweight=codes.to(torch.uint8), meta=meta, loss=loss,
                      grid=Grid(bits, -1, sym=False, codebook=True), codebook=lut)


def squeezellm(weight: Tensor, hessian: Tensor, cfg: SqueezeLLMConfig) -> Compressed:
    """Per-row tables of 2^bits values by k-means weighted with diag(H), weights rounded to the nearest entry.

    weight (out, in), hessian (in, in) = 2/n·XᵀX. Returns codes (uint8 indices (out, in)), the table
    ``codebook`` (fp32 (out, 2^bits), values exact in ``lut_dtype``), ``weight = lut[codes]`` and
    ``loss`` = ½·tr(ΔHΔᵀ) for the undamped H.
    """
    W = weight.detach().float()
    H = hessian.detach().to(W.dtype)
    lut = _stored(weighted_kmeans(W, H.diagonal().clamp(min=0), 1 << cfg.bits, cfg.iterations), cfg.lut_dtype)
    codes = nearest_codes(W, lut)
    meta = {"method": "squeezellm", "iterations": cfg.iterations, "lut_dtype": cfg.lut_dtype}
    return _result(codes, lut, meta, cfg.bits, _half_trace(W - lookup(codes, lut), H))


def refit_codebook(W: Tensor, H: Tensor, codes: Tensor, lut: Tensor) -> Tensor:
    """The table (rows, K) minimising ½·tr((W − lut[codes]) H (W − lut[codes])ᵀ) for fixed ``codes``.

    Per row, (AᵀHA) c = AᵀH w with A the one-hot (in, K) matrix of the row's codes; an entry used by no weight
    keeps its value from ``lut`` (a tiny ridge towards it, 1e-9·mean diag, keeps every system regular).
    W (rows, in), H (in, in) symmetric positive definite, codes (rows, in), lut (rows, K); float64 inside.
    """
    K = lut.shape[1]
    Hd = H.double()
    out = []
    rows = max(1, ELEMENTS_AT_ONCE // (W.shape[1] * K))
    for r in range(0, W.shape[0], rows):
        A = torch.nn.functional.one_hot(codes[r:r + rows].long(), K).double()  # (rows, in, K)
        HA = torch.matmul(Hd, A)
        G = A.transpose(1, 2) @ HA  # (rows, K, K)
        rhs = (HA * W[r:r + rows].double().unsqueeze(-1)).sum(dim=1)
        ridge = 1e-9 * G.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)  # (rows,)
        G.diagonal(dim1=1, dim2=2).add_(ridge.unsqueeze(-1))
        rhs += ridge.unsqueeze(-1) * lut[r:r + rows].double()
        out.append(torch.linalg.solve(G, rhs))
    return torch.cat(out).to(lut.dtype)


def gptq_lut(weight: Tensor, hessian: Tensor, cfg: GPTQLUTConfig) -> Compressed:
    """GPTQ's column-by-column rounding with error feedback onto per-row k-means tables (module docstring).

    weight (out, in), hessian (in, in) = 2/n·XᵀX; the solve runs in float64 when either is float64, else
    float32. Dead input channels (H_ii = 0) get the table entry nearest 0. Returns as :func:`squeezellm`, with
    ``loss`` = ½·tr(ΔHΔᵀ) for the damped H (what GPTQ minimises).
    """
    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    W = weight.detach().to(dtype=dtype, copy=True)
    sensitivity = hessian.detach().to(dtype).diagonal().clamp(min=0)
    def damped(order: bool) -> tuple[Tensor, Tensor | None]:
        return damped_hessian(hessian.detach().to(dtype), W, cfg.damp, order)

    ordered, perm = damped(cfg.act_order)  # in processing order; a wide one is factorised in its own memory
    lut = _stored(weighted_kmeans(W, sensitivity, 1 << cfg.bits, cfg.iterations), cfg.lut_dtype)
    U = inverse_cholesky_upper(ordered, lambda: damped(cfg.act_order)[0])
    del ordered
    Wt = (W.T if perm is None else W.T[perm]).contiguous()

    def nearest(w: Tensor) -> tuple[Tensor, Tensor]:
        index = (w.unsqueeze(1) - lut).abs_().argmin(dim=1, keepdim=True)
        return index.squeeze(1).to(w.dtype), lut.gather(1, index).squeeze(1)

    codes_t, _ = solve_nearest(Wt, U, cfg.block_size, nearest)
    del U, Wt
    H, _ = damped(False)  # the damped H in the weight's own order, for the refit and the loss
    codes = (codes_t if perm is None else codes_t[torch.argsort(perm)]).T.long().contiguous()
    if cfg.refit:
        lut = _stored(refit_codebook(W, H, codes, lut), cfg.lut_dtype)
    meta = {"method": "gptq-lut", "act_order": cfg.act_order, "refit": cfg.refit, "iterations": cfg.iterations,
            "lut_dtype": cfg.lut_dtype}
    return _result(codes, lut, meta, cfg.bits, _half_trace(W - lookup(codes, lut), H))


def gptq_lut_recipe(bits: int, **args) -> dict:
    """As ``gptq_recipe``: act-order, true-sequential, calibration forwards in bfloat16 where native."""
    stage = {"method": "gptq-lut", "args": {"bits": bits, "act_order": True, "true_sequential": True, **args}}
    return {"calibration": {"dtype": "auto"}, "stages": [stage]}


register(Method("squeezellm", SqueezeLLMConfig, squeezellm, ("hessian",), "quantize"), recipes={
    "squeezellm-w3": {"stages": [{"method": "squeezellm", "args": {"bits": 3}}]},
    "squeezellm-w4": {"stages": [{"method": "squeezellm", "args": {"bits": 4}}]},
})
register(Method("gptq-lut", GPTQLUTConfig, gptq_lut, ("hessian",), "quantize"), recipes={
    "gptq-lut-w2": gptq_lut_recipe(2),
    "gptq-lut-w3": gptq_lut_recipe(3),
    "gptq-lut-w4": gptq_lut_recipe(4),
})
