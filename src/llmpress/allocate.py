"""Choose one option per layer to minimise the summed cost under a size budget (multiple-choice knapsack).

This is the allocation step of automatic mixed precision (HAWQ-V2/V3, arXiv:1911.03852 / 2011.10680;
ModelOpt's AutoQuantize; auto-round's AutoScheme): each layer has candidate settings, each with a
predicted cost (the loss increase it causes) and a size in bytes; the costs are taken as additive
across layers. We solve it by the Lagrangian method of Everett (1963), the way the LP relaxation of
the multiple-choice knapsack is solved greedily (Sinha & Zoltners 1979):

1. per layer, keep the options on the lower convex hull of (size, cost) — any other option is
   never the best for any price λ of a byte;
2. start every layer at its smallest option, and take the hull's upgrades in order of cost saved
   per byte, best first, while they fit. Every solution met on the way minimises cost + λ·size for
   some λ, so it is optimal among all solutions no larger than itself;
3. spend what is left of the budget: repeatedly apply the single-layer change (to any option, on
   the hull or not) that saves the most cost and still fits.

The gap to the exact optimum is at most one layer's step on its hull; ``tests/test_auto.py`` checks
the result against exhaustive search. Pure Python on floats: a few hundred layers take milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence


def hull(sizes: Sequence[float], costs: Sequence[float]) -> list[int]:
    """Indices of the options on the lower convex hull of (size, cost), by increasing size and
    strictly decreasing cost; of options with equal size the cheapest (then the first) is kept."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], costs[i], i))
    kept: list[int] = []
    for i in order:
        if kept and (sizes[i] == sizes[kept[-1]] or costs[i] >= costs[kept[-1]]):
            continue  # no smaller cost for more bytes
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]  # drop b if it lies on or above the segment a -> i
            if (costs[b] - costs[a]) * (sizes[i] - sizes[a]) >= (costs[i] - costs[a]) * (sizes[b] - sizes[a]):
                kept.pop()
            else:
                break
        kept.append(i)
    return kept


def allocate(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[float]], budget: float) -> list[int]:
    """One option index per layer minimising ``sum(costs[l][choice[l]])`` with ``sum(sizes[l][choice[l]])
    <= budget`` (costs ≥ 0 need not be; sizes are any non-negative numbers, e.g. bytes).

    Raises ``ValueError`` naming the smallest total when even the smallest options exceed ``budget``.
    """
    if len(costs) != len(sizes) or any(len(c) != len(s) or not c for c, s in zip(costs, sizes)):
        raise ValueError("costs and sizes must give the same, non-empty, options per layer")
    hulls = [hull(s, c) for c, s in zip(costs, sizes)]
    choice = [h[0] for h in hulls]
    used = sum(sizes[layer][i] for layer, i in enumerate(choice))
    if used > budget:
        raise ValueError(f"the smallest options total {used:g}, over the budget of {budget:g}")
    upgrades = []  # (cost saved per unit of size, layer, step along its hull)
    for layer, h in enumerate(hulls):
        c, s = costs[layer], sizes[layer]
        upgrades += [((c[a] - c[b]) / (s[b] - s[a]), layer, k) for k, (a, b) in enumerate(zip(h, h[1:]))]
    upgrades.sort(key=lambda u: -u[0])  # per layer the hull's slopes decrease, so its steps stay in order
    blocked: set[int] = set()  # layers whose next step did not fit: their later steps must wait for it
    for _gain, layer, k in upgrades:
        if layer in blocked:
            continue
        a, b = hulls[layer][k], hulls[layer][k + 1]
        step = sizes[layer][b] - sizes[layer][a]
        if used + step > budget:
            blocked.add(layer)
            continue
        choice[layer], used = b, used + step
    return _fill(costs, sizes, budget, choice, used)


def _fill(costs, sizes, budget: float, choice: list[int], used: float) -> list[int]:
    """Spend the budget left: apply the best-saving single-layer change that fits until none helps."""
    while True:
        best = None
        for layer, current in enumerate(choice):
            for i, (c, s) in enumerate(zip(costs[layer], sizes[layer])):
                saved = costs[layer][current] - c
                if saved > 0 and used - sizes[layer][current] + s <= budget and (best is None or saved > best[0]):
                    best = (saved, layer, i)
        if best is None:
            return choice
        _saved, layer, i = best
        used += sizes[layer][i] - sizes[layer][choice[layer]]
        choice[layer] = i


def total(values: Sequence[Sequence[float]], choice: Sequence[int]) -> float:
    """The sum over layers of the chosen option's value (a cost or a size)."""
    return sum(v[i] for v, i in zip(values, choice))
