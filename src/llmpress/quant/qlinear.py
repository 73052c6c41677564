"""A linear layer that keeps its weight as packed low-bit integers and dequantizes on the fly.

``QuantizedLinear`` holds exactly the tensors of compressed-tensors'
``pack-quantized`` format (``weight_packed`` int32, ``weight_scale``,
``weight_zero_point`` packed along the output dim when asymmetric,
``weight_shape``), so its state dict is what the checkpoint stores, and
its forward computes ``F.linear(x, (q - zero) * scale, bias)`` with the
same arithmetic as compressed-tensors' ``dequantize`` (codes and zero
points cast to the scale's dtype, subtract, multiply). With fp32 scales
the dequantized weight is bit-identical to the dense weight the engine
wrote into the model (``llmpress.primitives.dequantize``). With
fp16/bf16 scales it matches what compressed-tensors/vLLM compute, which
can differ from the dense model by one rounding of the scale.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..compressed import Compressed, Grid
from ..errors import LlmpressError
from ..primitives import expand_groups, group_count
from .packing import pack_int, packed_width, unpack_int

log = logging.getLogger(__name__)


def _group(group_size: int | None) -> int | None:
    """Our ``group_size`` convention (-1 / None = one group per row) as primitives expects it."""
    return None if group_size is None or group_size <= 0 else group_size


def integer_zero(zero: Tensor | None) -> bool:
    """Whether zero points are whole numbers, what pack-quantized can store (None: none to store).

    HQQ's zero points are floats (``Grid.float_zero``); rounding them would change the weights.
    """
    return zero is None or not zero.is_floating_point() or bool(torch.equal(zero, zero.round()))


def packed_tensors(result: Compressed, bits: int, group_size: int | None, sym: bool,
                   dtype: torch.dtype) -> dict[str, Tensor]:
    """The pack-quantized tensors of one layer: ``weight_packed``, ``weight_scale``, ``weight_shape``
    and, when asymmetric, ``weight_zero_point`` (int32, packed along the output dim).

    ``result.qweight`` (out, in) int8 codes; ``result.scale``/``result.zero`` (out, groups).
    Scales are cast to ``dtype`` (the model's dtype). Zero points must be whole numbers
    (:func:`integer_zero`): a float zero point is refused, never rounded.
    """
    if result.qweight is None or result.scale is None:
        raise LlmpressError("this layer has no integer codes to pack: only quantized layers can be packed")
    out_features, in_features = result.qweight.shape
    groups = group_count(in_features, _group(group_size))
    if tuple(result.scale.shape) != (out_features, groups):
        raise LlmpressError(f"scale shape {tuple(result.scale.shape)} does not match {groups} groups of "
                            f"{group_size} for a ({out_features}, {in_features}) weight: check group_size")
    tensors = {
        "weight_packed": pack_int(result.qweight.to(torch.int8), bits),
        "weight_scale": result.scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not sym:
        if result.zero is None or not integer_zero(result.zero):
            raise LlmpressError("this asymmetric layer's zero points are not integers (e.g. HQQ's float zero "
                                "points), and packed layers store integer ones only: keep the layer dense")
        zero = result.zero.to(torch.int8)
        tensors["weight_zero_point"] = pack_int(zero.t().contiguous(), bits).t().contiguous()
    return tensors


def unpack_codes(packed: Tensor, zero_packed: Tensor | None, bits: int, out_features: int,
                 in_features: int) -> tuple[Tensor, Tensor | None]:
    """The inverse of :func:`packed_tensors`'s two packed tensors: int8 codes (out, in) and integer zero points
    (out, groups), or None for a symmetric layer (``zero_packed`` None)."""
    codes = unpack_int(packed, bits, in_features)
    if zero_packed is None:
        return codes, None
    return codes, unpack_int(zero_packed.t().contiguous(), bits, out_features).t()


def dequantize_packed(packed: Tensor, scale: Tensor, zero_packed: Tensor | None, bits: int,
                      group_size: int | None, in_features: int) -> Tensor:
    """(out, in) weight from pack-quantized tensors, in ``scale.dtype``, as compressed-tensors computes it.

    ``packed`` int32 (out, ceil(in*bits/32)); ``scale`` (out, groups); ``zero_packed`` int32
    (ceil(out*bits/32), groups) or None (symmetric); a partial last group is allowed.
    """
    group = _group(group_size)
    codes, zero = unpack_codes(packed, zero_packed, bits, packed.shape[0], in_features)
    W = codes.to(scale.dtype)
    if zero is not None:
        W = W - expand_groups(zero.to(scale.dtype), in_features, group)
    return W * expand_groups(scale, in_features, group)


class QuantizedLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W = (q - zero) * scale`` rebuilt from packed codes at every forward.

    Buffers (compressed-tensors names): ``weight_packed`` int32 (out, ceil(in*bits/32)),
    ``weight_scale`` (out, groups) in the compute dtype, ``weight_zero_point`` int32
    (ceil(out*bits/32), groups) when ``sym`` is False, ``weight_shape`` int64 [out, in];
    ``bias`` is a parameter, as in ``nn.Linear``. ``cache_weight=True`` keeps the
    dequantized weight after the first forward (faster, but as much memory as a dense layer).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = -1,
                 sym: bool = True, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, cache_weight: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.cache_weight = cache_weight
        groups = group_count(in_features, _group(group_size))
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_width(in_features, bits),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        if not sym:
            self.register_buffer("weight_zero_point", torch.zeros(packed_width(out_features, bits), groups,
                                                                  dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("_weight_cache", None, persistent=False)

    @classmethod
    def from_compressed(cls, linear: nn.Module, result: Compressed, meta: dict | None = None,
                        cache_weight: bool = False) -> QuantizedLinear:
        """Replace ``linear`` (``nn.Linear``, or GPT-2 ``Conv1D``) quantized as ``result``.

        The grid is ``result.grid``, or that of ``meta`` (the engine's per-layer record) when given.
        The bias is shared with ``linear``, not copied.
        """
        grid = result.grid if meta is None else Grid.of(meta)
        if result.qweight is None or grid is None:
            raise LlmpressError("from_compressed needs a quantized layer (integer codes and 'bits' in its meta)")
        weight = linear.weight
        out_features, in_features = result.qweight.shape
        expected = (in_features, out_features) if isinstance(linear, Conv1D) else (out_features, in_features)
        if tuple(weight.shape) != expected:
            raise LlmpressError(f"codes of shape {tuple(result.qweight.shape)} do not fit a layer with weight "
                                f"{tuple(weight.shape)}: pass the result computed for this layer")
        bits, group_size, sym = grid.bits, grid.group_size, grid.sym
        module = cls(in_features, out_features, bits, group_size, sym, bias=linear.bias is not None,
                     dtype=weight.dtype, device=weight.device, cache_weight=cache_weight)
        for name, tensor in packed_tensors(result, bits, group_size, sym, weight.dtype).items():
            setattr(module, name, tensor.to(weight.device))
        if linear.bias is not None:
            module.bias = linear.bias
        return module

    def codes(self) -> tuple[Tensor, Tensor | None]:
        """The stored int8 codes (out, in) and integer zero points (out, groups), None when symmetric."""
        return unpack_codes(self.weight_packed, None if self.sym else self.weight_zero_point, self.bits,
                            self.out_features, self.in_features)

    def dequantized_weight(self) -> Tensor:
        """The (out, in) weight in the scale's dtype: ``(q - zero) * scale``, group by group."""
        if self._weight_cache is not None:
            return self._weight_cache
        zero = None if self.sym else self.weight_zero_point
        W = dequantize_packed(self.weight_packed, self.weight_scale, zero, self.bits, self.group_size,
                              self.in_features)
        if self.cache_weight:
            self._weight_cache = W
        return W

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}")


def replace_linears(model: nn.Module, results: dict[str, Compressed], layers: dict[str, dict] | None = None,
                    cache_weight: bool = False) -> nn.Module:
    """Swap every quantized linear named in ``results`` for a :class:`QuantizedLinear`, in place.

    ``layers`` is the per-layer meta returned by ``compress_blocks`` (default: each result's own
    meta). Layers without integer codes (pruned only) are left alone. GPT-2's ``Conv1D`` is
    converted too: the codes are already (out, in), so the new module computes ``x Wᵀ + b``
    like ``nn.Linear`` (equal to Conv1D's ``addmm`` up to float summation order).
    Returns ``model``.
    """
    layers = layers or {}
    replaced = 0
    for name, result in results.items():
        grid = Grid.of(layers[name]) if name in layers else result.grid
        if result.qweight is None or grid is None:
            continue
        module = model.get_submodule(name)
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise LlmpressError(f"module {name} is a {type(module).__name__}, not a linear layer: "
                                "pass the results computed for this model")
        model.set_submodule(name, QuantizedLinear.from_compressed(module, result, layers.get(name), cache_weight))
        replaced += 1
    log.info("replaced %d linear layers with QuantizedLinear", replaced)
    return model
