"""Magnitude pruning (Han et al. 2015; the baseline of Wanda and SparseGPT).

Zero the weights of smallest |w|, either over the whole layer or within each
output row. Exactly ``floor(sparsity · n)`` weights go in each comparison
group, ties broken by position, so the sparsity is exact. With ``pattern``
"N:M" (e.g. "2:4") the N largest of every M consecutive weights of a row are
kept instead (``llmpress.prune.masks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from ..compressed import Compressed
from ..config import Check, Config
from ..errors import LlmpressError
from ..registry import Method, register
from .masks import Pattern, Sparsity, measured_sparsity, nm_mask, parse_pattern


@dataclass(frozen=True)
class MagnitudeConfig(Config):
    """sparsity: fraction of weights removed, in [0, 1); scope: "layer" or "row";
    pattern: "unstructured" or "N:M" (then sparsity must be 1 − N/M, e.g. 0.5 for "2:4")."""

    sparsity: Sparsity = 0.5
    scope: Annotated[Literal["layer", "row"], Check(advice="use 'layer' or 'row'")] = "layer"
    pattern: Pattern = "unstructured"

    def check(self) -> None:
        s = self.sparsity
        nm = parse_pattern(self.pattern)
        if nm is not None and abs(s - (1 - nm[0] / nm[1])) > 1e-9:
            raise LlmpressError(f"sparsity={s!r} contradicts pattern {self.pattern!r}: set sparsity to "
                                f"{1 - nm[0] / nm[1]:g}")


def prune_lowest(scores: Tensor, sparsity: float, scope: str) -> Tensor:
    """Keep-mask (bool, same shape) removing the lowest-scoring fraction per layer or per row."""
    groups = scores.reshape(1, -1) if scope == "layer" else scores
    k = int(groups.shape[1] * sparsity)
    mask = torch.ones_like(groups, dtype=torch.bool)
    if k:
        order = torch.argsort(groups, dim=1, stable=True)[:, :k]
        mask.scatter_(1, order, False)
    return mask.reshape(scores.shape)


def magnitude(weight: Tensor, cfg: MagnitudeConfig) -> Compressed:
    """Prune ``weight`` (out, in) by |w|; returns the pruned weight and its keep-mask (bool, (out, in))."""
    nm = parse_pattern(cfg.pattern)
    mask = prune_lowest(weight.abs(), cfg.sparsity, cfg.scope) if nm is None else nm_mask(weight.abs(), *nm)
    pruned = weight.float() * mask
    return Compressed(weight=pruned, mask=mask, meta={"method": "magnitude"},
                      sparsity=measured_sparsity(mask, nm))


def magnitude_recipe(sparsity: float, pattern: str = "unstructured") -> dict:
    return {"stages": [{"method": "magnitude", "args": {"sparsity": sparsity, "pattern": pattern}
                        if pattern != "unstructured" else {"sparsity": sparsity}}]}


register(Method("magnitude", MagnitudeConfig, magnitude, (), "prune"), recipes={
    "magnitude-50": magnitude_recipe(0.5),
    "magnitude-30": magnitude_recipe(0.3),
    "magnitude-24": magnitude_recipe(0.5, "2:4"),
    "magnitude-48": magnitude_recipe(0.5, "4:8"),
})
