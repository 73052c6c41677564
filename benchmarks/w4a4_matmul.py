"""W4A4 benchmark: int4 weights x int4 per-token activations through the int8 GEMM, against fp32 and W8A8.

    python benchmarks/w4a4_matmul.py [--tokens 512,1] [--repeats 50] [--threads N]

Times SmolLM2-135M's MLP shapes at 512 tokens (prefill) and 1 token (decode): fp32 ``F.linear``,
``W8A8Linear`` (int8 per-token activations, per-channel int8 weights), ``W4A4Linear`` (int4 codes held in
int8, per-token activations clipped at 0.9 of the absmax, per-channel int4 weights) on ``torch._int_mm`` and
on the exact fp32 emulation, and, for 1536 -> 576 (``down_proj``), W4A4 with QuaRot's online Hadamard on
its input (``llmpress.rotate.online.hadamard_transform``, 1536 = 12 x 128 applied factor by factor) and the
transform alone. Prints one Markdown table: median milliseconds over ``--repeats`` calls, speed-up over
fp32, and the relative error of each output against fp32 on Gaussian data (W4A4 is far coarser than W8A8:
that is the accuracy int4 costs; the perplexity is measured on the real model, see the README). Timings are
only meaningful on a quiet machine: the 1-minute load average is printed before and after.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import int8_matmul
from llmpress.quant.w4a4 import W4A4Linear
from llmpress.quant.w8a8 import W8A8Linear
from llmpress.rotate.online import absorb_input_hadamard, add_input_hadamard, hadamard_transform


def candidates(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> a call computing x Wᵀ + b one way."""
    w4 = dict(bits=4, act_bits=4, act_clip=0.9)
    w8a8 = W8A8Linear.from_float(weight, bias, path="int_mm")
    w4a4 = W4A4Linear.from_float(weight, bias, path="int_mm", **w4)
    emulated = W4A4Linear.from_float(weight, bias, path="fp32", **w4)
    paths: dict[str, Callable[[], torch.Tensor]] = {
        "fp32 F.linear": lambda: F.linear(x, weight, bias),
        "W8A8Linear, torch._int_mm": lambda: w8a8(x),
        "W4A4Linear, torch._int_mm": lambda: w4a4(x),
        "W4A4Linear, fp32 emulation": lambda: emulated(x),
    }
    if weight.shape[1] == 1536:  # down_proj: QuaRot's online Hadamard on the input, absorbed into the weight
        rotated = W4A4Linear.from_float(absorb_input_hadamard(weight).float(), bias, path="int_mm", **w4)
        add_input_hadamard(rotated)
        paths["W4A4Linear + online Hadamard, torch._int_mm"] = lambda: rotated(x)
        paths["online Hadamard alone (1536 = 12·128)"] = lambda: hadamard_transform(x)
    return paths


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float | None:
    return None if out.shape != reference.shape else ((out - reference).norm() / reference.norm()).item()


def main() -> None:
    int8_matmul.main(__doc__, candidates, relative_error, "rel. error vs fp32", "{:.3f}")


if __name__ == "__main__":
    main()
