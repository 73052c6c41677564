"""Round-to-nearest (RTN) weight quantization: the baseline every PTQ paper beats.

Each weight is rounded to the nearest point of a per-group integer grid
(see ``llmpress.primitives`` for the grid conventions, which follow
compressed-tensors). No calibration data is needed. With ``mse=True`` each
group's range is shrunk to the clip that minimises the rounding error (the
GPTQ repository's MSE search, ``llmpress.primitives.search_qparams``). With
``float_zero=True`` an asymmetric group spans exactly its [min, max] with a float zero point
(``llmpress.primitives.minmax_qparams``): llama.cpp's Q4_1/Q5_1 grid, which need not contain 0,
so ``rtn-q4_1`` rounds the way llama.cpp's reference quantizer does and writes to GGUF
(``llmpress.export.gguf_blocks``); compressed-tensors, whose zero points are integers, cannot
store it (such a model is saved dense). With ``kquant`` ("Q4_K", "Q6_K") the group scales are themselves
quantized against one fp16 scale per super-block of 256 inputs (``llmpress.primitives.kquant_qparams``):
llama.cpp's K-quants, written to GGUF with these codes; a layer whose inputs are not whole super-blocks gets
llama.cpp's fallback type instead (Q4_K: Q5_0, Q6_K: Q8_0), as ``llama-quantize`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from ..compressed import Compressed, Grid
from ..config import Check, Config, check_value
from ..errors import LlmpressError
from ..primitives import (
    KQUANTS,
    QK_K,
    compute_qparams,
    dequantize,
    kquant_qparams,
    minmax_qparams,
    quantize,
    search_qparams,
)
from ..registry import Method, register

Bits = Annotated[int, Check(ge=2, le=8, verdict="out of range", label="")]
GroupSize = Annotated[int | None, Check(rule=lambda g: g > 0 or g == -1, label="",  # -1 or None: one group per row
                                        advice="use a positive integer, or -1 for one group per row")]


def check_bits(bits: int) -> None:
    """``bits`` must be an integer from 2 to 8 (the :data:`Bits` annotation, for a plain argument)."""
    check_value("bits", bits, Bits)


def check_group_size(group_size: int | None) -> None:
    """``group_size`` must be positive or -1 (None, one group per row, passes too)."""
    check_value("group_size", group_size, GroupSize)


KQuantName = Annotated[Literal["Q4_K", "Q6_K"] | None, Check(advice="use Q4_K or Q6_K (llama.cpp's K-quants)")]
# llama.cpp's type for a tensor whose rows are not whole K-quant super-blocks (llama-quant.cpp, llama_tensor_get_type):
# (name, bits), symmetric groups of 32
KQUANT_FALLBACK = {"Q4_K": ("Q5_0", 5), "Q6_K": ("Q8_0", 8)}


def fix_kquant_grid(config: object, label: str) -> None:
    """``config.kquant`` fixes bits, group_size and sym: left at their defaults (4, 64, true) they are set to the
    K-quant's; otherwise they must agree (one-line LlmpressError). ``config`` is a frozen Config being checked."""
    kind = getattr(config, "kquant", None)
    if kind is None:
        return
    spec = KQUANTS[kind]
    given, want = (config.bits, config.group_size, config.sym), (spec.bits, spec.group_size, spec.sym)
    if given == (4, 64, True):  # the defaults: nothing was asked for
        for name, value in zip(("bits", "group_size", "sym"), want, strict=True):
            object.__setattr__(config, name, value)
    elif given != want:
        raise LlmpressError(f"{label} kquant {kind} is {spec.bits}-bit {'symmetric' if spec.sym else 'asymmetric'} "
                            f"groups of {spec.group_size}: set bits: {spec.bits}, group_size: {spec.group_size}, "
                            f"sym: {str(spec.sym).lower()}, or leave them out")
    if getattr(config, "mse", False):
        raise LlmpressError(f"{label} kquant {kind} chooses its own scales (ggml's rounding): set mse: false")


def kquant_grid(kind: str, in_features: int) -> Grid:
    """The grid of a layer with ``in_features`` inputs under K-quant ``kind``: the K-quant's own when its rows are
    whole super-blocks of 256, else llama.cpp's fallback for such tensors (Q4_K: Q5_0, Q6_K: Q8_0; symmetric
    groups of 32), as ``llama-quantize`` does (SmolLM2's 576-wide layers)."""
    spec = KQUANTS[kind]
    if in_features % QK_K == 0:
        return Grid(spec.bits, spec.group_size, spec.sym, float_zero=not spec.sym, kquant=kind)
    return Grid(KQUANT_FALLBACK[kind][1], 32, True)


def check_flags(config: object, names: tuple[str, ...], method: str = "") -> None:
    """Each named field of ``config`` must be a real bool (YAML true/false), not 0/1 or a string."""
    for name in names:
        check_value(name, getattr(config, name), bool, method)


