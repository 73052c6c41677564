"""Quantization-aware training on the fixed grid a post-training quantizer chose.

After RTN/GPTQ/AWQ a quantized layer's weight is ``(q - zero) * scale`` with
per-group scale and zero point. QAT keeps that grid fixed (no learned step size)
and trains a latent full-precision weight whose forward value is its rounding
onto the grid; the rounding's gradient is taken as the identity (the
straight-through estimator, Bengio et al. 2013; as in LLM-QAT, Liu et al. 2023,
and EfficientQAT's end-to-end stage, Chen et al. 2024, with frozen step sizes).
At the end the codes are the grid's rounding of the trained weight, so the
exported model holds real low-bit codes on the original grid.

Out-of-range weights: the default STE passes the gradient everywhere, and
:meth:`QATLinear.clamp_to_grid_` (called after every optimizer step by
``Student.after_step``) projects the latent weight back into the grid's range,
so a weight pushed past the largest level stays there, on that level, and
moves back as soon as the gradient turns. ``clipped=True`` gives the "clipped
STE" instead (zero gradient where the unrounded code falls outside
[qmin, qmax]; PACT/LSQ-style), under which such weights freeze.

W4A4 layers (``llmpress.quant.w4a4.W4A4Linear``) train the same way with their input fake-quantized too
(per token, their ``act_bits`` and clip ratio, the straight-through gradient: LLM-QAT's weight-activation
QAT, Liu et al. 2023), so the weights learn to absorb the activation rounding the layer will do at run time;
at the end they become W4A4 layers again, with the new codes on the same grid.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..compressed import Compressed, Grid
from ..errors import LlmpressError
from ..primitives import dequantize, expand_groups, group_count, qrange, quantize
from ..quant.w4a4 import W4A4Linear, fake_quant_act_ste


def _group(group_size: int | None) -> int | None:
    """Our ``group_size`` (-1 / None = one group per row) as ``llmpress.primitives`` expects it."""
    return None if group_size is None or group_size <= 0 else group_size


def _grouped_view(W: Tensor, group: int | None) -> tuple[int, int] | None:
    """(groups, g) when W's columns split into whole groups (or one per row), else None."""
    cols = W.shape[1]
    if group is None:
        return 1, cols
    return (cols // group, group) if cols % group == 0 else None


def _round_trip(W: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int | None,
                clipped: bool, float_zero: bool = False) -> tuple[Tensor, Tensor | None]:
    """dequantize(quantize(W)) in fp32, and (clipped) where the unrounded code is inside [qmin, qmax].

    With whole groups this is primitives' arithmetic op for op — round(W / s) + z, clamp,
    (q - z) * s, all in fp32 — on an (out, groups, g) view with broadcast scale/zero, so no
    expanded (out, in) copies of scale and zero are made (3.6x faster on a 1536x576 layer, one thread:
    1.0 vs 3.7 ms); exact integers survive primitives' int8 round trip, so the values are bit-identical
    (tests/test_qat.py checks it). A partial last group goes through primitives itself. ``float_zero``:
    the grid's zero points are floats (HQQ), rounded as round(W / s + z) (``primitives.quantize``).
    """
    qmin, qmax = qrange(bits)
    view = _grouped_view(W, group)
    if view is None:
        out = dequantize(quantize(W, scale, zero, bits, group, float_zero), scale, zero, group)
        if not clipped:
            return out, None
        cols = W.shape[1]
        s, z = expand_groups(scale, cols, group), expand_groups(zero, cols, group)
        raw = torch.round(W.float() / s + z) if float_zero else torch.round(W.float() / s) + z
        return out, (raw >= qmin) & (raw <= qmax)
    rows = W.shape[0]
    s, z = scale[:, :view[0]].unsqueeze(-1), zero[:, :view[0]].unsqueeze(-1)
    t = W.float().reshape(rows, *view) / s
    t = t.add_(z).round_() if float_zero else t.round_().add_(z)
    inside = ((t >= qmin) & (t <= qmax)).reshape(W.shape) if clipped else None
    return t.clamp_(qmin, qmax).sub_(z).mul_(s).reshape(W.shape), inside


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: the grid's round trip of W; backward: identity (or masked to the clamp range)."""

    @staticmethod
    def forward(ctx, W: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int | None,
                clipped: bool, float_zero: bool = False) -> Tensor:
        out, inside = _round_trip(W, scale, zero, bits, group, clipped, float_zero)
        if clipped:
            ctx.save_for_backward(inside)
        ctx.clipped = clipped
        return out.to(W.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.clipped:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None, None, None, None, None


def fake_quantize_ste(W: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int | None,
                      sym: bool = True, *, clipped: bool = False, float_zero: bool = False) -> Tensor:
    """W (out, in) rounded onto a fixed grid and dequantized, with a straight-through gradient.

    ``scale``/``zero`` (out, groups): contiguous groups of ``group_size`` columns along ``in``
    (a partial last group allowed; -1 or None = one group per row). The values are exactly
    ``llmpress.primitives.dequantize(quantize(W, ...))`` (bit for bit, cast to W's dtype); the gradient
    w.r.t. W is the incoming gradient unchanged, or, with ``clipped=True``, zeroed where
    round(W / scale) + zero falls outside [qmin, qmax]. ``sym`` is informational (a
    symmetric grid has zero == 0); the grid itself is fully given by scale and zero. ``float_zero``:
    the zero points are floats (HQQ) and the codes round(W / scale + zero).
    """
    group = _group(group_size)
    groups = group_count(W.shape[1], group)
    if tuple(scale.shape) != (W.shape[0], groups) or tuple(zero.shape) != tuple(scale.shape):
        raise ValueError(f"scale {tuple(scale.shape)} / zero {tuple(zero.shape)} do not fit a weight "
                         f"{tuple(W.shape)} with group_size {group_size}: expected ({W.shape[0]}, {groups})")
    return _FakeQuantSTE.apply(W, scale, zero, bits, group, clipped, float_zero)


class QATLinear(nn.Module):
    """A linear layer whose weight trains on a frozen quantization grid (see the module docstring).

    Parameters: ``weight`` (out, in), always in nn.Linear's layout (a GPT-2 Conv1D is
    transposed on the way in and out), and the original ``bias`` (shared, not copied).
    Buffers: ``scale``, ``zero`` (out, groups) fp32; they never change. ``act_bits`` (None: float inputs) and
    ``act_clip``: the input's per-token grid, for a layer made from a :class:`W4A4Linear` (:meth:`from_w4a4`).
    """

    def __init__(self, weight: Tensor, bias: nn.Parameter | None, scale: Tensor, zero: Tensor, bits: int,
                 group_size: int | None, sym: bool, clipped: bool = False, conv1d: bool = False, *,
                 act_bits: int | None = None, act_clip: float = 1.0) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size, self.sym, self.clipped, self.conv1d = bits, group_size, sym, clipped, conv1d
        self.act_bits, self.act_clip, self.path = act_bits, act_clip, "auto"
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = bias
        self.register_buffer("scale", scale.detach().to(weight.device, torch.float32).clone())
        self.register_buffer("zero", zero.detach().to(weight.device, torch.float32).clone())
        self.result: Compressed | None = None  # the result this layer started from (mask, meta kept at finalize)
        self.float_zero = False  # float zero points (HQQ): codes are round(W / s + z)

    @classmethod
    def from_linear(cls, linear: nn.Module, result: Compressed, meta: dict | None = None,
                    clipped: bool = False) -> QATLinear:
        """Wrap a quantized ``linear`` (nn.Linear or Conv1D) given the engine's ``result`` for it.

        The grid is ``result.grid``, or that of ``meta`` (the layer's record from compress) when given.
        The weight starts at the dequantized codes.
        """
        grid = result.grid if meta is None else Grid.of(meta)
        if result.qweight is None or result.scale is None or grid is None:
            raise LlmpressError("QAT needs a quantized layer: pass the engine's result with integer codes "
                                "and a meta with 'bits'")
        conv1d = isinstance(linear, Conv1D)
        if not conv1d and not isinstance(linear, nn.Linear):
            raise LlmpressError(f"QAT wraps nn.Linear or Conv1D, not {type(linear).__name__}")
        shape = tuple(linear.weight.shape[::-1] if conv1d else linear.weight.shape)
        if tuple(result.qweight.shape) != shape:
            raise LlmpressError(f"codes of shape {tuple(result.qweight.shape)} do not fit a layer with (out, in) "
                                f"weight {shape}: pass the result computed for this layer")
        zero = result.zero if result.zero is not None else torch.zeros_like(result.scale)
        W = dequantize(result.qweight, result.scale, zero, grid.group)
        module = cls(W.to(linear.weight.device, linear.weight.dtype), linear.bias, result.scale, zero,
                     grid.bits, grid.group_size, grid.sym, clipped, conv1d)
        module.result = result
        module.float_zero = grid.float_zero
        return module

    @classmethod
    def from_w4a4(cls, layer: W4A4Linear, result: Compressed | None = None) -> QATLinear:
        """Wrap a :class:`W4A4Linear`: the latent weight starts at its dequantized codes, on its grid, and the
        input is fake-quantized as the layer quantizes it. ``result``: the engine's record of the layer (its
        meta is kept at :meth:`finalize`)."""
        bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())
        module = cls(layer.dequantized_weight(), bias, layer.weight_scale, layer.zero_points(), layer.bits,
                     layer.group_size, layer.sym, act_bits=layer.act_bits, act_clip=layer.act_clip)
        module.result, module.path = result, layer.path
        return module

    @property
    def latent(self) -> nn.Parameter:
        """The parameter the quantization-aware learning rate applies to (``TrainConfig.qat_lr_scale``)."""
        return self.weight

    def quantized_weight(self) -> Tensor:
        """The weight the forward uses: the latent weight rounded onto the grid (STE gradient)."""
        return fake_quantize_ste(self.weight, self.scale, self.zero, self.bits, self.group_size, self.sym,
                                 clipped=self.clipped, float_zero=self.float_zero)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits is not None:
            x = fake_quant_act_ste(x, self.act_bits, self.act_clip)
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def clamp_to_grid_(self) -> None:
        """Project the latent weight into the grid's range [(qmin - zero)·scale, (qmax - zero)·scale]."""
        qmin, qmax = qrange(self.bits)
        group, cols = _group(self.group_size), self.in_features
        scale, zero = expand_groups(self.scale, cols, group), expand_groups(self.zero, cols, group)
        low, high = ((qmin - zero) * scale).to(self.weight.dtype), ((qmax - zero) * scale).to(self.weight.dtype)
        torch.minimum(torch.maximum(self.weight, low), high, out=self.weight)

    @torch.no_grad()
    def codes(self) -> Tensor:
        """int8 codes (out, in): the grid's rounding of the current weight."""
        return quantize(self.weight, self.scale, self.zero, self.bits, _group(self.group_size), self.float_zero)

    @torch.no_grad()
    def finalize(self) -> tuple[nn.Module, Compressed]:
        """The trained layer as a plain module on the grid, and its new :class:`Compressed`.

        The module is an nn.Linear (a Conv1D when this layer came from one) whose weight is
        exactly the dequantized codes, in the dtype of the weight; it shares this layer's bias.
        The Compressed has the new codes (int8, CPU) and the same scale/zero (CPU) and meta as the
        result it started from (its mask too); ``weight`` is None, as in the engine's results.
        """
        q = self.codes()
        W = dequantize(q, self.scale, self.zero, _group(self.group_size)).to(self.weight.dtype)
        if self.act_bits is not None:
            module = W4A4Linear.from_codes(q, self.scale, None if self.sym else self.zero, self.bias, bits=self.bits,
                                           group_size=self.group_size, act_bits=self.act_bits,
                                           act_clip=self.act_clip, path=self.path)
        elif self.conv1d:
            module = Conv1D(self.out_features, self.in_features)
            module.weight = nn.Parameter(W.t().contiguous(), requires_grad=self.weight.requires_grad)
            module.bias = self.bias
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               device=W.device, dtype=W.dtype)
            module.weight = nn.Parameter(W, requires_grad=self.weight.requires_grad)
            if self.bias is not None:
                module.bias = self.bias
        base = self.result or Compressed(weight=None, grid=Grid(self.bits, self.group_size, self.sym,
                                                                self.float_zero, act_bits=self.act_bits))
        zero = self.zero.cpu() if base.zero is not None or not self.sym else None
        new = dataclasses.replace(base, weight=None, qweight=q.cpu(), scale=self.scale.cpu(), zero=zero,
                                  meta=dict(base.meta), loss=None)
        return module, new

    def extra_repr(self) -> str:
        acts = "" if self.act_bits is None else f", act_bits={self.act_bits}, act_clip={self.act_clip}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}{acts}")
