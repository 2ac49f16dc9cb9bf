"""Allocation for a model that will be fine-tuned: what the knapsack minimizes when training follows.

Without training, the least damage on the calibration data is the right objective, and the budget
minimizes it (`budget.py`). With fine-tuning on labels after compression it is not: on the digits
ResNet (`benchmarks/budget.py`, 3 epochs, 6 seeds) the least-damage allocation cut the middle
block's convolutions to ranks 8-16 where uniform ranks keep 19-38, kept 50.8k parameters to
uniform's 69.5k at the same MACs, and ended behind uniform or level after training, although it
started far ahead. Training recovers what the remaining parameters can hold; a layer cut too far
has little left to recover with.

So with `budget.recovery` > 0 each candidate's damage gets a price for the share of its unit it
removes, squared:

    damage + recovery * spread * (1 - kept)**2

`kept` is the share of the unit's parameters the candidate keeps (1 for the unit as it is) and
`spread` the mean over units of the range of their candidates' damage, which puts the price in the
damage's own units (so one strength means the same on any model). Squared, the price grows faster
than the share: taking half of two layers costs less than all of one, so no layer is starved
while others keep most of theirs. Of the forms tried in scratch runs (6 seeds), a linear price on
the removed parameters helped the CNN and did nothing on the Transformer, whose Linear layers cost
MACs in proportion to their parameters (benchmarks/README.md, "Allocation for a model that will
be fine-tuned").

Label-free distillation is the other way round: on all-MiniLM-L6-v2 with 100 steps of cosine
distillation (`benchmarks/realistic.py`, one seed) the least-damage allocation kept 1.2-1.6
points more cosine than the priced one at 1.5x and 2x fewer MACs (both ahead of uniform ranks):
distillation pulls the model back towards the original, and the least-damage start is the
closest. So `recovery: auto` prices only where the recipe fine-tunes on labels.

Ranks only: the group envelope's kept channels are not priced (their allocation was not measured
with it), and they say `kept` 1. Pure arithmetic on the knapsack's options; tested in tests/test_recovery.py.
"""
from __future__ import annotations

from collections.abc import Sequence

Options = list[list[tuple[float, float]]]


def priced(options: Options, kept: Sequence[Sequence[float]], strength: float) -> Options:
    """`options` (per unit, (cost, damage) per candidate) with each damage raised by the price of the
    share of its unit the candidate removes; `kept[u][i]` is the share of unit u's parameters
    candidate i keeps (1 for the unit as it is)."""
    if strength <= 0 or not options:
        return options
    spread = sum(max(d for _, d in unit) - min(d for _, d in unit) for unit in options) / len(options)
    if spread <= 0:
        return options
    return [[(cost, damage + strength * spread * (1.0 - min(max(share, 0.0), 1.0)) ** 2)
             for (cost, damage), share in zip(unit, shares)]
            for unit, shares in zip(options, kept)]
