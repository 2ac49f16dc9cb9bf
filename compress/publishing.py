"""Publishing, the pipeline's last step: export to ONNX, parity with torch, int8, the baselines,
latency, the report, the checkpoint and the artifact, and the gates, all into the run's work
folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import bench, budget as budgeting, exporting as export, precision, quantize
from . import report as reporting
from .checkpoint import save_artifact, save_checkpoint, save_pickled_module
from .errors import UserError
from .hf import copy_tokenizer
from .methods import Method
from .metrics import drop, score
from .context import (METRIC_TOLERANCE, Compressed, Context, Options, calibration_feeds, evaluate, export_axes,
                      file_size, real_batch, rewrite_timing, timed, timing_feeds)

@dataclass
class _Published:
    """What publishing has made so far: the ONNX files, the metrics and outputs measured on them."""

    original_onnx: Path
    float_onnx: Path
    metric_after: dict | None
    torch_outputs: torch.Tensor | None
    float_metric: dict | None = None
    float_outputs: torch.Tensor | None = None
    parity: export.Parity | None = None
    shipped: Path | None = None
    shipped_metric: dict | None = None
    quantization: quantize.Quantized | None = None
    models: dict = field(default_factory=dict)  # label -> ONNX file, for the benchmark
    baselines: dict[str, reporting.Baseline] = field(default_factory=dict)
    warnings: list = field(default_factory=list)


def publish(ctx: Context, done: Compressed, work: Path, options: Options) -> reporting.Report:
    """Evaluate, export, verify, quantize, benchmark and save `done` into the folder `work`; the report."""
    r = ctx.recipe.recipe
    out = _export_and_verify(ctx, done, work)
    _ship(ctx, done, out, work)
    if "int8_original" in r.bench.baselines:
        _int8_baseline(ctx, done, out, work)
    measured = _bench(ctx, out, options)
    with timed(ctx.timings, "save"):
        shipped = precision.shipped_settings(r.quantize, done.allocation)
        _save_model(ctx, done.model, done.methods, work / "model.pt", out.metric_after,
                    shipped.model_dump() if shipped else None)
        if ctx.loaded.tokenizer:  # the output serves alone: model.onnx and the tokenizer that feeds it
            copy_tokenizer(ctx.loaded.tokenizer, work)
    original_onnx_bytes = out.original_onnx.stat().st_size
    for path in (out.original_onnx, *work.glob("original.int8-*.onnx")):  # measured; the output keeps the compressed
        path.unlink(missing_ok=True)                                        # model
    report = _report(ctx, done, out, measured, original_onnx_bytes, (work / "model.pt").stat().st_size)
    if done.allocation is not None:
        report.budget = budgeting.outcome(done.allocation, report)
    report.gates = check_gates(report, r.gates, options)
    report.files = sorted([p.name for p in work.iterdir()] + ["report.json", "report.md"])
    report.write(work)
    return report


def _export_and_verify(ctx: Context, done: Compressed, work: Path) -> _Published:
    """The torch metric, both models in ONNX, parity on the eval set, and the float ONNX model's metric."""
    r = ctx.recipe.recipe
    with timed(ctx.timings, "evaluate"):
        metric_after, torch_outputs = evaluate(done.model, ctx, torch.device("cpu"), done.reference)
    out = _Published(work / "original.onnx", work / ("model.float.onnx" if r.quantize else "model.onnx"),
                     metric_after, torch_outputs)
    with timed(ctx.timings, "export"):
        axes = export_axes(r, ctx.input_names, ctx.sample, r.export.dynamic_batch)
        export.export_onnx(done.original, ctx.sample, ctx.input_names, out.original_onnx, r.export.opset, axes)
        export.export_onnx(done.model, ctx.sample, ctx.input_names, out.float_onnx, r.export.opset, axes)
    with timed(ctx.timings, "parity"):
        tolerance = (r.export.parity.atol, r.export.parity.rtol)
        batch = real_batch(ctx, min(64, max(r.bench.batch_sizes)))
        out.parity = export.verify(done.model, out.float_onnx, ctx.input_names, batch, *tolerance, r.bench.threads)
        out.float_metric, out.float_outputs = _onnx_metric(ctx, out.float_onnx, metric_after, done.reference)
        if out.float_outputs is not None:  # the whole eval set, not one batch: the outputs are computed anyway
            out.parity = export.check_parity(export.parity(torch_outputs, out.float_outputs, *tolerance))
        shorter = export.shortest(batch, ctx.input_names, axes)
        if shorter is not None:  # a dynamic sequence axis: the model must take other lengths than it was traced at
            at_short = export.verify(done.model, out.float_onnx, ctx.input_names, shorter, *tolerance, r.bench.threads)
            mask = ctx.input_names.index("attention_mask")  # shortest() cuts along tokenized text's mask
            out.parity = export.worse(out.parity, at_short, [batch[mask].shape[1], shorter[mask].shape[1]])
    if metric_after and out.float_metric and abs(metric_after["value"] - out.float_metric["value"]) > METRIC_TOLERANCE:
        out.warnings.append(f"the torch model scores {metric_after['name']} {metric_after['value']:.4f} but model.onnx "
                            f"{out.float_metric['value']:.4f} although parity passed (ties or saturated outputs?); "
                            "gates use the worse")
    return out


