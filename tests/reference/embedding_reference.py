"""A slow, obviously-correct group-wise round-to-nearest of an embedding matrix, one row and group at a time.

Written from compressed-tensors' conventions rather than from ``llmpress.primitives``: a b-bit grid has the
integers -2^(b-1) … 2^(b-1)-1; a group's range is [min(min w, 0), max(max w, 0)]; symmetric: scale =
max(-lo, hi) / ((2^b - 1) / 2), zero point 0; asymmetric: scale = (hi - lo) / (2^b - 1), zero point
round(-2^(b-1) - lo / scale) clamped to the grid; an all-zero group gets scale 1. Codes are round(w / s) + z
clamped to the grid (round half to even); the weight is (q - z) s. float32 scalars, one element at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor


def embedding_reference(W: Tensor, bits: int, group_size: int, sym: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """codes (vocab, hidden) int8, scale and zero (vocab, groups), dequantized (vocab, hidden), all but codes
    float32; ``group_size`` -1: one group per row; a partial last group is its own group."""
    rows, cols = W.shape
    g = cols if group_size == -1 else group_size
    groups = -(-cols // g)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.zeros(rows, cols, dtype=torch.int8)
    scale, zero = torch.zeros(rows, groups), torch.zeros(rows, groups)
    out = torch.zeros(rows, cols)
    for r in range(rows):
        for k in range(groups):
            values = W[r, k * g:(k + 1) * g].float()
            lo, hi = torch.clamp(values.min(), max=0.0), torch.clamp(values.max(), min=0.0)  # 0-d float32
            s = torch.maximum(-lo, hi) / ((qmax - qmin) / 2) if sym else (hi - lo) / (qmax - qmin)
            s = s if s > 0 else torch.tensor(1.0)
            z = torch.tensor(0.0) if sym else torch.clamp(torch.round(qmin - lo / s), qmin, qmax)
            scale[r, k], zero[r, k] = s, z
            for c in range(values.numel()):
                q = torch.clamp(torch.round(values[c] / s) + z, qmin, qmax)
                codes[r, k * g + c] = int(q)
                out[r, k * g + c] = (q - z) * s
    return codes, scale, zero, out
