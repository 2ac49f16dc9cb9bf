"""Allocation as a capability a method offers: what a budget needs from a method, and nothing else.

A budget (`compress.budget`) spends one target (params, MACs, latency, ONNX bytes) across layers.
It knows no method by name. A method takes part by subclassing `Allocatable` and answering:

    allocates()                      whether this stage, as the recipe wrote it, leaves its sizes to a
                                     budget (e.g. a rank rule left out, `keep: auto`)
    allocation_choices(model, profile, request)
                                     one `LayerChoice` per unit it can size (a layer, a channel group),
                                     each with its candidates: None (left as it is) and the sizes it
                                     may take (a rank, a kept count); units it cannot size go to
                                     `request.unpriced`
    estimate_errors(choices, request, gradients)
                                     each candidate's predicted damage, in the method's own terms; with
                                     `gradients` (the output gradient's second moment per layer, for
                                     `sensitivity: gradient`) weighted by them to first order
    price_choices(choices, model, profile, request)
                                     each candidate's cost in the target's units: exact params/MACs,
                                     bytes, or measured latency through `request.costs`
    applied(model, choice, size)     a context in which the model has this one unit at this size,
                                     restored afterwards (the budget measures the output's change in
                                     it, to make different layers' errors comparable)
    refine_allocation(allocation)    after the knapsack: make the prediction exact where the additive
                                     cost model is not (shared parameters), re-solving if needed
    take_allocation(sizes, left, rows)
                                     the outcome: the size chosen per unit, the reason per unit left
                                     as it is, the budget's figures per unit for the plan's rows

The budget keeps only what is general: sensitivity scaling by calibration passes, the knapsack,
verification rounds and the outcome. A plug-in method (an entry point in `compress.methods`) takes
part the same way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

from torch import nn

from .base import Method

MAX_CANDIDATES = 24  # sizes per unit a method offers at most (besides leaving it as it is)


@dataclass
class Candidate:
    size: int | None  # None: left as it is; else the rank, or the channels (heads) kept
    cost: float
    error: float  # predicted output error of the size (the method's, scaled to the output by the budget)
    precision: str | None = None  # budget.precision per_layer: "int8" or "float" (None: as the recipe quantizes)
    quant_error: float = 0.0  # int8: the layer's quantization error, in the output's units (compress.precision)
    kept: float = 1.0  # the share of the unit's parameters the size keeps (budget.recovery prices the rest; ranks)

    @property
    def damage(self) -> float:
        """What the knapsack minimizes for this candidate: its size's error plus its precision's."""
        return self.error + self.quant_error


@dataclass
class LayerChoice:
    method: Method
    name: str
    scheme: str  # how the size is read: "channel"/"spatial" (a rank), "channels" (kept count)
    candidates: list[Candidate]
    chosen: int = 0
    energy: float = 0.0  # the unit's error at size 0: its output energy (a bound, for `sensitivity: layer`)
    unit: Any = None  # the method's own data about the unit (e.g. a channel group's slices)
    gradient_weighted: bool = False  # errors already first-order output errors (sensitivity: gradient)

    @property
    def candidate(self) -> Candidate:
        return self.candidates[self.chosen]


@dataclass
class AllocationRequest:
    """What a method needs to offer its candidates: the budget, the calibration batches, what to
    skip, how to price latency and bytes; `unpriced` collects (method, unit) it could not size."""

    budget: Any  # compress.budget.BudgetSection
    batches: Callable
    skip: set[str] = field(default_factory=set)
    costs: Callable | None = None  # (name, layer, rank, scheme, in_shape) -> ms or bytes
    quantized: Callable[[str, nn.Module], bool] = lambda name, layer: False
    unpriced: list = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.budget.target

    @property
    def batch(self) -> int:
        return self.budget.batch or 1


class Allocatable:
    """Mixin for a `Method` that a budget can size (see the module docstring). `allocation_hint`
    completes "leave out ..." in the error a budget gives when no stage is left to allocate."""

    allocation_hint: ClassVar[str] = ""  # "{names}" stands for the methods that share the hint
    left_as: ClassVar[str] = "dense"  # how the plan words a unit the budget left as it is

    def allocates(self) -> bool:
        return False

    def allocation_choices(self, model: nn.Module, profile: dict, request: AllocationRequest) -> list[LayerChoice]:
        raise NotImplementedError

    def estimate_errors(self, choices: list[LayerChoice], request: AllocationRequest, gradients: dict) -> None:
        """Default: the errors were set with the candidates."""

    def wants_gradients(self, choice: LayerChoice) -> bool:
        """Whether this unit's errors take the output-gradient weighting of `sensitivity: gradient`."""
        return False

    def price_choices(self, choices: list[LayerChoice], model: nn.Module, profile: dict,
                      request: AllocationRequest) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self, model: nn.Module, choice: LayerChoice, size: int) -> Iterator[None]:
        raise NotImplementedError
        yield  # pragma: no cover

    def refine_allocation(self, allocation) -> None:
        """Default: the additive prediction is exact."""

    def take_allocation(self, sizes: dict[str, int], left: dict[str, str], rows: dict[str, dict]) -> None:
        raise NotImplementedError


def layer_bytes(layer: nn.Module, params: int, quantized: bool) -> float:
    """Bytes `params` parameters of (a candidate for) `layer` take in the ONNX file: 4 each, or 1
    per weight element where the int8 model quantizes the layer (its bias vector stays float)."""
    if not quantized:
        return 4.0 * params
    bias = (layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features if isinstance(layer, nn.Linear)
            else 0) if getattr(layer, "bias", None) is not None else 0
    return float(4 * bias + (params - bias))


def allocatable(method: Method) -> bool:
    return isinstance(method, Allocatable) and method.allocates()


def take(batches: Callable, samples: int):
    """Whole batches from the start of `batches()` until at least `samples` samples."""
    taken = 0
    for batch in batches():
        if taken >= samples:
            break
        taken += batch[0].shape[0]
        yield batch
