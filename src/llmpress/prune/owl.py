"""OWL: non-uniform layer sparsity from outlier ratios, with the same overall budget.

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce
for Pruning LLMs to High Sparsity" (arXiv:2310.05175). A block's outlier
ratio D_l is the fraction of its Wanda scores |W_ij|·‖X_j‖₂ (over all its
linears together) above M times their mean. Blocks with more outliers are
pruned less: with D normalised to [0, 2λ], block l's sparsity is
``target − (D̂_l − mean D̂)``, the mean weighted by parameter count so that
the block ratios average exactly to the target (Wanda then rounds each
row's count down, which leaves up to one weight more per row: 49.92%
measured at 50%). The ratios need every block's statistics before any pruning, so OWL is a "plan" method: one
calibration pass through the dense model measures D_l, and it hands the engine a per-block plan
(Wanda or SparseGPT at each block's own ratio) that the engine executes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn

from ..calib import block_stats
from ..config import Check, Config
from ..errors import LlmpressError
from ..models.archs import Arch, block_linears, linear_weight
from ..registry import BlockPlan, Method, register
from .masks import Sparsity
from .sparsegpt import SparseGPTConfig
from .wanda import WandaConfig, wanda_scores

log = logging.getLogger(__name__)

PRUNERS = ("wanda", "sparsegpt")


@dataclass(frozen=True)
class OWLConfig(Config):
    """sparsity: overall fraction removed; pruner: "wanda" or "sparsegpt" (each block at its own ratio);
    outlier_factor: M, a score is an outlier above M·mean (5 in the paper); max_deviation: λ, block
    sparsities spread over [target − 2λ, target + 2λ] at most, over 2λ in all (0.08 in the paper)."""

    sparsity: Sparsity = 0.5
    pruner: Annotated[str, Check(choices=PRUNERS)] = "wanda"
    outlier_factor: Annotated[float, Check(ge=0, advice="use a non-negative number")] = 5.0
    max_deviation: Annotated[float, Check(ge=0, advice="use a non-negative number")] = 0.08

    def check(self) -> None:
        s = self.sparsity
        if 2 * self.max_deviation > s or s + 2 * self.max_deviation >= 1:
            raise LlmpressError(f"max_deviation={self.max_deviation} could push a block's sparsity out of [0, 1) "
                                f"at sparsity {s}: use less than {min(s, 1 - s) / 2:g}")


def outlier_ratio(scores: list[Tensor], factor: float) -> float:
    """Fraction of all entries of ``scores`` (one tensor per linear of a block) above ``factor`` × their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    return sum(int((s > factor * mean).sum()) for s in scores) / total


def owl_sparsities(ratios: Tensor, params: Tensor, sparsity: float, max_deviation: float) -> Tensor:
    """Per-block sparsity from outlier ratios (L,) and parameter counts (L,): target − (D̂ − mean D̂).

    D̂ = (D − min D)/(max D − min D) · 2λ; the mean is weighted by ``params``, so
    Σ params·result = sparsity · Σ params (up to rounding). Equal ratios give the target everywhere.
    """
    ratios, params = ratios.double(), params.double()
    spread = ratios.max() - ratios.min()
    if spread <= 0:
        return torch.full_like(ratios, sparsity)
    scaled = (ratios - ratios.min()) / spread * (2 * max_deviation)
    return sparsity - (scaled - (scaled * params).sum() / params.sum())


def _block_ratio(block: nn.Module, arch: Arch, stats: dict, factor: float) -> tuple[float, int]:
    """(outlier ratio, parameter count) of ``block`` from its linears' input column norms."""
    modules = block_linears(block, arch)
    scores = [wanda_scores(linear_weight(m, arch).float(), stats[n]["col_norm"]) for n, m in modules.items()]
    return outlier_ratio(scores, factor), sum(s.numel() for s in scores)


def owl(model: nn.Module, arch: Arch, samples: Tensor, cfg: OWLConfig, *, device: torch.device,
        batch_size: int = 8, progress: bool = False) -> BlockPlan:
    """OWL (arXiv:2310.05175) on the whole model: measure every block's outlier ratio on the dense
    model; the plan prunes block l at its own sparsity with ``cfg.pruner`` and records ``owl_sparsity``
    (the block's allotted ratio) and ``owl_outlier_ratio`` in its layers' meta."""
    if samples is None:
        raise LlmpressError("OWL needs calibration samples: give the recipe calibration data")
    ratios, params = [], []
    for _i, block, stats in block_stats(model, arch, samples, ("col_norm",), device, batch_size, progress,
                                         "OWL outlier ratios"):
        ratio, count = _block_ratio(block, arch, stats, cfg.outlier_factor)
        ratios.append(ratio)
        params.append(count)
    per_block = owl_sparsities(torch.tensor(ratios), torch.tensor(params), cfg.sparsity, cfg.max_deviation)
    log.info("OWL outlier ratios %s -> sparsities %s", [round(r, 4) for r in ratios],
             [round(float(s), 4) for s in per_block])
    config = WandaConfig if cfg.pruner == "wanda" else SparseGPTConfig
    return BlockPlan(steps=[[(cfg.pruner, config(sparsity=float(s)))] for s in per_block],
                     meta=[{"owl_sparsity": float(s), "owl_outlier_ratio": r} for s, r in zip(per_block, ratios)],
                     prefix="owl-")


register(Method("owl", OWLConfig, owl, (), "plan", calibrated=True), recipes={
    "owl-wanda-50": {"stages": [{"method": "owl", "args": {"sparsity": 0.5, "pruner": "wanda"}}]},
    "owl-sparsegpt-50": {"stages": [{"method": "owl", "args": {"sparsity": 0.5, "pruner": "sparsegpt"}}]},
    "owl-wanda-70": {"stages": [{"method": "owl", "args": {"sparsity": 0.7, "pruner": "wanda"}}]},
})
