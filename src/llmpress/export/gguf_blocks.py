"""llama.cpp's block formats for the integer codes a method chose: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K.

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
Q4_K    ``Grid.kquant`` "Q4_K" (group 32)    q = c + 8,  d sc = s, dmin m = (8 + z) s
Q6_K    ``Grid.kquant`` "Q6_K" (group 16)    q = c + 32, d sc = s
======  ===================================  ======================================

The codes are written bit-exactly; the scale (and offset) are rounded to fp16, which is what the
block holds, so llama.cpp's weight differs from llmpress's fp32 one by at most one fp16 rounding of
the scale. Float zero points (HQQ, ``Grid.float_zero``) fit the ``_1`` types too: ``m`` is a float.

K-quants (ggml's ``block_q4_K`` / ``block_q6_K``, super-blocks of 256 weights) quantize the group scales
themselves: ``s = d * sc`` with one fp16 ``d`` per super-block and integers ``sc`` (6-bit for Q4_K, int8 for
Q6_K), and Q4_K's offsets likewise ``dmin * m``. A grid must be chosen for them
(``llmpress.primitives.kquant_qparams``), not mapped; the packer reads ``d`` and ``sc`` back off the scales
exactly (the largest group of a super-block has ``sc`` = 63 / 127, and ``d * sc`` is exact in fp32) and checks
them. Q6_K's weights are llmpress's bit for bit; Q4_K's differ by the fp32 rounding of the float zero point
(a few ulps of ``16 s``).

Pure functions on tensors and NumPy arrays; the file writer is :mod:`.gguf_write`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..compressed import Grid
from ..primitives import KQUANTS, QK_K, qrange

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: its name, the grid it stores, the bytes of one block of ``block`` weights (32, or 256
    for the K-quants) and the weights per scale (``group_size``)."""

    name: str
    bits: int
    sym: bool
    nbytes: int
    block: int = BLOCK
    group_size: int = BLOCK

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
# ggml's block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles; block_q6_K: ql[128],
# qh[64], int8 scales[16], fp16 d. Not in BLOCK_TYPES: the gguf package cannot round tensors to them.
K_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q4_K", 4, False, 2 + 2 + 12 + QK_K // 2, QK_K, 32),
    BlockType("Q6_K", 6, True, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, QK_K, 16),
)}


def block_type_for(grid: Grid | None, in_features: int) -> BlockType | None:
    """The block type that holds codes on ``grid`` exactly, or None (then :func:`why_not` says why)."""
    if why_not(grid, in_features):
        return None
    return K_TYPES[grid.kquant] if grid.kquant is not None else _by_grid(grid)


def _by_grid(grid: Grid) -> BlockType | None:
    return next((t for t in BLOCK_TYPES.values() if t.bits == grid.bits and t.sym == grid.sym), None)


def why_not(grid: Grid | None, in_features: int) -> str | None:
    """Why codes on ``grid`` fit no GGUF block type (None when one fits)."""
    if grid is None:
        return "it has no integer codes"
    if grid.act_bits is not None:
        return f"its activations are quantized too (W{grid.bits}A{grid.act_bits}), which GGUF cannot express"
    if grid.kquant is not None:
        kind = K_TYPES.get(grid.kquant)
        if kind is None:
            return f"llmpress writes no K-quant {grid.kquant} (there are {', '.join(K_TYPES)})"
        if (grid.bits, grid.group_size, grid.sym) != (kind.bits, kind.group_size, kind.sym):
            return (f"its {grid.kquant} grid is {grid.bits}-bit groups of {grid.group_size}, not {kind.bits}-bit "
                    f"groups of {kind.group_size}")
        if in_features % QK_K:
            return f"its {in_features} inputs are not a multiple of {QK_K} ({grid.kquant} super-blocks)"
        return None
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
    zero None or all 0 for the symmetric types. Codes outside the grid's range are refused. The K-quants
    (``kind.block`` 256) take (out, in / kind.group_size) scales and zeros on their grid (:func:`pack_kquant`).
    """
    if kind.block == QK_K:
        return pack_kquant(codes, scale, zero, kind)
    rows, cols = codes.shape
    if cols % BLOCK:
        raise ValueError(f"{cols} columns are not a multiple of {BLOCK}")
    nb = cols // BLOCK
    if tuple(scale.shape) != (rows, nb):
        raise ValueError(f"scale shape {tuple(scale.shape)} is not ({rows}, {nb}): one scale per block of {BLOCK}")
    q = (_check_codes(codes, kind) + kind.offset).reshape(rows, nb, BLOCK)
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
    if kind.block != BLOCK:
        raise ValueError(f"{kind.name} is a K-quant: read it with unpack_kquant")
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


def _check_codes(codes: Tensor, kind: BlockType) -> Tensor:
    """Codes (out, in) as int32, refused when outside ``kind``'s signed range."""
    lo, hi = qrange(kind.bits)
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < lo or int(c.max()) > hi):
        raise ValueError(f"codes outside [{lo}, {hi}] cannot be stored as {kind.name}")
    return c


