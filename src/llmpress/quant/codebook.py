"""Non-uniform weight grids: per-row lookup tables (codebooks) of 2^b values, fitted by weighted k-means.

A ``bits``-bit code of row r is an index k into that row's table: the weight is ``lut[r, k]``, with no scale or
zero point (SqueezeLLM, Kim et al. 2023, "SqueezeLLM: Dense-and-Sparse Quantization", arXiv:2306.07629, §3:
"sensitivity-based non-uniform quantization"; LUT-GEMM, Park et al. 2022, arXiv:2206.09557, computes with such
tables directly). The pieces here are pure tensor functions:

- :func:`weighted_kmeans` fits each row's table by 1-D weighted k-means (Lloyd's algorithm) from weighted
  quantiles, a fixed number of iterations, vectorised over rows;
- :func:`nearest_codes` / :func:`lookup` assign codes and read the table back;
- :func:`pack_codes` / :func:`unpack_codes` store the indices in ``llmpress.quant.packing``'s dense b-bit layout;
- :func:`lut_matmul` computes ``x Wᵀ`` without forming W: for each table entry k, the inputs whose code is k are
  summed per output row (one 0/1 matrix product), then scaled by ``lut[:, k]`` (the bucketed form of LUT-GEMM);
- :class:`CodebookLinear` is the layer that stores exactly what ``llmpress.export.codebook`` writes (packed codes,
  fp16 table, shape, bias) and computes by dequantizing through the table (or :func:`lut_matmul`).

The methods that fit the tables (k-means alone, and with GPTQ's error feedback) are in
``llmpress.quant.squeezellm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compressed import Compressed
from ..errors import LlmpressError
from .packing import pack_int, packed_width, unpack_int

ELEMENTS_AT_ONCE = 1 << 24  # rows × cols × entries of one k-means chunk: the (rows, cols, K) distances stay small
LUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PATHS = ("dequantize", "lut")


def weighted_quantiles(W: Tensor, sensitivity: Tensor, entries: int) -> Tensor:
    """Each row's weighted quantiles at (k + 1/2) / entries, k = 0..entries-1: (rows, entries), ascending.

    W (rows, cols); sensitivity (rows, cols) non-negative. The quantile is the first sorted value whose
    cumulative weight reaches the target (a row of zero total weight is treated as equally weighted).
    """
    values, order = torch.sort(W, dim=1, stable=True)
    weights = sensitivity.gather(1, order)
    total = weights.sum(dim=1, keepdim=True)
    weights = torch.where(total > 0, weights, torch.ones_like(weights))
    cumulative = weights.cumsum(dim=1)
    fractions = (torch.arange(entries, dtype=W.dtype, device=W.device) + 0.5) / entries
    targets = fractions * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, targets.contiguous()).clamp_(max=W.shape[1] - 1)
    return values.gather(1, index)


def nearest_codes(W: Tensor, lut: Tensor) -> Tensor:
    """Index (int64, (rows, cols)) of the table entry nearest each weight; ties go to the lower index.

    W (rows, cols), lut (rows, entries)."""
    return (W.unsqueeze(-1) - lut.unsqueeze(1)).abs_().argmin(dim=-1)


def lookup(codes: Tensor, lut: Tensor) -> Tensor:
    """The weights (rows, cols) that ``codes`` (rows, cols) index in ``lut`` (rows, entries), in lut's dtype."""
    return lut.gather(1, codes.long())


def _kmeans_rows(W: Tensor, S: Tensor, entries: int, iterations: int) -> Tensor:
    centroids = weighted_quantiles(W, S, entries)
    for _ in range(iterations):
        codes = nearest_codes(W, centroids)
        mass = torch.zeros_like(centroids).scatter_add_(1, codes, S)
        moment = torch.zeros_like(centroids).scatter_add_(1, codes, S * W)
        centroids = torch.where(mass > 0, moment / mass.clamp(min=torch.finfo(W.dtype).tiny), centroids)
    return torch.sort(centroids, dim=1).values


