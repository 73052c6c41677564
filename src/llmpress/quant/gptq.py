"""GPTQ: quantize one column at a time and push its rounding error onto the columns not yet quantized.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers" (arXiv:2210.17323),
Algorithm 1: minimise ‖(W − Ŵ)X‖² with H = 2/n·XᵀX; after column i is
rounded, the optimal (OBS) update of the remaining columns is
−(w_i − q_i)/[H⁻¹]_ii · [H⁻¹]_i,>i, taken from the upper Cholesky factor of
H⁻¹ (``llmpress.linalg``). Updates inside a block of ``block_size`` columns
are applied one column at a time; the rest of the matrix gets them in one
matrix product per block ("lazy batch" updates). Grids follow
``llmpress.primitives`` (compressed-tensors conventions).

Groups. Without ``act_order`` a group's scale/zero are computed when its
first column is reached, from the weights as error feedback has left them
(as the reference code does). With ``act_order`` columns are processed in
order of decreasing diag(H) but the groups are *static*: every group's
qparams come up front from the original W (after dead-column zeroing) and
each column keeps its own original group's qparams, so the result needs no
``g_idx`` and saves in the standard layout. Per-channel grids
(``group_size=-1``) are static in both modes, and so are llama.cpp's K-quant
grids (``kquant``: every group's scale is tied to its super-block's, so all are
chosen up front, ``llmpress.primitives.kquant_qparams``); their float zero points
are rounded as ``round(w / s + z)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from ..compressed import Compressed, Grid
from ..config import Check, Config
from ..linalg import damped_hessian, inverse_cholesky_upper, single_threaded
from ..primitives import compute_qparams, dequantize, expand_groups, kquant_qparams, qrange, search_qparams
from ..registry import Method, register
from .rtn import Bits, GroupSize, KQuantName, fix_kquant_grid, kquant_grid


@dataclass(frozen=True)
class GPTQConfig(Config):
    """bits: 2–8; group_size: columns per scale (-1 = per output channel); sym: zero point 0;
    act_order: process columns by decreasing diag(H), static groups; damp: λ = damp·mean(diag H);
    block_size: columns per lazy batch update; mse: clip search per group (``search_qparams``);
    true_sequential: the engine quantizes a block's linears group by group in forward order, each
    group's Hessian taken with the groups before it already quantized (GPTQ's ``--true-sequential``);
    kquant: llama.cpp's K-quant grid "Q4_K" or "Q6_K" (fixes bits, group_size and sym; ``rtn.kquant_grid``)."""

    bits: Bits = 4
    group_size: GroupSize = 64
    sym: bool = True
    act_order: bool = False
    damp: Annotated[float, Check(gt=0, advice="use a positive number such as 0.01 (the fraction of "
                                              "mean(diag H) added to the diagonal)")] = 0.01
    block_size: Annotated[int, Check(ge=1, advice="use a positive integer such as 128")] = 128
    mse: bool = False
    true_sequential: bool = False
    kquant: KQuantName = None

    def check(self) -> None:
        fix_kquant_grid(self, "gptq")


def gptq(weight: Tensor, hessian: Tensor, cfg: GPTQConfig) -> Compressed:
    """GPTQ (arXiv:2210.17323, Alg. 1) of one linear layer.

    weight (out, in) and hessian (in, in) = 2/n·XᵀX (``llmpress.stats.HessianStats``);
    the solve runs in float64 when either is float64, else float32. Dead input
    channels (H_ii = 0) get zero weight columns. Returns ``Compressed`` with the
    dequantized fp32 weight (out, in) equal to ``dequantize(qweight, scale, zero)``,
    int8 codes (out, in) and scale/zero (out, groups), all in the original column
    order, and ``loss`` = Σ (w − q)²/[H_F⁻¹]_qq / 2 over all quantized entries (the
    reference code's estimate): half of tr(ΔHΔᵀ), Δ = W − Ŵ, for the damped H.
    The column loop runs on one torch thread below 4M weights (``llmpress.linalg.single_threaded``); the
    factorizations use all of them.
    """
    return _gptq(weight, hessian, cfg)