def _superblock_ints(v: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """Values v = d * k (rows, super-blocks, groups) -> fp16 d (rows, super-blocks) and integers k in 0..top.

    The inverse of ``llmpress.primitives.kquant_qparams``'s rounding: its largest group has k = top, so d is
    max(v) / top rounded to fp16 (exact for scales, whose products d * k fp32 holds exactly).
    """
    d = (v.amax(dim=-1) / top).to(torch.float16)
    dd = d.double().unsqueeze(-1)
    k = torch.where(dd > 0, torch.round(v / torch.where(dd > 0, dd, torch.ones_like(dd))), torch.zeros_like(v))
    return d, k.clamp(0, top).to(torch.int32)


def pack_kquant(codes: Tensor, scale: Tensor, zero: Tensor | None, kind: BlockType) -> np.ndarray:
    """The GGUF bytes of a weight on a K-quant grid: (out, in / 256 * kind.nbytes) uint8, ggml's ``block_q4_K``
    or ``block_q6_K`` (``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref`` write the same layout).

    ``codes`` (out, in) signed; ``scale``/``zero`` (out, in / group_size) as ``kquant_qparams`` gives them.
    Scales that are not an fp16 times integers 1..63 (127) per super-block are refused (ValueError), and so are
    Q4_K offsets (8 + z) s that dmin * m misses by more than s / 4096.
    """
    rows, cols = codes.shape
    if cols % QK_K:
        raise ValueError(f"{cols} columns are not a multiple of {QK_K}: {kind.name} needs whole super-blocks")
    nsb, per = cols // QK_K, QK_K // kind.group_size
    if tuple(scale.shape) != (rows, nsb * per):
        raise ValueError(f"scale shape {tuple(scale.shape)} is not ({rows}, {nsb * per}): one scale per "
                         f"{kind.group_size} weights")
    q = _check_codes(codes, kind) + kind.offset
    s = scale.double().reshape(rows, nsb, per)
    top = KQUANTS[kind.name].scale_max
    d, sc = _superblock_ints(s, top)
    if not torch.equal(d.double().unsqueeze(-1) * sc, s):
        raise ValueError(f"scales are not on the {kind.name} grid (an fp16 per {QK_K} weights times integers up to "
                         f"{top}): quantize with llmpress.primitives.kquant_qparams")
    if kind.name == "Q6_K":
        if zero is not None and bool(zero.ne(0).any()):
            raise ValueError("Q6_K is symmetric: its zero points must be 0")
        return _pack_q6_k(q, d, sc)
    z = torch.zeros_like(s) if zero is None else zero.double().reshape(rows, nsb, per)
    offset = (z + 2 ** (kind.bits - 1)) * s  # dmin * m
    dmin, m = _superblock_ints(offset, top)
    if bool(((dmin.double().unsqueeze(-1) * m - offset).abs() > s / 4096).any()):
        raise ValueError("zero points are not on the Q4_K grid (offsets dmin * m, an fp16 per 256 weights times "
                         "integers 0..63): quantize with llmpress.primitives.kquant_qparams")
    return _pack_q4_k(q, d, sc, dmin, m)


def _pack_q4_k(q: Tensor, d: Tensor, sc: Tensor, dmin: Tensor, m: Tensor) -> np.ndarray:
    """block_q4_K: d, dmin, scales[12] (6-bit sc and m of 8 groups: groups 0-3 in the low 6 bits of bytes 0-3 and
    4-7, groups 4-7 split as low nibbles in bytes 8-11 and top 2 bits over bytes 0-7), qs[128] (byte 32 k + l: group
    2k's weight l in the low nibble, group 2k+1's in the high one)."""
    rows, nsb = d.shape
    qg = q.reshape(rows, nsb, 8, 32)
    qs = (qg[:, :, 0::2] | (qg[:, :, 1::2] << 4)).reshape(rows, nsb, QK_K // 2)
    scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                        (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)], dim=-1)
    parts = [_f16_bytes(d), _f16_bytes(dmin), scales.to(torch.uint8).numpy(), qs.to(torch.uint8).numpy()]
    return np.concatenate(parts, axis=-1).reshape(rows, nsb * K_TYPES["Q4_K"].nbytes)


