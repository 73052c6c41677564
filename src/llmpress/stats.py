"""Calibration statistics of a linear layer's input, accumulated batch by batch.

The engine hooks each linear and feeds every calibration batch's input
``x`` (..., in) to ``add_batch``; methods receive ``result()``. Sums are
kept in float64 on CPU-sized tensors ((in, in) at most) so the order of
batches does not change the result beyond rounding.
"""

from __future__ import annotations

import numpy as np
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


# inputs at least this wide accumulate only the upper triangle of XᵀX, on the CPU through BLAS ``?syrk``
# (``add_syrk_``), elsewhere a block triangle at a time (``add_upper_gram_``), and mirror it once at the end
# (``mirror_upper_``); narrower ones keep ``add_gram_`` (the default model's widths, so its Hessians, and with them its
# figures, stay bit for bit what they were)
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


def add_syrk_(out: Tensor, X: Tensor) -> Tensor:
    """``out``'s upper triangle ``+= XᵀX``'s, through BLAS ``ssyrk`` / ``dsyrk`` (scipy's OpenBLAS) writing into
    ``out`` in place; the strictly lower triangle is left as it is (:func:`mirror_upper_` fills it).

    CPU tensors, float32 or float64, ``out`` contiguous. Half the products of XᵀX, in float32 (float64) sums as
    torch's products; on this project's 2-core CPU an 8192-wide Gram of 4096 tokens takes about 1.5 s against 2.0-2.4 s
    for :func:`add_upper_gram_` (``benchmarks/second_order.py``)."""
    from scipy.linalg import blas

    if X.shape[0] == 0:
        return out
    if out.dtype != X.dtype or out.dtype not in (torch.float32, torch.float64) or not out.is_contiguous():
        raise ValueError(f"add_syrk_ needs a contiguous float32/float64 out of X's dtype, got {out.dtype}, {X.dtype}")
    syrk = blas.ssyrk if out.dtype == torch.float32 else blas.dsyrk
    c = out.numpy().T  # column-major view of out: its lower triangle is out's upper one
    a = X.contiguous().numpy().T  # (d, tokens), column-major: a·aᵀ = XᵀX
    write_back_(c, syrk(1.0, a, beta=1.0, c=c, trans=0, lower=1, overwrite_c=1))
    return out


def write_back_(target: np.ndarray, result: np.ndarray) -> None:
    """Make ``target`` hold ``result``, the output of a scipy BLAS/LAPACK call asked to overwrite ``target``: the
    overwrite flags are requests, and a routine given an array of another order or dtype returns a new one
    (not expected here: the callers pass column-major arrays of the routine's dtype)."""
    if not np.shares_memory(result, target):
        target[...] = result


def mirror_upper_(out: Tensor, blocks: int = 8) -> Tensor:
    """Copy the upper triangle of ``out`` onto the lower one, in place (no second (d, d) matrix): the blocks below
    the diagonal from the blocks above, and within each diagonal block its strict upper triangle."""
    d = out.shape[0]
    edges = [d * i // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edges, edges[1:]):
        if hi == lo:
            continue
        diagonal = out[lo:hi, lo:hi]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
        if hi < d:
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
            (add_syrk_ if X.device.type == "cpu" else add_upper_gram_)(self.sum, X)
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
