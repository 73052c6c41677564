"""Integer quantization grids shared by every quantizer (pure tensor functions).

Conventions follow compressed-tensors, so that what we compute is what
vLLM and transformers will load: integers live in the signed range
[-2^(b-1), 2^(b-1)-1]; zero is always exactly representable (the range
[min, max] of a group is widened to include 0); a symmetric scale is
absmax / ((2^b - 1) / 2) (so int4 maps ±absmax to ±7.5 and uses all 16
levels); an asymmetric scale is (max - min) / (2^b - 1) with an integer
zero point. Groups run along the input dimension; a last group shorter
than ``group_size`` is allowed (widths like 576 or 1536 with group 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import single_threaded


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer range of a ``bits``-bit grid."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_count(columns: int, group_size: int | None) -> int:
    """Number of groups along the input dimension (``None`` or -1: one per row)."""
    if group_size is None or group_size <= 0:
        return 1
    return math.ceil(columns / group_size)


def _grouped(W: Tensor, group_size: int | None) -> Tensor:
    """(out, in) -> (out, groups, g), zero-padding a partial last group.

    Padding with zeros never changes the qparams: every range includes 0.
    """
    rows, cols = W.shape
    g = cols if group_size is None or group_size <= 0 else group_size
    groups = math.ceil(cols / g)
    pad = groups * g - cols
    if pad:
        W = torch.nn.functional.pad(W, (0, pad))
    return W.reshape(rows, groups, g)


def expand_groups(per_group: Tensor, columns: int, group_size: int | None) -> Tensor:
    """(out, groups) -> (out, in): each column gets the value of its group."""
    if group_size is None or group_size <= 0:
        return per_group[:, :1].expand(-1, columns)
    return per_group.repeat_interleave(group_size, dim=1)[:, :columns]


def compute_qparams(W: Tensor, bits: int, group_size: int | None, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point per (row, group), both (out, groups).

    The zero point is 0 for a symmetric grid. An all-zero group gets scale 1.
    """
    Wg = _grouped(W.float(), group_size)
    lo = Wg.amin(dim=-1).clamp(max=0)
    hi = Wg.amax(dim=-1).clamp(min=0)
    return qparams_from_range(lo, hi, bits, sym)


def minmax_qparams(W: Tensor, bits: int, group_size: int | None) -> tuple[Tensor, Tensor]:
    """Scale and float zero point per (row, group) spanning exactly each group's [min, max].

    The asymmetric grid of llama.cpp's Q4_1/Q5_1 (``x = q * d + min``), written in the signed convention
    above: codes ``round(W / s + z)`` in [qmin, qmax] with ``z = qmin - min / s`` (a float; 0 need not be
    on the grid). A constant group gets scale 1.
    """
    Wg = _grouped(W.float(), group_size)
    if W.shape[1] % (group_size or W.shape[1]):  # zero padding would widen the last group's range
        raise ValueError(f"{W.shape[1]} columns are not whole groups of {group_size}: min-max grids need them")
    lo, hi = Wg.amin(dim=-1), Wg.amax(dim=-1)
    qmin, qmax = qrange(bits)
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, qmin - lo / scale


QK_K = 256  # weights per K-quant super-block (ggml's QK_K)


@dataclass(frozen=True)
class KQuant:
    """One of llama.cpp's K-quant grids: ``bits``-bit codes, one scale per ``group_size`` inputs, and those scales
    (and, unless ``sym``, the offsets) integers 1..``scale_max`` (offsets 0..``scale_max``) times one fp16 scale
    per super-block of :data:`QK_K` inputs."""

    name: str
    bits: int
    group_size: int
    sym: bool
    scale_max: int


# ggml's block_q4_K (6-bit sub-scales and sub-mins) and block_q6_K (int8 sub-scales)
KQUANTS: dict[str, KQuant] = {k.name: k for k in (KQuant("Q4_K", 4, 32, False, 63), KQuant("Q6_K", 6, 16, True, 127))}
_F16_TINY = 2.0 ** -24  # the smallest positive fp16: the super-block scale of an all-zero super-block


