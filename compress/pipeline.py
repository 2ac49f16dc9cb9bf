"""The one pipeline: load -> plan -> prepare -> fine-tune -> finalize -> export -> verify -> bench -> report.

`apply(...)` is the whole library behind `compress apply`; `plan(...)` stops after the decisions.
Outputs are written into a temporary folder beside `--out` and renamed into place at the end, so a
failed run never leaves files that look finished.
"""
from __future__ import annotations

import copy
import functools
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import torch
from torch import nn

from . import bench, budget as budgeting, distributed, exporting as export, metrics, opcost, outdir, quantize
from . import report as reporting
from .checkpoint import (LoadedModel, load_model, save_artifact, save_checkpoint,
                         save_pickled_module)
from .data import Dataset, load_source, split_batch, synthetic_sample
from .errors import GateFailed, RecipeError, UserError, first_line
from .finetune import ResumePoint, finetune, predict
from .losses import detect_output_kind
from .methods import METHODS, Decision, Method
from .metrics import choose_metric, drop, primary_output, score
from .recipe import LoadedRecipe
from .trust import trusted_prefixes


@dataclass
class Options:
    """What the command line adds to a recipe."""

    seed: int | None = None
    device: str = "cpu"
    trust_checkpoint: bool = False
    trust_factories: tuple[str, ...] = ()
    progress: bool = True
    resume: bool = False
    max_metric_drop: float | None = None
    min_speedup: float | None = None
    min_size_ratio: float | None = None


@dataclass
class Context:
    """Everything loaded before planning: the model, data, input names and shapes."""

    recipe: LoadedRecipe
    loaded: LoadedModel
    input_names: list[str]
    sample: tuple[torch.Tensor, ...]  # one real (or synthetic) sample, batch size 1
    data: dict[str, Dataset | None]
    target: str
    timings: dict[str, float] = field(default_factory=dict)
    output: dict = field(default_factory=lambda: {"kind": "logits", "reason": "default"})  # losses.detect_output_kind
    allocation: budgeting.Allocation | None = None  # the budget's choice per layer (recipes with `budget:`)
    # what calibration (and a budget's input statistics) left on each stage, by stage: a sweep's runs share it
    calibrated: dict = field(default_factory=dict)


@contextmanager
def timed(timings: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 3)


METRIC_TOLERANCE = 1e-3  # torch and model.onnx metrics further apart than this get a warning


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: compress fine-tunes on cpu or cuda (cuda:N), or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


ROLES = ("train", "calibration", "eval")


def load_context(recipe: LoadedRecipe, model: str | Path | nn.Module | LoadedModel, options: Options,
                 data: dict | None = None) -> Context:
    """Load (or take) the model and the data and check that they fit. `model` is a file or folder, or
    a model in memory; `data` maps roles (train, calibration, eval) to data sets given in memory
    (Dataset, or a dict of tensors), overriding the recipe's sources for those roles."""
    timings: dict[str, float] = {}
    r = recipe.recipe
    with timed(timings, "load"):
        if isinstance(model, LoadedModel):
            loaded = model
        elif isinstance(model, nn.Module):
            loaded = LoadedModel(model.eval(), "<in memory>")
        else:
            loaded = load_model(model, r.model.factory, r.model.kwargs, trust=options.trust_checkpoint,
                                trusted=trusted_prefixes(options.trust_factories))
        if isinstance(loaded.model, torch.jit.ScriptModule) or any(
                isinstance(m, torch.jit.ScriptModule) for m in loaded.model.modules()):
            raise UserError(f"{loaded.path}: is (or holds) a TorchScript module; compress rewrites a model's modules, "
                            "which a scripted model cannot have done to it: pass the eager model instead")
        _check_weights(loaded.model, loaded.path)
        if data is not None and not isinstance(data, dict):
            raise UserError(f"data: expected a mapping of roles (train, calibration, eval) to data sets, not "
                            f"{type(data).__name__}")
        given = {role: _in_memory(d, role) for role, d in (data or {}).items()}
        sources = {"train": r.data.train, "calibration": r.data.calibration or r.data.train}
        sources["eval"] = r.data.eval or sources["calibration"]
        cache: dict[str, Dataset] = {}
        data = {}
        for role, source in sources.items():
            if role in given:
                data[role] = given[role]
                continue
            if source is None:
                data[role] = None
                continue
            resolved = recipe.resolve(source)
            if resolved not in cache:
                cache[resolved] = load_source(resolved)
            data[role] = cache[resolved]
        if "train" in given and "calibration" not in given and r.data.calibration is None:
            data["calibration"] = given["train"]
        if "eval" not in given and r.data.eval is None and ("calibration" in given or "train" in given):
            data["eval"] = data["calibration"]
        metrics.OUTPUT_KEY.set(r.model.output_key)
        try:  # a context that fails to load leaves no output key behind for the next one
            input_names, sample = _inputs(r, loaded, data, r.data.target)
            per_sample = check_inputs(loaded.model, input_names, sample, data, r.data.target, r)
            evaluated = data["eval"]
            if r.data.metric in ("accuracy", "auc") and evaluated is not None and r.data.target not in evaluated.keys():
                raise UserError(f"data.metric {r.data.metric} needs labels, and {evaluated.source} has no key "
                                f"{r.data.target!r} (data.target); add them, or use metric: agreement, cosine or neighbors")
            output = _output_kind(loaded.model, input_names, sample, data, r)
            bench.check_fits(r.bench.batch_sizes, per_sample, "bench.batch_sizes")
            if any(d is not None for d in data.values()):
                bench.check_fits([r.data.batch_size], per_sample, "data.batch_size")
            if r.quantize is not None:  # mistakes in the quantize section fail now, not after fine-tuning
                quantize.check_section(r.quantize, [n for n, _ in loaded.model.named_modules() if n],
                                       data["calibration"] is not None)
        except BaseException:
            metrics.OUTPUT_KEY.set(None)
            raise
    return Context(recipe, loaded, input_names, sample, data, r.data.target, timings, output)