def weighted_kmeans(weight: Tensor, sensitivity: Tensor, entries: int, iterations: int = 30) -> Tensor:
    """Per-row 1-D weighted k-means: the table (rows, entries), ascending, minimising Σ_j s_rj (w_rj − c(w_rj))².

    weight (rows, cols); sensitivity broadcastable to it, non-negative (a weight's importance: SqueezeLLM's
    diagonal Fisher information, or the diagonal of the layer Hessian per column). Start: the row's weighted
    quantiles at (k + 1/2)/entries (:func:`weighted_quantiles`); then ``iterations`` Lloyd steps: assign every
    weight to its nearest centroid (ties to the lower), move each centroid to the weighted mean of its weights (a
    centroid with no weight, or only weight-0 ones, stays). Deterministic; computed in float64 and returned in
    weight's dtype. Rows are independent, so large matrices go in row chunks.
    """
    if weight.dim() != 2 or entries < 1 or iterations < 0:
        raise ValueError(f"weighted_kmeans needs (rows, cols), entries >= 1, iterations >= 0; got "
                         f"{tuple(weight.shape)}, {entries}, {iterations}")
    W = weight.detach().double()
    S = torch.broadcast_to(sensitivity.detach().double(), W.shape)
    if bool((S < 0).any()) or not bool(torch.isfinite(S).all()):
        raise ValueError("sensitivity must be finite and non-negative")
    rows = max(1, ELEMENTS_AT_ONCE // max(1, W.shape[1] * entries))
    parts = [_kmeans_rows(W[r:r + rows], S[r:r + rows], entries, iterations) for r in range(0, W.shape[0], rows)]
    return torch.cat(parts).to(weight.dtype)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Indices 0..2^bits-1 (rows, cols) packed into int32 words (rows, ceil(cols*bits/32)), the layout of
    ``llmpress.quant.packing`` (an index k is stored as the signed code k - 2^(bits-1))."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise LlmpressError(f"codebook indices outside 0..{(1 << bits) - 1}: fit with bits={bits}")
    return pack_int((codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8), bits)


def unpack_codes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """The inverse of :func:`pack_codes`: int64 indices (rows, cols)."""
    return unpack_int(packed, bits, cols).long() + (1 << (bits - 1))


def exact_in(table: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """``table`` cast to ``dtype`` (a layer's stored lookup table or codebooks), refused when the cast would
    change a value: the stored layer must compute the weight the method chose."""
    cast = table.to(dtype)
    if not torch.equal(cast.to(table.dtype), table):
        raise LlmpressError(f"{what} not exact in {dtype}: fit with lut_dtype matching")
    return cast


def lut_matmul(x: Tensor, codes: Tensor, lut: Tensor) -> Tensor:
    """``x Wᵀ`` for W = lut[r, codes[r, j]] without forming W: Σ_k lut[:, k] ⊙ (x · 1[codes = k]ᵀ).

    x (..., in); codes (out, in) indices; lut (out, entries). Computed in x's dtype (the table cast to it);
    equal to ``F.linear(x, lookup(codes, lut))`` up to float summation order."""
    out = None
    table = lut.to(x.dtype)
    for k in range(lut.shape[1]):
        member = (codes == k).to(x.dtype)
        part = F.linear(x, member) * table[:, k]
        out = part if out is None else out.add_(part)
    return out


class CodebookLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W[r, j] = weight_lut[r, code[r, j]]``, codes packed ``bits`` to a weight.

    Buffers: ``weight_codes`` int32 (out, ceil(in*bits/32)) (:func:`pack_codes`), ``weight_lut`` (out, 2^bits)
    in the table's dtype (fp16 by default), ``weight_shape`` int64 [out, in]; ``bias`` a parameter, as in
    ``nn.Linear``. ``path``: "dequantize" (the default: W read through the table in x's dtype, then one GEMM) or
    "lut" (:func:`lut_matmul`).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True,
                 lut_dtype: torch.dtype = torch.float16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, path: str = "dequantize") -> None:
        super().__init__()
        if path not in PATHS:
            raise LlmpressError(f"codebook matmul path '{path}' is unknown: use one of {', '.join(PATHS)}")
        self.in_features, self.out_features, self.bits, self.path = in_features, out_features, bits, path
        self.register_buffer("weight_codes", torch.zeros(out_features, packed_width(in_features, bits),
                                                         dtype=torch.int32, device=device))
        self.register_buffer("weight_lut", torch.zeros(out_features, 1 << bits, dtype=lut_dtype, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_compressed(cls, linear: nn.Linear, result: Compressed, lut_dtype: torch.dtype = torch.float16,
                        path: str = "dequantize") -> CodebookLinear:
        """The layer of ``linear`` (``nn.Linear``) quantized as ``result`` (codes and its ``codebook``); the bias
        is shared, not copied. The table must be exactly representable in ``lut_dtype`` (refused otherwise)."""
        if result.qweight is None or result.codebook is None or result.grid is None or not result.grid.codebook:
            raise LlmpressError("CodebookLinear needs a codebook-quantized layer (codes and a lookup table)")
        out_features, in_features = result.qweight.shape
        if tuple(linear.weight.shape) != (out_features, in_features):
            raise LlmpressError(f"codes of shape {tuple(result.qweight.shape)} do not fit a layer with weight "
                                f"{tuple(linear.weight.shape)}: pass the result computed for this layer")
        lut = exact_in(result.codebook, lut_dtype, "the lookup table is")
        device = linear.weight.device
        module = cls(in_features, out_features, result.grid.bits, linear.bias is not None, lut_dtype,
                     linear.weight.dtype, device, path)
        module.weight_codes = pack_codes(result.qweight, result.grid.bits).to(device)
        module.weight_lut = lut.contiguous().to(device)
        if linear.bias is not None:
            module.bias = linear.bias
        return module

    def codes(self) -> Tensor:
        """The stored indices, int64 (out, in)."""
        return unpack_codes(self.weight_codes, self.bits, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) weight read through the table, in ``dtype`` (default: the bias's, else float32)."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        return lookup(self.codes(), self.weight_lut).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.path == "lut":
            y = lut_matmul(x, self.codes(), self.weight_lut)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"lut_dtype={self.weight_lut.dtype}, bias={self.bias is not None}, path={self.path}")
