"""Quantization-aware training of codebook (lookup-table) layers: the codes stay, the tables train.

A layer quantized on a non-uniform grid (``Grid.codebook``: ``squeezellm``, ``gptq-lut``;
``llmpress.quant.squeezellm``) computes with ``W[r, j] = lut[r, codes[r, j]]``. Its continuous part is the
table: (out, 2^bits) values, a few per row. :class:`CodebookQATLinear` freezes the codes and makes the table a
parameter, so the gradient of the loss in an entry is the sum of the weight gradients of the weights that use
it (the backward of a gather: exact, no straight-through estimate). That is the continuous step of
PV-tuning (Malinovskii et al. 2024, "PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM
Compression", arXiv:2405.14852, §3: codes fixed, codebooks, scales and norms trained by backprop) and the
end-to-end stage of EfficientQAT (Chen et al. 2024, arXiv:2407.11062, §3.2: only the step sizes train); the
discrete step (re-choosing codes) is not done. The distillation stage trains the norms alongside
(``train: all``: every block's norm weights are trainable).

:meth:`CodebookQATLinear.finalize` rounds the table to its stored dtype (``lut_dtype`` of the layer's record,
fp16 by default), so the new weight is exactly the stored table read at the unchanged codes and the
``codebook`` folder (``llmpress.export.codebook``) reloads it bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compressed import Compressed, Grid
from ..errors import LlmpressError
from ..quant.codebook import LUT_DTYPES
from ..quant.vq import vq_lookup


def lut_weight(lut: Tensor, codes: Tensor, vector: tuple[int, int] | None = None) -> Tensor:
    """The (out, in) weight ``lut[r, codes[r, j]]``, differentiable in ``lut`` (out, K); codes (out, in) integer.
    With ``vector`` = (dim, rows): ``lut`` holds codebooks (groups, K, dim), codes (out, in/dim)
    (``llmpress.quant.vq.vq_lookup``)."""
    if vector is not None:
        return vq_lookup(codes, lut, vector[1])
    return lut.gather(1, codes.long())


class CodebookQATLinear(nn.Module):
    """``y = x Wᵀ + b`` with W read through a trainable per-row table at frozen codes (module docstring).

    Parameter ``lut`` (out, 2^bits), fp32 (or the layer weight's dtype); buffer ``codes`` uint8 (out, in); a
    vector-quantized layer (``vector`` = (dim, rows), GPTVQ) has codebooks (groups, 2^(bits·dim), dim) and codes
    (out, in/dim) instead; the
    original ``bias`` (shared, not copied; it trains under ``train: all`` as any bias does).
    """

    def __init__(self, codes: Tensor, lut: Tensor, bias: nn.Parameter | None, bits: int,
                 lut_dtype: str = "float16", vector: tuple[int, int] | None = None) -> None:
        super().__init__()
        if lut_dtype not in LUT_DTYPES:
            raise LlmpressError(f"lut_dtype '{lut_dtype}' is unknown: use one of {', '.join(LUT_DTYPES)}")
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * (vector[0] if vector else 1)
        self.bits, self.lut_dtype, self.vector = bits, lut_dtype, vector
        self.register_buffer("codes", codes.detach().to(torch.uint8).clone())
        self.lut = nn.Parameter(lut.detach().clone())
        self.bias = bias
        self.result: Compressed | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module, result: Compressed, meta: dict | None = None) -> CodebookQATLinear:
        """Wrap ``linear`` (nn.Linear) quantized as ``result`` (codes + ``codebook``); ``meta``: its record."""
        grid = result.grid if meta is None else Grid.of(meta)
        if result.qweight is None or result.codebook is None or grid is None or not grid.codebook:
            raise LlmpressError("codebook QAT needs a codebook-quantized layer: pass the engine's result with "
                                "codes and a lookup table")
        if type(linear) is not nn.Linear:
            raise LlmpressError(f"codebook QAT wraps nn.Linear, not {type(linear).__name__}")
        out, cols = linear.weight.shape
        if tuple(result.qweight.shape) != ((out, cols // grid.vector[0]) if grid.vector else (out, cols)):
            raise LlmpressError(f"codes of shape {tuple(result.qweight.shape)} do not fit a layer with weight "
                                f"{tuple(linear.weight.shape)}: pass the result computed for this layer")
        lut_dtype = (meta or result.meta).get("lut_dtype", "float16")
        device, dtype = linear.weight.device, linear.weight.dtype
        module = cls(result.qweight.to(device), result.codebook.to(device, dtype), linear.bias, grid.bits,
                     lut_dtype, grid.vector)
        module.result = result
        return module

    @property
    def latent(self) -> nn.Parameter:
        """The parameter the quantization-aware learning rate applies to (``TrainConfig.qat_lr_scale``)."""
        return self.lut

    def quantized_weight(self) -> Tensor:
        return lut_weight(self.lut, self.codes, self.vector)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def clamp_to_grid_(self) -> None:
        """Nothing to project: any table is a valid one (kept for ``Student.after_step``)."""

    @torch.no_grad()
    def stored_table(self) -> Tensor:
        """The table rounded to its storage dtype, back in the parameter's dtype."""
        return self.lut.detach().to(LUT_DTYPES[self.lut_dtype]).to(self.lut.dtype)

    @torch.no_grad()
    def finalize(self) -> tuple[nn.Module, Compressed]:
        """The trained layer as an nn.Linear whose weight is the stored table at the codes, and its Compressed
        (same codes, the new table fp32 on the CPU, meta kept; ``weight`` None as in the engine's results)."""
        lut = self.stored_table()
        W = lut_weight(lut, self.codes, self.vector)
        module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=W.device,
                           dtype=W.dtype)
        module.weight = nn.Parameter(W, requires_grad=self.lut.requires_grad)
        if self.bias is not None:
            module.bias = self.bias
        grid = Grid(self.bits, -1, sym=False, codebook=True, vector=self.vector)
        base = self.result or Compressed(weight=None, grid=grid,
                                         meta={"lut_dtype": self.lut_dtype})
        new = dataclasses.replace(base, weight=None, qweight=self.codes.cpu(), codebook=lut.float().cpu(),
                                  meta=dict(base.meta), loss=None)
        return module, new

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"lut_dtype={self.lut_dtype}, vector={self.vector}, bias={self.bias is not None}")