def _check_weights(model: nn.Module, source) -> None:
    """Weights must be finite: NaN or Inf make every decomposition fail and every metric meaningless."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{source}: weight {name!r} holds {bad:,} non-finite values (NaN or Inf); the model "
                            "cannot be compressed or measured: fix or retrain it")


def _in_memory(source, role: str) -> Dataset:
    if role not in ROLES:
        raise UserError(f"data role {role!r}: expected one of {', '.join(ROLES)}")
    if isinstance(source, Dataset):
        return source
    if isinstance(source, dict) and source and all(isinstance(v, torch.Tensor) for v in source.values()):
        return Dataset(dict(source), f"<{role} data in memory>")
    if isinstance(source, (str, Path)):
        return load_source(str(source))
    raise UserError(f"data {role}: expected a Dataset, a dict of tensors or a file path, not {type(source).__name__}")


LABEL_NAMES = {"label", "labels", "y", "targets", "target", "class", "classes", "class_label", "class_labels"}
AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear, nn.Embedding)


def _output_kind(model: nn.Module, names: list[str], sample, data, r) -> dict:
    """What the model returns (logits, probabilities, log-probabilities), from the recipe or from the
    model's last module and its outputs on up to 256 samples of the data."""
    if r.finetune.output != "auto":
        return {"kind": r.finetune.output, "reason": "set in the recipe (finetune.output)"}
    source = next((d for d in (data["calibration"], data["train"], data["eval"]) if d is not None), None)
    inputs = sample if source is None else tuple(source.head(min(256, len(source)))[n] for n in names)
    leaves = [m for m in model.modules() if not list(m.children())]
    seen = []
    handle = leaves[-1].register_forward_hook(lambda m, a, out: seen.append(out)) if leaves else None
    try:
        with torch.no_grad():
            outputs = primary_output(model.eval()(*inputs))
    finally:
        if handle is not None:
            handle.remove()
    # the output is the last module's own (nothing applied after it): known to be unbounded when that
    # module is affine, whatever values the sample happens to take
    raw = bool(seen) and isinstance(seen[-1], torch.Tensor) and seen[-1].shape == outputs.shape and \
        torch.equal(seen[-1].float(), outputs.float())
    kind, reason = detect_output_kind(model, outputs, affine_output=raw and isinstance(leaves[-1], AFFINE))
    return {"kind": kind, "reason": f"auto: {reason}"}


def _inputs(r, loaded: LoadedModel, data: dict[str, Dataset | None], target: str):
    """Input names in call order and one sample: from the recipe, else the checkpoint, else the data."""
    specs = [s.model_dump() for s in r.inputs] if r.inputs else loaded.inputs
    some = next((d for d in data.values() if d is not None), None)
    declared = {s["name"] for s in specs or []}
    for d in data.values():  # labels under another name would be silently dropped (distillation instead)
        if d is None or target in d.keys() or "target" in r.data.model_fields_set:  # a key the user chose
            continue
        lookalike = next((k for k in d.keys() if k not in declared and k.lower() in LABEL_NAMES), None)
        if lookalike is not None:
            raise UserError(f"{d.source}: has no key {target!r} (data.target) but holds {lookalike!r}; if those are "
                            f"the labels, set data.target: {lookalike}")
    if specs:
        names = [s["name"] for s in specs]
        if target in names:
            raise UserError(f"data.target {target!r} is also one of the model's inputs; name the labels' key "
                            "(data.target) or the inputs differently")
    elif some is not None:
        names = [k for k in some.keys() if k != target]
    else:
        raise UserError("cannot tell the model's inputs: add `inputs:` or `data:` to the recipe")
    if some is not None:
        for d in data.values():
            if d is None:
                continue
            missing = [n for n in names if n not in d.keys()]
            if missing:
                raise UserError(f"{d.source}: has no key {missing[0]!r} for model input (keys: {', '.join(d.keys())}); "
                                f"rename it or set `inputs:` in the recipe")
            for spec in specs if r.inputs else []:  # the data must be what the recipe declares
                shape, dynamic = spec.get("shape"), {int(a) for a in (spec.get("dynamic_axes") or {})}
                have = list(d.tensors[spec["name"]].shape[1:])
                if shape is not None and (len(have) != len(shape) or any(
                        h != w for axis, (h, w) in enumerate(zip(have, shape), start=1) if axis not in dynamic)):
                    raise UserError(f"{d.source}: {spec['name']!r} has samples of shape {have}, but the inputs "
                                    f"declare {list(shape)}; fix the data or the declared shape")
        first = some.head(1)
        return names, tuple(first[n] for n in names)
    return names, synthetic_sample(specs)


def check_inputs(model: nn.Module, names: list[str], sample, data=None, target: str = "target", r=None,
                 what: str = "recipe inputs") -> int:
    """Bytes one sample's forward pass keeps alive, after refusing inputs whose forward would not fit
    in memory (traced on the meta device first, before the model runs on anything real) and data
    that does not fit the model (`_check_fit`)."""
    per_sample = bench.activation_bytes_per_sample(model, sample, meta_only=True)
    if per_sample is not None:
        bench.check_fits([1], per_sample, what)
    _check_fit(model, names, sample, data or {}, target, r, what)
    return per_sample if per_sample is not None else bench.activation_bytes_per_sample(model, sample)


