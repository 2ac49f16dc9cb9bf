"""Multiple-choice knapsack: one option per item, least total error within a cost budget.

Pure math (numpy only), tested against brute force. `budget.py` uses it to pick one candidate
(dense, or a rank) per layer.

Exact dynamic programming over a discretized cost axis: with `buckets` steps of `budget / buckets`,
every option's cost is rounded *up* to whole steps, so a returned choice always fits the real
budget; it is optimal for the rounded costs, which can differ from the real optimum only by what
one step per item buys. Integer costs with `budget <= buckets` are not rounded at all (exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Solution:
    choice: list[int]  # per item, the index of the option taken
    cost: float  # the real (unrounded) total cost
    error: float


def smallest_cost(options: list[list[tuple[float, float]]]) -> float:
    """The cheapest reachable total: every item at its cheapest option."""
    return float(sum(min(c for c, _ in item) for item in options))


def solve(options: list[list[tuple[float, float]]], budget: float, buckets: int = 4096) -> Solution | None:
    """The least-error choice of one (cost, error) option per item with total cost <= `budget`;
    None when even the cheapest options do not fit."""
    if not options:
        return Solution([], 0.0, 0.0)
    if any(not item for item in options):
        raise ValueError("every item needs at least one option")
    if smallest_cost(options) > budget:
        return None
    integral = all(float(c).is_integer() for item in options for c, _ in item) and budget <= buckets
    step = 1.0 if integral else budget / buckets
    size = int(math.floor(budget / step + 1e-9)) + 1
    inf = np.inf
    best = np.full(size, inf)  # best[c]: least error of the items so far at rounded cost exactly c
    best[0] = 0.0
    picks = []  # per item, the option taken at each total
    for item in options:
        new = np.full(size, inf)
        pick = np.full(size, -1, dtype=np.int64)
        for index, (cost, error) in enumerate(item):
            units = max(0, int(math.ceil(cost / step - 1e-9)))
            if units >= size:
                continue
            shifted = np.full(size, inf)
            shifted[units:] = best[: size - units] + error
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = index
        best = new
        picks.append(pick)
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):  # fits only unrounded: the cheapest option of every item
        choice = [min(range(len(item)), key=lambda k, item=item: item[k][0]) for item in options]
        return _solution(options, choice)
    choice = []
    for item, pick in zip(reversed(options), reversed(picks)):
        index = int(pick[end])
        choice.append(index)
        end -= max(0, int(math.ceil(item[index][0] / step - 1e-9)))
    choice.reverse()
    return _solution(options, choice)


def _solution(options, choice: list[int]) -> Solution:
    return Solution(choice, float(sum(options[i][k][0] for i, k in enumerate(choice))),
                    float(sum(options[i][k][1] for i, k in enumerate(choice))))
