"""`budget:` -- the user states what they pay for; the tool spends it across layers.

A recipe with a `budget:` section (one target: `speedup`, `latency_ms`, `params`, `macs` or
`onnx_bytes`) lets every stage that leaves its sizes open be *allocated*: each unit it offers (a
layer, a channel group) gets one candidate -- left as it is, or a size from the method's grid -- so
that the model meets the target with the least predicted damage. Which stages take part, what
their candidates are, what each costs and what it is predicted to lose is the method's own
business (`compress.methods.allocation`: the factorizing methods' ranks in
`methods/rank_allocation.py`, kept channels in `methods/group_envelope_allocation.py`, a plug-in's
in its own package). Stages with explicit sizes stay as they are and count toward the target.

Cost of a candidate: params and MACs exactly (layers.factorized_cost); latency measured alone in
ONNX Runtime at the layer's real input shape at `budget.batch` (opcost.py, cached on disk); ONNX
bytes as a layer's parameters at 4 bytes each, or 1 per weight element where the int8 model
quantizes the layer. Latency and bytes are additive: the original's whole-model figure minus what
each changed layer saves. What that misses (a factorized layer is two ops, each with its own fixed
overhead; fusions; initializer and scale bytes) is checked: after the model is built, before
fine-tuning, it is exported and measured beside the original; when the measurement is more than
5 % (bytes: 1 %) off the prediction and its 95 % interval does not hold the prediction either, the
miss is spread over the factorized layers as a per-op overhead and the allocation is redone
(`budget.rounds`). When the recipe quantizes, every cost is the int8 model's (the original's
latency and size as ONNX Runtime's quantization of it would ship; each op measured quantized when
the recipe's settings quantize it), while the ratio stays against the float original, as in the
report.

Each method predicts its candidates' errors in its own terms (see its allocation file).
Errors of different units are made comparable by how much each moves the model's output
(`sensitivity: output`, the default): one calibration pass per unit with only that unit at a
probe size measures E||f(x) - f_l(x)||^2, and the layer's curve is scaled to it.
`sensitivity: gradient` weights each error by the second moment of the output's gradient at the
layer instead (first order, one backward pass per batch for all layers); `sensitivity: layer`
scales each curve by the layer's own output energy (relative error, no extra passes).

Solver: multiple-choice knapsack (knapsack.py), least total predicted output error within the
budget: exact (Pareto fronts) on the instances budgets make, else on a discretized cost axis with
a stated bound on its distance from the optimum (the outcome's `solver_gap`). Its choice under
several objectives is checked on the model (Allocation._best_objective), then refined there by a
swap search (Allocation._swap_search, `search`): the units' errors are measured one at a time and
do not add up when several layers are truncated together.

A quality floor (`min_agreement`) makes the target the most the budget may reach: the allocated
units' cost limit is bisected until the chosen allocation keeps the floor's agreement with the
original on the probe samples (Allocation.meet_agreement).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from .bench import MAX_SEQ_LEN, shape_key
from .errors import RecipeError
from .knapsack import minimax, smallest_cost, solution_of, solve
from .methods import METHODS
from .methods.allocation import MAX_CANDIDATES, AllocationRequest, LayerChoice, allocatable, layer_bytes, take
from .methods.base import Decision, Method
from .precision import add_float_twins, float_layers, measure_quantization_errors, simulated_int8
from .recovery import priced
from .report import BudgetOutcome
from .schema import Strict

__all__ = ["Allocation", "BudgetSection", "allocated", "layer_bytes"]  # layer_bytes: for the pipeline's fixed savings

TARGETS = ("speedup", "latency_ms", "params", "macs", "onnx_bytes")
# what the allocation minimizes, each checked on the model's output (Allocation._best_objective):
# the sum of the units' errors, of their squares, of their 4th powers, and the largest one
OBJECTIVES = (("sum", 1), ("sum of squares", 2), ("sum of 4th powers", 4), ("largest", float("inf")))
OBJECTIVE_KEYS = {"sum": "sum", "squares": "sum of squares", "fourth": "sum of 4th powers", "largest": "largest"}
TOLERANCE = {"speedup": 0.05, "latency_ms": 0.05,  # a latency within 5 % of the prediction needs no other round
             "onnx_bytes": 0.01, "params": 0.0, "macs": 0.0}  # a size is no noisier than its estimate
SEARCH_MEASURE = "metric"  # what the swap search lowers: the divergence the metric follows
SEARCH_PASSES = 160  # swap search passes by default ...
MIN_SEARCH_PASSES = 8  # ... fewer, down to this, where they would run more than
SEARCH_MACS = 1e12  # this many MACs; each solve searches, and all of them together at most
SEARCH_SOLVES = 2  # this many times the passes (a verification round's solve starts from a new choice)
AGREEMENT_STEPS = 8  # min_agreement: bisection steps on the cost limit (1/256 of the range at the end)
AUTO_PROBES = 3  # probes per layer by default ...
PROBE_PASSES = 120  # ... unless that makes more calibration passes than this (102 layers: 1 probe each)
AUTO_PROBE_SAMPLES = 256  # samples each probe pass runs by default ...
MIN_PROBE_SAMPLES = 64  # ... fewer, down to this, where the passes together would run more than
PROBE_MACS = 4e12  # this many MACs (MiniLM: 3 probes x 36 layers on 64 samples; benchmarks/planning.py)
RECOVERY = 1.0  # budget.recovery when the recipe fine-tunes on labels (compress/recovery.py; benchmarks/budget.py)


class BudgetSection(Strict):
    """What the compressed model may cost: exactly one target."""

    speedup: float | None = Field(None, gt=0, le=1000, description="ORT p50 latency ratio original/compressed at "
                                  "`batch`: above 1 over the original; over int8_original, 1 asks for int8's speed")
    latency_ms: float | None = Field(None, gt=0, description="ORT p50 latency of the compressed model at `batch`")
    params: float | None = Field(None, gt=1, description="parameter ratio original/compressed (2: half the parameters)")
    macs: float | None = Field(None, gt=1, description="MAC ratio original/compressed per sample")
    onnx_bytes: float | None = Field(None, gt=1, description="file size ratio of the original's ONNX to the shipped "
                                     "model.onnx (int8 when the recipe quantizes)")
    batch: int | None = Field(None, gt=0, le=1 << 20, description="batch size of the latency targets (default: the largest "
                              "bench.batch_sizes)")
    seq_len: int | None = Field(None, gt=0, le=MAX_SEQ_LEN, description="sequence length of the latency targets for "
                                "tokenized text (one of bench.seq_lens; default: the longest of them)")
    over: Literal["original", "int8_original"] = Field(
        "original", description="speedup targets: over the float original, or over int8 of the original (the "
        "recipe's quantize settings, dynamic without them), measured at `batch` when planning: `speedup: 1.3, "
        "over: int8_original` asks for a model 30 % faster than the one-line int8 alternative")
    precision: Literal["recipe", "per_layer"] = Field(
        "recipe", description="recipe = every layer the quantize: settings match is int8; per_layer = each "
        "allocated layer they match is offered in int8 and in float, at every size, and the budget picks (layers "
        "kept float are excluded from quantization; the plan says each layer's precision). Needs a quantize: "
        "section and a speedup, latency_ms or onnx_bytes target")
    rounds: int = Field(3, ge=1, le=10, description="latency targets: allocations at most, each checked by "
                        "measuring the whole model before fine-tuning")
    probes: int | Literal["auto"] = Field(
        "auto", description="sensitivity: output: ranks per layer at which the model's output error is measured "
        "(spread over the layer's candidates; the others are interpolated): one calibration pass each; auto = "
        f"{AUTO_PROBES} per layer, fewer when that would pass more than {PROBE_PASSES} times in all (at least 1)")
    probe_samples: int | Literal["auto"] = Field(
        "auto", description="calibration samples each probe pass runs (whole batches, at least this many); auto = "
        f"{AUTO_PROBE_SAMPLES}, fewer (down to {MIN_PROBE_SAMPLES}) when the probe passes would run more than "
        f"{PROBE_MACS:.0e} MACs in all (a 6-layer encoder of width 384: about 64)")
    measure: Literal["metric", "mse"] = Field(
        "mse", description="what a probe pass measures of the model's output against the original's: metric = the "
        "divergence the metric follows (KL of the class distributions for logits and probabilities, 1 - cosine "
        "for embeddings); mse = the squared error of the raw outputs")
    objective: Literal["auto", "sum", "squares", "fourth", "largest"] = Field(
        "auto", description="what the knapsack minimizes over the units' errors: their sum, the sum of their "
        "squares or 4th powers, or the largest (AIMET's threshold rule); auto = each one's choice applied to the "
        "model and its output error measured on the probe samples, the least kept")
    min_agreement: float | None = Field(
        None, gt=0, le=1, description="the least agreement with the original the allocation may leave on the probe "
        "samples (top-1 for class outputs, mean cosine for embeddings): the target becomes the most the budget may "
        "reach, lowered by bisection (each step checked on the model) until the allocation keeps this agreement; "
        "the model is checked in float (a recipe-wide quantize: section is not in the check)")
    search: int | Literal["auto"] = Field(
        "auto", description="whole-model passes on the probe samples that refine the knapsack's choice by swaps (one "
        "unit a size up, paid for by another's smaller size), each kept when it lowers the divergence the metric "
        f"follows; 0 = none; auto = up to {SEARCH_PASSES}, fewer (down to {MIN_SEARCH_PASSES}) when they would run "
        f"more than {SEARCH_MACS:.0e} MACs")
    recovery: float | Literal["auto"] = Field(
        "auto", description="with fine-tuning after compression: the price of the share of a layer a candidate "
        "removes (squared, in units of the candidates' damage; compress/recovery.py), so that no layer is cut "
        f"far below the others and training has something to recover with; 0 = least damage only; auto = "
        f"{RECOVERY:g} when the recipe fine-tunes on labels (and no swap search unless `search` is set: it climbs "
        "the damage before training), else 0 (label-free distillation recovers best from the least damage)")
    sensitivity: Literal["output", "gradient", "layer"] = Field(
        "output", description="how layer errors are made comparable: output = scaled by calibration passes that "
        "measure the model's output error with the layer truncated (`probes` per layer); gradient = weighted by "
        "the output's gradients at the layer (first order, one backward pass per batch for all layers); layer = "
        "relative to the layer's own output energy")

    @model_validator(mode="after")
    def _probe_range(self):
        if self.probes != "auto" and not 1 <= self.probes <= MAX_CANDIDATES:
            raise ValueError(f"probes must be auto or between 1 and {MAX_CANDIDATES}")
        if self.probe_samples != "auto" and not 1 <= self.probe_samples <= 65536:
            raise ValueError("probe_samples must be auto or between 1 and 65536")
        if self.search != "auto" and not 0 <= self.search <= 1000:
            raise ValueError("search must be auto or between 0 and 1000")
        if self.recovery != "auto" and not 0 <= self.recovery <= 100:
            raise ValueError("recovery must be auto or between 0 and 100")
        return self

    @model_validator(mode="after")
    def _one_target(self):
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(TARGETS)}"
                             + (f", not {' and '.join(given)}" if given else ""))
        return self

    @model_validator(mode="after")
    def _precision(self):
        if self.precision == "per_layer":
            if not self.verified:
                raise ValueError(f"precision: per_layer needs a speedup, latency_ms or onnx_bytes target (int8 does not "
                                 f"change {self.target})")
            if self.sensitivity == "layer":
                raise ValueError("precision: per_layer needs sensitivity output or gradient (a layer's int8 error is "
                                 "measured on the model's output)")
        return self

    @model_validator(mode="after")
    def _over(self):
        if self.over != "original" and self.speedup is None:
            raise ValueError(f"over: {self.over} applies to a speedup target only")
        if self.over == "original" and self.speedup is not None and self.speedup <= 1:
            raise ValueError(f"speedup {self.speedup:g} over the original asks for no speedup; give more than 1 (or "
                             "over: int8_original, where 1 means as fast as int8 of the original)")
        return self

    @property
    def target(self) -> str:
        return next(k for k in TARGETS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.target)

    @property
    def shape(self) -> str:
        """The benchmark shape the latency targets are measured at, keyed as the report keys it."""
        return shape_key(self.batch or 1, self.seq_len)

    @property
    def in_latency(self) -> bool:
        return self.target in ("speedup", "latency_ms")

    @property
    def verified(self) -> bool:
        """Whether the built model is measured, and the allocation corrected, before fine-tuning
        (the targets whose per-layer costs are estimates: latency and file size)."""
        return self.target in ("speedup", "latency_ms", "onnx_bytes")


def allocated(method: Method) -> bool:
    """Whether a budget allocates this stage (the method offers allocation, and the stage leaves
    its sizes to the budget)."""
    return allocatable(method)


def _hints() -> str:
    """How to give a budget something to allocate, from the registered methods' own hints."""
    by_hint: dict[str, list[str]] = {}
    for name, cls in METHODS.items():
        if getattr(cls, "allocation_hint", ""):
            by_hint.setdefault(cls.allocation_hint, []).append(name)
    return "; or ".join(hint.format(names=" or ".join(", ".join(names).rsplit(", ", 1)))
                        for hint, names in by_hint.items())


