"""Planning, the pipeline's second step: the stages as methods, calibrated once, a budget's
allocation (priced, measured, solved, handed to the methods), and every stage's decisions, as one
`Plan` that every later step reads; after the model is built, the allocation's check against a
measurement of it (which may plan again: a new Plan)."""
from __future__ import annotations

import copy
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import bench, budget as budgeting, distributed, exporting as export, opcost, precision, quantize
from .data import split_batch
from .errors import RecipeError, UserError
from .methods import ACTIONS, METHODS, Decision, Method
from .recipe import LoadedRecipe
from .context import Context, calibration_feeds, export_axes, file_size, rewrite_timing, timed

def make_methods(recipe: LoadedRecipe, output_kind: str = "logits") -> list[Method]:
    methods = [METHODS[stage.method](stage, i) for i, stage in enumerate(recipe.recipe.stages)]
    for method in methods:
        method.output_kind = output_kind
    return methods


@dataclass(frozen=True)
class Plan:
    """What planning decided: the stages as methods (calibrated; under a budget, sized by the
    allocation), every stage's per-layer decisions in stage order, and the budget's allocation."""

    methods: tuple[Method, ...]
    decisions: tuple[Decision, ...]
    allocation: budgeting.Allocation | None = None

    @property
    def rows(self) -> list[dict]:
        """The decisions as `compress plan --json` and report.json write them."""
        return [d.as_dict() for d in self.decisions]

    def changed(self) -> int:
        """How many layers the plan changes (a layer two chained stages change counts once)."""
        return len({d.name for d in self.decisions if d.action != "keep"})

    def targeted(self) -> int:
        return len({d.name for d in self.decisions})

    def cost(self, params: int, macs: int) -> tuple[int, int]:
        """(params, MACs per sample) of the model this plan builds from one with `params` and `macs`."""
        return planned_cost(list(self.methods), self.rows, params, macs)


