"""LowRankLinear: a factorized linear layer, and how factorized layers are put in and multiplied back out.

``LowRankLinear`` holds two plain ``nn.Linear`` children, ``down`` (V: k×n, no bias)
and ``up`` (U: m×k, with the original bias), so that forward = (x Vᵀ) Uᵀ + b and so that
every per-linear stage (RTN, GPTQ), parameter count and FLOP count sees U and V as
ordinary linears (``llmpress.models.archs.block_linears`` lists them as
``<name>.down`` / ``<name>.up``). :func:`densify` multiplies the factors back (U·V).

Saving and loading factorized models is the ``low-rank`` entry of the format table
(``llmpress.export.lowrank``); this module knows nothing of files.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


class LowRankLinear(nn.Module):
    """y = up(down(x)) = (x Vᵀ) Uᵀ + b with V = down.weight (k×n), U = up.weight (m×k).

    ``conv1d`` records that the layer replaced a GPT-2 ``Conv1D`` (so :func:`densify` gives
    one back); the computation is the same either way.
    """

    linear_children = ("down", "up")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 conv1d: bool = False, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.conv1d = in_features, out_features, rank, conv1d
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, U: Tensor, V: Tensor, bias: Tensor | None = None, conv1d: bool = False,
                     dtype: torch.dtype | None = None) -> LowRankLinear:
        """A layer computing x ↦ x (U V)ᵀ + bias; U (m×k), V (k×n)."""
        dtype = dtype or U.dtype
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias is not None, conv1d, dtype, U.device)
        with torch.no_grad():
            layer.down.weight.copy_(V)
            layer.up.weight.copy_(U)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> Tensor:
        """U·V as an (out, in) matrix."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_with_factors(model: nn.Module, name: str, U: Tensor, V: Tensor) -> LowRankLinear:
    """Replace the nn.Linear / Conv1D called ``name`` by a LowRankLinear of U (m×k) and V (k×n)."""
    old = model.get_submodule(name)
    weight = old.weight
    layer = LowRankLinear.from_factors(U.to(weight.device), V.to(weight.device), old.bias,
                                       conv1d=isinstance(old, Conv1D), dtype=weight.dtype)
    model.set_submodule(name, layer)
    return layer


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Module name -> LowRankLinear for every factorized layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in lowrank_modules(model).items()}


def densify(model: nn.Module) -> nn.Module:
    """Replace every LowRankLinear of ``model`` (in place) by a dense layer holding U·V; returns the model."""
    for name, layer in lowrank_modules(model).items():
        W = layer.dense_weight().detach()
        bias = layer.up.bias
        if layer.conv1d:
            dense = Conv1D(layer.out_features, layer.in_features)
            dense.weight = nn.Parameter(W.T.contiguous())
        else:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                              dtype=W.dtype, device=W.device)
            dense.weight = nn.Parameter(W.contiguous())
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().clone())
        elif layer.conv1d:
            dense.bias = None
        model.set_submodule(name, dense)
    return model
