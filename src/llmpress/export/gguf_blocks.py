"""llama.cpp's block formats for the integer codes a method chose: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

A GGUF "legacy" block holds 32 consecutive weights of a row, an fp16 scale ``d`` and, for the
``_1`` types, an fp16 offset ``m``; llama.cpp computes ``x = (q - o) * d`` (``o`` = 8 for Q4_0,
16 for Q5_0, 0 for Q8_0) or ``x = q * d + m``, with ``q`` the unsigned code (ggml's
``dequantize_row_q4_0`` and siblings). llmpress's grids (``llmpress.primitives``) store signed codes
``c`` in [-2^(b-1), 2^(b-1)-1] and ``x = (c - z) * s``, so a grid with groups of 32 maps onto a block
type without re-rounding anything:

======  ===================================  ======================================
type    llmpress grid                        stored
======  ===================================  ======================================
Q4_0    4 bits, group 32, symmetric          q = c + 8,  d = s
Q4_1    4 bits, group 32, asymmetric         q = c + 8,  d = s, m = -(8 + z) s
Q5_0    5 bits, group 32, symmetric          q = c + 16, d = s
Q5_1    5 bits, group 32, asymmetric         q = c + 16, d = s, m = -(16 + z) s
Q8_0    8 bits, group 32, symmetric          q = c,      d = s
======  ===================================  ======================================

The codes are written bit-exactly; the scale (and offset) are rounded to fp16, which is what the
block holds, so llama.cpp's weight differs from llmpress's fp32 one by at most one fp16 rounding of
the scale. Float zero points (HQQ, ``Grid.float_zero``) fit the ``_1`` types too: ``m`` is a float.
K-quants (super-blocks of 256 with 6-bit sub-scales) are not here: their scales are themselves
quantized, so a grid must be chosen for them, not mapped.

Pure functions on tensors and NumPy arrays; the file writer is :mod:`.gguf_write`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..compressed import Grid

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: its name, the grid it stores, and the bytes of one block of 32 weights."""

    name: str
    bits: int
    sym: bool
    nbytes: int

    @property
    def offset(self) -> int:
        """What is added to llmpress's signed code to get llama.cpp's unsigned one."""
        return 0 if self.bits == 8 else 2 ** (self.bits - 1)


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q4_0", 4, True, 2 + 16),
    BlockType("Q4_1", 4, False, 2 + 2 + 16),
    BlockType("Q5_0", 5, True, 2 + 4 + 16),
    BlockType("Q5_1", 5, False, 2 + 2 + 4 + 16),
    BlockType("Q8_0", 8, True, 2 + 32),
)}


def block_type_for(grid: Grid | None, in_features: int) -> BlockType | None:
    """The block type that holds codes on ``grid`` exactly, or None (then :func:`why_not` says why)."""
    return None if why_not(grid, in_features) else _by_grid(grid)


def _by_grid(grid: Grid) -> BlockType | None:
    return next((t for t in BLOCK_TYPES.values() if t.bits == grid.bits and t.sym == grid.sym), None)


def why_not(grid: Grid | None, in_features: int) -> str | None:
    """Why codes on ``grid`` fit no GGUF block type (None when one fits)."""
    if grid is None:
        return "it has no integer codes"
    if grid.act_bits is not None:
        return f"its activations are quantized too (W{grid.bits}A{grid.act_bits}), which GGUF cannot express"
    if grid.group_size != BLOCK:
        group = "one scale per row" if grid.group_size == -1 else f"groups of {grid.group_size}"
        return f"it has {group}, GGUF blocks are groups of {BLOCK}"
    if in_features % BLOCK:
        return f"its {in_features} inputs are not a multiple of {BLOCK}"
    if _by_grid(grid) is None:
        kind = "symmetric" if grid.sym else "asymmetric"
        have = ", ".join(f"{t.name} ({t.bits}-bit {'symmetric' if t.sym else 'asymmetric'})"
                         for t in BLOCK_TYPES.values())
        return f"GGUF has no block type for {kind} {grid.bits}-bit codes (there are {have})"
    if grid.sym and grid.float_zero:
        return "its zero points are floats on a symmetric grid"
    return None


