"""Calibration statistics of a linear layer's input, accumulated batch by batch.

The engine hooks each linear and feeds every calibration batch's input
``x`` (..., in) to ``add_batch``; methods receive ``result()``. Sums are
kept in float64 on CPU-sized tensors ((in, in) at most) so the order of
batches does not change the result beyond rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import Tensor


def _rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.detach().reshape(-1, x.shape[-1]).to(dtype)


def add_gram_(out: Tensor, X: Tensor, blocks: int = 4) -> Tensor:
    """``out += XᵀX`` computing only the upper block triangle (XᵀX is symmetric): about 10/16 of the FLOPs."""
    d = X.shape[1]
    edges = [d * i // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edges, edges[1:]):
        if hi == lo:
            continue
        strip = X[:, lo:hi].T @ X[:, lo:]  # rows lo:hi, columns lo:
        out[lo:hi, lo:] += strip
        if hi < d:
            out[hi:, lo:hi] += strip[:, hi - lo:].T
    return out


# inputs at least this wide accumulate only the upper block triangle of XᵀX, each strip added inside its GEMM (on
# oneDNN's bfloat16 kernels when the activations are bfloat16: ``bf16_exact_products``), and mirror it once at the
# end (``add_upper_gram_``); narrower ones keep ``add_gram_`` (the default model's widths, so its Hessians, and with
# them its figures, stay bit for bit what they were)
UPPER_GRAM_MIN = 2048


def add_upper_gram_(out: Tensor, X: Tensor, blocks: int = 8) -> Tensor:
    """``out``'s upper block triangle ``+= XᵀX``'s (blocks of ``d / blocks`` rows): about 36/64 of the FLOPs of the
    full product, each strip accumulated inside its GEMM (no temporary, no transposed add); the blocks below the
    diagonal are left as they are: :func:`mirror_upper_` fills them from the triangle once all batches are in."""
    d = X.shape[1]
    edges = [d * i // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edges, edges[1:]):
        if hi > lo:
            out[lo:hi, lo:].addmm_(X[:, lo:hi].T, X[:, lo:])
    return out


@contextmanager
def bf16_exact_products(enabled: bool = True) -> Iterator[None]:
    """Inside, float32 matrix products on the CPU run through oneDNN's bfloat16 kernels with float32 accumulation
    and a float32 result (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``), where the CPU has native
    bfloat16 (AVX512-BF16 / AMX); elsewhere, or with ``enabled`` false, nothing changes.

    Only for factors whose values are bfloat16 already (activations of a bf16 calibration pass, upcast): the
    cast back to bfloat16 is then exact, every product of two such values is exact in float32, and the sums
    are float32's as before; what changes is the speed (an 8192-wide Gram of 4096 tokens: 2.1-2.5 s
    -> 1.7-1.9 s here). A bfloat16 product, by contrast, rounds every entry of XᵀX to 8 bits, and torch has no
    bfloat16-in, float32-out product on the CPU (``mm(out_dtype=)`` is CUDA-only)."""
    if not enabled or not _native_bf16():
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


@lru_cache(maxsize=1)
def _native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and hasattr(torch.backends.mkldnn, "matmul")
    except (AttributeError, RuntimeError):
        return False


def mirror_upper_(out: Tensor, blocks: int = 8) -> Tensor:
    """Copy the upper block triangle written by :func:`add_upper_gram_` (same ``blocks``) onto the blocks below."""
    d = out.shape[0]
    edges = [d * i // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edges, edges[1:]):
        if lo < hi < d:
            out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out


class HessianStats:
    """H = 2/n · XᵀX over all n calibration tokens (GPTQ, SparseGPT)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.sum: Tensor | None = None
        self.count = 0

    def add_batch(self, x: Tensor) -> None:
        # Half-precision activations are upcast: a bf16 product would round every entry of XᵀX to
        # 8 bits, and GPTQ's solve amplifies that error on outlier channels (perplexity measured worse).
        if self.count < 0:
            raise RuntimeError("HessianStats.add_batch after result()")
        X = _rows(x, self.dtype)
        if self.sum is None:
            self.sum = torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype, device=X.device)
        if X.shape[1] >= UPPER_GRAM_MIN:
            with bf16_exact_products(x.dtype == torch.bfloat16 and X.dtype == torch.float32 and X.device.type == "cpu"):
                add_upper_gram_(self.sum, X)
        else:
            add_gram_(self.sum, X)
        self.count += X.shape[0]

    def result(self) -> Tensor:
        """H, scaled in place (no second (in, in) matrix: 268 MB for an 8192-wide input); the accumulator is
        finished then, so further batches are refused."""
        if self.count >= 0:
            with torch.inference_mode(self.sum.is_inference()):  # accumulated in the calibration's inference mode
                if self.sum.shape[0] >= UPPER_GRAM_MIN:
                    mirror_upper_(self.sum)
                self.sum.mul_(2.0 / max(self.count, 1))
            self.count = -1
        return self.sum