def _ship(ctx: Context, done: Compressed, out: _Published, work: Path) -> None:
    """The model that ships: the float ONNX model, or its int8 version when the recipe quantizes."""
    r = ctx.recipe.recipe
    out.shipped, out.shipped_metric = out.float_onnx, out.float_metric
    if r.quantize:
        with timed(ctx.timings, "quantize"):
            out.shipped = work / "model.onnx"
            cfg = precision.shipped_settings(r.quantize, done.allocation)  # budget: layers kept float excluded
            with quantize.int8_source(cfg, done.model, out.float_onnx, _eager_export(ctx, done.model)) as source:
                out.quantization, out.shipped_metric = _quantize(ctx, cfg, source, out.shipped, out.float_metric,
                                                                 out.float_outputs, done.reference)
            fused = out.quantization.fused
            if fused is not None and not fused.get("Attention"):
                out.warnings.append("quantize.fuse fused no attention in the compressed model (factorized or unevenly "
                                    "pruned attention projections break the pattern ONNX Runtime's optimizer fuses); "
                                    f"it fused {', '.join(f'{v} {k}' for k, v in fused.items()) or 'nothing'}")
    out.models = {"original": str(out.original_onnx), "compressed": str(out.shipped)}
    if r.quantize:
        out.models["compressed_float"] = str(out.float_onnx)


def _eager_export(ctx: Context, model: nn.Module):
    """`quantize.int8_source`'s export: `model` as publishing exports it, with eager attention."""
    r = ctx.recipe.recipe
    axes = export_axes(r, ctx.input_names, ctx.sample, r.export.dynamic_batch)
    return lambda path: export.export_onnx(model, ctx.sample, ctx.input_names, path, r.export.opset, axes,
                                           eager_attention=True)


def int8_options(recipe, calibration: bool) -> list[quantize.QuantizeSection]:
    """The int8 options of the original the data allows: the recipe's quantize settings (ONNX
    Runtime's dynamic defaults without them), the same unfused where they fuse (ONNX Runtime's
    one-line dynamic int8) and, with calibration data, static QDQ with its defaults (convolutions
    included) unless the recipe's settings are static already. None has compress's own graph
    rewrites (`quantize.rewrites`): the baseline is what ONNX Runtime makes."""
    first = (recipe.quantize or quantize.QuantizeSection()).model_copy(update={"rewrites": []})
    return ([first] + ([first.model_copy(update={"fuse": False})] if first.fuse else [])
            + ([quantize.QuantizeSection(mode="static")] if calibration and first.mode != "static" else []))


def option_label(cfg: quantize.QuantizeSection) -> str:
    """How the report names an int8 option of the original: its mode, `+fused` where it fuses."""
    return cfg.mode + ("+fused" if cfg.fuse else "")


