"""Vector quantization with GPTQ's error feedback: GPTVQ (van Baalen et al. 2024, arXiv:2402.15319).

Consecutive input columns are taken ``dim`` at a time (here dim = 2): each row's pair (w[r, 2p], w[r, 2p+1]) is
replaced by one of K = 2^(bits·dim) two-dimensional codewords, so a code of bits·dim bits stands for ``dim``
weights (``bits`` per weight: 4-bit codes for 2 bits/weight). A codebook (K, dim) is shared by ``group_rows``
consecutive output rows (GPTVQ §3: a codebook per group of weights, so its cost spreads over many weights: 16
fp16 pairs per 8 rows of 576 inputs = 0.11 bits/weight). The pieces, pure functions on tensors:

- :func:`vector_kmeans`: per group, weighted k-means of the pairs with per-coordinate weights (the diagonal of
  the layer Hessian at each column, GPTVQ's "Hessian-weighted" EM initialisation, §3.2), from the product grid
  of per-coordinate weighted quantiles, a fixed number of Lloyd steps;
- :func:`vq_gptq` (method ``gptvq``): GPTQ (Frantar et al., arXiv:2210.17323) column pair by column pair: with
  U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), choosing codeword c for the pair (j, j+1) costs
  e1² + e2² with e1 = (w_j − c_1)/U_jj and e2 = (w_{j+1} − U_j,j+1·e1 − c_2)/U_j+1,j+1 — exactly the OBQ
  error of quantizing the two columns jointly, (w − c)ᵀ[(H⁻¹)_PP]⁻¹(w − c) — the cheapest codeword is taken
  and both errors fed forward as GPTQ does (lazy batches of ``block_size`` columns);
- :func:`refit_vq_codebook`: the codebooks re-solved by least squares for the chosen codes, minimising
  ½·tr(ΔHΔᵀ) exactly (GPTVQ §3.3 updates them by gradient steps; the normal equations have only K·dim
  unknowns per group);
- :func:`vq_lookup` / :class:`VQLinear`: the weight read back, and the layer ``llmpress.export.codebook``
  stores (packed codes, fp16 codebooks).

Not done: act-order (the codes would then need the column permutation stored), GPTVQ's int8 codebook
quantization and SVD codebook compression. Bits per weight (``llmpress.measure.size``): ``bits`` for the codes
plus ceil(out / group_rows)·K·dim·16 bits of codebooks per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compressed import Compressed, Grid
from ..config import Check, Config
from ..errors import LlmpressError
from ..linalg import damped_hessian, inverse_cholesky_upper
from ..registry import Method, register
from .codebook import ELEMENTS_AT_ONCE, LUT_DTYPES, exact_in, pack_codes, unpack_codes, weighted_quantiles
from .packing import packed_width

DIM = 2  # weights per codeword


@dataclass(frozen=True)
class VQConfig(Config):
    """bits: bits per weight (codes of bits·dim bits; 2^(bits·dim) codewords); dim: weights per codeword;
    group_rows: consecutive output rows sharing one codebook; iterations: Lloyd steps of the initial k-means;
    damp, block_size, true_sequential: as ``gptq``'s; refit: re-solve the codebooks for the chosen codes;
    lut_dtype: the codebooks' stored dtype."""

    label = "gptvq"

    bits: Annotated[int, Check(ge=1, le=4, verdict="out of range", advice="use 1 to 4 (bits per weight)")] = 2
    dim: Literal[2] = 2
    group_rows: Annotated[int, Check(ge=1, advice="use a positive integer, e.g. 8")] = 8
    iterations: Annotated[int, Check(ge=0, advice="use an integer >= 0, e.g. 20")] = 20
    damp: Annotated[float, Check(gt=0, advice="use a positive number such as 0.01")] = 0.01
    block_size: Annotated[int, Check(ge=2, advice="use an even integer such as 128")] = 128
    true_sequential: bool = False
    refit: bool = True
    lut_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def check(self) -> None:
        if self.block_size % self.dim:
            raise LlmpressError(f"gptvq block_size={self.block_size} is not a multiple of dim={self.dim}: "
                                f"use e.g. {self.dim * 64}")