def _pack_q6_k(q: Tensor, d: Tensor, sc: Tensor) -> np.ndarray:
    """block_q6_K: ql[128] (each half of 128 weights: byte l holds weight l's low 4 bits, weight 64 + l's in the high
    nibble), qh[64] (each half: byte l holds the top 2 bits of weights l, 32 + l, 64 + l, 96 + l at bits 0, 2, 4, 6),
    int8 scales[16] (one per 16 weights), d."""
    rows, nsb = d.shape
    halves = q.reshape(rows, nsb, 2, QK_K // 2)
    ql = ((halves[..., :64] & 0xF) | ((halves[..., 64:] & 0xF) << 4)).reshape(rows, nsb, QK_K // 2)
    high = ((halves >> 4) & 3).reshape(rows, nsb, 2, 4, 32) << (2 * torch.arange(4)).reshape(4, 1)
    qh = high.sum(dim=-2).reshape(rows, nsb, QK_K // 4)
    parts = [ql.to(torch.uint8).numpy(), qh.to(torch.uint8).numpy(), sc.to(torch.int8).numpy().view(np.uint8),
             _f16_bytes(d)]
    return np.concatenate(parts, axis=-1).reshape(rows, nsb * K_TYPES["Q6_K"].nbytes)


def unpack_kquant(data: np.ndarray, kind: BlockType, cols: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The inverse of :func:`pack_kquant`: signed codes (out, in) int8, d (out, in / 256) fp32, the integer scales
    sc (out, in / group_size), and for Q4_K dmin and the integer mins m (zeros for Q6_K); llama.cpp's weight is
    ``d sc (c + offset) - dmin m`` (Q6_K: ``d sc c``). For tests and for reading files back."""
    nsb = cols // QK_K
    raw = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, nsb, kind.nbytes).astype(np.int32))
    rows = raw.shape[0]

    def f16(at: int) -> Tensor:
        pair = raw[..., at:at + 2].to(torch.uint8).numpy().copy()
        return torch.from_numpy(pair.view("<f2").astype(np.float32).reshape(rows, nsb))

    if kind.name == "Q4_K":
        b = raw[..., 4:16]
        sc = torch.cat([b[..., :4] & 63, (b[..., 8:] & 0xF) | ((b[..., :4] >> 6) << 4)], dim=-1)
        m = torch.cat([b[..., 4:8] & 63, (b[..., 8:] >> 4) | ((b[..., 4:8] >> 6) << 4)], dim=-1)
        qs = raw[..., 16:].reshape(rows, nsb, 4, 1, 32)
        q = ((qs >> torch.tensor([0, 4]).reshape(2, 1)) & 0xF).reshape(rows, nsb * QK_K)
        return ((q - kind.offset).to(torch.int8), f16(0), sc.reshape(rows, -1), f16(2), m.reshape(rows, -1))
    ql = raw[..., :128].reshape(rows, nsb, 2, 1, 64)
    qh = raw[..., 128:192].reshape(rows, nsb, 2, 1, 32)
    low = ((ql >> torch.tensor([0, 4]).reshape(2, 1)) & 0xF).reshape(rows, nsb, 2, 128)
    high = ((qh >> (2 * torch.arange(4)).reshape(4, 1)) & 3).reshape(rows, nsb, 2, 128)
    q = (low | (high << 4)).reshape(rows, nsb * QK_K)
    sc = torch.from_numpy(raw[..., 192:208].to(torch.uint8).numpy().view(np.int8).astype(np.int32)).reshape(rows, -1)
    zeros = torch.zeros(rows, nsb)
    return (q - kind.offset).to(torch.int8), f16(208), sc, zeros, torch.zeros_like(sc)