def _int8_baseline(ctx: Context, done: Compressed, out: _Published, work: Path) -> None:
    """ONNX Runtime's int8 of the original in each option the data allows, each measured beside the
    shipped model (`_bench` keeps the fastest); an error is reported, not fatal."""
    r = ctx.recipe.recipe
    with timed(ctx.timings, "baselines"):
        errors = []
        for cfg in int8_options(r, ctx.data["calibration"] is not None):
            mode = option_label(cfg)
            label, path = f"int8_original:{mode}", work / f"original.int8-{mode.replace('+', '-')}.onnx"
            try:
                with quantize.int8_source(cfg, done.original, out.original_onnx,
                                          _eager_export(ctx, done.original)) as (source, heads):
                    info = quantize.quantize(source, path, cfg, calibration_feeds(ctx, cfg), heads)
            except UserError as exc:  # e.g. nothing to quantize in the original: say so, do not fail the run
                errors.append(f"{mode}: {exc}")
                continue
            metric, _ = _onnx_metric(ctx, path, done.metric_before, done.reference)
            out.baselines[label] = reporting.Baseline(mode=mode, metric=metric, onnx_bytes=path.stat().st_size,
                                                      quantized_ops=sum(info.quantized_ops.values()))
            out.models[label] = str(path)
        if errors and not out.baselines:
            out.baselines["int8_original"] = reporting.Baseline(error="; ".join(errors))
            out.warnings.append(f"baseline int8_original not measured: {'; '.join(errors)}")


def _bench(ctx: Context, out: _Published, options: Options) -> bench.Measurement:
    """Latency of every model in `out.models`, interleaved, at the recipe's batch sizes; of the int8
    options of the original, the fastest at the largest shape is the `int8_original` baseline (the
    others are listed in its `tried`)."""
    r = ctx.recipe.recipe
    options_tried = [label for label in out.models if label.startswith("int8_original:")]
    with timed(ctx.timings, "bench"):
        feeds = timing_feeds(ctx, r.bench.batch_sizes, r.bench.seq_lens)
        measured = bench.measure(out.models, feeds, r.bench.threads, r.bench.warmup, r.bench.runs,
                                 progress=options.progress, pairs=[(label, "compressed") for label in options_tried])
    if options_tried:
        largest = bench.largest_key(feeds)
        for label in options_tried:
            base = out.baselines[label]
            base.latency_ms, base.speedup = measured.latency_ms[label], measured.speedup[label]
            base.speedup_ci = measured.speedup_ci[label]
            base.compressed_speedup = measured.pair(label, "compressed")
        fastest = min(options_tried, key=lambda label: measured.latency_ms[label][largest]["p50"])
        chosen = out.baselines[fastest]
        tried = [(out.baselines.pop(label), measured.latency_ms[label][largest]["p50"]) for label in options_tried]
        chosen.tried = [{"mode": b.mode, "onnx_bytes": b.onnx_bytes, "quantized_ops": b.quantized_ops, "metric": b.metric,
                         f"p50_ms@{largest}": p50} for b, p50 in tried]
        out.baselines["int8_original"] = chosen
    return measured


def _report(ctx: Context, done: Compressed, out: _Published, measured: bench.Measurement, original_onnx_bytes: int,
            model_pt: int) -> reporting.Report:
    """The typed report of the run (gates, budget and files are added by the caller)."""
    r = ctx.recipe.recipe
    lat = measured.latency_ms
    macs = bench.count_macs(done.model, ctx.sample)
    orig = reporting.Side(params=bench.count_params(done.original), macs=done.original_macs,
                          onnx_bytes=original_onnx_bytes, metric=done.metric_before, latency_ms=lat["original"],
                          checkpoint_bytes=file_size(ctx.loaded.path))
    comp = reporting.Side(params=bench.count_params(done.model), macs=macs, onnx_bytes=out.shipped.stat().st_size,
                          metric=out.shipped_metric if r.quantize else out.metric_after, onnx_metric=out.shipped_metric,
                          latency_ms=lat["compressed"], checkpoint_bytes=model_pt)
    comp_float = None
    if r.quantize:
        comp_float = reporting.Side(params=comp.params, macs=macs, onnx_bytes=out.float_onnx.stat().st_size,
                                    metric=out.metric_after, onnx_metric=out.float_metric,
                                    latency_ms=lat["compressed_float"], checkpoint_bytes=model_pt)
    return reporting.Report(
        recipe=str(ctx.recipe.path), recipe_name=r.name, recipe_sha256=ctx.recipe.sha256, model=ctx.loaded.path,
        seed=done.seed, device=str(done.device), inputs=ctx.input_names, output=ctx.output, original=orig,
        compressed=comp, compressed_float=comp_float, quantization=out.quantization, baselines=out.baselines,
        ratios=reporting.Ratios(params=reporting.ratio(orig.params, comp.params),
                                macs=reporting.ratio(orig.macs, comp.macs),
                                onnx_bytes=reporting.ratio(orig.onnx_bytes, comp.onnx_bytes),
                                speedup=measured.speedup["compressed"],
                                speedup_ci=measured.speedup_ci["compressed"]),
        warnings=out.warnings + measured.warnings, parity=out.parity, layers=done.decisions,
        finetune=done.finetune, post_finetune=done.post_finetune, bench=r.bench.model_dump(),
        versions=reporting.versions(), timings_s=dict(ctx.timings))


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