class ColumnNormStats:
    """‖X_j‖₂ per input channel j over all calibration tokens (Wanda, AWQ)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.sumsq: Tensor | None = None
        self.count = 0

    def add_batch(self, x: Tensor) -> None:
        X = _rows(x, self.dtype)
        s = (X * X).sum(dim=0)
        self.sumsq = s if self.sumsq is None else self.sumsq + s
        self.count += X.shape[0]

    def result(self) -> Tensor:
        return self.sumsq.sqrt()


class AbsMaxStats:
    """max |X_j| per input channel j (SmoothQuant)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.absmax: Tensor | None = None

    def add_batch(self, x: Tensor) -> None:
        m = _rows(x, self.dtype).abs().amax(dim=0)
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)

    def result(self) -> Tensor:
        return self.absmax


class CovarianceStats:
    """Mean xxᵀ over the calibration tokens, each batch's product in float32 summed in float64 (SVD-LLM, ASVD)."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.count = 0

    def add_batch(self, x: Tensor) -> None:
        X = _rows(x, torch.float32)
        p = (X.T @ X).double()
        self.sum = p if self.sum is None else self.sum + p
        self.count += X.shape[0]

    def result(self) -> Tensor:
        return (self.sum / self.count).float().cpu()


class AbsMeanStats:
    """Mean |x_j| per input channel j over the calibration tokens, summed in float64 (ASVD)."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.count = 0

    def add_batch(self, x: Tensor) -> None:
        a = _rows(x, torch.float32).abs().sum(0).double()
        self.sum = a if self.sum is None else self.sum + a
        self.count += x.reshape(-1, x.shape[-1]).shape[0]

    def result(self) -> Tensor:
        return (self.sum / self.count).float().cpu()


class MeanVarStats:
    """(mean, unbiased variance) per input channel over the calibration tokens, in float64 (FLAP)."""

    def __init__(self) -> None:
        self.n, self.sum, self.sumsq = 0, None, None

    def add_batch(self, x: Tensor) -> None:
        X = _rows(x, torch.float64)
        s, ss = X.sum(0), (X * X).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = ss if self.sumsq is None else self.sumsq + ss
        self.n += X.shape[0]

    def result(self) -> tuple[Tensor, Tensor]:
        mean = self.sum / self.n
        var = (self.sumsq - self.n * mean * mean) / max(self.n - 1, 1)
        return mean.cpu(), var.clamp_min(0).cpu()


class ErrorInputStats:
    """What a linear's output error is measured on (``llmpress.measure.attribution.relative_output_error``): its
    input rows X (tokens, in), kept in their own dtype while there are fewer tokens than input features, else
    their Gram (``HessianStats``), whichever is smaller. The per-linear errors of a sampled reference pass
    (``llmpress.engine``): an 8192-wide input over 4096 tokens keeps 64 MB of bfloat16 rows instead of a 268 MB
    Gram, and its error takes half the products of the Gram's."""

    def __init__(self) -> None:
        self.rows: list[Tensor] = []
        self.count = 0
        self.gram: HessianStats | None = None

    def add_batch(self, x: Tensor) -> None:
        X = x.detach().reshape(-1, x.shape[-1])
        if self.gram is None and self.count + X.shape[0] < X.shape[1]:
            self.rows.append(X)
            self.count += X.shape[0]
            return
        if self.gram is None:
            self.gram = HessianStats()
            for rows in self.rows:
                self.gram.add_batch(rows)
            self.rows = []
        self.gram.add_batch(X)

    def result(self) -> Tensor | None:
        """X (tokens < in, in) or the Gram (in, in); None without batches."""
        if self.gram is not None:
            return self.gram.result()
        if len(self.rows) > 1:
            self.rows = [torch.cat(self.rows)]
        return self.rows[0] if self.rows else None


# The statistics a method can ask for by name (``Method.stats``, ``llmpress.calib``).
STATS = {"hessian": HessianStats, "col_norm": ColumnNormStats, "absmax": AbsMaxStats, "covariance": CovarianceStats,
         "abs_mean": AbsMeanStats, "mean_var": MeanVarStats, "error_inputs": ErrorInputStats}
