"""Low-rank adapters on frozen layers: LoRA (Hu et al. 2021) and QLoRA-style (Dettmers et al. 2023).

``y = base(x) + (alpha / rank) · x Aᵀ Bᵀ`` with A (rank, in) Kaiming-uniform (as
PEFT and the LoRA reference code) and B (out, rank) zeros, so training starts
exactly at the base layer. The base is frozen: a dense ``nn.Linear`` (LoRA) or a
``llmpress.quant.qlinear.QuantizedLinear`` holding packed low-bit codes (QLoRA;
the paper's NF4 + double quantization is replaced by our int grid, the idea is
the same: the low-bit base stays, only the adapters train).

Pruned bases: with a ``mask`` (bool (out, in), True = kept) the update is
``(B A) ⊙ mask``, applied in the forward too, so the merged layer equals the
trained one and pruned weights stay exactly zero. (Masking only at merge time
would silently drop the part of the update that fell on pruned weights.)

Merging: over nn.Linear, ``W + s·(B A)[⊙ mask]``. Over a QuantizedLinear the
merged weight is rounded on the base's own grid (same scale and zero point),
giving a new QuantizedLinear ("requantize") or an nn.Linear holding the rounded
weight ("dense"); "float" keeps the unrounded sum (no longer on the grid).
Rounding loses whatever part of the update is smaller than half a grid step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..compressed import Compressed, Grid
from ..config import PositiveInt, check_value
from ..errors import LlmpressError
from ..primitives import dequantize, quantize
from ..quant.qlinear import QuantizedLinear, packed_tensors

log = logging.getLogger(__name__)

MERGE_MODES = ("auto", "dense", "requantize", "float")


def _features(base: nn.Module) -> tuple[int, int]:
    """(in, out) features of nn.Linear, Conv1D or QuantizedLinear."""
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    if isinstance(base, (nn.Linear, QuantizedLinear)):
        return base.in_features, base.out_features
    raise LlmpressError(f"LoRA wraps nn.Linear, Conv1D or QuantizedLinear, not {type(base).__name__}")


def _dense_weight(base: nn.Module) -> Tensor:
    """The base's (out, in) weight."""
    if isinstance(base, QuantizedLinear):
        return base.dequantized_weight()
    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def grid_of(base: QuantizedLinear) -> tuple[Tensor, Tensor]:
    """The (out, groups) fp32 scale and zero point of a QuantizedLinear (zeros when symmetric)."""
    scale = base.weight_scale.float()
    if base.sym:
        return scale, torch.zeros_like(scale)
    return scale, base.codes()[1].float()


def _group(group_size: int | None) -> int | None:
    return None if group_size is None or group_size <= 0 else group_size


class LoRALinear(nn.Module):
    """``base(x) + (alpha/rank)·x (B A [⊙ mask])ᵀ`` with the base frozen; see the module docstring."""

    def __init__(self, base: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                 mask: Tensor | None = None) -> None:
        super().__init__()
        check_value("rank", rank, PositiveInt, label="LoRA")
        if not 0.0 <= dropout < 1.0:
            raise LlmpressError(f"LoRA dropout={dropout!r} is invalid: use a number in [0, 1)")
        in_features, out_features = _features(base)
        weight = _dense_weight(base)
        if mask is not None and tuple(mask.shape) != (out_features, in_features):
            raise LlmpressError(f"LoRA mask of shape {tuple(mask.shape)} does not fit a ({out_features}, "
                                f"{in_features}) layer: pass the layer's (out, in) keep-mask")
        self.base, self.rank, self.alpha = base, rank, float(alpha)
        self.in_features, self.out_features = in_features, out_features
        self.scaling = self.alpha / rank
        for param in base.parameters():
            param.requires_grad_(False)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("mask", None if mask is None else mask.to(weight.device, torch.bool))

    def delta(self) -> Tensor:
        """The (out, in) weight update ``s·B A`` (masked when a mask was given)."""
        update = (self.lora_B @ self.lora_A) * self.scaling
        return update if self.mask is None else update * self.mask

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.mask is not None:
            return y + F.linear(self.dropout(x), self.delta())
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """(out, in) fp32 ``W + delta``, not rounded."""
        return _dense_weight(self.base).float() + self.delta().float()

    @torch.no_grad()
    def requantized(self) -> Compressed:
        """The merged weight rounded on a QuantizedLinear base's grid: int8 codes, same scale/zero (CPU)."""
        if not isinstance(self.base, QuantizedLinear):
            raise LlmpressError("only a LoRA over a QuantizedLinear can be requantized: merge with mode 'dense'")
        scale, zero = grid_of(self.base)
        group = _group(self.base.group_size)
        q = quantize(self.merged_weight(), scale, zero, self.base.bits, group)
        grid = Grid(self.base.bits, self.base.group_size, self.base.sym)
        return Compressed(weight=None, qweight=q.cpu(), scale=scale.cpu(), zero=zero.cpu(),
                          mask=None if self.mask is None else self.mask.cpu(), grid=grid)

    @torch.no_grad()
    def merged(self, mode: str = "auto") -> nn.Module:
        """The adapter folded into a plain module (see the module docstring for the modes).

        "auto": "requantize" over a QuantizedLinear, "dense" otherwise. The bias is shared.
        """
        if mode not in MERGE_MODES:
            raise LlmpressError(f"unknown LoRA merge mode '{mode}': use one of {', '.join(MERGE_MODES)}")
        quantized = isinstance(self.base, QuantizedLinear)
        if mode == "auto":
            mode = "requantize" if quantized else "dense"
        if mode == "requantize" and not quantized:
            raise LlmpressError("mode 'requantize' needs a QuantizedLinear base: use 'dense' for a dense layer")
        if quantized and mode != "float":
            result = self.requantized()
            if mode == "requantize":
                return _quantized_module(self.base, result)
            W = dequantize(result.qweight, result.scale, result.zero, _group(self.base.group_size))
            return _dense_module(self.base, W.to(self.base.weight_scale.device))
        return _dense_module(self.base, self.merged_weight())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, masked={self.mask is not None}"