def _gptq(weight: Tensor, hessian: Tensor, cfg: GPTQConfig) -> Compressed:
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight (out, in) and hessian (in, in) expected, got {tuple(weight.shape)} "
                         f"and {tuple(hessian.shape)}")
    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    W = weight.detach().to(dtype=dtype, copy=True)
    grid = Grid(cfg.bits, cfg.group_size, cfg.sym) if cfg.kquant is None else kquant_grid(cfg.kquant, W.shape[1])
    group = grid.group
    qparams = search_qparams if cfg.mse else compute_qparams
    H, perm = damped_hessian(hessian.detach().to(dtype), W, cfg.damp, cfg.act_order)
    # a retry with more damping gets the same H again (a wide one is factorised in its own memory)
    U = inverse_cholesky_upper(H, lambda: damped_hessian(hessian.detach().to(dtype), W, cfg.damp, cfg.act_order)[0])
    del H  # only U is needed from here: one (in, in) matrix less during the solve
    Wt = (W.T if perm is None else W.T[perm]).contiguous()  # row c = the c-th column processed
    if cfg.act_order or group is None or grid.kquant is not None:  # static groups
        if grid.kquant is not None:
            scale, zero = kquant_qparams(W, grid.kquant)
        else:
            scale, zero = qparams(W, grid.bits, group, grid.sym)
        del W  # Wt holds the weights from here (an 8192-wide layer's copy is 67 MB)
        # column c's group, in processing order: the (groups, out) rows are looked up, never expanded to (in, out)
        of_column = expand_groups(torch.arange(scale.shape[1])[None], Wt.shape[0], group)[0]
        of_column = of_column if perm is None else of_column[perm]
        per_group = (scale.to(dtype).T.contiguous(), zero.to(dtype).T.contiguous(), of_column.tolist())
        codes_t, loss = _solve(Wt, U, grid.bits, cfg.block_size, per_column=per_group, float_zero=grid.float_zero)
    else:
        groups = _CurrentGroups(lambda Wg: qparams(Wg, grid.bits, None, grid.sym), group, W.shape[0],
                                math.ceil(W.shape[1] / group))
        codes_t, loss = _solve(Wt, U, grid.bits, cfg.block_size, groups=groups)
        scale, zero = groups.scale, groups.zero
    codes = codes_t if perm is None else codes_t[torch.argsort(perm)]
    qweight = codes.T.to(torch.int8).contiguous()
    meta = {"method": "gptq", "act_order": cfg.act_order, "mse": cfg.mse}
    return Compressed(weight=dequantize(qweight, scale, zero, group), qweight=qweight, scale=scale,
                      zero=zero, meta=meta, loss=loss, grid=grid)