def _check_fit(model: nn.Module, names: list[str], sample, data, target: str, r=None,
               what: str = "recipe inputs") -> None:
    """Run one sample of every data source through the model, so that misfitting data fails now,
    with the source's name; then check the labels against the model's output (class indices in
    range, no real-valued labels for a class output)."""
    checks = {d.source: (d, tuple(d.head(1)[n] for n in names)) for d in data.values() if d is not None}
    for source, (dataset, inputs) in (checks or {what: (None, sample)}).items():
        try:
            with torch.no_grad():
                raw = model.eval()(*inputs)
                output = primary_output(raw)
        except Exception as exc:  # any error inside the user's forward means the data does not fit
            shapes = ", ".join(f"{n} {list(t.shape[1:])} {str(t.dtype).removeprefix('torch.')}"
                               for n, t in zip(names, inputs))
            raise UserError(f"{source}: inputs ({shapes}) do not fit the model: {first_line(exc)}") from None
        if r is not None and r.model.output_key is not None and isinstance(raw, torch.Tensor):
            raise UserError(f"model.output_key {r.model.output_key!r} is set, but the model returns a single tensor, "
                            "which has no keys; remove model.output_key")
        if dataset is not None and target in dataset.keys():
            dataset.tensors[target] = _check_labels(output, dataset.tensors[target], source, target, r)


def _check_labels(output: torch.Tensor, labels: torch.Tensor, source: str, key: str, r) -> torch.Tensor:
    """The labels as training and scoring will use them, checked against the model's output (one
    sample of it) and the recipe's loss and metric: integer labels of any width become int64, 0/1
    integers for a one-output model become float, [N, 1] class labels become [N]. Every
    contradiction is a one-line error naming the key and what uses it."""
    out = tuple(output.shape[1:])  # per sample
    classes = out[-1] if len(out) >= 1 and out[-1] > 1 else None
    loss = r.finetune.loss if r is not None else "auto"
    metric = r.data.metric if r is not None else "auto"
    integer = not labels.is_floating_point() and labels.dtype != torch.bool
    if integer:
        labels = labels.long()
        if classes is None and int(torch.tensor(out).prod()) == 1 and bool(((labels == 0) | (labels == 1)).all()):
            labels = labels.float()  # 0/1 labels of a one-output (binary) model
            integer = False
    if classes is not None and labels.dim() == 2 and labels.shape[1] == 1 and len(out) == 1:
        labels = labels[:, 0]  # [N, 1] class labels, as numpy often writes them
    per_label = tuple(labels.shape[1:])
    users = []  # what takes the labels as class indices
    if loss == "cross_entropy" or (loss == "auto" and integer):
        users.append(f"finetune.loss {loss}")
    if metric == "accuracy" or (metric == "auto" and integer):
        users.append(f"data.metric {metric}")
    if users:  # the labels are class indices
        what = " and ".join(users)
        if classes is None:
            raise UserError(f"{source}: {what} takes labels {key!r} as class indices, but the model outputs "
                            f"{list(out)} per sample, not one score per class; choose a loss and metric for this "
                            "output (bce/auc for one 0/1 output as float labels, mse for values)")
        if not integer:
            raise UserError(f"{source}: labels {key!r} are {str(labels.dtype).removeprefix('torch.')} values but "
                            f"{what} needs class indices for the model's {classes} classes; store them as integers")
        if per_label != out[:-1]:
            raise UserError(f"{source}: labels {key!r} have shape {list(per_label)} per sample, but the model's "
                            f"output {list(out)} needs {list(out[:-1])} class indices per sample ({what})")
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            first = int(bad.reshape(labels.shape[0], -1).any(dim=1).nonzero()[0, 0])
            raise UserError(f"{source}: {int(bad.sum()):,} labels {key!r} lie outside the model's {classes} classes "
                            f"[0, {classes}), the first at index {first} (value {int(labels[first].reshape(-1)[0])})")
    values = []  # what compares the labels with the outputs value by value
    if loss in ("bce", "mse") or (loss == "auto" and not integer):
        values.append(f"finetune.loss {loss}")
    if metric in ("auc", "mse") or (metric == "auto" and not integer):
        values.append(f"data.metric {metric}")
    if values:
        what = " and ".join(values)
        if classes is not None and per_label == out[:-1] and not integer:
            raise UserError(f"{source}: labels {key!r} are {str(labels.dtype).removeprefix('torch.')} values but the "
                            f"model outputs {classes} classes; store class indices as integers (int64)")
        if int(torch.tensor(per_label).prod()) != int(torch.tensor(out).prod()):
            raise UserError(f"{source}: {what} compares each output with a label, but the model outputs {list(out)} "
                            f"per sample and labels {key!r} hold {list(per_label)}; for class labels use "
                            "loss: cross_entropy and metric: accuracy")
        if "bce" in what and bool(((labels < 0) | (labels > 1)).any()):
            raise UserError(f"{source}: finetune.loss bce needs labels {key!r} between 0 and 1")
    return labels


def make_methods(recipe: LoadedRecipe, output_kind: str = "logits") -> list[Method]:
    methods = [METHODS[stage.method](stage, i) for i, stage in enumerate(recipe.recipe.stages)]
    for method in methods:
        method.output_kind = output_kind
    return methods