def _dense_module(base: nn.Module, W: Tensor) -> nn.Module:
    """An nn.Linear (a Conv1D for a Conv1D base) holding the (out, in) weight W, sharing the base's bias."""
    dtype = base.weight_scale.dtype if isinstance(base, QuantizedLinear) else base.weight.dtype
    W = W.to(dtype)
    if isinstance(base, Conv1D):
        module = Conv1D(W.shape[0], W.shape[1])
        module.weight = nn.Parameter(W.t().contiguous(), requires_grad=False)
    else:
        module = nn.Linear(W.shape[1], W.shape[0], bias=base.bias is not None, device=W.device, dtype=dtype)
        module.weight = nn.Parameter(W, requires_grad=False)
    if base.bias is not None:
        module.bias = base.bias
    return module


def _quantized_module(base: QuantizedLinear, result: Compressed) -> QuantizedLinear:
    """A new QuantizedLinear with ``result``'s codes on ``base``'s grid, dtype and device."""
    dtype, device = base.weight_scale.dtype, base.weight_scale.device
    module = QuantizedLinear(base.in_features, base.out_features, base.bits, base.group_size, base.sym,
                             bias=base.bias is not None, dtype=dtype, device=device)
    for name, tensor in packed_tensors(result, base.bits, base.group_size, base.sym, dtype).items():
        setattr(module, name, tensor.to(device))
    if base.bias is not None:
        module.bias = base.bias
    return module


def add_lora(model: nn.Module, names: Iterable[str], rank: int = 16, alpha: float = 32.0,
             masks: dict[str, Tensor] | None = None, dropout: float = 0.0) -> list[str]:
    """Wrap each named linear of ``model`` in a :class:`LoRALinear`, in place; returns the names.

    ``masks``: name -> (out, in) keep-mask for pruned layers (their updates stay masked).
    """
    masks = masks or {}
    wrapped = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise LlmpressError(f"layer {name} already has a LoRA adapter: merge it first (merge_lora)")
        model.set_submodule(name, LoRALinear(module, rank, alpha, dropout, masks.get(name)))
        wrapped.append(name)
    log.info("added rank-%d LoRA adapters to %d layers", rank, len(wrapped))
    return wrapped


def merge_lora(model: nn.Module, mode: str = "auto") -> list[str]:
    """Replace every :class:`LoRALinear` in ``model`` by its merged module, in place; returns the names."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    for name, module in found:
        model.set_submodule(name, module.merged(mode))
    return [name for name, _ in found]


def merged_result(module: LoRALinear, meta: dict | None = None) -> Compressed:
    """:meth:`LoRALinear.requantized` with the layer's own meta (``meta``) kept, for the engine's results."""
    result = module.requantized()
    return dataclasses.replace(result, meta=dict(meta) if meta else result.meta)