def check(budget: BudgetSection, methods: list[Method]) -> None:
    """Recipe-level checks: something to allocate, and nothing a latency table cannot price."""
    if not any(allocated(m) for m in methods):
        raise RecipeError(f"budget: no stage to allocate; {_hints()}")
    if budget.in_latency:
        for m in methods:
            if not getattr(m, "latency_priced", False):
                raise RecipeError(f"budget.{budget.target}: stages[{m.stage_index}] ({m.name}) changes the model in a "
                                  "way the latency table cannot price; use a params, macs or onnx_bytes budget with it")


@dataclass
class Allocation:
    """The budget's outcome, for the plan and the report."""

    target: str
    value: float
    batch: int | None
    layers: list[LayerChoice]
    fixed: float  # the cost of everything not allocated
    reference: float  # the original's cost (params, MACs or ms)
    predicted: float  # the compressed model's predicted cost
    unpriced: list = field(default_factory=list)  # (method, layer): no candidate saves anything, stays dense
    rounds: int = 1
    measured: float | None = None
    newly_measured: int | None = None
    history: list[dict] = field(default_factory=list)
    seq_len: int | None = None  # latency targets on tokenized text: the length they are measured at
    stated: dict | None = None  # a target stated over another model ({"over", "speedup"}); `value` is it over the original
    # how the units' errors are made comparable (the costly probing), run by the first solve that must
    # shrink something: a target the dense model (with the fixed part, e.g. int8) meets needs none
    scale_errors: Callable[[], tuple[int, int]] | None = field(default=None, repr=False)
    solver_gap: float = 0.0  # the knapsack's bound on its distance from the optimum (0: exact)
    probe_passes: int = 0  # what scaling the errors ran: whole-model passes, each on this many samples
    probe_samples: int = 0
    # the model's output error on the probe samples with some units at given sizes: each objective's
    # choice is checked on it and the best kept (None: the first objective's choice, unchecked)
    probe: "OutputProbe | None" = field(default=None, repr=False)
    objective: str | None = None  # the objective whose choice was kept
    every_int8: bool | None = None  # precision per layer: whether the kept choice was made with every layer int8
    evaluations: int = 0  # whole-model passes spent checking the objectives' choices
    # whole-model passes the swap search may spend per solve (0: the objectives' choice stands), asked
    # for when the search starts (auto: what the probe samples allow)
    search: int | Callable[[], int] = 0
    searched: int = 0  # whole-model passes it spent, in all solves
    min_agreement: float | None = None  # the floor on the probe samples' agreement with the original ...
    agreement: float | None = None  # ... what the kept choice measured there ...
    asked: float | None = None  # ... and the target as asked (`value` is then what the floor allowed)
    swaps: int = 0  # swaps it kept, in all solves
    recovery: float = 0.0  # the price of the share of a layer removed (budget.recovery as resolved; 0: least damage)

    @property
    def per_layer_precision(self) -> bool:
        """Whether precision is a choice here (budget.precision per_layer offered some unit in float)."""
        return any(c.precision == "float" for choice in self.layers for c in choice.candidates)

    @property
    def kept_objective(self) -> str | None:
        """The objective whose choice was kept, as the plan and the report say it."""
        return f"{self.objective}, every layer int8" if self.every_int8 else self.objective

    def ratio(self, cost: float) -> float:
        return self.reference / cost if cost > 0 else float("inf")

    def limit(self) -> float:
        """The most the allocated units may cost together."""
        total = self.value if self.target == "latency_ms" else self.reference / self.value
        return total - self.fixed + 1e-9 * abs(total)  # a target exactly at the dense cost is met by it

    def solve(self) -> None:
        """Pick one candidate per unit: least predicted error within the target. A target out of
        reach is said before the errors are scaled; one the dense model meets needs no scaling
        (unless precision is a choice: whether a float layer is worth its cost needs the int8 errors)."""
        options = self._options()
        solution = solve(options, self.limit())
        shrinks = solution is not None and (self.per_layer_precision or any(i != 0 for i in solution.choice))
        if shrinks and self.scale_errors is not None:
            scale, self.scale_errors = self.scale_errors, None
            self.probe_passes, self.probe_samples = scale()
            options = self._options()
            solution = solve(options, self.limit())
        if shrinks and solution is not None and self.probe is not None:
            solution, error = self._best_objective(options, solution)
            if callable(self.search):
                self.search = self.search()
            passes = min(self.search, SEARCH_SOLVES * self.search - self.searched)  # later solves: what is left
            if passes > 0:
                solution = self._swap_search(options, solution, error, passes)
        if solution is None:
            best = self.fixed + smallest_cost(options)
            reach = f"{best:.4g} ms" if self.target == "latency_ms" else f"{self.ratio(best):.3g}x"
            asked = (f"{self.stated[self.target]:g} over {self.stated['over']} ({self.value:.3g}x over the original)"
                     if self.stated else f"{self.value:g}")
            raise RecipeError(f"budget.{self.target} {asked} cannot be met even with every allocated "
                              f"layer at its smallest candidate; the best reachable is {reach}"
                              + (" over the original" if self.stated else ""))
        for choice, index in zip(self.layers, solution.choice):
            choice.chosen = index
        self.predicted = self.fixed + solution.cost
        self.solver_gap = solution.gap

    def _options(self) -> list[list[tuple[float, float]]]:
        options = [[(c.cost, c.damage) for c in choice.candidates] for choice in self.layers]
        return priced(options, [[c.kept for c in choice.candidates] for choice in self.layers], self.recovery)

    def meet_agreement(self) -> None:
        """Solve for the least cost whose choice keeps `min_agreement` on the probe samples, at most the
        target asked (or the least reachable where that is out of reach). Bisection on the allocated
        units' cost limit, AGREEMENT_STEPS steps, one probe pass each (the objective is chosen by the
        first; the swap search runs once, at the end, and is dropped if it costs agreement)."""
        floor = self.min_agreement
        self.probe.error([], "agreement")  # a model whose outputs have no agreement is refused before probing
        options = self._options()
        asked = self.limit()
        low = max(asked, smallest_cost(options))
        high = sum(max(c for c, _ in item) for item in options)  # every unit at its largest candidate
        self.asked, search, self.search = self.value, self.search, 0
        try:
            if self._agreement_within(low) >= floor:
                high = low
            elif (reached := self._agreement_within(high)) < floor:
                raise RecipeError(f"budget.min_agreement {floor:g}: even with every allocated layer at its largest "
                                  f"candidate the probe samples agree {reached:.4g} with the original; lower it")
            else:
                for _ in range(AGREEMENT_STEPS):
                    middle = (low + high) / 2
                    if self._agreement_within(middle) >= floor:
                        high = middle
                    else:
                        low = middle
        finally:
            self.search = search
        kept = self._agreement_within(high)
        if kept < floor:  # the search lowered the divergence, not the agreement: without it the floor held
            self.search = 0
            kept = self._agreement_within(high)
        self.agreement = kept
        if high == asked:  # the target as asked, not as its limit reads back
            self.value = self.asked

    def _agreement_within(self, limit: float) -> float:
        """The choice solved within `limit` (the allocated units' cost), and its agreement measured."""
        total = limit + self.fixed
        self.value = total if self.target == "latency_ms" else self.reference / total
        self.solve()
        self.evaluations += 1
        return 1.0 - self._measure([u.chosen for u in self.layers], "agreement")

    def _best_objective(self, options, summed):
        """The least total error is one way to spread the damage; the least largest error (AIMET's
        threshold) and the sums of squared or 4th powers are others. Each objective's choice is
        applied to the model and its output error measured on the probe samples (one pass each);
        the least wins (`benchmarks/budget.py --only quality`: the digits ResNet at 2.43x fewer MACs
        kept 0.9361 test accuracy by default, 0.9000 with the sum alone). With precision per layer
        each objective also chooses with every layer int8 (the recipe's precision), checked beside
        the rest: the int8 errors, measured one layer at a time, can favour float layers paid for
        by factorizations whose errors compound (all-MiniLM-L6-v2 at 5 % over int8 of the original:
        cosine 0.8444 per layer against 0.8739 with every layer int8, before this check)."""
        top = max((e for item in options for _, e in item), default=0.0) or 1.0
        limit = self.limit()
        found = {}
        # chosen once: a later solve (a verification round, shared groups counted exactly) keeps the
        # objective (and whether every layer stays int8), so its rounds move one way
        for every_int8 in ([False, True] if self.per_layer_precision and self.every_int8 is None
                           else [bool(self.every_int8)]):
            opts = self._int8_only(options, limit) if every_int8 else options
            for name, power in [o for o in OBJECTIVES if self.objective in (None, o[0])]:
                if power == 1:
                    solution = solve(opts, limit) if every_int8 else summed
                elif power == float("inf"):
                    solution = minimax(opts, limit)
                else:
                    solution = solve([[(c, (e / top) ** power) for c, e in item] for item in opts], limit)
                if solution is not None:
                    found.setdefault(tuple(solution.choice), (name, every_int8, solution))
        if self.objective is not None:
            name, _, best = next(iter(found.values()), (self.objective, False, summed))
            return (solution_of(options, best.choice) if best is not summed else summed), None
        scored = []
        for choice, (name, every_int8, solution) in found.items():
            scored.append((self._measure(choice), name, every_int8, solution))
            self.evaluations += 1
        error, self.objective, self.every_int8, best = min(scored, key=lambda item: item[0])
        return (solution_of(options, best.choice) if best is not summed else summed), error

    def _measure(self, choice, measure: str | None = None) -> float:
        """The model's output error on the probe samples with every unit at its candidate in `choice`."""
        changed = [(unit, unit.candidates[i].size, unit.candidates[i].precision == "int8")
                   for unit, i in zip(self.layers, choice)
                   if unit.candidates[i].size is not None or unit.candidates[i].precision == "int8"]
        return self.probe.error(changed, measure)

    def _swap_search(self, options, solution, error: float | None, passes: int):
        """Refine the knapsack's choice on the model itself: the predicted errors are measured one
        unit at a time and summed, which misses how units compound. A swap gives one unit its next
        larger candidate and pays for it with the least predicted loss elsewhere (another unit's
        smaller candidate, or room left under the target); swaps are measured on the probe samples
        in order of their predicted cost (the closest calls first) and the first that lowers the
        model's measured output error (in the metric's divergence) is kept, until no swap lowers it or
        `passes` passes are spent."""
        limit = self.limit()
        fronts = [_front(item) for item in options]
        current = list(solution.choice)
        if error is None or self.probe.measure != SEARCH_MEASURE:
            error = self._measure(current, SEARCH_MEASURE)
            self.searched += 1
        seen = {tuple(current)}
        spent = 0
        while spent < passes:
            moves = []
            free = limit - sum(options[i][k][0] for i, k in enumerate(current))
            for i, k in enumerate(current):
                ci, ei = options[i][k]
                for up in fronts[i]:  # the next candidate with less predicted error, at more cost
                    if options[i][up][1] < ei and options[i][up][0] > ci:
                        break
                else:
                    continue
                extra = options[i][up][0] - ci
                if extra <= free:
                    moves.append((options[i][up][1] - ei, {i: up}))
                    continue
                for j, kj in enumerate(current):
                    if j == i:
                        continue
                    cj, ej = options[j][kj]
                    down = [d for d in fronts[j] if cj - options[j][d][0] >= extra - free]
                    if down:  # the smallest saving that pays is the least loss on a Pareto front
                        d = max(down, key=lambda d: options[j][d][0])
                        moves.append((options[i][up][1] - ei + options[j][d][1] - ej, {i: up, j: d}))
            moves.sort(key=lambda m: m[0])
            kept = False
            for _, move in moves:
                trial = [move.get(i, k) for i, k in enumerate(current)]
                if tuple(trial) in seen:
                    continue
                seen.add(tuple(trial))
                measured = self._measure(trial, SEARCH_MEASURE)
                spent += 1
                if measured < error:
                    current, error, kept = trial, measured, True
                    self.swaps += 1
                    break
                if spent >= passes:
                    break
            if not kept:
                break
        self.searched += spent
        return solution_of(options, current)

    def _int8_only(self, options, limit: float):
        """`options` with every float candidate out of reach (costing more than the whole limit)."""
        out_of_reach = abs(limit) * 2 + 1
        return [[(out_of_reach if c.precision == "float" else cost, e) for c, (cost, e) in zip(choice.candidates, item)]
                for choice, item in zip(self.layers, options)]

    def summary(self) -> BudgetOutcome:
        """What was planned (nothing measured on the built model yet)."""
        pred = self.predicted if self.target == "latency_ms" else self.ratio(self.predicted)
        shape = {"batch": self.batch, "seq_len": self.seq_len}
        target = {self.target: self.value if self.asked is None else self.asked, **(self.stated or {})}
        return BudgetOutcome(target={**target, **{k: v for k, v in shape.items() if v}},
                             over_original=round(self.value, 4) if self.stated else None,
                             predicted=round(pred, 4), rounds=self.rounds, allocated_layers=len(self.layers),
                             dense_layers=sum(1 for c in self.layers if c.candidate.size is None),
                             history=self.history or None, probe_passes=self.probe_passes,
                             probe_samples=self.probe_samples, solver_gap=self.solver_gap,
                             objective=self.kept_objective, recovery=self.recovery,
                             evaluations=self.evaluations, search_passes=self.searched, swaps=self.swaps,
                             min_agreement=self.min_agreement,
                             agreement=None if self.agreement is None else round(self.agreement, 4),
                             floor_bound=(round(self.value, 4) if self.asked is not None and self.value != self.asked
                                          else None),
                             float_layers=float_layers(self) if self.per_layer_precision else None)