def plan(ctx: Context, model: nn.Module | None = None, progress: bool = False) -> tuple[list[Method], list[dict]]:
    """Per-layer decisions of every stage, without changing any weight."""
    model = model if model is not None else ctx.loaded.model
    methods = make_methods(ctx.recipe, ctx.output["kind"])
    calibration = ctx.data["calibration"]

    def batches():
        """The calibration data as tuples of model inputs (methods may iterate it more than once)."""
        for batch in calibration.batches(ctx.recipe.recipe.data.batch_size):
            yield split_batch(batch, ctx.input_names, ctx.target)[0]

    if calibration is not None:
        batches.total = -(-len(calibration) // ctx.recipe.recipe.data.batch_size)  # for progress

    keys = {id(m): _stage_key(m) for m in methods}  # before a budget sets any ranks
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
            ctx.allocation = _allocate(ctx, methods, model, profile, batches, progress)
        for method in methods:  # the budget's input statistics, for a sweep's next run
            if method.budget_inputs is not None:
                ctx.calibrated.setdefault(keys[id(method)], {})["budget_inputs"] = method.budget_inputs
    with timed(ctx.timings, "plan"):
        rows = plan_methods(methods, model, profile)
    return methods, rows


def _stage_key(method: Method) -> str:
    return f"{method.stage_index}:{method.stage.model_dump_json()}"


def plan_methods(methods: list[Method], model: nn.Module, profile: dict) -> list[dict]:
    """Every stage's decisions in order, each stage seeing what the earlier ones change (chains)."""
    rows = []
    changed: dict[str, tuple[int, Decision]] = {}
    for method in methods:
        method.earlier = dict(changed)
        decisions = method.plan(model, profile)
        budgeting.annotate(decisions, method)
        for decision in decisions:
            if decision.action != "keep":
                if decision.name in changed and decision.action != "refine":
                    raise RecipeError(_overlap_error(method, decision.name, *changed[decision.name]))
                changed[decision.name] = (method.stage_index, decision)
            rows.append(decision.as_dict())
    return rows


def planned_cost(methods: list[Method], rows: list[dict], params: int, macs: int) -> tuple[int, int]:
    """(params, MACs per sample) of the model the plan would build from one with `params` and `macs`:
    every row's saving, a refine row not again (it repeats the earlier stage's change), less what
    two rows count twice where they shrink one layer together (Method.counted_twice)."""
    own = [r for r in rows if r["action"] != "refine"]
    twice = [m.counted_twice() for m in methods]
    saved_p = sum(r["params_before"] - r["params_after"] for r in own) - sum(t[0] for t in twice)
    saved_m = sum(r["macs_before"] - r["macs_after"] for r in own) - sum(t[1] for t in twice)
    return params - saved_p, macs - saved_m


def _allocate(ctx: Context, methods: list[Method], model: nn.Module, profile: dict, batches,
              progress: bool) -> budgeting.Allocation:
    """The budget's allocation: candidates priced (latency measured per op, cached), errors measured
    on the calibration data, one candidate per layer by the knapsack; handed to the methods."""
    r = ctx.recipe.recipe
    b = r.budget
    budgeting.check(b, methods)
    costs, table, base = None, None, None
    if b.in_latency and distributed.world()[1] > 1:  # each process would time, and allocate, differently
        raise UserError(f"budget.{b.target}: latency is measured, and measurements differ from process to process; "
                        "run without --nproc, or use a params, macs or onnx_bytes budget")
    quantized = functools.partial(quantize.quantizes_layer, r.quantize)
    if b.verified:  # measured on the original as exported, and as it would ship when the recipe quantizes
        shipped = {"original": (model, False), **({"original_int8": (model, True)} if r.quantize else {})}
        measured = _measure_models(ctx, shipped, b)
        reference, base = measured["original"], measured.get("original_int8")
    if b.in_latency:
        table = opcost.OpCosts(r.bench.threads, r.quantize)

        def latency(name, layer, rank, scheme, shape):
            return table.latency_ms(layer, rank, scheme, shape, quantized(name, layer))

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
                                           skip=fixed_layers, progress=progress, base_cost=base, quantized=quantized)
    if table is not None:
        table.save()
        allocation.newly_measured = table.measured
    budgeting.assign(allocation)
    return allocation


def _measure_models(ctx: Context, models: dict[str, tuple[nn.Module, bool]], budget) -> dict:
    """What the budget counts of each (model, quantized) as exported: its ONNX file's bytes, or its
    p50 latency in ms at budget.batch in ONNX Runtime (measured together, bench.measure); quantized
    by the recipe's `quantize:` settings where asked. For latency also "<label>/interval": each later
    model's latency over the first's, the 95 % interval of the paired runs."""
    r = ctx.recipe.recipe
    with tempfile.TemporaryDirectory(prefix="compress-budget-") as folder:
        paths = {}
        declared = {s.name: s.dynamic_axes for s in r.inputs or []}
        axes = export.dynamic_axes_for(ctx.input_names, ctx.sample, declared, True)
        for label, (model, int8) in models.items():
            paths[label] = str(Path(folder) / f"{label}.onnx")
            export.export_onnx(model.cpu().eval(), ctx.sample, ctx.input_names, paths[label], r.export.opset, axes)
            if int8:
                paths[label] = str(Path(folder) / f"{label}.int8.onnx")
                quantize.quantize(Path(folder) / f"{label}.onnx", Path(paths[label]), r.quantize,
                                  _calibration_feeds(ctx, r.quantize))
        if budget.target == "onnx_bytes":
            return {label: float(_file_size(path)) for label, path in paths.items()}
        feeds = {budget.batch: export.to_feed(ctx.input_names, _real_batch(ctx, budget.batch))}
        measured = bench.measure(paths, feeds, r.bench.threads, r.bench.warmup, r.bench.runs)
    key = str(budget.batch)
    out = {label: measured["latency_ms"][label][key]["p50"] for label in models}
    out.update({f"{label}/interval": [1 / hi, 1 / lo] for label, ci in measured["speedup_ci"].items()
                for lo, hi in [ci[key]]})
    return out


