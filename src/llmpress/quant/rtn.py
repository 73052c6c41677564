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
store it (such a model is saved dense).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from torch import Tensor

from ..compressed import Compressed, Grid
from ..config import Check, Config, check_value
from ..errors import LlmpressError
from ..primitives import compute_qparams, dequantize, minmax_qparams, quantize, search_qparams
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


def check_flags(config: object, names: tuple[str, ...], method: str = "") -> None:
    """Each named field of ``config`` must be a real bool (YAML true/false), not 0/1 or a string."""
    for name in names:
        check_value(name, getattr(config, name), bool, method)


@dataclass(frozen=True)
class RTNConfig(Config):
    """bits: 2–8; group_size: columns per scale (-1 = per output channel); sym: zero point fixed at 0;
    mse: search the clip range per group instead of using the full [min, max];
    float_zero: asymmetric groups span exactly [min, max] with a float zero point (GGUF's Q4_1/Q5_1)."""

    label = "rtn"

    bits: Bits = 4
    group_size: GroupSize = 64
    sym: bool = True
    mse: bool = False
    float_zero: bool = False

    def check(self) -> None:
        if self.float_zero and (self.sym or self.mse):
            raise LlmpressError("rtn float_zero is the asymmetric [min, max] grid: set sym: false and mse: false")


def rtn(weight: Tensor, cfg: RTNConfig) -> Compressed:
    """Quantize ``weight`` (out, in) by round-to-nearest; returns codes, scales and the dequantized weight."""
    group = None if cfg.group_size == -1 else cfg.group_size
    if cfg.float_zero:
        scale, zero = minmax_qparams(weight, cfg.bits, group)
    else:
        qparams = search_qparams if cfg.mse else compute_qparams
        scale, zero = qparams(weight, cfg.bits, group, cfg.sym)
    q = quantize(weight, scale, zero, cfg.bits, group, float_zero=cfg.float_zero)
    meta = {"method": "rtn", "mse": True} if cfg.mse else {"method": "rtn"}
    return Compressed(
        weight=dequantize(q, scale, zero, group),
        qweight=q,
        scale=scale,
        zero=zero,
        meta=meta,
        grid=Grid(cfg.bits, cfg.group_size, cfg.sym, float_zero=cfg.float_zero),
    )


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
})