def _quantize(ctx: Context, cfg, source: tuple[Path, tuple[int, int] | None], out: Path, float_metric: dict | None,
              float_outputs, reference) -> tuple[quantize.Quantized, dict | None]:
    """Quantize the float model.onnx (`source`: `quantize.int8_source`'s file and heads), then hold the
    result to the recipe's fidelity limits against the float model (on the eval data, else on a batch
    of the inputs): QuantizationError (exit 4) when missed."""
    float_onnx, heads = source
    info = quantize.quantize(float_onnx, out, cfg, calibration_feeds(ctx, cfg), heads, rewrite_timing(ctx))
    metric, outputs = _onnx_metric(ctx, out, float_metric, reference)
    if outputs is None:  # no eval data: compare the two ONNX models on the batch parity used
        r = ctx.recipe.recipe
        batch = export.to_feed(ctx.input_names, real_batch(ctx, min(64, max(r.bench.batch_sizes))))
        float_outputs, outputs = (export.run(p, batch, r.bench.threads) for p in (float_onnx, out))
    fid = quantize.fidelity(float_outputs, outputs, classes=bool(metric) and metric["name"] == "accuracy")
    fid.metric_drop = (round(drop(metric["name"], float_metric["value"], metric["value"]), 6)
                       if metric and float_metric else None)
    info.fidelity = quantize.check_fidelity(fid, cfg, metric["name"] if metric else None)
    return info, metric


def train_summary(trained) -> dict | None:
    if trained is None:
        return None
    if isinstance(trained, str):  # skipped, and why
        return {"steps": 0, "skipped": trained}
    return {"steps": trained.steps, "epochs": round(trained.epochs, 3), "seconds": round(trained.seconds, 3),
            "samples_per_s": round(trained.samples_per_s, 1), "final_loss": trained.final_loss,
            "loss_terms": trained.loss_terms}


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
    if "base" in loaded.metadata:  # a Hugging Face folder: which one, and the hash of its weights
        metadata["base"] = loaded.metadata["base"]
    if quantization:  # model.onnx is int8 by these settings; the weights saved here stay float
        metadata["quantization"] = quantization
    save_checkpoint(path, model, loaded.factory, loaded.kwargs, inputs=inputs, edits=edits, metadata=metadata)
    save_artifact(path.parent, model, loaded.factory, loaded.kwargs, edits, inputs, metadata)


def check_gates(report: reporting.Report, gates, options: Options) -> reporting.Gates:
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
        checked.append(reporting.GateCheck("max_metric_drop", max_drop, value, value <= max_drop, measured_on=measured_on))
    if min_speedup is not None:  # held to the lower end of the speedup's 95 % interval, not to one noisy figure
        shapes = [k for k in report.ratios.speedup  # at the longest sequence timed, when text is timed at several
                  if gates.speedup_batch is None or k.split("x")[0] == str(gates.speedup_batch)]
        batch = bench.largest_key(shapes)
        value = report.ratios.speedup_ci[batch][0]
        checked.append(reporting.GateCheck(f"min_speedup@batch{batch}", min_speedup, value, value >= min_speedup,
                                           estimate=report.ratios.speedup[batch]))
    if min_size is not None:
        value = report.ratios.onnx_bytes
        checked.append(reporting.GateCheck("min_size_ratio", min_size, value, value is not None and value >= min_size))
    if gates.budget and report.budget is not None:
        target, = (k for k in report.budget.target if k not in ("batch", "seq_len", "over"))
        limit = report.budget.over_original or report.budget.target[target]  # in the measurement's terms
        checked.append(reporting.GateCheck(f"budget.{target}", limit,
                                           report.budget.measured, report.budget.met))
    return reporting.Gates(checked, all(g.passed for g in checked))
