"""Global rank allocation: choose every layer's rank from its loss curve under one parameter budget.

Rather than cutting every layer by the same ratio, each layer gets the rank that
minimises the sum of the layers' *relative* losses (curve[k] / curve[0], i.e. the
truncation error over ‖WX‖² for SVD-LLM) under a budget on their total parameter count.
A layer of shape (m, n) at rank k costs k·(m+n) parameters; it may also stay dense
(m·n parameters, no loss), which it does when no rank below the break-even
⌊(mn−1)/(m+n)⌋ is worth its price.

Algorithm: a Lagrangian relaxation (each layer independently minimises
loss + λ·params; λ found by bisection so that the total fits the budget), then a greedy
fill of what is left of the budget with the upgrades of best loss decrease per parameter
(one more rank, or back to dense). Along one curve the marginal loss per rank
(σ²_{k+1}) never increases, so this is the knapsack's convex-hull solution plus rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import LlmpressError


def break_even(m: int, n: int) -> int:
    """The largest rank whose factors hold fewer parameters than the dense (m, n) matrix."""
    return (m * n - 1) // (m + n)


def layer_params(shape: tuple[int, int], rank: int | None) -> int:
    """Parameters of an (m, n) weight kept dense (rank None) or factorized at ``rank``."""
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def _options(shape: tuple[int, int], curve: Tensor, min_rank: int) -> tuple[Tensor, Tensor, list[int | None]]:
    """(relative losses, params, ranks) of every choice of one layer; the last choice is dense."""
    m, n = shape
    top = break_even(m, n)
    total = float(curve[0])
    rel = curve.double() / total if total > 0 else torch.zeros_like(curve, dtype=torch.float64)
    ranks: list[int | None] = list(range(min_rank, top + 1))
    losses = torch.cat([rel[min_rank:top + 1], rel.new_zeros(1)])
    params = torch.tensor([k * (m + n) for k in ranks] + [m * n], dtype=torch.float64)
    return losses, params, ranks + [None]


def _choose(options, lam: float) -> list[int]:
    return [int(torch.argmin(losses + lam * params)) for losses, params, _ in options]


def _total(options, picks: list[int]) -> float:
    return sum(float(params[i]) for (_, params, _), i in zip(options, picks))


def allocate_ranks(shapes: list[tuple[int, int]], curves: list[Tensor], budget: int,
                   min_rank: int = 1) -> list[int | None]:
    """Each layer's rank (None = stays dense) so that the total parameters are ≤ ``budget``.

    shapes: (m, n) per layer; curves: the per-rank loss curve of each layer (curve[k] = loss
    at rank k, k = 0..min(m, n), non-increasing; see ``llmpress.lowrank.factorize``); budget:
    the parameter count the layers may hold in total. Minimises Σ curve[k]/curve[0].
    """
    if len(shapes) != len(curves):
        raise ValueError("one curve per shape")
    options = [_options(s, c, min_rank) for s, c in zip(shapes, curves)]
    floor = sum(float(p.min()) for _, p, _ in options)
    if floor > budget:
        raise LlmpressError(f"the parameter budget ({budget:,}) is below what the layers need even at rank {min_rank} "
                            f"({int(floor):,}): keep a larger fraction")
    picks = _choose(options, 0.0)
    if _total(options, picks) > budget:
        lo, hi = 0.0, 1e-12
        while _total(options, _choose(options, hi)) > budget:
            lo, hi = hi, hi * 4
            if hi > 1e6:
                picks = [int(torch.argmin(p)) for _, p, _ in options]
                break
        else:
            for _ in range(60):
                mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
                lo, hi = (mid, hi) if _total(options, _choose(options, mid)) > budget else (lo, mid)
            picks = _choose(options, hi)
    picks = _greedy_fill(options, picks, budget - _total(options, picks))
    return [options[i][2][p] for i, p in enumerate(picks)]


def _greedy_fill(options, picks: list[int], left: float) -> list[int]:
    """Spend the remaining budget on the upgrades with the best loss decrease per parameter."""
    picks = list(picks)
    while True:
        best, best_ratio = None, 0.0
        for i, (losses, params, _) in enumerate(options):
            p = picks[i]
            for q in {p + 1, len(params) - 1}:  # one more rank, or dense
                if q <= p or q >= len(params):
                    continue
                cost = float(params[q] - params[p])
                gain = float(losses[p] - losses[q])
                if cost <= left and gain > 0 and gain / cost > best_ratio:
                    best, best_ratio = (i, q, cost), gain / cost
        if best is None:
            return picks
        i, q, cost = best
        picks[i] = q
        left -= cost