def _front(item: list[tuple[float, float]]) -> list[int]:
    """The indices of a unit's (cost, error) options that no other beats on both, cheapest first."""
    front, least = [], float("inf")
    for k in sorted(range(len(item)), key=lambda k: (item[k][0], item[k][1])):
        if item[k][1] < least:
            front.append(k)
            least = item[k][1]
    return front


# ---------------------------------------------------------------- statistics and errors

def output_gradient_moments(model: nn.Module, names: list[str], batches, samples: int) -> dict[str, torch.Tensor]:
    """{layer: E[g g^T]} with g the gradient of r . f(x) at the layer's output, r ~ N(0, I) per
    output element, summed over the layer's positions and averaged over samples: then
    E||J delta||^2 ~ tr(G Cov(delta)) for a perturbation delta of the layer's outputs (Hutchinson).
    One forward and one backward pass per calibration batch, for all layers at once."""
    from .methods.lowrank import output_features
    from .metrics import primary_output

    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        def hook(mod, args, output, name=name):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                def grad_hook(grad, mod=mod):
                    g = output_features(mod, grad).reshape(-1, grad.shape[1 if isinstance(mod, nn.Conv2d) else -1])
                    g = g.detach().double().cpu()
                    sums[name] = sums.get(name, 0) + g.T @ g
                output.register_hook(grad_hook)

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    count = 0
    generator = torch.Generator().manual_seed(0)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in take(batches, samples):
                device = params[0].device
                out = primary_output(model(*(t.to(device) for t in batch)))
                r = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
                model.zero_grad(set_to_none=True)
                (out * r).sum().backward()
                count += out.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: total / max(1, count) for name, total in sums.items()}