def _overlap_error(method: Method, layer: str, index: int, prior: Decision) -> str:
    """Why a stage may not change a layer an earlier stage changed, and which chains exist instead."""
    here = f"stages[{method.stage_index}].targets: layer {layer!r} is already changed by stages[{index}] ({prior.method})"
    chains = ", ".join(f"{earlier} -> {name}" for name, cls in METHODS.items() for earlier in cls.refines)
    if prior.method in method.refines:
        why = f"{method.name} continues only layers that {prior.method} factorized (it {prior.action}s this one)"
    else:
        why = f"{method.name} cannot continue from {prior.method} (allowed chains: {chains or 'none'})"
    return f"{here}; {why}; exclude it from one of them"


def _evaluate(model: nn.Module, ctx: Context, device, reference: torch.Tensor | None):
    """(metric dict, outputs) on the eval data, or (None, None) without eval data."""
    data = ctx.data["eval"]
    if data is None:
        return None, None
    outputs = predict(model, data, ctx.input_names, ctx.recipe.recipe.data.batch_size * 4, device)
    target = data.tensors.get(ctx.target)
    name = choose_metric(ctx.recipe.recipe.data.metric, target)
    # without a reference (the original model itself) agreement is measured against its own outputs
    reference = outputs if reference is None else reference
    return {"name": name, "value": round(score(name, outputs, target, reference), 6)}, outputs


def apply(ctx: Context, out: Path, options: Options, force: bool = False) -> reporting.Report | None:
    """Run the whole recipe and write model.pt, model.onnx, report.json and report.md to `out`."""
    r = ctx.recipe.recipe
    seed = r.seed if options.seed is None else options.seed
    torch.manual_seed(seed)
    device = resolve_device(options.device)
    out = Path(out)
    if not distributed.is_main():  # other processes of a torchrun only help fine-tune; rank 0 writes
        compress_model(ctx, options, seed, device, resume_point(ctx, out, seed, options))
        return None
    return write(ctx, lambda: compress_model(ctx, options, seed, device, resume_point(ctx, out, seed, options)),
                 out, options, force)


def write(ctx: Context, compress: Callable[[], Compressed] | Compressed, out: Path, options: Options,
          force: bool = False) -> reporting.Report:
    """Into `out`, atomically and one run at a time: compress (when given a callable), then
    evaluate, export, verify, benchmark and report. GateFailed (exit 3) after writing when a gate is missed."""
    out = Path(out)
    outdir.check_out(out, force, [ctx.loaded.path, ctx.recipe.path])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create its parent folder ({exc.strerror or exc}); nothing was written") from None
    with outdir.locked(out):
        work = outdir.make_work_dir(out)  # removes what a killed run into this same --out left
        try:
            os.chmod(work, 0o777 & ~outdir.current_umask())  # mkdtemp makes it private; the output is an ordinary folder
            done = compress() if callable(compress) else compress
            with outdir.writing(out, work):  # disk full, permissions, ...: nothing half-written stays behind
                result = publish(ctx, done, work, options)
                outdir.write_marker(work)
                outdir.check_out(out, force)  # nothing of the user's appeared in it while we ran
                outdir.replace_dir(work, out)
            outdir.remove_own_dir(resume_folder(out))  # finished: nothing left to resume
        except BaseException:
            outdir.remove_own_dir(work)
            raise
    failed = [g for g in result.gates["checked"] if not g["passed"]]
    if failed:
        error = GateFailed("gate missed: " + "; ".join(f"{g['gate']} {g['limit']} (measured {g['value']})" for g in failed)
                           + f"; report in {out}")
        error.result = result
        raise error
    return result


def resume_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.resume")


def resume_point(ctx: Context, out: Path, seed: int, options: Options) -> ResumePoint:
    """Where fine-tuning keeps its resumable state for this --out (kept when a run fails)."""
    identity = {"recipe_sha256": ctx.recipe.sha256, "model": str(Path(ctx.loaded.path).resolve()), "seed": seed}
    return ResumePoint(resume_folder(out) / "state.pt", ctx.recipe.recipe.finetune.checkpoint_every or 0,
                       options.resume, identity)


@dataclass
class Compressed:
    """Compression done in memory: the compressed model (CPU, eval mode) and what the report needs."""

    model: nn.Module
    original: nn.Module
    methods: list[Method]
    seed: int
    device: torch.device
    metric_before: dict | None
    reference: torch.Tensor | None  # the original's outputs on the eval data
    original_macs: int
    finetune: dict | None = None
    post_finetune: dict | None = None

    @property
    def decisions(self) -> list[dict]:
        """Per-layer decisions as finally applied (finalize may have changed ranks or groups)."""
        return [d.as_dict() for m in self.methods for d in m.decisions]


