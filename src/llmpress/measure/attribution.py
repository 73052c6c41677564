"""Per-layer error attribution: how far a compressed linear (or block) is from the one it replaced.

A perplexity gap says that a recipe hurt, not where. The engine records, for every linear it
rewrites, the relative output error on the calibration tokens

    ‖X Wᵀ − X Ŵᵀ‖²_F / ‖X Wᵀ‖²_F  =  tr(ΔW H ΔWᵀ) / tr(W H Wᵀ),   ΔW = W − Ŵ,  H = Σ_t x_t x_tᵀ,

which needs only the (in, in) Gram matrix of the linear's input (the Hessian GPTQ and SparseGPT
already collect; any positive multiple of it gives the same ratio), and for every block the
relative change of its output on the same inputs, ‖B̂(x) − B(x)‖² / ‖B(x)‖². Without calibration
inputs only the weights are known: ‖ΔW‖²_F / ‖W‖²_F (the output error for white inputs, H = I).

Pure functions on tensors; ``llmpress.engine`` calls them and ``llmpress inspect`` reads the
records they produce (``llmpress.measure.inspect``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; 0 when both are 0 (nothing there and nothing changed), inf for x / 0."""
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else math.inf


def relative_output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the relative squared output error of ``W_hat`` in place of ``W``.

    W, W_hat: (out, in); H: (in, in), symmetric positive semi-definite, a multiple of Σ x xᵀ over the
    inputs x the error is taken on. Equals ‖X Wᵀ − X Ŵᵀ‖²/‖X Wᵀ‖² for X (tokens, in) with XᵀX ∝ H,
    without the tokens. ``H`` may also be such an X itself with fewer tokens than columns (then the cheaper
    of the two: ``llmpress.stats.ErrorInputStats``). The products run in float32 (float64 when an input is),
    the sums in float64; on a CPU, for inputs at least ``BF16_ERROR_MIN`` wide, in bfloat16 (X, W, ΔW and H rounded
    to 8 bits, each product's output too, its squares and sums in float64): a figure recorded to three digits moves
    by about 1e-3 of itself, and it costs 2.4 s instead of 6.4 s a block for a 1B model's seven linears here.
    """
    if W.shape != W_hat.shape or W.dim() != 2 or H.dim() != 2 or H.shape[1] != W.shape[1] or (
            H.shape[0] > H.shape[1]):
        raise ValueError(f"weights (out, in) and H (in, in) or X (tokens < in, in) expected, got {tuple(W.shape)}, "
                         f"{tuple(W_hat.shape)} and {tuple(H.shape)}")
    dtype = torch.promote_types(torch.promote_types(W.dtype, H.dtype), torch.float32)
    W_ = W.detach().to(dtype)
    D = W_ - W_hat.detach().to(W_.device, dtype)
    if dtype == torch.float32 and H.shape[1] >= BF16_ERROR_MIN and H.device.type == W_.device.type == "cpu":
        dtype = torch.bfloat16
    if H.shape[0] < H.shape[1]:
        return _ratio(*_row_norms(H.detach(), (D, W_), dtype))
    H_ = H.detach().to(W_.device, dtype)
    return _ratio(_quadratic(D, H_), _quadratic(W_, H_))


# inputs at least this wide have their output errors computed with bfloat16 products on a CPU (narrower ones, the
# default model's, keep float32 products: their recorded errors stay what they were)
BF16_ERROR_MIN = 2048


def _row_norms(X: Tensor, weights: tuple[Tensor, ...], dtype: torch.dtype, rows: int = 1024) -> list[float]:
    """‖X Aᵀ‖² for each A of ``weights``, X cast to ``dtype`` ``rows`` tokens at a time, the sums in float64."""
    totals = [0.0] * len(weights)
    weights = tuple(A.to(dtype) for A in weights)
    for start in range(0, X.shape[0], rows):
        chunk = X[start:start + rows].to(weights[0].device, dtype)
        for k, A in enumerate(weights):  # the square of a bfloat16 value is exact in float32
            totals[k] += float((chunk @ A.T).float().pow(2).sum(dtype=torch.float64))
    return totals


def _quadratic(A: Tensor, H: Tensor) -> float:
    """tr(A H Aᵀ), the product A·H in H's dtype, the row sums taken in float64."""
    return float(((A.to(H.dtype) @ H).to(A.dtype) * A).sum(dim=1, dtype=torch.float64).sum())


def relative_error(reference: Tensor, approx: Tensor) -> float:
    """‖approx − reference‖² / ‖reference‖² over all entries, in float64 (a weight or an output)."""
    total = RelativeError()
    total.add(reference, approx)
    return total.result()


CHUNK_ELEMENTS = 1 << 22  # larger tensors are compared in row chunks (an 8B down_proj in float64 is 470 MB)


class RelativeError:
    """:func:`relative_error` accumulated over batches: Σ‖b − a‖² / Σ‖a‖² (a block's output change)."""

    def __init__(self) -> None:
        self.error = 0.0
        self.norm = 0.0

    def add(self, reference: Tensor, approx: Tensor) -> None:
        if reference.shape != approx.shape:
            raise ValueError(f"shapes differ: {tuple(reference.shape)} and {tuple(approx.shape)}")
        if reference.dim() > 1 and reference.numel() > CHUNK_ELEMENTS:  # rows at a time: float64 copies of a chunk
            rows = max(1, CHUNK_ELEMENTS // reference[0].numel())
            for r in range(0, reference.shape[0], rows):
                self.add(reference[r:r + rows], approx[r:r + rows])
            return
        ref = reference.detach().double()
        diff = approx.detach().to(ref.device, torch.float64) - ref
        self.error += float((diff * diff).sum())
        self.norm += float((ref * ref).sum())

    def result(self) -> float:
        return _ratio(self.error, self.norm)


# The records above, as llmpress.json keeps them: the metric of a linear (output error where there were
# calibration inputs, else weight error) and of a block. Readers (inspect, plots, api) take them from here.
METRICS = ("output_error", "weight_error")
BLOCK_METRIC = "output_error"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def layer_errors(layers: dict | None) -> tuple[str | None, dict[str, float]]:
    """(metric, {layer: error}) from ``llmpress.json``'s ``layers``: the first of :data:`METRICS` any layer
    has, finite values only; (None, {}) when none has either."""
    layers = layers if isinstance(layers, dict) else {}
    for metric in METRICS:
        found = {name: float(rec[metric]) for name, rec in layers.items()
                 if isinstance(rec, dict) and _finite(rec.get(metric))}
        if found:
            return metric, found
    return None, {}


def block_errors(blocks: dict | None) -> dict[str, float]:
    """{block: output error} from ``llmpress.json``'s ``blocks``, finite values only."""
    blocks = blocks if isinstance(blocks, dict) else {}
    return {name: float(rec[BLOCK_METRIC]) for name, rec in blocks.items()
            if isinstance(rec, dict) and _finite(rec.get(BLOCK_METRIC))}
