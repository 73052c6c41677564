"""Wanda: prune by weight magnitude times input activation norm, no weight update.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large
Language Models" (arXiv:2306.11695). The importance of weight W_ij is
|W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the norm of input channel j over all
calibration tokens (``llmpress.stats.ColumnNormStats``); weights are compared
within each output row (the paper's per-output comparison group, which it
found much better than per layer for LLMs), or within runs of M inputs for
N:M sparsity. The kept weights are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from torch import Tensor

from ..compressed import Compressed
from ..config import Check, Config
from ..registry import Method, register
from .masks import Pattern, Sparsity, measured_sparsity, resolve_sparsity, select_mask


@dataclass(frozen=True)
class WandaConfig(Config):
    """sparsity: fraction removed in [0, 1) (default 0.5, or 1 − N/M with a pattern);
    pattern: "unstructured" or "N:M" (e.g. "2:4", "4:8"); scope: comparison group of unstructured
    pruning, "row" (the paper's per-output choice) or "layer"; true_sequential: the engine prunes a
    block's linears group by group in forward order, each group's input norms taken with the groups
    before it already pruned (the inputs the layer will really see), instead of all from the dense block."""

    label = "wanda"

    sparsity: Sparsity | None = None
    pattern: Pattern = "unstructured"
    scope: Annotated[Literal["row", "layer"], Check(advice="use 'row' (per output, as in the paper) or 'layer'",
                                                    label="")] = "row"
    true_sequential: bool = False

    def check(self) -> None:
        resolve_sparsity(self.sparsity, self.pattern)


def wanda_scores(weight: Tensor, col_norm: Tensor) -> Tensor:
    """|W| · ‖X_j‖₂: weight (out, in), col_norm (in,) -> scores (out, in), fp32."""
    if col_norm.shape != (weight.shape[1],):
        raise ValueError(f"col_norm must be ({weight.shape[1]},) for a weight {tuple(weight.shape)}, "
                         f"got {tuple(col_norm.shape)}")
    return weight.float().abs() * col_norm.float().to(weight.device).unsqueeze(0)


def wanda(weight: Tensor, col_norm: Tensor, cfg: WandaConfig) -> Compressed:
    """Wanda (arXiv:2306.11695) of one linear layer.

    weight (out, in); col_norm (in,) = ‖X_j‖₂ over the calibration tokens. Returns
    ``Compressed`` with the pruned fp32 weight (out, in) and its keep-mask (bool, (out, in)):
    exactly ``floor(sparsity · in)`` weights removed per row (scope "row"), per layer
    (scope "layer"), or ``M − N`` of every ``M`` consecutive inputs of a row (pattern "N:M").
    """
    sparsity, nm = resolve_sparsity(cfg.sparsity, cfg.pattern)
    mask = select_mask(wanda_scores(weight, col_norm), sparsity, nm, cfg.scope)
    return Compressed(weight=weight.float() * mask, mask=mask, meta={"method": "wanda"},
                      sparsity=measured_sparsity(mask, nm))


register(Method("wanda", WandaConfig, wanda, ("col_norm",), "prune"), recipes={
    "wanda-50": {"stages": [{"method": "wanda", "args": {"sparsity": 0.5}}]},
    "wanda-24": {"stages": [{"method": "wanda", "args": {"pattern": "2:4"}}]},
    "wanda-48": {"stages": [{"method": "wanda", "args": {"pattern": "4:8"}}]},
    "wanda-50-ts": {"stages": [{"method": "wanda", "args": {"sparsity": 0.5, "true_sequential": True}}]},
    "wanda-24-ts": {"stages": [{"method": "wanda", "args": {"pattern": "2:4", "true_sequential": True}}]},
    # OWL's own setting: high sparsity, where uniform ratios break down first
    "wanda-70": {"stages": [{"method": "wanda", "args": {"sparsity": 0.7}}]},
})