def compress_model(ctx: Context, options: Options, seed: int, device: torch.device,
                   checkpoint: ResumePoint | None = None) -> Compressed:
    """Plan, prepare, fine-tune and finalize: the compressed model in memory, no file written."""
    r = ctx.recipe.recipe
    timings = ctx.timings
    original = ctx.loaded.model.cpu().eval()
    with timed(timings, "evaluate"):
        metric_before, reference = _evaluate(original, ctx, device, None)
    original.cpu()  # evaluation may have moved it to the device; counting and planning run on the CPU
    original_macs = bench.count_macs(original, ctx.sample)
    methods, _ = plan(ctx, original, options.progress)
    compressed = copy.deepcopy(original)
    with timed(timings, "prepare"):
        for method in methods:
            method.prepare(compressed)
    if ctx.allocation is not None and r.budget.verified and all(m.measurable_before_finetune for m in methods):
        # (a method that removes structure after fine-tuning leaves nothing to measure yet; its costs are exact)
        compressed = _verify_allocation(ctx, original, compressed, methods)
    train = ctx.data["train"]
    steps_wanted = r.finetune.steps or r.finetune.epochs
    if steps_wanted and train is None:
        raise UserError("finetune asks for training but the recipe names no `data.train`")
    with timed(timings, "finetune"):
        trained = None
        if train is not None and steps_wanted:
            trained = finetune(compressed, train, ctx.input_names, ctx.target, r.finetune, r.data.batch_size,
                               teacher=copy.deepcopy(original), methods=methods, device=device, seed=seed,
                               progress=options.progress, checkpoint=checkpoint, output_kind=ctx.output["kind"])
    with timed(timings, "finalize"):
        for method in methods:
            method.finalize(compressed)
    post_epochs = max((m.post_finetune_epochs() for m in methods), default=0)
    post = None
    if post_epochs and train is not None:
        with timed(timings, "post_finetune"):
            post = finetune(compressed, train, ctx.input_names, ctx.target,
                            r.finetune.model_copy(update={"epochs": post_epochs, "steps": None}), r.data.batch_size,
                            teacher=copy.deepcopy(original), device=device, seed=seed + 1,
                            progress=options.progress, desc="post-finetune", output_kind=ctx.output["kind"])
    return Compressed(compressed.cpu().eval(), original, methods, seed, device, metric_before, reference,
                      original_macs, _train_summary(trained), _train_summary(post))


def _verify_allocation(ctx: Context, original: nn.Module, compressed: nn.Module, methods: list[Method]) -> nn.Module:
    """Latency and file size budgets: measure the built model (as it will ship: int8 when the recipe
    quantizes) beside the original before any fine-tuning; while the additive prediction misses by
    more than the target's tolerance, correct the costs, allocate again and rebuild."""
    r = ctx.recipe.recipe
    b = r.budget
    allocation = ctx.allocation
    with timed(ctx.timings, "budget"):
        while True:
            measured = _measure_models(ctx, {"original": (original, False),
                                             "compressed": (compressed, r.quantize is not None)}, b)
            # in the units of the first measurement of the original, which the costs were fitted to
            value = allocation.reference * measured["compressed"] / measured["original"]
            ratio = measured.get("compressed/interval")  # latency only: compressed / original, 95 %
            interval = [allocation.reference * x for x in ratio] if ratio else None
            if budgeting.record(allocation, value, interval) or allocation.rounds >= b.rounds:
                return compressed
            budgeting.correct(allocation, value)
            budgeting.assign(allocation)
            plan_methods(methods, original, bench.profile_layers(original, ctx.sample))
            compressed = copy.deepcopy(original)
            for method in methods:
                method.prepare(compressed)


