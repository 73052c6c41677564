"""A slow, obviously-correct GPTQ: Optimal Brain Quantization one column at a time, no Cholesky, no batching.

Written from the paper (Frantar et al. 2022, arXiv:2210.17323, eqs. 2–3)
rather than from the fast code: for each column in processing order, invert
the (damped) Hessian restricted to the columns not yet quantized, round the
column, and move every remaining column by the optimal OBS correction
−(w − q)/[H_F⁻¹]_qq · [H_F⁻¹]_q,:. Float64 throughout. Groups follow
``llmpress.quant.gptq``: dynamic qparams at each group's first column from the
current weights, or static ones from the original W with act_order or per
channel. O(in⁴): keep ``in`` to a few hundred.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmpress.primitives import compute_qparams, search_qparams


def dead_inputs_dropped(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 copies of W (out, in) and H (in, in) with every dead input (H[j, j] == 0: never active) given
    H[j, j] = 1 and a zero weight column, as GPTQ and the solvers built on it do before damping."""
    W, H = W.double().clone(), H.double().clone()
    for j in range(W.shape[1]):
        if H[j, j] == 0:
            H[j, j], W[:, j] = 1.0, 0.0
    return W, H


def gptq_reference(W: Tensor, H: Tensor, bits: int, group_size: int, sym: bool, act_order: bool = False,
                   damp: float = 0.01, mse: bool = False) -> tuple[Tensor, Tensor, Tensor, float]:
    """Returns codes (out, in) int8, scale and zero (out, groups) fp32, and Σ (w − q)²/[H_F⁻¹]_qq / 2."""
    W, H = dead_inputs_dropped(W, H)
    rows, n = W.shape
    g = n if group_size == -1 else group_size
    groups = -(-n // g)
    order = list(range(n))
    if act_order:
        order = torch.argsort(torch.diagonal(H), descending=True, stable=True).tolist()
    H = H + damp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype)
    qparams = search_qparams if mse else compute_qparams
    scale = torch.zeros(rows, groups)
    zero = torch.zeros(rows, groups)
    static = act_order or group_size == -1
    if static:
        for k in range(groups):
            s, z = qparams(W[:, k * g:(k + 1) * g], bits, None, sym)
            scale[:, k], zero[:, k] = s[:, 0], z[:, 0]
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.zeros(rows, n, dtype=torch.int8)
    remaining = list(order)
    loss = 0.0
    for col in order:
        k = col // g
        if not static and col % g == 0:
            s, z = qparams(W[:, col:col + g], bits, None, sym)
            scale[:, k], zero[:, k] = s[:, 0], z[:, 0]
        s, z = scale[:, k].double(), zero[:, k].double()
        Hinv = torch.linalg.inv(H[remaining][:, remaining])  # remaining[0] == col
        w = W[:, col]
        q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
        codes[:, col] = q.to(torch.int8)
        error = w - (q - z) * s
        loss += float((error ** 2).sum() / Hinv[0, 0]) / 2
        W[:, remaining] -= torch.outer(error / Hinv[0, 0], Hinv[0])
        remaining.pop(0)
    return codes, scale, zero, loss
