import itertools
import math
import random

import pytest

from compress.knapsack import smallest_cost, solve


def brute_force(options, budget):
    best = None
    for choice in itertools.product(*[range(len(item)) for item in options]):
        cost = sum(options[i][k][0] for i, k in enumerate(choice))
        error = sum(options[i][k][1] for i, k in enumerate(choice))
        if cost <= budget + 1e-9 and (best is None or error < best[1] - 1e-12):
            best = (choice, error)
    return best


def random_instance(rng, integral):
    options = []
    for _ in range(rng.randint(1, 5)):
        item = []
        for _ in range(rng.randint(1, 4)):
            cost = rng.randint(0, 20) if integral else rng.uniform(0, 20)
            item.append((cost, rng.uniform(0, 10)))
        options.append(item)
    return options


@pytest.mark.parametrize("seed", range(40))
def test_integer_costs_match_brute_force_exactly(seed):
    rng = random.Random(seed)
    options = random_instance(rng, integral=True)
    budget = rng.randint(0, 60)
    expected = brute_force(options, budget)
    got = solve(options, budget)
    if expected is None:
        assert got is None and smallest_cost(options) > budget
        return
    assert got.cost <= budget
    assert got.error == pytest.approx(expected[1])


@pytest.mark.parametrize("seed", range(40))
def test_real_costs_always_fit_and_are_optimal_for_the_rounded_costs(seed):
    rng = random.Random(100 + seed)
    options = random_instance(rng, integral=False)
    budget = rng.uniform(5, 60)
    buckets = 64
    got = solve(options, budget, buckets=buckets)
    expected = brute_force(options, budget)
    if expected is None:
        assert got is None
        return
    assert got.cost <= budget + 1e-9 and got.error >= expected[1] - 1e-9  # feasible, never "better" than optimal
    step = budget / buckets
    rounded = [[(math.ceil(c / step - 1e-9), e) for c, e in item] for item in options]
    exact_rounded = brute_force(rounded, buckets)
    if exact_rounded is not None:  # optimal among the choices that fit after rounding up
        assert got.error == pytest.approx(exact_rounded[1])


def test_one_item_per_choice_and_the_cheapest_when_nothing_else_fits():
    options = [[(10.0, 0.0), (2.0, 5.0)], [(10.0, 0.0), (3.0, 1.0)]]
    assert solve(options, 20).choice == [0, 0]
    assert solve(options, 13).choice == [0, 1]
    assert solve(options, 5).choice == [1, 1]
    assert solve(options, 4.9) is None
    with pytest.raises(ValueError):
        solve([[]], 1)