def publish(ctx: Context, done: Compressed, work: Path, options: Options) -> reporting.Report:
    """Evaluate, export, verify, quantize, benchmark and save `done` into the folder `work`; the report."""
    r = ctx.recipe.recipe
    timings = ctx.timings
    compressed, original, methods = done.model, done.original, done.methods
    seed, device, metric_before, reference, original_macs = (done.seed, done.device, done.metric_before,
                                                             done.reference, done.original_macs)
    with timed(timings, "evaluate"):
        metric_after, torch_outputs = _evaluate(compressed, ctx, torch.device("cpu"), reference)
    rows = done.decisions

    with timed(timings, "export"):
        declared = {s.name: s.dynamic_axes for s in r.inputs or []}
        axes = export.dynamic_axes_for(ctx.input_names, ctx.sample, declared, r.export.dynamic_batch)
        original_onnx = work / "original.onnx"
        float_onnx = work / ("model.float.onnx" if r.quantize else "model.onnx")
        export.export_onnx(original, ctx.sample, ctx.input_names, original_onnx, r.export.opset, axes)
        export.export_onnx(compressed, ctx.sample, ctx.input_names, float_onnx, r.export.opset, axes)
    with timed(timings, "parity"):
        parity = export.verify(compressed, float_onnx, ctx.input_names,
                               _real_batch(ctx, min(64, max(r.bench.batch_sizes))), r.export.parity.atol,
                               r.export.parity.rtol, r.bench.threads)
        float_onnx_metric, float_outputs = _onnx_metric(ctx, float_onnx, metric_after, reference)
        if float_outputs is not None:  # the whole eval set, not one batch: the outputs are computed anyway
            parity = export.check_parity(export.parity(torch_outputs, float_outputs, r.export.parity.atol,
                                                       r.export.parity.rtol))
    warnings = []
    if metric_after and float_onnx_metric and abs(metric_after["value"] - float_onnx_metric["value"]) > METRIC_TOLERANCE:
        warnings.append(f"the torch model scores {metric_after['name']} {metric_after['value']:.4f} but model.onnx "
                        f"{float_onnx_metric['value']:.4f} although parity passed (ties or saturated outputs?); "
                        "gates use the worse")
    shipped, shipped_metric, quantization = float_onnx, float_onnx_metric, None
    if r.quantize:
        with timed(timings, "quantize"):
            shipped = work / "model.onnx"
            quantization = _quantize(ctx, r.quantize, float_onnx, shipped, float_onnx_metric, float_outputs, reference)
            shipped_metric = quantization["fidelity"].pop("metric")
    models = {"original": str(original_onnx), "compressed": str(shipped)}
    if r.quantize:
        models["compressed_float"] = str(float_onnx)
    baselines = {}
    if "int8_original" in r.bench.baselines:
        with timed(timings, "baselines"):
            baseline_onnx = work / "original.int8.onnx"
            try:
                info = quantize.quantize(original_onnx, baseline_onnx, r.quantize or quantize.QuantizeSection(),
                                         _calibration_feeds(ctx, r.quantize))
                metric, _ = _onnx_metric(ctx, baseline_onnx, metric_before, reference)
                baselines["int8_original"] = {"mode": info["mode"], "onnx_bytes": baseline_onnx.stat().st_size,
                                              "metric": metric}
                models["int8_original"] = str(baseline_onnx)
            except UserError as exc:  # e.g. nothing to quantize in the original: say so, do not fail the run
                baselines["int8_original"] = {"error": str(exc)}
                warnings.append(f"baseline int8_original not measured: {exc}")
    with timed(timings, "bench"):
        feeds = {bs: export.to_feed(ctx.input_names, _real_batch(ctx, bs)) for bs in r.bench.batch_sizes}
        pairs = [("int8_original", "compressed")] if "int8_original" in models else []
        measured = bench.measure(models, feeds, r.bench.threads, r.bench.warmup, r.bench.runs,
                                 progress=options.progress, pairs=pairs)
        lat = measured["latency_ms"]
    if "int8_original" in models:
        baselines["int8_original"].update(
            latency_ms=lat["int8_original"], speedup=measured["speedup"]["int8_original"],
            speedup_ci=measured["speedup_ci"]["int8_original"],
            compressed_speedup=measured["pairs"]["int8_original/compressed"])

    with timed(timings, "save"):
        _save_model(ctx, compressed, methods, work / "model.pt", metric_after,
                    r.quantize.model_dump() if r.quantize else None)
    original_onnx_bytes = original_onnx.stat().st_size
    for path in (original_onnx, work / "original.int8.onnx"):  # measured; the output keeps the compressed model
        path.unlink(missing_ok=True)

    model_pt = (work / "model.pt").stat().st_size
    macs = bench.count_macs(compressed, ctx.sample)
    orig = reporting.Side(params=bench.count_params(original), macs=original_macs, onnx_bytes=original_onnx_bytes,
                          metric=metric_before, latency_ms=lat["original"],
                          checkpoint_bytes=_file_size(ctx.loaded.path))
    comp = reporting.Side(params=bench.count_params(compressed), macs=macs, onnx_bytes=shipped.stat().st_size,
                          metric=shipped_metric if r.quantize else metric_after, onnx_metric=shipped_metric,
                          latency_ms=lat["compressed"], checkpoint_bytes=model_pt)
    comp_float = None
    if r.quantize:
        comp_float = reporting.Side(params=comp.params, macs=macs, onnx_bytes=float_onnx.stat().st_size,
                                    metric=metric_after, onnx_metric=float_onnx_metric,
                                    latency_ms=lat["compressed_float"], checkpoint_bytes=model_pt)
    report = reporting.Report(
        recipe=str(ctx.recipe.path), recipe_name=r.name, recipe_sha256=ctx.recipe.sha256, model=ctx.loaded.path,
        seed=seed, device=str(device), inputs=ctx.input_names, output=ctx.output, original=orig, compressed=comp,
        compressed_float=comp_float, quantization=quantization, baselines=baselines,
        ratios=reporting.Ratios(params=reporting.ratio(orig.params, comp.params),
                                macs=reporting.ratio(orig.macs, comp.macs),
                                onnx_bytes=reporting.ratio(orig.onnx_bytes, comp.onnx_bytes),
                                speedup=measured["speedup"]["compressed"],
                                speedup_ci=measured["speedup_ci"]["compressed"]),
        warnings=warnings + measured["warnings"], parity=parity, layers=rows, finetune=done.finetune,
        post_finetune=done.post_finetune, bench=r.bench.model_dump(), versions=reporting.versions(),
        timings_s=dict(timings))
    if ctx.allocation is not None:
        report.budget = budgeting.outcome(ctx.allocation, report)
    report.gates = check_gates(report, r.gates, options)
    report.files = sorted([p.name for p in work.iterdir()] + ["report.json", "report.md"])
    report.write(work)
    return report


def _file_size(path) -> int | None:
    """The input checkpoint's size (None for a model given in memory)."""
    try:
        return Path(path).stat().st_size
    except (OSError, TypeError, ValueError):
        return None


def _onnx_metric(ctx: Context, path: Path, torch_metric: dict | None, reference):
    """(metric dict, outputs) of an ONNX model on the eval data, scored like the torch model; (None,
    None) without eval data."""
    data = ctx.data["eval"]
    if data is None or torch_metric is None:
        return None, None
    r = ctx.recipe.recipe
    outputs = export.onnx_predict(path, data, ctx.input_names, r.data.batch_size * 4, r.bench.threads)
    value = score(torch_metric["name"], outputs, data.tensors.get(ctx.target), reference)
    return {"name": torch_metric["name"], "value": round(value, 6)}, outputs


def _calibration_feeds(ctx: Context, cfg) -> list[dict] | None:
    """Static quantization's calibration batches (ONNX feeds) from data.calibration."""
    data = ctx.data["calibration"]
    if cfg is None or cfg.mode != "static" or data is None:
        return None
    return quantize.calibration_feeds(data, ctx.input_names, ctx.recipe.recipe.data.batch_size, cfg)


