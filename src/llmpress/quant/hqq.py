"""Half-Quadratic Quantization (HQQ; Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine
Learning Models", mobiusml blog and github.com/mobiusml/hqq): calibration-free, per-group zero points
fitted by a proximal (half-quadratic) solver.

Per group of ``group_size`` weights along the input dimension the scale is fixed from the group's
[min, max] (no widening to include 0: with a float zero point 0 need not be on the grid) and the zero
point z is optimised for a sparsity-promoting ``lp`` error (p < 1) by alternating

    q   = clamp(round(w / s + z), qmin, qmax)        # codes for the current zero
    e   = w - (q - z)·s                              # the error in weight units
    ê   = sign(e)·relu(|e| - |e|^(p-1) / beta)       # generalised soft-threshold (prox of the lp norm)
    z   = mean over the group of (q - (w - ê) / s)   # the zero that best explains w - ê
    beta ← kappa·beta

for ``iterations`` steps, keeping per group the zero with the lowest mean |e| (HQQ's own stopping
error); with ``early_stop`` a group stops at the first step that does not improve on its best.
As in HQQ the error and its threshold are in weight units: an error is kept (not shrunk to 0) only
when |e| > beta^(-1/(2-p)), about 0.17 for beta = 10, p = 0.7, so for LLM weights (|w| ~ 1e-2) the
zero update is in practice the least-squares one, mean(q - w/s), and the lp term acts on outliers only.

Grid: the asymmetric integer grid of ``llmpress.primitives`` (compressed-tensors' convention: codes in
the signed range [-2^(b-1), 2^(b-1)-1], weight = (q - zero)·scale), so the codes pack like any other
asymmetric int grid. HQQ's unsigned codes 0..2^b-1 are these codes plus 2^(b-1), with the zero point
shifted by the same amount. Unlike RTN the zero point is a float, not an integer (meta
``"zero_float": True``): an exporter must store it as a float, since rounding it to an integer changes
the weights.

Exactness: ``param_dtype`` is the dtype scale and zero point will be stored in (HQQ itself keeps them
in fp16). Both are rounded to it before the final codes and the dequantized weight are computed, so
``weight == dequantize(qweight, scale, zero)`` holds exactly for the stored values, in fp32
arithmetic (as ``QuantizedLinear`` and compressed-tensors compute it for an fp32 model). The default
fp16 values are also exact in fp32 storage; for a bf16 model use ``param_dtype: bfloat16``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from ..compressed import Compressed, Grid
from ..config import Check, Config
from ..primitives import dequantize, qrange
from ..registry import Method, register
from .rtn import Bits, GroupSize

PARAM_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class HQQConfig(Config):
    """bits: 2–8; group_size: columns per scale/zero (-1 = per output channel); iterations: proximal
    steps (>= 1; 1 = the min/max grid with a float zero, no optimisation); lp_norm: p of the error
    norm, in (0, 1]; beta: initial penalty (> 0), multiplied by kappa (>= 1) every step; early_stop:
    a group stops at its first step without improvement; param_dtype: the dtype scale and zero are
    stored in, see the module docstring."""

    label = "hqq"

    bits: Bits = 4
    group_size: GroupSize = 64
    iterations: Annotated[int, Check(ge=1, advice="use an integer >= 1, e.g. 20")] = 20
    lp_norm: Annotated[float, Check(gt=0, le=1, advice="use a number in (0, 1], e.g. 0.7")] = 0.7
    beta: Annotated[float, Check(gt=0, advice="use a positive number, e.g. 10")] = 10.0
    kappa: Annotated[float, Check(ge=1, advice="use a number >= 1, e.g. 1.01")] = 1.01
    early_stop: bool = True
    param_dtype: Literal["float16", "bfloat16", "float32"] = "float16"


def shrink_lp(e: Tensor, beta: float, p: float) -> Tensor:
    """The generalised soft-threshold of the lp norm: sign(e)·max(|e| - |e|^(p-1)/beta, 0) (0 stays 0)."""
    a = e.abs()
    return torch.sign(e) * torch.relu(a - a.pow(p - 1) / beta)


def _stored(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to ``dtype`` and back to fp32."""
    return x.to(dtype).float()


def initial_qparams(Wg: Tensor, bits: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """HQQ's start per group of Wg (rows, groups, g): scale = (max - min)/(2^b - 1), rounded to
    ``dtype`` (and kept positive), and the float zero that puts min on qmin; both (rows, groups, 1).

    A constant group c gets scale |c|/(2^b - 1) (an all-zero one 1/(2^b - 1)), which puts c exactly
    on the grid with an integer zero.
    """
    qmin, qmax = qrange(bits)
    lo = Wg.amin(dim=-1, keepdim=True)
    hi = Wg.amax(dim=-1, keepdim=True)
    span = hi - lo
    span = torch.where(span > 0, span, lo.abs())
    span = torch.where(span > 0, span, torch.ones_like(span))
    info = torch.finfo(dtype)
    scale = _stored((span / (qmax - qmin)).clamp(max=info.max), dtype)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, info.tiny * info.eps))  # underflow: smallest
    return scale, qmin - lo / scale


