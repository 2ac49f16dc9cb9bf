"""Allocation for group_envelope (`keep: auto`): per coupled channel group (or attention module),
keep all n channels (heads), or k on a grid (multiples of the stage's round_to; every count for
heads). A candidate's error is what the hard projection to k drops, the n - k smallest channel
norms squared; its cost counts every parameter the group's channels own, consumers included; and
where two pruned groups shrink the same parameter the total is made exact (`exact_envelope`).
"""
from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from torch import nn

from ..errors import RecipeError
from .allocation import MAX_CANDIDATES, Allocatable, AllocationRequest, Candidate, LayerChoice
from .group_envelope_channels import channel_norms, overcounted, scale_channels, slice_costs, unit_costs


class EnvelopeAllocation(Allocatable):
    """The allocation capability of group_envelope: with `keep: auto`, how many channels each group
    keeps is the budget's choice. Channels go only after fine-tuning, so a latency table cannot
    price the stage and the built model cannot be measured before it."""

    allocation_hint: ClassVar[str] = "set keep: auto on a stage of {names}"
    left_as: ClassVar[str] = "whole"
    measurable_before_finetune: ClassVar[bool] = False

    def allocates(self) -> bool:
        return getattr(self.stage, "keep", None) == "auto"

    def allocation_choices(self, model: nn.Module, profile: dict, request: AllocationRequest) -> list[LayerChoice]:
        self.units = unit_costs(model, profile, request.target, request.quantized)  # what one element costs
        out = []
        for root, info in self.channel_groups(model).items():
            n = info.channels
            if root in request.skip or info.reason or n < 2:
                if not info.reason and root not in request.skip:
                    request.unpriced.append((self, root))
                continue
            step = 1 if info.heads or info.depth else self.stage.round_to
            counts = list(range(step, n, step))
            if not counts:
                request.unpriced.append((self, root))
                continue
            if len(counts) > MAX_CANDIDATES:
                stride = -(-len(counts) // MAX_CANDIDATES)
                counts = counts[::-1][::stride][::-1]
            squares = torch.sort(channel_norms(info.slices, n).pow(2)).values  # ascending
            dropped = torch.cumsum(squares, 0)  # dropped[i]: the i + 1 smallest
            candidates = [Candidate(None, 0.0, 0.0)] + [Candidate(k, 0.0, float(dropped[n - k - 1])) for k in counts]
            out.append(LayerChoice(self, root, "channels", candidates, energy=float(dropped[-1]), unit=info))
        return out

    def price_choices(self, choices: list[LayerChoice], model: nn.Module, profile: dict,
                      request: AllocationRequest) -> None:
        for choice in choices:
            for c in choice.candidates:
                c.cost = envelope_cost(choice, c.size, self.units)

    @contextlib.contextmanager
    def applied(self, model: nn.Module, choice: LayerChoice, size: int):
        """All but the group's `size` largest channels zeroed, restored afterwards."""
        slices, n = choice.unit.slices, choice.unit.channels
        saved = {id(s.param): (s.param, s.param.detach().clone()) for s in slices}
        keep = torch.zeros(n, dtype=torch.float64)
        keep[torch.argsort(channel_norms(slices, n), descending=True)[:size]] = 1.0
        scale_channels(slices, keep)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, data in saved.values():
                    param.copy_(data)

    def refine_allocation(self, allocation) -> None:
        exact_envelope(allocation, self.units, lambda choice: isinstance(choice.method, EnvelopeAllocation))

    def take_allocation(self, sizes: dict[str, int], left: dict[str, str], rows: dict[str, dict]) -> None:
        self.stage = self.stage.model_copy(update={"keeps": sizes})
        self.budget_dense, self.budget_rows = left, rows


def envelope_cost(choice: LayerChoice, kept: int | None, units: dict[int, float]) -> float:
    """The group's parameters' cost with `kept` of its n channels (None: all), as if no other group
    shrank (additive; exact_envelope corrects where two groups shrink the same parameter)."""
    fraction = 1.0 if kept is None else kept / choice.unit.channels
    return sum(cost * share * fraction for _, cost, share in slice_costs(choice.unit.slices, units))


def envelope_interaction(groups: list[LayerChoice], units: dict[int, float]) -> float:
    """What the additive prediction misses: a parameter two groups shrink (a conv between two pruned
    groups loses rows and columns) saves 1 - (1 - a)(1 - b), not a + b, of its cost."""
    removed: dict[int, tuple[float, list[float]]] = {}
    for choice in groups:
        kept = choice.candidate.size
        dropped = 0.0 if kept is None else 1 - kept / choice.unit.channels
        for param, cost, share in slice_costs(choice.unit.slices, units):
            removed.setdefault(id(param), (cost, []))[1].append(share * dropped)
    return overcounted(removed)


def exact_envelope(allocation, units: dict[int, float], mine, rounds: int = 10) -> None:
    """Make the prediction exact where pruned groups (the allocation's units for which `mine` holds)
    share parameters; while the exact cost is over the target, add the excess to the pruned groups'
    candidates and solve again (a few rounds)."""
    true_cost = {id(c): c.cost for choice in allocation.layers for c in choice.candidates}
    total = allocation.limit() + allocation.fixed
    groups = [c for c in allocation.layers if mine(c)]

    def exact() -> float:
        chosen = sum(true_cost[id(choice.candidate)] for choice in allocation.layers)
        return allocation.fixed + chosen + envelope_interaction(groups, units)

    def restore() -> None:
        for choice in allocation.layers:
            for c in choice.candidates:
                c.cost = true_cost[id(c)]

    try:  # rounds that do not settle under the objective the allocation chose are tried again under the sum
        for objective in dict.fromkeys([allocation.objective, "sum"]):
            if objective != allocation.objective:
                restore()
                allocation.objective = objective
                allocation.solve()
            for _ in range(rounds):
                cost = exact()
                if cost <= total:
                    allocation.predicted = cost
                    return
                pruned = [c for c in groups if c.candidate.size is not None]
                for choice in pruned:
                    for c in choice.candidates:
                        if c.size is not None:
                            c.cost += (cost - total) / len(pruned)
                allocation.solve()
    finally:
        restore()
    raise RecipeError(f"budget.{allocation.target} {allocation.value:g}: the pruned channel groups share layers, and "
                      f"no allocation found in {rounds} rounds meets the target once that is counted; lower it")