def _f16_bytes(x: Tensor) -> np.ndarray:
    """(..., ) float -> (..., 2) uint8: the fp16 value, little-endian."""
    return x.to(torch.float16).contiguous().numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def pack_blocks(codes: Tensor, scale: Tensor, zero: Tensor | None, kind: BlockType) -> np.ndarray:
    """The GGUF bytes of a quantized (out, in) weight: (out, in / 32 * kind.nbytes) uint8.

    ``codes``: signed integer codes (out, in) on ``kind``'s grid; ``scale``/``zero``: (out, in / 32),
    zero None or all 0 for the symmetric types. Codes outside the grid's range are refused.
    """
    rows, cols = codes.shape
    if cols % BLOCK:
        raise ValueError(f"{cols} columns are not a multiple of {BLOCK}")
    nb = cols // BLOCK
    if tuple(scale.shape) != (rows, nb):
        raise ValueError(f"scale shape {tuple(scale.shape)} is not ({rows}, {nb}): one scale per block of {BLOCK}")
    lo, hi = -(2 ** (kind.bits - 1)), 2 ** (kind.bits - 1) - 1
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < lo or int(c.max()) > hi):
        raise ValueError(f"codes outside [{lo}, {hi}] cannot be stored as {kind.name}")
    q = (c + kind.offset).reshape(rows, nb, BLOCK)
    parts = [_f16_bytes(scale.float())]
    if not kind.sym:
        z = torch.zeros_like(scale, dtype=torch.float32) if zero is None else zero.float()
        parts.append(_f16_bytes(-(kind.offset + z) * scale.float()))
    if kind.bits == 8:
        parts.append(q.to(torch.int8).numpy().view(np.uint8))
    else:
        if kind.bits == 5:
            high = ((q >> 4) & 1).to(torch.int64) << torch.arange(BLOCK, dtype=torch.int64)
            qh = high.sum(dim=-1).numpy().astype("<u4")  # bit j: the fifth bit of weight j
            parts.append(qh.view(np.uint8).reshape(rows, nb, 4))
        low = (q & 0xF).to(torch.uint8)
        parts.append((low[..., :BLOCK // 2] | (low[..., BLOCK // 2:] << 4)).numpy())
    return np.concatenate(parts, axis=-1).reshape(rows, nb * kind.nbytes)


def unpack_blocks(data: np.ndarray, kind: BlockType, cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of :func:`pack_blocks`: signed codes (out, in) int8, fp16 scales and offsets as fp32
    (out, in / 32); the offset ``m`` is 0 for the symmetric types. For tests and for reading files back."""
    nb = cols // BLOCK
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, nb, kind.nbytes)
    rows = raw.shape[0]
    d = torch.from_numpy(raw[..., 0:2].copy().view("<f2").astype(np.float32).reshape(rows, nb))
    at = 2
    m = torch.zeros_like(d)
    if not kind.sym:
        m = torch.from_numpy(raw[..., 2:4].copy().view("<f2").astype(np.float32).reshape(rows, nb))
        at = 4
    if kind.bits == 8:
        q = torch.from_numpy(raw[..., at:].copy().view(np.int8).astype(np.int32))
    else:
        high = torch.zeros(rows, nb, BLOCK, dtype=torch.int32)
        if kind.bits == 5:
            qh = torch.from_numpy(raw[..., at:at + 4].copy().view("<u4").astype(np.int64).reshape(rows, nb, 1))
            high = (((qh >> torch.arange(BLOCK)) & 1) << 4).to(torch.int32)
            at += 4
        qs = torch.from_numpy(raw[..., at:at + BLOCK // 2].astype(np.int32))
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1) | high
    codes = (q - kind.offset).reshape(rows, cols).to(torch.int8)
    return codes, d, m