@dataclass(frozen=True)
class RTNConfig(Config):
    """bits: 2–8; group_size: columns per scale (-1 = per output channel); sym: zero point fixed at 0;
    mse: search the clip range per group instead of using the full [min, max];
    float_zero: asymmetric groups span exactly [min, max] with a float zero point (GGUF's Q4_1/Q5_1);
    kquant: llama.cpp's K-quant grid "Q4_K" or "Q6_K" (fixes bits, group_size and sym; see ``kquant_grid``)."""

    label = "rtn"

    bits: Bits = 4
    group_size: GroupSize = 64
    sym: bool = True
    mse: bool = False
    float_zero: bool = False
    kquant: KQuantName = None

    def check(self) -> None:
        fix_kquant_grid(self, "rtn")
        if self.float_zero and (self.sym or self.mse):
            raise LlmpressError("rtn float_zero is the asymmetric [min, max] grid: set sym: false and mse: false")


ROWS_AT_ONCE = 1 << 22  # weights with more elements are rounded in row chunks: the temporaries stay small


def rtn(weight: Tensor, cfg: RTNConfig) -> Compressed:
    """Quantize ``weight`` (out, in) by round-to-nearest; returns codes, scales and the dequantized weight.

    Every row is rounded on its own, so a large weight is done in chunks of rows (the same numbers; the
    float temporaries of one chunk instead of several copies of an 8B ``down_proj``)."""
    if weight.dim() == 2 and weight.numel() > ROWS_AT_ONCE and weight.shape[0] > 1:
        rows = max(1, ROWS_AT_ONCE // weight.shape[1])
        parts = [_rtn(weight[r:r + rows], cfg) for r in range(0, weight.shape[0], rows)]
        first = parts[0]

        def cat(name):
            return None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])

        return Compressed(weight=cat("weight"), qweight=cat("qweight"), scale=cat("scale"), zero=cat("zero"),
                          meta=first.meta, grid=first.grid)
    return _rtn(weight, cfg)


def _rtn(weight: Tensor, cfg: RTNConfig) -> Compressed:
    grid = Grid(cfg.bits, cfg.group_size, cfg.sym, float_zero=cfg.float_zero)
    if cfg.kquant is not None:
        grid = kquant_grid(cfg.kquant, weight.shape[1])
    group = grid.group
    if grid.kquant is not None:
        scale, zero = kquant_qparams(weight, grid.kquant)
    elif grid.float_zero:
        scale, zero = minmax_qparams(weight, grid.bits, group)
    else:
        qparams = search_qparams if cfg.mse else compute_qparams
        scale, zero = qparams(weight, grid.bits, group, grid.sym)
    q = quantize(weight, scale, zero, grid.bits, group, float_zero=grid.float_zero)
    meta = {"method": "rtn", "mse": True} if cfg.mse else {"method": "rtn"}
    return Compressed(weight=dequantize(q, scale, zero, group), qweight=q, scale=scale, zero=zero, meta=meta,
                      grid=grid)


def rtn_recipe(bits: int, group: int, sym: bool = True) -> dict:
    """The recipe dict of plain RTN at ``bits`` with groups of ``group`` (-1: per channel)."""
    return {"stages": [{"method": "rtn", "args": {"bits": bits, "group_size": group, "sym": sym}}]}


register(Method("rtn", RTNConfig, rtn, (), "quantize"), recipes={
    "rtn-w4-g64": rtn_recipe(4, 64),
    "rtn-w4-g64-asym": rtn_recipe(4, 64, sym=False),
    "rtn-w4-g128": rtn_recipe(4, 128),
    "rtn-w3-g64": rtn_recipe(3, 64),
    "rtn-w8": rtn_recipe(8, -1),
    "rtn-w4-g64-mse": {"stages": [{"method": "rtn", "args": {"bits": 4, "group_size": 64, "mse": True}}]},
    # llama.cpp's block types (groups of 32), written to GGUF with these codes (--format gguf)
    "rtn-q4_0": rtn_recipe(4, 32),
    "rtn-q4_1": {"stages": [{"method": "rtn", "args": {"bits": 4, "group_size": 32, "sym": False,
                                                       "float_zero": True}}]},
    "rtn-q5_0": rtn_recipe(5, 32),
    "rtn-q8_0": rtn_recipe(8, 32),
    # llama.cpp's K-quants (super-blocks of 256; narrower layers get Q5_0 / Q8_0, as llama-quantize does)
    "rtn-q4_k": {"stages": [{"method": "rtn", "args": {"bits": 4, "group_size": 32, "sym": False,
                                                       "kquant": "Q4_K"}}]},
    "rtn-q6_k": {"stages": [{"method": "rtn", "args": {"bits": 6, "group_size": 16, "kquant": "Q6_K"}}]},
})
