import itertools
import math
import random

import pytest

from compress.knapsack import discretized, smallest_cost, solve


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
def test_discretized_real_costs_always_fit_and_are_optimal_for_the_rounded_costs(seed):
    rng = random.Random(100 + seed)
    options = random_instance(rng, integral=False)
    budget = rng.uniform(5, 60)
    buckets = 64
    got = discretized(options, budget, buckets) if smallest_cost(options) <= budget else None
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


@pytest.mark.parametrize("seed", range(40))
def test_real_costs_are_solved_exactly(seed):
    """Pareto fronts: the optimum itself for real-valued costs, not the rounded one."""
    rng = random.Random(300 + seed)
    options = random_instance(rng, integral=False)
    budget = rng.uniform(5, 60)
    got, expected = solve(options, budget, buckets=8), brute_force(options, budget)
    if expected is None:
        assert got is None
        return
    assert got.cost <= budget + 1e-9 and got.error == pytest.approx(expected[1]) and got.gap == 0.0


@pytest.mark.parametrize("seed", range(20))
def test_past_the_front_limit_the_gap_bounds_the_distance_to_the_optimum(seed):
    rng = random.Random(500 + seed)
    options = [[(rng.uniform(0, 20), rng.uniform(0, 10)) for _ in range(4)] for _ in range(5)]
    budget = rng.uniform(20, 60)
    got, expected = solve(options, budget, buckets=16, front_limit=2), brute_force(options, budget)
    if expected is None:
        assert got is None
        return
    assert got.cost <= budget + 1e-9
    assert expected[1] - 1e-9 <= got.error <= expected[1] + got.gap + 1e-9


def test_a_realistic_instance_is_exact_and_quick():
    """20 layers x 24 candidates, costs falling with error rising (a budget's shape): exact, and
    the discretized programme's stated gap covers what it gives up."""
    rng = random.Random(7)
    options = []
    for _ in range(20):
        dense = rng.uniform(50, 200)
        item = [(dense, 0.0)] + sorted(((dense * (i / 24), rng.uniform(0.5, 1.5) * (24 - i) ** 2)
                                        for i in range(1, 24)), key=lambda o: o[0])
        options.append(item)
    budget = 0.5 * sum(item[0][0] for item in options)
    got = solve(options, budget)
    assert got.gap == 0.0 and got.cost <= budget
    rounded = solve(options, budget, front_limit=1)  # the discretized programme, for comparison
    assert got.error <= rounded.error and rounded.gap >= rounded.error - got.error - 1e-9