class _CurrentGroups:
    """Dynamic groups: qparams from the current weights at each group's first column, recorded as they come."""

    def __init__(self, fn: Callable[[Tensor], tuple[Tensor, Tensor]], size: int, rows: int, groups: int) -> None:
        self.fn, self.size = fn, size
        self.scale = torch.empty(rows, groups)
        self.zero = torch.empty(rows, groups)

    def at(self, Wt: Tensor, E1: Tensor, U: Tensor, i1: int, c: int, i2: int) -> tuple[Tensor, Tensor]:
        """Scale and zero (out,) of the group starting at column c, the current block being [i1, i2).

        The group's columns inside the block are up to date; those past i2 still
        lack the block's pending lazy update from columns [i1, c), applied here to a copy.
        """
        end = min(c + self.size, Wt.shape[0])
        current = Wt[c:end]
        if end > i2:
            tail = torch.addmm(Wt[i2:end], U[i1:c, i2:end].T, E1[:c - i1], alpha=-1)
            current = torch.cat([Wt[c:i2], tail])
        s, z = self.fn(current.T)
        self.scale[:, c // self.size], self.zero[:, c // self.size] = s[:, 0], z[:, 0]
        return s[:, 0].to(Wt.dtype), z[:, 0].to(Wt.dtype)


def _solve(Wt: Tensor, *args, **kwargs) -> tuple[Tensor, float]:
    with single_threaded(Wt.numel()):  # threads by size: one for small layers, all for large ones
        return _solve_loop(Wt, *args, **kwargs)


def solve_nearest(Wt: Tensor, U: Tensor, block_size: int,
                  nearest: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, float]:
    """GPTQ's blocked column loop for any grid: ``nearest(w) -> (codes, values)`` rounds one column w (out,).

    Wt = Wᵀ (in, out) in processing order (overwritten), U the upper Cholesky factor of H⁻¹ in that order
    (``llmpress.linalg.inverse_cholesky_upper``); returns the float codes (in, out) and the loss, as
    :func:`gptq` computes them. Used by the non-uniform (codebook) variant, ``llmpress.quant.squeezellm``.
    """
    return _solve(Wt, U, 8, block_size, nearest=nearest)


def _solve_loop(Wt: Tensor, U: Tensor, bits: int, block_size: int,
                per_column: tuple[Tensor, Tensor, list[int]] | None = None,
                groups: _CurrentGroups | None = None, float_zero: bool = False,
                nearest: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, float]:
    """The blocked GPTQ loop on Wt = Wᵀ (in, out), rows in processing order; returns codes (in, out), loss.

    Working on Wᵀ keeps each column a contiguous row. Qparams come either from
    ``per_column`` (S, Z, g): S and Z (groups, out), g[c] the group of the c-th processed column, or from ``groups``.
    Codes are ``round(w / s) + z`` for integer zero points, ``round(w / s + z)`` when ``float_zero``
    (as ``llmpress.primitives.quantize``), returned as int8 (a grid of at most 8 bits). Any other grid (a
    non-uniform codebook, ``llmpress.quant.squeezellm``) passes ``nearest(w) -> (codes, values)`` for a column
    w (out,) instead (codes then returned in Wt's dtype).
    Wt is overwritten (it holds the error-updated weights at the end). The scaled errors are kept one block of
    columns at a time, the loss summed block by block: with int8 codes, two (in, out) matrices less than a float
    copy of each (an 8192 x 2048 layer: 134 MB).
    """
    columns = Wt.shape[0]
    qmin, qmax = qrange(bits)
    Q = torch.empty(Wt.shape, dtype=Wt.dtype if nearest is not None else torch.int8)  # integer codes, |q| ≤ 128
    E = torch.empty(min(block_size, columns), Wt.shape[1], dtype=Wt.dtype)  # scaled errors (w - q) / U_cc
    loss = 0.0
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, E1, U1 = Wt[i1:i2], E[:i2 - i1], U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            w = W1[i]
            if nearest is not None:
                q, value = nearest(w)
            else:
                if groups is None:
                    g = per_column[2][c]
                    s, z = per_column[0][g], per_column[1][g]
                elif c % groups.size == 0:
                    s, z = groups.at(Wt, E1, U, i1, c, i2)
                q = torch.round(w / s + z) if float_zero else torch.round(w / s).add_(z)
                q = torch.clamp_(q, qmin, qmax)
                value = (q - z).mul_(s)
            Q[c] = q
            err = torch.sub(w, value, out=E1[i]).div_(U1[i, i])
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
        if i2 < columns:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1)
        loss += float(E1.pow(2).sum())
    return Q, loss / 2


def gptq_recipe(bits: int, group_size: int = 64, **args) -> dict:
    """GPTQ's default recipe: act-order (static groups) and true-sequential, calibration forwards in bfloat16
    where the CPU/GPU runs it natively (Hessians stay fp32)."""
    stage = {"method": "gptq", "args": {"bits": bits, "group_size": group_size, "act_order": True,
                                        "true_sequential": True, **args}}
    return {"calibration": {"dtype": "auto"}, "stages": [stage]}


register(Method("gptq", GPTQConfig, gptq, ("hessian",), "quantize"), recipes={
    "gptq-w4-g64": gptq_recipe(4),
    "gptq-w4-g64-asym": gptq_recipe(4, sym=False),
    "gptq-w3-g64": gptq_recipe(3),
    "gptq-w2-g64": gptq_recipe(2),  # the uniform int2 contrast to gptq-lut-w2 (llmpress.quant.squeezellm)
    "gptq-w4-g64-mse": gptq_recipe(4, mse=True),
    # the reference algorithm (no act-order, one pass)
    "gptq-w4-g64-classic": {"stages": [{"method": "gptq", "args": {"bits": 4, "group_size": 64}}]},
    # llama.cpp's block types (groups of 32), written to GGUF with these codes (--format gguf)
    "gptq-q4_0": gptq_recipe(4, 32),
    "gptq-q4_1": gptq_recipe(4, 32, sym=False),
    "gptq-q5_0": gptq_recipe(5, 32),
    "gptq-q5_1": gptq_recipe(5, 32, sym=False),
    "gptq-q8_0": gptq_recipe(8, 32),
    # llama.cpp's K-quants (super-blocks of 256; narrower layers get Q5_0 / Q8_0, as llama-quantize does)
    "gptq-q4_k": gptq_recipe(4, 32, sym=False, kquant="Q4_K"),
    "gptq-q6_k": gptq_recipe(6, 16, kquant="Q6_K"),
})
