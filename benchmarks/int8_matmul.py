"""Int8 matmul benchmark: is W8A8 (SmoothQuant's runtime) faster than fp32 on this CPU?

    python benchmarks/int8_matmul.py [--tokens 512,1] [--repeats 50] [--threads N]

Times SmolLM2-135M's two MLP shapes (576 -> 1536 and 1536 -> 576) at 512 tokens
(prefill) and 1 token (decode): fp32 ``F.linear`` against ``W8A8Linear`` (per-token
dynamic int8 activations, per-channel int8 weights; its GEMM on ``torch._int_mm``
or the exact fp32 emulation), the bare ``torch._int_mm`` GEMM, and PyTorch's own
dynamic quantized linear (``quantized::linear_dynamic``: per-tensor activation
scale, so coarser than per-token, shown for reference). Prints one Markdown
table: median milliseconds over ``--repeats`` calls, speed-up over fp32, and the
max abs error of each output against fp32. Timings are only meaningful on a
quiet machine: the 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmpress.quant.w8a8 import W8A8Linear, quantize_a8_per_token

SHAPES = ((576, 1536), (1536, 576))


def median_ms(fn: Callable[[], torch.Tensor], repeats: int, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def dynamic_quantized(weight: torch.Tensor, engine: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """quantized::linear_dynamic with per-channel int8 weights on ``engine``; None if unavailable."""
    if engine not in torch.backends.quantized.supported_engines:
        return None
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scale = (weight.abs().amax(dim=1) / 127).double()
            zero = torch.zeros(weight.shape[0], dtype=torch.long)
            packed = torch.ops.quantized.linear_prepack(
                torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8), None)
    finally:
        torch.backends.quantized.engine = previous

    def run(x: torch.Tensor) -> torch.Tensor:
        torch.backends.quantized.engine = engine
        try:
            return torch.ops.quantized.linear_dynamic(x, packed)
        finally:
            torch.backends.quantized.engine = previous
    return run


def candidates(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> a call computing x Wᵀ + b one way (the GEMM-only entry returns int32 codes)."""
    fast = W8A8Linear.from_float(weight, bias, path="int_mm")
    emulated = W8A8Linear.from_float(weight, bias, path="fp32")
    codes = quantize_a8_per_token(x)[0]
    paths: dict[str, Callable[[], torch.Tensor]] = {
        "fp32 F.linear": lambda: F.linear(x, weight, bias),
        "W8A8Linear, torch._int_mm": lambda: fast(x),
        "W8A8Linear, fp32 emulation": lambda: emulated(x),
        "GEMM only: torch._int_mm": lambda: torch._int_mm(codes, fast.weight.t()),
    }
    for engine in ("onednn", "fbgemm"):
        run = dynamic_quantized(weight, engine)
        if run is not None:
            paths[f"quantized::linear_dynamic ({engine}, per-tensor act)"] = lambda run=run: run(x)
    return paths


def max_abs_error(out: torch.Tensor, reference: torch.Tensor) -> float | None:
    return (out - reference).abs().max().item() if out.is_floating_point() else None


def bench(in_features: int, out_features: int, tokens: int, repeats: int, make=None,
          error: Callable[[torch.Tensor, torch.Tensor], float | None] = max_abs_error) -> list[dict]:
    """One row per path of ``make`` (default :func:`candidates`) on seeded Gaussian data, with its error."""
    make = make or candidates
    generator = torch.Generator().manual_seed(in_features + tokens)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    bias = torch.randn(out_features, generator=generator) * 0.1
    x = torch.randn(tokens, in_features, generator=generator)
    reference = F.linear(x, weight, bias)
    rows = []
    with torch.inference_mode():
        for name, fn in make(weight, bias, x).items():
            err = error(fn(), reference)
            rows.append({"shape": f"{in_features}→{out_features}", "tokens": tokens, "path": name,
                         "ms": median_ms(fn, repeats), "error": err})
    base = rows[0]["ms"]
    for row in rows:
        row["speedup"] = base / row["ms"]
    return rows


def table(rows: list[dict], error_head: str = "max abs err vs fp32", error_format: str = "{:.2e}") -> str:
    lines = [f"| linear | tokens | path | median ms | vs fp32 | {error_head} |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        err = "–" if r["error"] is None else error_format.format(r["error"])
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['path']} | {r['ms']:.3f} | {r['speedup']:.2f}× | {err} |")
    return "\n".join(lines)


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "unknown"
    wanted = ("avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
    return ",".join(f for f in wanted if f in flags) or "none of avx512/vnni/amx"


def main(description: str = __doc__, make=None, error=max_abs_error, error_head: str = "max abs err vs fp32",
         error_format: str = "{:.2e}") -> None:
    """The command line of this benchmark; ``benchmarks/w4a4_matmul.py`` runs it with its own paths and error."""
    p = argparse.ArgumentParser(description=description.splitlines()[0])
    p.add_argument("--tokens", default="512,1", help="comma-separated token counts (default 512,1)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = [row for tokens in (int(t) for t in args.tokens.split(",")) for k, n in SHAPES
            for row in bench(k, n, tokens, args.repeats, make, error)]
    load_after = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, cpu flags: {cpu_flags()}, "
          f"median of {args.repeats}; 1-min load average {load_before:.2f} before, {load_after:.2f} after"
          + ("" if max(load_before, load_after) < 1 else " (NOT quiet: timings are unreliable)"))
    print()
    print(table(rows, error_head, error_format))


if __name__ == "__main__":
    main()