def kquant_qparams(W: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Scale and float zero point per (row, group) on llama.cpp's K-quant grid ``kind`` ("Q4_K" or "Q6_K").

    As ggml's ``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref`` (``block_q4_K``, ``block_q6_K``) with plain
    rounding for the sub-scales (no search). Q4_K, per group of 32: lo = min(min, 0), hi = max,
    s = (hi - lo) / 15; per super-block of 256: d = fp16(max s / 63), sc = round(s / d) in 1..63,
    dmin = fp16(max(-lo) / 63), m = round(-lo / dmin) in 0..63; llama.cpp's weight
    ``d sc q - dmin m`` (q in 0..15) is ours with codes c = q - 8, scale d sc and zero -8 + dmin m / (d sc).
    Q6_K, per group of 16: s = absmax / 31.5 (the symmetric 6-bit scale), d = fp16(max s / 127), sc in 1..127,
    zero 0. The group with the largest s (-lo) always gets sc (m) = 63 or 127, so d (dmin) is exactly
    max(d sc) / 63 (127): the GGUF packer reads the integers back off the scales (``export.gguf_blocks``).
    W (out, in) with ``in`` a multiple of 256; returns (out, in / group_size) each.
    """
    spec = KQUANTS[kind]
    rows, cols = W.shape
    if cols % QK_K:
        raise ValueError(f"{cols} columns are not whole super-blocks of {QK_K}: {kind} needs them")
    Wg = W.float().reshape(rows, cols // QK_K, QK_K // spec.group_size, spec.group_size)
    levels = 2 ** spec.bits - 1
    lo = Wg.amin(dim=-1).clamp(max=0)
    if spec.sym:
        scale = _superblock_grid(torch.maximum(-lo, Wg.amax(dim=-1)) / (levels / 2), spec.scale_max, lowest=1)
        zero = torch.zeros_like(scale)
    else:
        scale = _superblock_grid((Wg.amax(dim=-1) - lo) / levels, spec.scale_max, lowest=1)
        zero = qrange(spec.bits)[0] + _superblock_grid(-lo, spec.scale_max, lowest=0) / scale
    return scale.reshape(rows, -1), zero.reshape(rows, -1)


def _superblock_grid(v: Tensor, top: int, lowest: int) -> Tensor:
    """Values v >= 0 (..., groups of a super-block) rounded to d * k: d = fp16(max v / top), k = round(v / d) in
    lowest..top, k = top for the largest v (a no-op unless d is an fp16 subnormal). A super-block of zeros
    gets d = 0 when ``lowest`` is 0 (all k 0), else the smallest fp16 (all k = top)."""
    d = (v.amax(dim=-1, keepdim=True) / top).to(torch.float16).float()
    if lowest:
        d = torch.where(d > 0, d, torch.full_like(d, _F16_TINY))
    k = torch.round(v / torch.where(d > 0, d, torch.ones_like(d))).clamp(lowest, top)
    k = torch.where((v == v.amax(dim=-1, keepdim=True)) & (d > 0), torch.full_like(k, top), k)
    return d * k


def qparams_from_range(lo: Tensor, hi: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point for ranges [lo, hi] (lo <= 0 <= hi, any shape): the grid conventions above."""
    qmin, qmax = qrange(bits)
    levels = qmax - qmin
    if sym:
        scale = torch.maximum(-lo, hi) / (levels / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not sym:
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def quantize(W: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int | None,
             float_zero: bool = False) -> Tensor:
    """Integer codes (int8, same shape as W) on the grid given by per-group scale/zero.

    ``round(W / s) + z`` for integer zero points (compressed-tensors); ``round(W / s + z)`` when the
    zero points are floats (HQQ), where adding z after rounding would leave non-integer codes.
    """
    cols = W.shape[1]
    s = expand_groups(scale, cols, group_size)
    z = expand_groups(zero, cols, group_size)
    qmin, qmax = qrange(bits)
    codes = torch.round(W.float() / s + z) if float_zero else torch.round(W.float() / s) + z
    return torch.clamp(codes, qmin, qmax).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, group_size: int | None) -> Tensor:
    """Float weights (fp32) from integer codes: (q - zero) * scale."""
    cols = q.shape[1]
    s = expand_groups(scale, cols, group_size)
    z = expand_groups(zero, cols, group_size)
    return (q.float() - z) * s


def fake_quantize(W: Tensor, bits: int, group_size: int | None, sym: bool) -> Tensor:
    """Round-to-nearest onto the grid and back, in fp32 (no state kept)."""
    scale, zero = compute_qparams(W, bits, group_size, sym)
    return dequantize(quantize(W, scale, zero, bits, group_size), scale, zero, group_size)


def search_qparams(W: Tensor, bits: int, group_size: int | None, sym: bool, grid: int = 100,
                   max_shrink: float = 0.8, norm: float = 2.4) -> tuple[Tensor, Tensor]:
    """MSE-style clip search: per (row, group), the shrunk range with the lowest Lp rounding error.

    As the GPTQ repository's ``Quantizer(mse=True)``: the range [min, max] of each
    group is scaled by p = 1 - k/grid for k = 0 … int(max_shrink·grid) - 1 (so p runs
    from 1 down to about 1 - max_shrink), and the qparams minimising
    Σ|w − Q(w)|^norm over the group are kept (p = 1, the plain grid, wins ties).
    W (out, in); returns scale and zero (out, groups), like :func:`compute_qparams`.
    Vectorised over rows and groups; rows are taken in chunks that stay in cache, on one
    thread (measured on SmolLM2: same wall time as two threads, half the CPU, and no
    stalls when other jobs share the cores; see ``llmpress.linalg.single_threaded``).
    """
    Wg = _grouped(W.float(), group_size)
    rows = max(1, _SEARCH_CHUNK // (Wg.shape[1] * Wg.shape[2]))
    with single_threaded():
        found = [_search_rows(Wg[r:r + rows], bits, sym, grid, max_shrink, norm)
                 for r in range(0, Wg.shape[0], rows)]
    if len(found) == 1:
        return found[0]
    return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])


_SEARCH_CHUNK = 2 ** 16  # elements per chunk of rows in search_qparams (measured: ~1.6x faster than one pass)


def _search_rows(Wg: Tensor, bits: int, sym: bool, grid: int, max_shrink: float, norm: float) -> tuple[Tensor, Tensor]:
    """:func:`search_qparams` on grouped rows Wg (rows, groups, g)."""
    lo = Wg.amin(dim=-1).clamp(max=0)
    hi = Wg.amax(dim=-1).clamp(min=0)
    qmin, qmax = qrange(bits)
    best_scale, best_zero = qparams_from_range(lo, hi, bits, sym)
    best = _lp_error(Wg, best_scale, best_zero, qmin, qmax, norm)
    for k in range(1, int(max_shrink * grid)):
        p = 1 - k / grid
        scale, zero = qparams_from_range(p * lo, p * hi, bits, sym)
        err = _lp_error(Wg, scale, zero, qmin, qmax, norm)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _lp_error(Wg: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, norm: float) -> Tensor:
    """Σ over each group of |w − dequant(quant(w))|^norm; Wg (rows, groups, g), qparams (rows, groups).

    |e|^norm as exp(norm·log|e|): about 3x faster than pow on CPU (log 0 = -inf gives 0).
    """
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    e = torch.round(Wg / s).add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).sub_(Wg).abs_()
    return e.log_().mul_(norm).exp_().sum(dim=-1)
