"""SparseGPT: prune (and optionally quantize) one column at a time, reconstructing the rest from the Hessian.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot" (arXiv:2301.00774), Algorithm 1. Minimise ‖(W − Ŵ)X‖²
with H = 2/n·XᵀX. Columns are processed left to right; when column j is
pruned (or rounded) its error is pushed onto the columns not yet processed
with the OBS update −(w_j − q_j)/[H_F⁻¹]_jj · [H_F⁻¹]_j,>j, read off the upper
Cholesky factor U of H⁻¹ (``llmpress.linalg``, shared with GPTQ), with lazy
block updates. The mask is adaptive: at the start of every block of
``block_size`` columns the weights with the lowest OBS saliency
w²/[H_F⁻¹]_jj² (= w²/U_jj²) over the whole (rows × block) chunk are pruned,
from the weights as earlier updates have left them; for N:M sparsity the
selection is made per row within each run of M columns when its first column
is reached. The block counts are chosen so the layer's total is exactly
``floor(sparsity · out · in)``.

Joint sparsify + quantize (the paper's 50% + 4-bit setting, section 4): the
kept weights are rounded to a grid (``llmpress.primitives``, compressed-tensors
conventions) in the same pass, GPTQ-style; a group's scale/zero come from the
current weights at its first column, already-pruned entries excluded (per-channel
grids: from the original W). Pruned weights get the zero point's code, so the
result packs as an ordinary quantized layer whose zeros are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor

from ..compressed import Compressed, Grid
from ..config import Check, Config
from ..errors import LlmpressError
from ..linalg import damped_hessian, inverse_cholesky_upper, single_threaded
from ..primitives import compute_qparams, dequantize, group_count, qrange
from ..quant.rtn import Bits, GroupSize
from ..registry import Method, register
from .masks import Pattern, Sparsity, lowest_mask, measured_sparsity, nm_mask, resolve_sparsity


@dataclass(frozen=True)
class SparseGPTConfig(Config):
    """sparsity: fraction removed (default 0.5, or 1 − N/M); pattern: "unstructured" or "N:M";
    block_size: columns per adaptive mask selection and lazy update (128 in the paper);
    damp: λ = damp·mean(diag H); bits: quantize the kept weights jointly (2–8, None = no);
    group_size/sym: their grid (-1 = per output channel); keep_zeros: prune exactly the weights
    that are already zero (an earlier stage's mask) and select nothing — with ``bits`` this is
    GPTQ restricted to that mask, the "prune, then quantize" sequential baseline; true_sequential: the
    engine compresses a block's linears group by group in forward order, each group's Hessian taken
    with the groups before it already compressed (as GPTQ's ``--true-sequential``)."""

    label = "sparsegpt"

    sparsity: Sparsity | None = None
    pattern: Pattern = "unstructured"
    block_size: Annotated[int, Check(ge=1, advice="use a positive integer such as 128", label="")] = 128
    damp: Annotated[float, Check(gt=0, advice="use a positive number such as 0.01", label="")] = 0.01
    bits: Bits | None = None
    group_size: GroupSize = 64
    sym: bool = True
    keep_zeros: bool = False
    true_sequential: bool = False

    def check(self) -> None:
        sparsity, nm = resolve_sparsity(self.sparsity, self.pattern)
        size = self.block_size
        if nm is not None and size % nm[1]:
            raise LlmpressError(f"block_size={size} is not a multiple of M={nm[1]} in pattern {self.pattern!r}: "
                                f"use e.g. block_size {nm[1] * max(1, 128 // nm[1])}")
        if self.keep_zeros and (sparsity != 0 or nm is not None):
            raise LlmpressError("keep_zeros=true keeps an earlier stage's mask, so it selects nothing itself: "
                                "set sparsity: 0 and leave pattern unstructured")


def sparsegpt(weight: Tensor, hessian: Tensor, cfg: SparseGPTConfig) -> Compressed:
    """SparseGPT (arXiv:2301.00774, Alg. 1) of one linear layer, optionally with joint quantization.

    weight (out, in); hessian (in, in) = 2/n·XᵀX (``llmpress.stats.HessianStats``); float64
    when either is, else float32. Dead input channels (H_jj = 0) get zero weight columns.
    Returns ``Compressed`` with the reconstructed fp32 weight (out, in), its keep-mask (bool,
    (out, in)), ``loss`` = Σ (w − q)²/[H_F⁻¹]_jj / 2 over all processed entries and, when
    ``cfg.bits`` is set, int8 codes (out, in) (the zero point where pruned) with scale/zero
    (out, groups) such that ``weight == dequantize(qweight, scale, zero)`` exactly.
    Runs on one torch thread (see ``llmpress.linalg.single_threaded``).
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight (out, in) and hessian (in, in) expected, got {tuple(weight.shape)} "
                         f"and {tuple(hessian.shape)}")
    sparsity, nm = resolve_sparsity(cfg.sparsity, cfg.pattern)
    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    W = weight.detach().to(dtype=dtype, copy=True)
    with single_threaded(W.numel()):
        H, _ = damped_hessian(hessian.detach().to(dtype), W, cfg.damp)
        keep_t = (W != 0).T.contiguous() if cfg.keep_zeros else torch.ones_like(W.T, dtype=torch.bool)
        grid = None if cfg.bits is None else _Grid(cfg, W, keep_t)
        Wt = W.T.contiguous()
        # a wide H is factorised in its own memory (a retry with more damping rebuilds it)
        U = inverse_cholesky_upper(H, lambda: damped_hessian(hessian.detach().to(dtype), W, cfg.damp)[0])
        del H
        Q, loss = _solve(Wt, U, keep_t, sparsity, nm, cfg, grid)
    mask = keep_t.T.contiguous()
    meta, sparsity = {"method": "sparsegpt"}, measured_sparsity(mask, nm)
    if grid is None:
        return Compressed(weight=Q.T.float().contiguous(), mask=mask, meta=meta, loss=loss, sparsity=sparsity)
    qweight = Q.T.to(torch.int8).contiguous()
    group = None if cfg.group_size == -1 else cfg.group_size
    return Compressed(weight=dequantize(qweight, grid.scale, grid.zero, group), qweight=qweight,
                      scale=grid.scale, zero=grid.zero, mask=mask, meta=meta, loss=loss, sparsity=sparsity,
                      grid=Grid(cfg.bits, cfg.group_size, cfg.sym))


class _Grid:
    """Scale/zero per (row, group): static per channel, or set at each group's first column."""

    def __init__(self, cfg: SparseGPTConfig, W: Tensor, keep_t: Tensor) -> None:
        self.bits, self.sym = cfg.bits, cfg.sym
        self.size = None if cfg.group_size == -1 else cfg.group_size
        if self.size is None:
            self.scale, self.zero = compute_qparams(W * keep_t.T, cfg.bits, None, cfg.sym)
        else:
            groups = group_count(W.shape[1], self.size)
            self.scale, self.zero = torch.empty(W.shape[0], groups), torch.empty(W.shape[0], groups)
        self.current = (self.scale[:, 0].to(W.dtype), self.zero[:, 0].to(W.dtype))

    def at(self, Wt: Tensor, E1: Tensor, U: Tensor, keep_t: Tensor, i1: int, c: int, i2: int) -> tuple[Tensor, Tensor]:
        """Scale and zero (out,) for column c, the block being [i1, i2); a group's start sets them.

        The group's columns past i2 still lack the block's pending lazy update from
        columns [i1, c): it is applied here to a copy. Entries already pruned count as 0.
        """
        if self.size is None or c % self.size:
            return self.current
        end = min(c + self.size, Wt.shape[0])
        current = Wt[c:end]
        if end > i2:
            tail = torch.addmm(Wt[i2:end], U[i1:c, i2:end].T, E1[:c - i1], alpha=-1)
            current = torch.cat([Wt[c:i2], tail])
        s, z = compute_qparams((current * keep_t[c:end]).T, self.bits, None, self.sym)
        self.scale[:, c // self.size], self.zero[:, c // self.size] = s[:, 0], z[:, 0]
        self.current = (s[:, 0].to(Wt.dtype), z[:, 0].to(Wt.dtype))
        return self.current


def _select_block(W1: Tensor, d1: Tensor, keep1: Tensor, rows: int, i1: int, i2: int, sparsity: float) -> None:
    """Unstructured adaptive selection for columns [i1, i2): the block's share of the layer's prunes,
    lowest w²/U_jj² over the (block × rows) chunk, flattened column by column."""
    k = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
    if k:
        scores = (W1 * W1 / (d1 * d1).unsqueeze(1)).reshape(1, -1)
        keep1.copy_(lowest_mask(scores, k).reshape(keep1.shape))


def _solve(Wt: Tensor, U: Tensor, keep_t: Tensor, sparsity: float, nm: tuple[int, int] | None,
           cfg: SparseGPTConfig, grid: _Grid | None) -> tuple[Tensor, float]:
    """The blocked loop on Wt = Wᵀ (in, out); fills keep_t (in, out); returns Ŵᵀ (or codes) and the loss."""
    columns, rows = Wt.shape
    select = not cfg.keep_zeros
    Q = torch.empty_like(Wt)
    E = torch.empty_like(Wt)  # scaled errors (w - q) / U_jj, one row per column
    qmin, qmax = qrange(cfg.bits or 8)
    for i1 in range(0, columns, cfg.block_size):
        i2 = min(i1 + cfg.block_size, columns)
        W1, E1, U1, keep1 = Wt[i1:i2], E[i1:i2], U[i1:i2, i1:i2], keep_t[i1:i2]
        d1 = U1.diagonal()
        if select and nm is None:
            _select_block(W1, d1, keep1, rows, i1, i2, sparsity)
        for i in range(i2 - i1):
            c = i1 + i
            if select and nm is not None and c % nm[1] == 0:
                j = min(i + nm[1], i2 - i1)
                scores = W1[i:j] * W1[i:j] / (d1[i:j] * d1[i:j]).unsqueeze(1)
                keep1[i:j] = nm_mask(scores.T, *nm).T
            w, k = W1[i], keep1[i]
            if grid is None:
                q = w * k
                Q[c] = q
            else:
                s, z = grid.at(Wt, E1, U, keep_t, i1, c, i2)
                code = torch.where(k, torch.clamp(torch.round(w / s) + z, qmin, qmax), z)
                Q[c] = code
                q = (code - z) * s
            err = torch.sub(w, q, out=E1[i]).div_(U1[i, i])
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
        if i2 < columns:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1)
    return Q, float(E.pow(2).sum()) / 2


def _sgpt(**args) -> dict:
    return {"method": "sparsegpt", "args": args}


# 50% unstructured, 2:4 and 4:8; 50% + int4 (group 64) jointly in one pass (-w4), or pruned and then quantized
# on the kept weights (+gptq-w4); -ts: true-sequential Hessians (each linear group's taken after the groups
# before it are compressed)
register(Method("sparsegpt", SparseGPTConfig, sparsegpt, ("hessian",), "prune"), recipes={
    "sparsegpt-50": {"stages": [_sgpt(sparsity=0.5)]},
    "sparsegpt-24": {"stages": [_sgpt(pattern="2:4")]},
    "sparsegpt-48": {"stages": [_sgpt(pattern="4:8")]},
    "sparsegpt-50-ts": {"stages": [_sgpt(sparsity=0.5, true_sequential=True)]},
    "sparsegpt-24-ts": {"stages": [_sgpt(pattern="2:4", true_sequential=True)]},
    "sparsegpt-50-w4": {"stages": [_sgpt(sparsity=0.5, bits=4, group_size=64)]},
    "sparsegpt-24-w4": {"stages": [_sgpt(pattern="2:4", bits=4, group_size=64)]},
    "sparsegpt-50+gptq-w4": {"stages": [_sgpt(sparsity=0.5), _sgpt(sparsity=0.0, keep_zeros=True, bits=4,
                                                                   group_size=64)]},
    "sparsegpt-50-w4-ts": {"stages": [_sgpt(sparsity=0.5, bits=4, group_size=64, true_sequential=True)]},
    "sparsegpt-50+gptq-w4-ts": {"stages": [_sgpt(sparsity=0.5, true_sequential=True),
                                           _sgpt(sparsity=0.0, keep_zeros=True, bits=4, group_size=64,
                                                 true_sequential=True)]},
})
