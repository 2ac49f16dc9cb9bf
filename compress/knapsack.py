"""Multiple-choice knapsack: one option per item, least total error within a cost budget.

Pure math (numpy only), tested against brute force. `budget.py` uses it to pick one candidate
(dense, or a rank) per layer.

Exact first: a dynamic programme over the Pareto front of (cost, error) totals, item by item,
dropping every total that another beats on both; exact for real-valued costs, and fast while the
front stays small (it does on the layer instances a budget makes: tens of thousands of points at
most). When a front would exceed `front_limit` points the solver falls back to a dynamic
programme over a discretized cost axis: with `buckets` steps of `budget / buckets`, every option's
cost is rounded *up* to whole steps, so a returned choice always fits the real budget. Its distance
from the real optimum is bounded by solving again with costs rounded *down* (a relaxation: every
choice that fits the real budget fits it too, so its least error is at most the optimum's); the
difference of the two is `Solution.gap` (0 when exact). Integer costs with `budget <= buckets` are
not rounded at all (exact).
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
    gap: float = 0.0  # at most this much more error than the optimum (0: exact)


def smallest_cost(options: list[list[tuple[float, float]]]) -> float:
    """The cheapest reachable total: every item at its cheapest option."""
    return float(sum(min(c for c, _ in item) for item in options))


def solve(options: list[list[tuple[float, float]]], budget: float, buckets: int = 4096,
          front_limit: int = 20_000) -> Solution | None:
    """The least-error choice of one (cost, error) option per item with total cost <= `budget`;
    None when even the cheapest options do not fit. Exact (Pareto fronts) while a front stays
    within `front_limit` points, else discretized with its gap to the optimum bounded."""
    if not options:
        return Solution([], 0.0, 0.0)
    if any(not item for item in options):
        raise ValueError("every item needs at least one option")
    if smallest_cost(options) > budget:
        return None
    exact = pareto(options, budget, front_limit)
    if exact is not None:
        return exact
    rounded = discretized(options, budget, buckets)
    relaxed = discretized(options, budget, buckets, down=True)
    gap = max(0.0, rounded.error - relaxed.error) if relaxed is not None else float("inf")
    return Solution(rounded.choice, rounded.cost, rounded.error, gap)


def minimax(options: list[list[tuple[float, float]]], budget: float) -> Solution | None:
    """The choice whose largest single error is least within the budget (AIMET's greedy rule: one
    threshold on every item's error, each item at its cheapest option under it), then, among the
    options under that threshold, the least total error (the leftover budget is not wasted).
    None when even the cheapest options do not fit."""
    if not options:
        return Solution([], 0.0, 0.0)
    if smallest_cost(options) > budget:
        return None
    levels = sorted({e for item in options for _, e in item})

    def cheapest(threshold: float) -> float:
        return sum(min(c for c, e in item if e <= threshold) if any(e <= threshold for _, e in item) else np.inf
                   for item in options)

    low, high = 0, len(levels) - 1  # the cheapest options' largest error fits by the check above
    while low < high:
        mid = (low + high) // 2
        if cheapest(levels[mid]) <= budget:
            high = mid
        else:
            low = mid + 1
    threshold = levels[low]
    allowed = [[k for k, (_, e) in enumerate(item) if e <= threshold] for item in options]
    under = solve([[item[k] for k in keep] for item, keep in zip(options, allowed)], budget)
    return solution_of(options, [keep[k] for keep, k in zip(allowed, under.choice)])


def pareto(options: list[list[tuple[float, float]]], budget: float, front_limit: int) -> Solution | None:
    """The exact optimum by Pareto fronts, or None when a front would exceed `front_limit` points."""
    cost, error = np.zeros(1), np.zeros(1)
    parents, picks = [], []
    for item in options:
        c = np.array([o[0] for o in item], dtype=np.float64)
        e = np.array([o[1] for o in item], dtype=np.float64)
        total_c = (cost[:, None] + c[None, :]).ravel()
        total_e = (error[:, None] + e[None, :]).ravel()
        keep = np.flatnonzero(total_c <= budget + 1e-12 * abs(budget))
        order = keep[np.lexsort((total_e[keep], total_c[keep]))]  # by cost, then error
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], total_e[order]]))[:-1]
        front = order[total_e[order] < best_before]  # each point beats every cheaper one on error
        if front.size > front_limit:
            return None
        cost, error = total_c[front], total_e[front]
        parents.append(front // len(item))
        picks.append(front % len(item))
    end = int(np.argmin(error))
    choice = []
    for parent, pick in zip(reversed(parents), reversed(picks)):
        choice.append(int(pick[end]))
        end = int(parent[end])
    choice.reverse()
    return solution_of(options, choice)


def discretized(options: list[list[tuple[float, float]]], budget: float, buckets: int,
                down: bool = False) -> Solution | None:
    """The dynamic programme on a cost axis of `buckets` steps, costs rounded up (a choice that fits
    the budget) or, with `down`, rounded down (a relaxation: its error is a lower bound)."""
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
            units = max(0, int(math.floor(cost / step + 1e-9)) if down else int(math.ceil(cost / step - 1e-9)))
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
        return None if down else solution_of(options, choice)
    choice = []
    for item, pick in zip(reversed(options), reversed(picks)):
        index = int(pick[end])
        choice.append(index)
        cost = item[index][0]
        end -= max(0, int(math.floor(cost / step + 1e-9)) if down else int(math.ceil(cost / step - 1e-9)))
    choice.reverse()
    return solution_of(options, choice)


def solution_of(options, choice: list[int]) -> Solution:
    """The Solution that takes `choice` (an option index per item), with its real cost and error."""
    return Solution(choice, float(sum(options[i][k][0] for i, k in enumerate(choice))),
                    float(sum(options[i][k][1] for i, k in enumerate(choice))))