def _grouped(W: Tensor, rows: int) -> Tensor:
    """(out, in) → (groups, rows·in/dim, dim): each group's row pairs as points (the last group zero-padded)."""
    out, cols = W.shape
    groups = -(-out // rows)
    pad = groups * rows - out
    if pad:
        W = torch.cat([W, W.new_zeros(pad, cols)])
    return W.reshape(groups, rows * cols // DIM, DIM)


def nearest_vectors(points: Tensor, weights: Tensor, codebook: Tensor) -> Tensor:
    """Index (groups, n) of the codeword nearest each point in Σ_d w_d (x_d − c_d)²; ties to the lower index.

    points, weights (groups, n, dim); codebook (groups, K, dim). Computed as Σ_d w_d c_d² − 2 Σ_d w_d x_d c_d
    (the Σ_d w_d x_d² every codeword shares dropped): two batched products instead of a (groups, n, K, dim)
    difference."""
    score = torch.baddbmm(weights @ codebook.square().transpose(1, 2), weights * points, codebook.transpose(1, 2),
                          alpha=-2)
    return score.argmin(dim=-1)


def vector_kmeans(points: Tensor, weights: Tensor, entries: int, iterations: int) -> Tensor:
    """Per group, weighted k-means of ``points`` (groups, n, dim) with per-coordinate ``weights`` (same shape,
    non-negative): the codebook (groups, entries, dim) minimising Σ Σ_d w_d (x_d − c(x)_d)².

    Start: the product grid of each coordinate's weighted quantiles at (k + 1/2)/m, m = entries^(1/dim)
    (``llmpress.quant.codebook.weighted_quantiles``; codeword (a, b) = (q0[a], q1[b]), index a·m + b). Then
    ``iterations`` Lloyd steps: assign each point to its nearest codeword (:func:`nearest_vectors`), move each
    coordinate of each codeword to the weighted mean of its members' coordinate (no weight there: it stays).
    Computed in points' dtype."""
    m = round(entries ** (1 / points.shape[-1]))
    if m ** points.shape[-1] != entries:
        raise ValueError(f"{entries} codewords are not a product grid in {points.shape[-1]} dimensions")
    X, S = points, weights.to(points.dtype)
    axes = [weighted_quantiles(X[..., d], S[..., d], m) for d in range(X.shape[-1])]  # (groups, m) each
    C = torch.stack([axes[0].repeat_interleave(m, dim=1), axes[1].repeat(1, m)], dim=-1)
    for _ in range(iterations):
        codes = nearest_vectors(X, S, C).unsqueeze(-1).expand_as(X)
        mass = torch.zeros_like(C).scatter_add_(1, codes, S)
        moment = torch.zeros_like(C).scatter_add_(1, codes, S * X)
        C = torch.where(mass > 0, moment / mass.clamp(min=torch.finfo(C.dtype).tiny), C)
    return C


def vq_lookup(codes: Tensor, codebook: Tensor, group_rows: int) -> Tensor:
    """The (out, in) weight: row r, pair p is ``codebook[r // group_rows, codes[r, p]]``; codes (out, in/dim),
    codebook (groups, K, dim). Differentiable in ``codebook`` (a gather)."""
    out, pairs = codes.shape
    table = codebook.repeat_interleave(group_rows, dim=0)[:out]  # (out, K, dim)
    index = codes.long().unsqueeze(-1).expand(out, pairs, codebook.shape[-1])
    return table.gather(1, index).reshape(out, pairs * codebook.shape[-1])


def _solve_pairs(Wt: Tensor, U: Tensor, C: Tensor, block_size: int) -> Tensor:
    """GPTQ's lazy-batch loop choosing one codeword per column pair (module docstring). Wt (in, out) is updated
    in place; U (in, in) upper with H⁻¹ = UᵀU; C (out, K, 2) each row's codebook. Returns codes (in/2, out)."""
    cols, out = Wt.shape
    codes = torch.zeros(cols // DIM, out, dtype=torch.long, device=Wt.device)
    c1, c2 = C[..., 0], C[..., 1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(0, i2 - i1, DIM):
            e1 = (W1[i].unsqueeze(1) - c1) / U1[i, i]  # (out, K)
            e2 = (W1[i + 1].unsqueeze(1) - U1[i, i + 1] * e1 - c2) / U1[i + 1, i + 1]
            k = (e1.square() + e2.square()).argmin(dim=1, keepdim=True)
            codes[(i1 + i) // DIM] = k.squeeze(1)
            E1[i] = e1.gather(1, k).squeeze(1)
            W1[i + 1:].addr_(U1[i, i + 1:], E1[i], alpha=-1)
            E1[i + 1] = (W1[i + 1] - c2.gather(1, k).squeeze(1)) / U1[i + 1, i + 1]
            if i + 2 < i2 - i1:
                W1[i + 2:].addr_(U1[i + 1, i + 2:], E1[i + 1], alpha=-1)
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1)
    return codes


def refit_vq_codebook(W: Tensor, H: Tensor, codes: Tensor, codebook: Tensor, group_rows: int) -> Tensor:
    """The codebooks (groups, K, dim) minimising ½·tr((W − Ŵ) H (W − Ŵ)ᵀ), Ŵ = :func:`vq_lookup`, for fixed codes.

    Per group g, with A_r the one-hot (in, K·dim) matrix mapping row r's weights to the entries they read:
    (Σ_r A_rᵀ H A_r) c = Σ_r A_rᵀ H w_r over the group's rows; an entry no weight reads keeps its value (a tiny
    ridge towards ``codebook``, 1e-9·mean diag, keeps each system regular). The sums are formed in W's dtype
    (float32 on a model: 2 s instead of 20 s for a 576×1536 layer), the systems solved in float64."""
    out, cols = W.shape
    groups, K, dim = codebook.shape
    entry = (codes.long() * dim).repeat_interleave(dim, dim=1) + torch.arange(cols, device=W.device) % dim
    Hw = H.to(W.dtype)
    G = torch.zeros(groups, K * dim, K * dim, dtype=W.dtype, device=W.device)
    rhs = torch.zeros(groups, K * dim, dtype=W.dtype, device=W.device)
    owner = torch.arange(out, device=W.device) // group_rows
    step = max(1, ELEMENTS_AT_ONCE // (cols * K * dim))
    for r in range(0, out, step):
        A = F.one_hot(entry[r:r + step], K * dim).to(W.dtype)  # (rows, in, K·dim)
        HA = torch.matmul(Hw, A)
        G.index_add_(0, owner[r:r + step], A.transpose(1, 2) @ HA)
        rhs.index_add_(0, owner[r:r + step], (HA * W[r:r + step].unsqueeze(-1)).sum(dim=1))
    G, rhs = G.double(), rhs.double()
    ridge = 1e-9 * G.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
    G.diagonal(dim1=1, dim2=2).add_(ridge.unsqueeze(-1))
    rhs += ridge.unsqueeze(-1) * codebook.reshape(groups, K * dim).double()
    return torch.linalg.solve(G, rhs).reshape(groups, K, dim).to(codebook.dtype)


def _stored(codebook: Tensor, name: str) -> Tensor:
    return codebook.to(LUT_DTYPES[name]).to(codebook.dtype)


def vq_gptq(weight: Tensor, hessian: Tensor, cfg: VQConfig) -> Compressed:
    """GPTVQ: codebooks by Hessian-weighted k-means, codes by GPTQ pair by pair, codebooks re-solved (module
    docstring). weight (out, in) with in a multiple of ``dim``, hessian (in, in) = 2/n·XᵀX; float64 inside when
    either is float64, else float32. Returns codes (uint8 (out, in/dim)), ``codebook`` (groups, K, dim) fp32
    (values exact in ``lut_dtype``), ``weight`` = :func:`vq_lookup` and ``loss`` = ½·tr(ΔHΔᵀ) for the damped H.
    """
    out, cols = weight.shape
    if cols % cfg.dim:
        raise LlmpressError(f"gptvq needs the input width to be a multiple of dim={cfg.dim}, got {cols}: leave "
                            "this layer out (ignore) or use gptq-lut")
    dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
    W = weight.detach().to(dtype=dtype, copy=True)
    sensitivity = hessian.detach().to(dtype).diagonal().clamp(min=0)
    def damped() -> Tensor:
        return damped_hessian(hessian.detach().to(dtype), W, cfg.damp)[0]

    H = damped()
    K = 1 << (cfg.bits * cfg.dim)
    points = _grouped(W, cfg.group_rows)
    weights = _grouped(sensitivity.expand(out, cols), cfg.group_rows)
    codebook = _stored(vector_kmeans(points, weights, K, cfg.iterations), cfg.lut_dtype)
    U = inverse_cholesky_upper(H, damped)  # a wide H is factorised in its own memory (spoilt, also on a retry)
    del H
    table = codebook.repeat_interleave(cfg.group_rows, dim=0)[:out]
    codes = _solve_pairs(W.T.contiguous(), U, table, cfg.block_size).T.contiguous()
    del U
    H = damped()  # the same damped H again, for the refit and the loss
    if cfg.refit:
        codebook = _stored(refit_vq_codebook(W, H, codes, codebook, cfg.group_rows), cfg.lut_dtype)
    codebook = codebook.float()
    Wq = vq_lookup(codes, codebook, cfg.group_rows)
    delta = (W - Wq.to(dtype))
    meta = {"method": "gptvq", "refit": cfg.refit, "iterations": cfg.iterations, "lut_dtype": cfg.lut_dtype}
    return Compressed(weight=Wq, qweight=codes.to(torch.uint8), meta=meta,
                      loss=float(((delta @ H) * delta).sum()) / 2,
                      grid=Grid(cfg.bits, -1, sym=False, codebook=True, vector=(cfg.dim, cfg.group_rows)),
                      codebook=codebook)


class VQLinear(nn.Module):
    """``y = x Wᵀ + b`` with W = :func:`vq_lookup` (codes, codebook, group_rows): what the codebook folder stores.

    Buffers: ``weight_codes`` int32 (out, ceil(in/dim·bits·dim/32)) (``pack_codes`` of the bits·dim-bit codes),
    ``weight_codebook`` (groups, 2^(bits·dim), dim) in its stored dtype (fp16 by default), ``weight_shape``
    [out, in]; ``bias`` a parameter as in ``nn.Linear``. Computes by reading W through the codebooks.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, dim: int, group_rows: int,
                 bias: bool = True, lut_dtype: torch.dtype = torch.float16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.dim, self.group_rows = bits, dim, group_rows
        groups, code_bits = -(-out_features // group_rows), bits * dim
        self.register_buffer("weight_codes", torch.zeros(out_features, packed_width(in_features // dim, code_bits),
                                                         dtype=torch.int32, device=device))
        self.register_buffer("weight_codebook", torch.zeros(groups, 1 << code_bits, dim, dtype=lut_dtype,
                                                            device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_compressed(cls, linear: nn.Linear, result: Compressed,
                        lut_dtype: torch.dtype = torch.float16) -> VQLinear:
        """The layer of ``linear`` quantized as ``result`` (codes, ``codebook``, a grid with ``vector``); the
        bias is shared. The codebooks must be exact in ``lut_dtype``."""
        grid = result.grid
        if result.qweight is None or result.codebook is None or grid is None or grid.vector is None:
            raise LlmpressError("VQLinear needs a vector-quantized layer (codes and codebooks): run gptvq first")
        dim, rows = grid.vector
        out_features, in_features = linear.weight.shape
        if tuple(result.qweight.shape) != (out_features, in_features // dim):
            raise LlmpressError(f"codes of shape {tuple(result.qweight.shape)} do not fit a layer with weight "
                                f"{tuple(linear.weight.shape)}: pass the result computed for this layer")
        book = exact_in(result.codebook, lut_dtype, "the codebooks are")
        device = linear.weight.device
        module = cls(in_features, out_features, grid.bits, dim, rows, linear.bias is not None, lut_dtype,
                     linear.weight.dtype, device)
        module.weight_codes = pack_codes(result.qweight, grid.bits * dim).to(device)
        module.weight_codebook = book.contiguous().to(device)
        if linear.bias is not None:
            module.bias = linear.bias
        return module

    def codes(self) -> Tensor:
        """The stored codes, int64 (out, in/dim)."""
        return unpack_codes(self.weight_codes, self.bits * self.dim, self.in_features // self.dim)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        return vq_lookup(self.codes(), self.weight_codebook, self.group_rows).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"dim={self.dim}, group_rows={self.group_rows}, bias={self.bias is not None}")


def gptvq_recipe(bits: int, **args) -> dict:
    """As ``gptq_lut_recipe``, without act-order (module docstring): true-sequential, bfloat16 forwards."""
    stage = {"method": "gptvq", "args": {"bits": bits, "true_sequential": True, **args}}
    return {"calibration": {"dtype": "auto"}, "stages": [stage]}


register(Method("gptvq", VQConfig, vq_gptq, ("hessian",), "quantize"), recipes={
    "gptvq-w2": gptvq_recipe(2),
})