@torch.no_grad()
def _output_error(model: nn.Module, batches, reference: list[torch.Tensor], measure: str = "mse",
                  kind: str = "logits") -> float:
    """The model's outputs against `reference`, per sample: the squared error (mse), or the
    divergence the metric follows (metric: the distillation's KL for class outputs, 1 - cosine for
    embeddings; losses.distill_loss)."""
    from .losses import distill_loss
    from .metrics import primary_output

    total, count = 0.0, 0
    for batch, ref in zip(batches(), reference):
        out = primary_output(model(*batch)).double()
        if measure == "agreement":  # what disagrees: top-1 for classes, 1 - cosine for embeddings, per sample
            total += float(disagreement(out, ref, kind).sum())
        elif measure == "metric":
            total += float(distill_loss("kl", out, ref, 1.0, kind)) * out.shape[0]
        else:
            total += float(((out - ref) ** 2).reshape(out.shape[0], -1).sum(1).sum())
        count += out.shape[0]
    return total / max(1, count)


def disagreement(out: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """Per sample, what of `out` disagrees with `ref`: 1 - cosine over the last axis for embeddings,
    else the share of positions whose top class differs (averaged over any positions)."""
    if kind == "embeddings":
        return (1 - torch.nn.functional.cosine_similarity(out, ref, dim=-1)).reshape(out.shape[0], -1).mean(1)
    if out.dim() < 2 or out.shape[-1] < 2:
        raise RecipeError("budget.min_agreement needs class outputs (two or more) or embeddings; this model returns "
                          "one value per sample")
    return (out.argmax(-1) != ref.argmax(-1)).double().reshape(out.shape[0], -1).mean(1)


def plan_allocation(budget: BudgetSection, methods: list[Method], model: nn.Module, profile: dict,
                    batches, costs: Callable | None, reference_cost: float, fixed_savings: float,
                    skip: set[str] = frozenset(), progress: bool = False,
                    base_cost: float | None = None,
                    quantized: Callable[[str, nn.Module], bool] = lambda name, layer: False,
                    value: float | None = None, int8=None, output_kind: str = "logits",
                    finetunes: bool = False) -> Allocation:
    """Candidates, costs, errors and the knapsack's choice for every unit the allocated stages offer.

    `costs(name, layer, rank, scheme, in_shape) -> ms or bytes` prices latency and file size
    targets; `reference_cost` is the original's params, MACs, latency or bytes (what the target's
    ratio is against); `base_cost` the original as it would ship (int8 when the recipe quantizes;
    default: the reference); `fixed_savings` what the stages with explicit rules save;
    `quantized(name, layer)` whether the int8 model quantizes a layer (its weights take a byte);
    `value` the target in the reference's terms when the recipe states it over something else
    (`over: int8_original`: the speedup over the original that it means); `int8` the recipe's
    quantize settings with `precision: per_layer` (each layer they quantize is offered in float too);
    `output_kind` the model's (losses.detect_output_kind), for `measure: metric`; `finetunes`: the
    recipe fine-tunes the model after, on labels (budget.recovery auto)."""
    from .progress import iterate

    request = AllocationRequest(budget, batches, set(skip), costs, quantized)
    offered = [(m, m.allocation_choices(model, profile, request)) for m in methods if allocated(m)]
    weighted = [c for _, choices in offered for c in choices if c.method.wants_gradients(c)]
    samples = AUTO_PROBE_SAMPLES if budget.probe_samples == "auto" else budget.probe_samples
    gradients = (output_gradient_moments(model, [c.name for c in weighted], batches, samples)
                 if budget.sensitivity == "gradient" and weighted else {})
    for method, choices in offered:
        method.estimate_errors(choices, request, gradients)
    choices = [c for _, mine in offered for c in mine]
    if not choices:
        raise RecipeError("budget: the stages it allocates have no layer whose factorization (or pruning) would save "
                          "anything")
    for choice in iterate(choices, len(choices), "price candidates", "layer", enabled=progress and budget.in_latency):
        choice.method.price_choices([choice], model, profile, request)  # latency: measured per op, cached
    if int8 is not None:
        add_float_twins(offered, model, profile, request, int8)
    recovery = budget.recovery if budget.recovery != "auto" else (RECOVERY if finetunes else 0.0)
    samples, search = _probe_sizes(budget, model, batches, len(choices), recovery)
    probe = OutputProbe(model, batches, samples, int8, budget.measure, output_kind)

    def scale() -> tuple[int, int]:
        passes, count = _scale_errors(budget, choices, probe, progress)
        if int8 is not None:
            passes += measure_quantization_errors(choices, probe)
        return passes, probe.sample_count
    dense_total = sum(c.candidates[0].cost for c in choices)
    base = reference_cost if base_cost is None else base_cost
    fixed = base - fixed_savings - dense_total  # everything the allocation does not touch
    allocation = Allocation(target=budget.target, value=budget.value if value is None else value,
                            stated={"over": budget.over, budget.target: budget.value} if value is not None else None,
                            batch=request.batch if budget.in_latency else None, layers=choices, fixed=fixed,
                            seq_len=budget.seq_len,
                            reference=reference_cost, predicted=reference_cost, unpriced=request.unpriced,
                            scale_errors=scale, probe=probe,
                            objective=None if budget.objective == "auto" else OBJECTIVE_KEYS[budget.objective],
                            search=search, min_agreement=budget.min_agreement, recovery=recovery)
    if budget.min_agreement is None:
        allocation.solve()
    else:
        allocation.meet_agreement()
    for method, mine in offered:
        if mine:
            method.refine_allocation(allocation)
    return allocation


def _probe_sizes(budget: BudgetSection, model: nn.Module, batches, units: int,
                 recovery: float = 0.0) -> tuple[Callable, Callable | int]:
    """How many samples a probe pass runs, and how many passes the swap search may spend: each asked
    for when first needed (the model's MACs per sample are counted then, once). With `recovery` (a
    model that will be fine-tuned) `search: auto` is none: the search climbs the damage before training."""
    macs: list[int] = []

    def per_sample() -> int:
        from .bench import count_macs

        if not macs:
            macs.append(count_macs(model, next(iter(batches()))))
        return macs[0]

    def samples() -> int:
        return probe_samples(budget.probe_samples, probes_per_layer(budget.probes, units) * units, per_sample())

    def search() -> int:
        return search_passes(budget.search, samples(), per_sample())

    return samples, (0 if recovery and budget.search == "auto" else search)


class OutputProbe:
    """The model's output error per sample (E||f(x) - f'(x)||^2, or the metric's divergence with
    `measure: metric`) on a fixed set of calibration samples with some units at given sizes (each
    method's `applied`) and some layers in simulated int8 (compress.precision), against the model's
    own outputs there. The samples and those outputs are taken once, when first needed."""

    def __init__(self, model: nn.Module, batches, samples: Callable[[], int], int8=None, measure: str = "mse",
                 kind: str = "logits"):
        self.model, self.batches, self.samples, self.int8 = model, batches, samples, int8
        self.measure, self.kind = measure, kind
        self.probe: list | None = None
        self.reference: list[torch.Tensor] = []

    @torch.no_grad()
    def error(self, applied: list[tuple[LayerChoice, int | None, bool]], measure: str | None = None) -> float:
        """With each (unit, size or None, int8) applied, in `measure` (default: the probe's)."""
        from contextlib import ExitStack

        from .metrics import primary_output

        if self.probe is None:
            self.probe = list(take(self.batches, self.samples()))
            self.reference = [primary_output(self.model(*b)).double() for b in self.probe]
        with ExitStack() as stack:
            for choice, size, int8 in applied:
                if size is not None:
                    stack.enter_context(choice.method.applied(self.model, choice, size))
                if int8:
                    stack.enter_context(simulated_int8(self.model.get_submodule(choice.name), self.int8))
            return _output_error(self.model, lambda: iter(self.probe), self.reference, measure or self.measure,
                                 self.kind)

    @property
    def sample_count(self) -> int:
        return sum(len(r) for r in self.reference)


def _scale_errors(budget, choices: list[LayerChoice], probe: OutputProbe, progress: bool) -> tuple[int, int]:
    """Make the units' error curves comparable: scale each by its measured effect on the model's
    output at a probe size (`sensitivity: output`) or by the unit's output energy (`layer`).
    Returns the probe passes run and the samples each ran."""
    from .progress import iterate

    if budget.sensitivity == "gradient":  # curves already first-order output errors are left as they are
        choices = [c for c in choices if not c.gradient_weighted]
        if not choices:
            return 0, 0
    if budget.sensitivity == "layer":
        for choice in choices:
            coefficient = 1.0 / choice.energy if choice.energy > 0 else 0.0
            for c in choice.candidates:
                c.error *= coefficient
        return 0, 0
    per_layer = probes_per_layer(budget.probes, len(choices))
    passes = 0
    for choice in iterate(choices, len(choices), "layer sensitivity", "layer", enabled=progress):
        sized = [c for c in choice.candidates if c.size is not None and c.precision != "float"]  # one per size
        count = min(per_layer, len(sized))  # spread from the smallest to the largest size
        picks = sorted({round(i * (len(sized) - 1) / max(1, count - 1)) for i in range(count)})
        measured = {}  # size -> output error / unit error
        for index in picks:
            pick = sized[index]
            out = probe.error([(choice, pick.size, False)])
            if pick.error > 0:
                measured[pick.size] = out / pick.error
        for c in choice.candidates:  # a float twin's error too: the size's error is the same
            if c.size is not None:
                c.error *= interpolate_coefficient(measured, c.size)
        passes += len(picks)
    return passes, probe.sample_count


def probes_per_layer(probes: int | str, layers: int) -> int:
    """`probes` as given, or for auto: AUTO_PROBES per layer while that stays within PROBE_PASSES
    calibration passes in all, else as many as fit (at least one). Each pass runs the whole model
    on the probe samples, so a 100-layer model with 3 probes spends most of its planning there
    (52 s of 55 s on the 102-Linear model of benchmarks/budget.py, against 16 s with 1)."""
    if probes != "auto":
        return int(probes)
    return max(1, min(AUTO_PROBES, PROBE_PASSES // max(1, layers)))


def probe_samples(setting: int | str, passes: int, macs_per_sample: int) -> int:
    """`probe_samples` as given, or for auto: AUTO_PROBE_SAMPLES while `passes` passes over them
    stay within PROBE_MACS, else as many as fit (at least MIN_PROBE_SAMPLES). On all-MiniLM-L6-v2
    (benchmarks/planning.py) 3 probes on 64 samples kept the allocation's cosine (0.9058 against
    0.9067 on 256) at a fifth of the time; 1 probe on 256 lost 2.4 points."""
    if setting != "auto":
        return int(setting)
    fits = int(PROBE_MACS // max(1, passes * macs_per_sample))
    return max(MIN_PROBE_SAMPLES, min(AUTO_PROBE_SAMPLES, fits))


def search_passes(setting: int | str, samples: int, macs_per_sample: int) -> int:
    """`search` as given, or for auto: SEARCH_PASSES while that many passes over the probe samples stay
    within SEARCH_MACS, else as many as fit (at least MIN_SEARCH_PASSES). On the digits ResNet the search
    settles within 150 passes (benchmarks/budget.py); on all-MiniLM-L6-v2 auto allows 28
    (benchmarks/planning.py)."""
    if setting != "auto":
        return int(setting)
    fits = int(SEARCH_MACS // max(1, samples * macs_per_sample))
    return max(MIN_SEARCH_PASSES, min(SEARCH_PASSES, fits))


def interpolate_coefficient(measured: dict[int, float], rank: int) -> float:
    """The output-per-layer error ratio at `rank`: measured at a few ranks, interpolated linearly in
    the log between them (by rank), the nearest measured value outside them; 0 when none was
    measured (the layer's truncation changes nothing measurable)."""
    import math

    points = sorted((r, v) for r, v in measured.items() if v > 0)
    if not points:
        return 0.0
    if rank <= points[0][0]:
        return points[0][1]
    if rank >= points[-1][0]:
        return points[-1][1]
    for (r0, v0), (r1, v1) in zip(points, points[1:]):
        if r0 <= rank <= r1:
            t = (rank - r0) / (r1 - r0)
            return math.exp((1 - t) * math.log(v0) + t * math.log(v1))
    return points[-1][1]


def record(allocation: Allocation, measured: float, interval: list[float] | None = None) -> bool:
    """Note a whole-model measurement of the allocation (ms, or bytes); True when it is within the
    target's TOLERANCE of the prediction, or (latency) the prediction lies inside the measurement's
    95 % interval: a noisy run is no reason to move the allocation."""
    allocation.measured = measured
    unit = "bytes" if allocation.target == "onnx_bytes" else "ms"
    row = {"round": allocation.rounds, f"predicted_{unit}": round(allocation.predicted, 4),
           f"measured_{unit}": round(measured, 4)}
    if interval is not None and interval[0] != interval[1]:
        row["measured_interval"] = [round(x, 4) for x in interval]
    allocation.history.append(row)
    inside = interval is not None and interval[0] <= allocation.predicted <= interval[1]
    return inside or abs(measured - allocation.predicted) <= TOLERANCE[allocation.target] * measured


def correct(allocation: Allocation, measured: float) -> None:
    """Spread the miss between measurement and prediction over the factorized layers as a per-op
    overhead (what an additive model of ops measured alone misses: launch costs, an initializer's
    and a quantization scale's bytes), and solve again."""
    miss = measured - allocation.predicted
    factorized = [c for c in allocation.layers if c.candidate.size is not None]
    if not factorized:  # nothing factorized: the miss is the fixed part's
        allocation.fixed += miss
    else:
        overhead = miss / len(factorized)
        for choice in allocation.layers:
            for c in choice.candidates:
                if c.size is not None:
                    c.cost = max(1e-6, c.cost + overhead)
    allocation.rounds += 1
    allocation.solve()


def outcome(allocation: Allocation, report) -> BudgetOutcome:
    """report.json's `budget`: the target, what the allocation predicted, what was measured on the
    shipped model, whether it met the target (latency within TOLERANCE), and the rounds it took."""
    out = allocation.summary()
    target, value = allocation.target, allocation.value
    if target in ("params", "macs", "onnx_bytes"):  # exact for params and MACs (no tolerance)
        measured = getattr(report.ratios, target)
        met = measured is not None and measured >= value * (1 - TOLERANCE[target])
    elif target == "speedup":
        key = shape_key(allocation.batch, allocation.seq_len)
        measured = report.ratios.speedup.get(key)
        met = measured is not None and measured >= value * (1 - TOLERANCE[target])
        base = (report.baselines or {}).get("int8_original") if allocation.stated else None
        pair = (base.compressed_speedup or {}).get(key) if base is not None and not base.error else None
        if pair:  # over int8 of the original, measured beside it: the same model timed twice, in two runs,
            # differed by 20 % at 2 threads (all-MiniLM-L6-v2), beside each other it does not
            stated = allocation.stated["speedup"] * (allocation.value / allocation.asked if allocation.asked else 1.0)
            out.measured_over_int8 = pair
            met = pair["speedup"] >= stated * (1 - TOLERANCE[target]) or pair["ci"][1] >= stated
    else:
        measured = report.compressed.latency_ms.get(shape_key(allocation.batch, allocation.seq_len), {}).get("p50")
        met = measured is not None and measured <= value * (1 + TOLERANCE[target])
    out.measured, out.met = measured, bool(met)
    out.ops_measured = allocation.newly_measured  # 0 when the latency cache had them all
    return out


def assign(allocation: Allocation) -> None:
    """Hand the outcome to the methods: the chosen size per unit, a reason per unit left as it is,
    and the budget's figures per unit for the plan's rows."""
    handed: dict[int, tuple[Method, dict, dict, dict]] = {}

    def entry(method):
        return handed.setdefault(id(method), (method, {}, {}, {}))

    for method, name in allocation.unpriced:
        entry(method)[2][name] = "budget: no candidate of this layer (rank, kept channels) saves what the budget counts"
    for choice in allocation.layers:
        _, sizes, left, rows = entry(choice.method)
        c = choice.candidate
        if c.size is None:
            left[choice.name] = (f"budget: left {choice.method.left_as}" + (f" ({c.precision})" if c.precision else "")
                                 + ", the better use of the budget")
        else:
            sizes[choice.name] = c.size
        rows[choice.name] = {"budget_cost": round(c.cost, 6), "budget_error": float(f"{c.damage:.6g}"),
                             "budget_candidates": len(choice.candidates)}
        if c.precision:
            rows[choice.name]["precision"] = c.precision
    for method, sizes, left, rows in handed.values():
        method.take_allocation(sizes, left, rows)


def annotate(decisions: list[Decision], method: Method) -> None:
    for d in decisions:
        d.extra.update(getattr(method, "budget_rows", {}).get(d.name, {}))