def plan(ctx: Context, model: nn.Module | None = None, progress: bool = False) -> Plan:
    """Per-layer decisions of every stage, without changing any weight."""
    model = model if model is not None else ctx.loaded.model
    methods = make_methods(ctx.recipe, ctx.output["kind"])
    calibration = ctx.data["calibration"]

    def batches():
        """The calibration data as tuples of model inputs (methods may iterate it more than once)."""
        for batch in calibration.batches(ctx.recipe.recipe.data.batch_size, trim=True):
            yield split_batch(batch, ctx.input_names, ctx.target)[0]

    if calibration is not None:
        batches.total = -(-len(calibration) // ctx.recipe.recipe.data.batch_size)  # for progress

    keys = {id(m): _stage_key(m) for m in methods}  # before a budget sets any ranks
    allocation = None
    for method in methods:
        saved = ctx.calibrated.get(keys[id(method)], {})
        if saved.get("budget_inputs") is not None:
            method.budget_inputs = saved["budget_inputs"]
        if "state" in saved:  # the same stage, calibrated on the same data before (a sweep)
            for name, value in saved["state"].items():
                setattr(method, name, value)
        elif method.needs_calibration:
            if calibration is None:
                raise UserError(f"stages[{method.stage_index}] ({method.name}) needs calibration data: "
                                "set data.calibration (or data.train) in the recipe")
            with timed(ctx.timings, "calibrate"):
                method.calibrate(model, batches, progress)
            if method.calibration_state:  # what calibrate set, as the method declares it: kept for the next run
                ctx.calibrated.setdefault(keys[id(method)], {})["state"] = {
                    name: getattr(method, name) for name in method.calibration_state}
    with timed(ctx.timings, "plan"):
        profile = bench.profile_layers(model, ctx.sample)
    if ctx.recipe.recipe.budget is not None:
        if calibration is None:
            raise UserError("budget: needs calibration data to measure what each candidate loses: set "
                            "data.calibration (or data.train) in the recipe")
        with timed(ctx.timings, "budget"):
            allocation = _allocate(ctx, methods, model, profile, batches, progress)
        for method in methods:  # the budget's input statistics, for a sweep's next run
            if method.budget_inputs is not None:
                ctx.calibrated.setdefault(keys[id(method)], {})["budget_inputs"] = method.budget_inputs
    with timed(ctx.timings, "plan"):
        decisions = plan_methods(methods, model, profile)
    return Plan(tuple(methods), tuple(decisions), allocation)


def _stage_key(method: Method) -> str:
    return f"{method.stage_index}:{method.stage.model_dump_json()}"


def plan_methods(methods: list[Method], model: nn.Module, profile: dict) -> list[Decision]:
    """Every stage's decisions in order, each stage seeing what the earlier ones change (chains)."""
    out = []
    changed: dict[str, tuple[int, Decision]] = {}
    for method in methods:
        method.earlier = dict(changed)
        decisions = method.plan(model, profile)
        budgeting.annotate(decisions, method)
        for decision in decisions:
            if decision.action not in ACTIONS:  # a plug-in's mistake: the report's readers know these only
                raise TypeError(f"method {method.name!r} decided {decision.action!r} for {decision.name}; "
                                f"a decision's action is one of {', '.join(ACTIONS)}")
            if decision.action != "keep":
                if decision.name in changed and decision.action != "refine":
                    raise RecipeError(_overlap_error(method, decision.name, *changed[decision.name]))
                changed[decision.name] = (method.stage_index, decision)
            out.append(decision)
    return out


def planned_cost(methods: list[Method], rows: list[dict], params: int, macs: int) -> tuple[int, int]:
    """(params, MACs per sample) of the model the plan would build from one with `params` and `macs`:
    every row's saving, a refine row not again (it repeats the earlier stage's change), less what
    two rows count twice where they shrink one layer together (Method.counted_twice)."""
    own = [r for r in rows if r["action"] != "refine"]
    twice = [m.counted_twice() for m in methods]
    saved_p = sum(r["params_before"] - r["params_after"] for r in own) - sum(t[0] for t in twice)
    saved_m = sum(r["macs_before"] - r["macs_after"] for r in own) - sum(t[1] for t in twice)
    return params - saved_p, macs - saved_m


def finetunes_on_labels(ctx: Context) -> bool:
    """Whether the recipe trains the compressed model (finetune.steps or epochs) on labels (its
    training data has `data.target`), not only by distillation from the original."""
    r, train = ctx.recipe.recipe, ctx.data["train"]
    return bool(r.finetune.steps or r.finetune.epochs) and train is not None and ctx.target in train.keys()


def _allocate(ctx: Context, methods: list[Method], model: nn.Module, profile: dict, batches,
              progress: bool) -> budgeting.Allocation:
    """The budget's allocation: candidates priced (latency measured per op, cached), errors measured
    on the calibration data, one candidate per layer by the knapsack; handed to the methods."""
    r = ctx.recipe.recipe
    b = r.budget
    budgeting.check(b, methods)
    costs, table, base, value = None, None, None, None
    if b.in_latency and distributed.world()[1] > 1:  # each process would time, and allocate, differently
        raise UserError(f"budget.{b.target}: latency is measured, and measurements differ from process to process; "
                        "run without --nproc, or use a params, macs or onnx_bytes budget")
    quantized = functools.partial(quantize.quantizes_layer, r.quantize)
    if b.verified:
        reference, base, value = _reference_costs(ctx, model)
    if b.in_latency:
        table = opcost.OpCosts(r.bench.threads, r.quantize)
        if b.seq_len is not None:  # each op is priced at the shape it runs at: the layers' inputs at seq_len tokens
            axes = export_axes(r, ctx.input_names, ctx.sample)
            profile = bench.profile_layers(model, export.at_length(ctx.sample, ctx.input_names, axes, b.seq_len))

        def latency(name, layer, rank, scheme, shape, quantized=quantized):
            """The op(s)' latency, int8 where the recipe quantizes the layer (`quantized`: a bool, or
            the rule; precision per_layer prices the float twins with False)."""
            return table.latency_ms(layer, rank, scheme, shape,
                                    quantized if isinstance(quantized, bool) else quantized(name, layer))

        costs = latency
    elif b.target == "params":
        reference = float(bench.count_params(model))
    elif b.target == "macs":
        reference = float(bench.count_macs(model, ctx.sample))
    savings, fixed_layers = 0.0, set()
    for method in [m for m in methods if not budgeting.allocated(m)]:  # explicit rules count toward the budget
        method.earlier = {}
        for d in method.plan(model, profile):
            if d.action == "keep":
                continue
            fixed_layers.add(d.name)
            layer = model.get_submodule(d.name)
            if b.target == "onnx_bytes":
                savings += budgeting.layer_bytes(layer, d.params_before - d.params_after, quantized(d.name, layer))
            elif costs is None:
                savings += getattr(d, f"{b.target}_before") - getattr(d, f"{b.target}_after")
            else:
                shape = (b.batch,) + tuple(profile[d.name].in_shape)
                savings += (costs(d.name, layer, None, "channel", shape)
                            - costs(d.name, layer, d.rank, d.scheme or "channel", shape))
    allocation = budgeting.plan_allocation(b, methods, model, profile, batches, costs, reference, savings,
                                           skip=fixed_layers, progress=progress, base_cost=base, quantized=quantized,
                                           value=value, int8=r.quantize if b.precision == "per_layer" else None,
                                           output_kind=ctx.output["kind"],
                                           finetunes=finetunes_on_labels(ctx))
    if table is not None:
        table.save()
        allocation.newly_measured = table.measured
    budgeting.assign(allocation)
    return allocation


def _reference_costs(ctx: Context, model: nn.Module) -> tuple[float, float | None, float | None]:
    """(the original's cost as exported, its cost as it would ship when the recipe quantizes, the
    target in the first's units for `over: int8_original`) of a budget measured on the built model."""
    r = ctx.recipe.recipe
    b = r.budget
    shipped = {"original": (model, None), **({"original_int8": (model, r.quantize)} if r.quantize else {})}
    if b.over == "int8_original":  # the target is over int8 of the original as the report's baseline makes
        # it: the recipe's settings without compress's rewrites (ONNX Runtime's defaults without them)
        shipped["int8_baseline"] = (model, (r.quantize or quantize.QuantizeSection()).model_copy(
            update={"rewrites": []}))
    measured = _measure_models(ctx, shipped, b)
    reference = measured["original"].value
    base = measured["original_int8"].value if "original_int8" in measured else None
    if base is not None and "int8_baseline" in measured:  # the rewrites are kept only where faster, so
        base = min(base, measured["int8_baseline"].value)  # the dense int8 model costs the less of the two
    # where no rewrite applied, int8_baseline is original_int8's file, measured once, so that `speedup: 1`
    # is exactly int8 of the original's cost (two timings of it would differ)
    value = b.speedup * reference / measured["int8_baseline"].value if b.over == "int8_original" else None
    return reference, base, value


@dataclass(frozen=True)
class Counted:
    """What a budget counts of one exported model: its ONNX file's bytes or its p50 latency in ms;
    for latency after the first model, the 95 % interval of its latency over the first's."""

    value: float
    over_first: tuple[float, float] | None = None


def _measure_models(ctx: Context, models: dict[str, tuple[nn.Module, quantize.QuantizeSection | None]], budget
                    ) -> dict[str, Counted]:
    """What the budget counts of each (model, int8 settings or None) as exported, measured together
    (bench.measure) at budget.batch for latency; quantized by its settings where given."""
    r = ctx.recipe.recipe
    timing = rewrite_timing(ctx, budget.batch, budget.seq_len) if budget.in_latency else None
    with tempfile.TemporaryDirectory(prefix="compress-budget-") as folder:
        paths = {}
        axes = export_axes(r, ctx.input_names, ctx.sample)
        for label, (model, int8) in models.items():
            paths[label] = str(Path(folder) / f"{label}.onnx")
            export.export_onnx(model.cpu().eval(), ctx.sample, ctx.input_names, paths[label], r.export.opset, axes)
            if int8 is not None:
                exported, paths[label] = Path(paths[label]), str(Path(folder) / f"{label}.int8.onnx")
                eager = functools.partial(export.export_onnx, model, ctx.sample, ctx.input_names, opset=r.export.opset,
                                          dynamic_axes=axes, eager_attention=True)
                with quantize.int8_source(int8, model, exported, eager) as (source, heads):
                    quantize.quantize(source, Path(paths[label]), int8, calibration_feeds(ctx, int8), heads, timing)
        if budget.target == "onnx_bytes":
            return {label: Counted(float(file_size(path))) for label, path in paths.items()}
        same = _same_files(paths)  # label -> an earlier label with the same file: measured once
        measured = bench.measure({k: v for k, v in paths.items() if k not in same}, timing.feeds,
                                 r.bench.threads, r.bench.warmup, r.bench.runs)
    (key,), first = timing.feeds, next(iter(models))
    out = {first: Counted(measured.latency_ms[first][key]["p50"])}
    for label in [k for k in list(models)[1:] if k not in same]:
        over = measured.over_reference(label)[key]  # latency ratios are the speedup's inverse
        out[label] = Counted(measured.latency_ms[label][key]["p50"], (1 / over.high, 1 / over.low))
    return {label: out[same.get(label, label)] for label in models}


def _same_files(paths: dict[str, str]) -> dict[str, str]:
    """label -> the first earlier label whose file has the same bytes."""
    import hashlib

    seen, same = {}, {}
    for label, path in paths.items():
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if digest in seen:
            same[label] = seen[digest]
        else:
            seen[digest] = label
    return same


def _overlap_error(method: Method, layer: str, index: int, prior: Decision) -> str:
    """Why a stage may not change a layer an earlier stage changed, and which chains exist instead."""
    here = f"stages[{method.stage_index}].targets: layer {layer!r} is already changed by stages[{index}] ({prior.method})"
    chains = ", ".join(f"{earlier} -> {name}" for name, cls in METHODS.items() for earlier in cls.refines)
    if prior.method in method.refines:
        why = f"{method.name} continues only layers that {prior.method} factorized (it {prior.action}s this one)"
    else:
        why = f"{method.name} cannot continue from {prior.method} (allowed chains: {chains or 'none'})"
    return f"{here}; {why}; exclude it from one of them"


def verify_allocation(ctx: Context, original: nn.Module, compressed: nn.Module, planned: Plan) -> tuple[nn.Module, Plan]:
    """Latency and file size budgets: measure the built model (as it will ship: int8 when the recipe
    quantizes) beside the original before any fine-tuning; while the additive prediction misses by
    more than the target's tolerance, correct the costs, allocate again and rebuild (a new Plan)."""
    r = ctx.recipe.recipe
    b = r.budget
    allocation, methods = planned.allocation, list(planned.methods)
    with timed(ctx.timings, "budget"):
        while True:
            shipped = precision.shipped_settings(r.quantize, allocation)  # the layers kept float, excluded
            measured = _measure_models(ctx, {"original": (original, None), "compressed": (compressed, shipped)}, b)
            # in the units of the first measurement of the original, which the costs were fitted to
            value = allocation.reference * measured["compressed"].value / measured["original"].value
            ratio = measured["compressed"].over_first  # latency only: compressed / original, 95 %
            interval = [allocation.reference * x for x in ratio] if ratio else None
            if budgeting.record(allocation, value, interval) or allocation.rounds >= b.rounds:
                return compressed, planned
            budgeting.correct(allocation, value)
            budgeting.assign(allocation)
            planned = Plan(planned.methods, tuple(plan_methods(methods, original, bench.profile_layers(original, ctx.sample))),
                           allocation)
            compressed = copy.deepcopy(original)
            for method in methods:
                method.prepare(compressed)