def optimize_zero(Wg: Tensor, scale: Tensor, zero: Tensor, cfg: HQQConfig) -> Tensor:
    """The proximal zero-point iteration (module docstring) on Wg (rows, groups, g), vectorised over
    groups; scale and zero (rows, groups, 1). Returns each group's best zero (lowest mean |e|)."""
    qmin, qmax = qrange(cfg.bits)
    beta = float(cfg.beta)
    best_err = torch.full_like(zero, math.inf)
    best_zero = zero.clone()
    active = torch.ones_like(zero, dtype=torch.bool)
    unit = Wg / scale
    for step in range(cfg.iterations):
        q = torch.round(unit + zero).clamp_(qmin, qmax)
        e = Wg - (q - zero) * scale
        err = e.abs().mean(dim=-1, keepdim=True)
        better = err < best_err
        if cfg.early_stop:
            better &= active
            active = better
        best_err = torch.where(better, err, best_err)
        best_zero = torch.where(better, zero, best_zero)
        if step + 1 == cfg.iterations or (cfg.early_stop and not bool(active.any())):
            break
        shrunk = shrink_lp(e, beta, cfg.lp_norm)
        zero = (q - (Wg - shrunk) / scale).mean(dim=-1, keepdim=True)
        beta *= cfg.kappa
    return best_zero


def _hqq_groups(Wg: Tensor, cfg: HQQConfig) -> tuple[Tensor, Tensor]:
    """Scale and zero (rows, groups), both exactly representable in ``cfg.param_dtype``, for Wg (rows, groups, g)."""
    dtype = PARAM_DTYPES[cfg.param_dtype]
    scale, zero = initial_qparams(Wg, cfg.bits, dtype)
    zero = optimize_zero(Wg, scale, zero, cfg)
    return scale.squeeze(-1), _stored(zero, dtype).squeeze(-1)


def hqq(weight: Tensor, cfg: HQQConfig) -> Compressed:
    """HQQ (Badri & Shaji 2023) on ``weight`` (out, in) fp32: the zero point of each group of
    ``group_size`` input columns fitted by the proximal lp iteration, the scale from the group's range.

    Returns codes (int8, (out, in), signed range), scale and float zero (fp32 (out, groups), values
    exactly representable in ``cfg.param_dtype``) and ``weight = dequantize(codes, scale, zero)``.
    A last group shorter than ``group_size`` is fitted on its own columns only.
    """
    W = weight.detach().float()
    rows, cols = W.shape
    g = cols if cfg.group_size is None or cfg.group_size == -1 else min(cfg.group_size, cols)
    full = cols // g
    scales, zeros = [], []
    if full:
        s, z = _hqq_groups(W[:, :full * g].reshape(rows, full, g), cfg)
        scales.append(s)
        zeros.append(z)
    if full * g < cols:
        s, z = _hqq_groups(W[:, full * g:].unsqueeze(1), cfg)
        scales.append(s)
        zeros.append(z)
    scale, zero = torch.cat(scales, dim=1), torch.cat(zeros, dim=1)
    group = None if cfg.group_size is None or cfg.group_size == -1 else cfg.group_size
    qmin, qmax = qrange(cfg.bits)
    s_full = scale.repeat_interleave(g, dim=1)[:, :cols]
    z_full = zero.repeat_interleave(g, dim=1)[:, :cols]
    q = torch.round(W / s_full + z_full).clamp_(qmin, qmax).to(torch.int8)
    meta = {"method": "hqq", "param_dtype": cfg.param_dtype}
    return Compressed(weight=dequantize(q, scale, zero, group), qweight=q, scale=scale, zero=zero, meta=meta,
                      grid=Grid(cfg.bits, -1 if cfg.group_size is None else cfg.group_size, sym=False,
                                float_zero=True))


def hqq_recipe(bits: int, group: int) -> dict:
    """The recipe dict of HQQ at ``bits`` with groups of ``group`` (-1: per channel)."""
    return {"stages": [{"method": "hqq", "args": {"bits": bits, "group_size": group}}]}


register(Method("hqq", HQQConfig, hqq, (), "quantize", calibrated=False), recipes={
    "hqq-w4-g64": hqq_recipe(4, 64),
    "hqq-w3-g64": hqq_recipe(3, 64),
})
