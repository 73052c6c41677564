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

import argparse
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from int8_matmul import cpu_flags, median_ms
from llmpress.quant.w4a4 import W4A4Linear
from llmpress.quant.w8a8 import W8A8Linear
from llmpress.rotate.online import absorb_input_hadamard, add_input_hadamard, hadamard_transform

SHAPES = ((576, 1536), (1536, 576))


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


def bench(in_features: int, out_features: int, tokens: int, repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(in_features + tokens)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    bias = torch.randn(out_features, generator=generator) * 0.1
    x = torch.randn(tokens, in_features, generator=generator)
    reference = F.linear(x, weight, bias)
    rows = []
    with torch.inference_mode():
        for name, fn in candidates(weight, bias, x).items():
            out = fn()
            error = None if out.shape != reference.shape else ((out - reference).norm() / reference.norm()).item()
            rows.append({"shape": f"{in_features}→{out_features}", "tokens": tokens, "path": name,
                         "ms": median_ms(fn, repeats), "error": error})
    base = rows[0]["ms"]
    for row in rows:
        row["speedup"] = base / row["ms"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| linear | tokens | path | median ms | vs fp32 | rel. error vs fp32 |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        err = "–" if r["error"] is None else f"{r['error']:.3f}"
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['path']} | {r['ms']:.3f} | {r['speedup']:.2f}× | {err} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="512,1", help="comma-separated token counts (default 512,1)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = [row for tokens in (int(t) for t in args.tokens.split(",")) for k, n in SHAPES
            for row in bench(k, n, tokens, args.repeats)]
    load_after = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, cpu flags: {cpu_flags()}, "
          f"median of {args.repeats}; 1-min load average {load_before:.2f} before, {load_after:.2f} after"
          + ("" if max(load_before, load_after) < 1 else " (NOT quiet: timings are unreliable)"))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
