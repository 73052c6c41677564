"""Second-order kernels of a 1B model's GPTQ on this CPU: torch's route against the BLAS/LAPACK one llmpress takes.

    python benchmarks/second_order.py [--tokens 4096] [--repeats 3]

At Llama-3.2-1B's widths (2048 and 8192), per calibration batch of ``--tokens`` bfloat16 activations:

- the Gram XᵀX accumulated in float32: torch's upper block triangle (``stats.add_upper_gram_``, 36/64 of the full
  product's FLOPs) against BLAS ``ssyrk`` through scipy's OpenBLAS (``stats.add_syrk_``, half of them);
- the inverse Cholesky factor of an 8192-wide damped Hessian: torch's Cholesky and blocked triangular inverse
  against LAPACK ``spotrf`` + ``strtri`` (``linalg._lapack_factor_inverse_``);
- a linear's relative output error (``measure.attribution.relative_output_error``) on 4096 input rows of the
  8192-wide down_proj and on the 2048-wide Gram of gate_proj: float32 products against bfloat16 ones.

Prints one Markdown table: median seconds over ``--repeats`` runs of each, the speed-up, and the largest difference
from a float64 reference (relative to its largest entry; for the errors, relative to the error). Timings are only
meaningful on a quiet machine: the 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from llmpress import linalg, stats
from llmpress.measure import attribution


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def activations(tokens: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, width, generator=g) * torch.rand(width, generator=g) * 4).bfloat16()


def gram_rows(tokens: int, width: int, repeats: int) -> list[tuple]:
    X = activations(tokens, width, width).float()
    ref = (X.double().T @ X.double()).triu()
    rows = []
    for name, fn in (("torch upper block triangle", stats.add_upper_gram_), ("BLAS ssyrk (scipy)", stats.add_syrk_)):
        out = torch.zeros(width, width)
        fn(out, X)
        diff = float((out.double().triu() - ref).abs().max() / ref.abs().max())
        rows.append((f"Gram {tokens} x {width}", name, median_s(lambda fn=fn: fn(torch.zeros(width, width), X),
                                                                  repeats), diff))
    return rows


def factor_rows(width: int, repeats: int) -> list[tuple]:
    X = activations(width + 64, width, 1).float()
    H = X.T @ X / width
    H.diagonal().add_(0.01 * H.diagonal().mean())
    ref = torch.linalg.inv(torch.linalg.cholesky(H.double()))

    def torch_route(M: torch.Tensor) -> torch.Tensor:
        info = torch.empty((), dtype=torch.int32)
        torch.linalg.cholesky_ex(M.mT, out=(M.mT, info))
        return linalg.tril_inverse_(M.mT.tril_())

    def lapack_route(M: torch.Tensor) -> torch.Tensor:
        linalg._lapack_factor_inverse_(M.mT)
        return M.mT.tril_()

    rows = []
    for name, fn in (("torch cholesky + tril_inverse_", torch_route), ("LAPACK spotrf + strtri (scipy)", lapack_route)):
        diff = float((fn(H.clone()).double() - ref).abs().max() / ref.abs().max())
        rows.append((f"inverse Cholesky {width}", name, median_s(lambda fn=fn: fn(H.clone()), repeats), diff))
    return rows


def error_rows(tokens: int, repeats: int) -> list[tuple]:
    rows = []
    for label, out, width in (("down_proj rows", 2048, 8192), ("gate_proj Gram", 8192, 2048)):
        X = activations(tokens, width, out)
        g = torch.Generator().manual_seed(out)
        W = torch.randn(out, width, generator=g).bfloat16().float()
        W_hat = W + 0.05 * torch.randn(out, width, generator=g)
        given = X if tokens < width else X.float().T @ X.float()
        Xd = X.double()
        ref = float(((Xd @ (W - W_hat).double().T) ** 2).sum() / ((Xd @ W.double().T) ** 2).sum())
        floor = attribution.BF16_ERROR_MIN
        for name, minimum in (("float32 products", width + 1), ("bfloat16 products", floor)):
            attribution.BF16_ERROR_MIN = minimum
            try:
                got = attribution.relative_output_error(W, W_hat, given)
                took = median_s(lambda W=W, W_hat=W_hat, given=given: attribution.relative_output_error(
                    W, W_hat, given), repeats)
            finally:
                attribution.BF16_ERROR_MIN = floor
            rows.append((f"output error, {label} ({out} x {width})", name, took, abs(got - ref) / ref))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average before: "
          f"{os.getloadavg()[0]:.2f}")
    rows = [*gram_rows(args.tokens, 2048, args.repeats), *gram_rows(args.tokens, 8192, args.repeats),
            *factor_rows(8192, args.repeats), *error_rows(args.tokens, args.repeats)]
    print("\n| kernel | route | median s | speed-up | max diff from float64 |")
    print("|---|---|---:|---:|---:|")
    for k, (kernel, route, seconds, diff) in enumerate(rows):
        first = rows[k - k % 2][2]
        print(f"| {kernel} | {route} | {seconds:.3f} | {first / seconds:.2f}x | {diff:.1e} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