def _quantize(ctx: Context, cfg, float_onnx: Path, out: Path, float_metric: dict | None, float_outputs,
              reference) -> dict:
    """Quantize the float model.onnx, then hold the result to the recipe's fidelity limits against the
    float model (on the eval data, else on a batch of the inputs): QuantizationError (exit 4) when missed."""
    info = quantize.quantize(float_onnx, out, cfg, _calibration_feeds(ctx, cfg))
    metric, outputs = _onnx_metric(ctx, out, float_metric, reference)
    if outputs is None:  # no eval data: compare the two ONNX models on the batch parity used
        r = ctx.recipe.recipe
        batch = export.to_feed(ctx.input_names, _real_batch(ctx, min(64, max(r.bench.batch_sizes))))
        float_outputs, outputs = (export.run(p, batch, r.bench.threads) for p in (float_onnx, out))
    fid = quantize.fidelity(float_outputs, outputs, classes=bool(metric) and metric["name"] == "accuracy")
    fid["metric_drop"] = (round(drop(metric["name"], float_metric["value"], metric["value"]), 6)
                          if metric and float_metric else None)
    fid = quantize.check_fidelity(fid, cfg, metric["name"] if metric else None)
    fid["metric"] = metric
    return {**info, "fidelity": fid}


def _train_summary(trained) -> dict | None:
    if trained is None:
        return None
    return {"steps": trained.steps, "epochs": round(trained.epochs, 3), "seconds": round(trained.seconds, 3),
            "samples_per_s": round(trained.samples_per_s, 1), "final_loss": trained.final_loss,
            "loss_terms": trained.loss_terms}


def _real_batch(ctx: Context, size: int) -> tuple[torch.Tensor, ...]:
    """`size` real samples from the eval data (cycled if fewer), or the synthetic sample repeated."""
    data = ctx.data["eval"]
    if data is None:
        return tuple(t.expand(size, *t.shape[1:]).contiguous() for t in ctx.sample)
    batch = data.head(size)
    return split_batch(batch, ctx.input_names, ctx.target)[0]


def _save_model(ctx: Context, model: nn.Module, methods: list[Method], path: Path, metric: dict | None,
                quantization: dict | None = None) -> None:
    loaded = ctx.loaded
    if loaded.pickled:
        save_pickled_module(path, model)
        return
    # a layer a later stage refined (afm -> pela) is replayed by the earlier stage's edit, which names the chain
    chains = {d.name: d.extra["chain"] for m in methods for d in m.decisions if d.action == "refine"}
    edits = list(loaded.edits) + [{**e, "chain": chains[e["name"]]} if e["op"] == "factorize" and e["name"] in chains
                                  else e for m in methods for e in m.edits()]
    inputs = [{"name": n, "shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
              for n, t in zip(ctx.input_names, ctx.sample)]
    metadata = {"recipe_sha256": ctx.recipe.sha256, "metric": metric, "source": loaded.path}
    if quantization:  # model.onnx is int8 by these settings; the weights saved here stay float
        metadata["quantization"] = quantization
    save_checkpoint(path, model, loaded.factory, loaded.kwargs, inputs=inputs, edits=edits, metadata=metadata)
    save_artifact(path.parent, model, loaded.factory, loaded.kwargs, edits, inputs, metadata)


def check_gates(report: reporting.Report, gates, options: Options) -> dict:
    """Each gate set in the recipe or on the command line (the command line wins), with its value."""
    max_drop = options.max_metric_drop if options.max_metric_drop is not None else gates.max_metric_drop
    min_speedup = options.min_speedup if options.min_speedup is not None else gates.min_speedup
    min_size = options.min_size_ratio if options.min_size_ratio is not None else gates.min_size_ratio
    checked = []
    if max_drop is not None:  # the shipped model's metric: the worse of torch's and model.onnx's
        before, after = report.original.metric, report.compressed.metric
        if before is None or after is None:
            raise UserError("gate max_metric_drop needs eval data (data.eval) to measure a metric")
        onnx_metric = getattr(report.compressed, "onnx_metric", None)
        candidates = [("torch", after)] + ([("model.onnx", onnx_metric)] if onnx_metric else [])
        measured_on, worst = max(candidates, key=lambda c: drop(before["name"], before["value"], c[1]["value"]))
        value = round(drop(before["name"], before["value"], worst["value"]), 6)
        checked.append({"gate": "max_metric_drop", "limit": max_drop, "value": value, "measured_on": measured_on,
                        "passed": value <= max_drop})
    if min_speedup is not None:  # held to the lower end of the speedup's 95 % interval, not to one noisy figure
        batch = str(gates.speedup_batch or max(int(b) for b in report.ratios.speedup))
        value = report.ratios.speedup_ci[batch][0]
        checked.append({"gate": f"min_speedup@batch{batch}", "limit": min_speedup, "value": value,
                        "estimate": report.ratios.speedup[batch], "passed": value >= min_speedup})
    if min_size is not None:
        value = report.ratios.onnx_bytes
        checked.append({"gate": "min_size_ratio", "limit": min_size, "value": value,
                        "passed": value is not None and value >= min_size})
    if gates.budget and report.budget is not None:
        target, = (k for k in report.budget["target"] if k != "batch")
        checked.append({"gate": f"budget.{target}", "limit": report.budget["target"][target],
                        "value": report.budget["measured"], "passed": report.budget["met"]})
    return {"checked": checked, "passed": all(g["passed"] for g in checked)}
