"""`compress sweep`: one budgeted run per budget value, and the Pareto front they trace.

The recipe's `budget:` target (speedup, latency_ms, params, macs or onnx_bytes) is set to each value in turn;
every run is a complete `compress apply` into `OUT/budget-<value>/`. The runs share the
calibration statistics (taken once, in memory) and the op-latency cache (on disk). `OUT` then
holds `pareto.json` and `pareto.md` (metric against measured latency at the budget's batch size:
each run's shipped model with its precision, float, int8 or mixed; where the recipe quantizes, the
same allocation in float; the original and, when the recipe benchmarks it, int8 of the original) and
`pareto.png` when
matplotlib is installed (`pip install 'compress[plot]'`; otherwise pareto.md says it was skipped).
The folder is built beside `OUT` and moved into place at the end, like `apply`'s. A run that
misses one of the recipe's gates does not stop the sweep; the sweep then exits 3 at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from . import outdir
from .bench import largest_key
from .outdir import current_umask
from .errors import GateFailed, UserError
from .recipe import LoadedRecipe

SWEEP_FILES = frozenset({outdir.MARKER, "pareto.json", "pareto.md", "pareto.png"})


def folder_name(value: float) -> str:
    return f"budget-{value:g}"


def check_out(out: Path, force: bool, inputs) -> None:
    """Like outdir.check_out, for a sweep's folder: a previous sweep (its files and its budget-* runs,
    each an output of compress) may be replaced with --force, nothing else."""
    entries = list(out.iterdir()) if out.is_dir() and not out.is_symlink() else []
    if not entries:
        outdir.check_out(out, force, inputs)  # missing, empty, a file, a link: as for apply
        return
    outdir.check_not_holding(out, inputs)
    if not force:
        raise UserError(f"{out}: output folder exists; pass --force to replace it")
    ours = (out / outdir.MARKER).is_file() and all(
        (p.name in SWEEP_FILES and p.is_file() and not p.is_symlink())
        or (p.is_dir() and not p.is_symlink() and p.name.startswith("budget-") and _only_ours(p))
        for p in entries)
    if not ours:
        raise UserError(f"{out}: --force replaces only a previous compress sweep, and this folder holds other "
                        "files; nothing was touched: choose another --out or move them")


def _only_ours(folder: Path) -> bool:
    """A budget-* run folder holding only what `apply` writes, its marker included."""
    entries = list(folder.iterdir())
    return (folder / outdir.MARKER).is_file() and all(
        p.name in outdir.OUTPUT_FILES and p.is_file() and not p.is_symlink() for p in entries)


def run(ctx, values: list[float], out: Path, options, force: bool = False) -> dict:
    """Every budget in `values`, written under `out`; the Pareto summary (also in pareto.json)."""
    from .pipeline import compress_model, resolve_device, write

    recipe = ctx.recipe.recipe
    if recipe.budget is None:
        raise UserError("sweep: the recipe has no budget: section; its target is what --budgets sets")
    target = recipe.budget.target
    shape = recipe.budget.shape if recipe.budget.in_latency else None
    for value in values:  # the section's own bounds, before anything runs
        try:
            recipe.budget.model_validate({**recipe.budget.model_dump(exclude_none=True), target: value})
        except Exception as exc:  # noqa: BLE001 - pydantic's message, one line
            raise UserError(f"--budgets {value:g}: not a valid budget.{target} ({str(exc).splitlines()[-1].strip()})") \
                from None
    names = [folder_name(v) for v in values]
    clash = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if clash:
        same = [f"{v!r}" for v, n in zip(values, names) if n == clash]
        raise UserError(f"--budgets: {' and '.join(same)} would share the folder {clash}; give budgets that differ "
                        "in their first 6 significant digits")
    out = Path(out)
    check_out(out, force, [ctx.loaded.path, ctx.recipe.path])
    device = resolve_device(options.device)
    points, twins, missed, reports = [], [], [], []
    with outdir.locked(out):
        work = outdir.make_work_dir(out, "sweep")  # removes what a killed sweep into this same --out left
        try:
            os.chmod(work, 0o777 & ~current_umask())  # mkdtemp makes it private; the output is an ordinary folder
            for value in values:
                budget = recipe.budget.model_copy(update={target: value})
                loaded = LoadedRecipe(recipe.model_copy(update={"budget": budget}), ctx.recipe.path,
                                      ctx.recipe.sha256)
                run_ctx = dataclasses.replace(ctx, recipe=loaded, timings={})
                seed = recipe.seed if options.seed is None else options.seed
                folder = work / folder_name(value)
                try:
                    # no resume point: a sweep has no --resume, and its work folder goes when it is stopped
                    report = write(run_ctx, lambda: compress_model(run_ctx, options, seed, device), folder, options)
                except GateFailed as exc:  # the run's report is written; the sweep goes on
                    report = exc.result
                    missed.append(folder_name(value))
                reports.append(report.to_json())
                points.append(_point(f"budget {target} {value:g}", value, reports[-1], shape))
                twins.append(_float_point(f"budget {target} {value:g}", value, reports[-1], shape))
            summary = _summary(target, shape, reports[0], points, [t for t in twins if t])
            with outdir.writing(out, work):
                (work / "pareto.json").write_text(json.dumps(summary, indent=2) + "\n")
                png = _plot(summary, work / "pareto.png")
                (work / "pareto.md").write_text(_markdown(summary, png))
                outdir.write_marker(work)
                outdir.replace_dir(work, out)
        except BaseException:
            outdir.remove_own_dir(work)
            raise
    if missed:  # everything is written; the exit code says a run missed a gate
        error = GateFailed(f"sweep: {len(missed)} of {len(values)} runs missed a gate: {', '.join(missed)} "
                           f"(see their report.md in {out})")
        error.result = summary
        raise error
    return summary


def _batch(report: dict, shape: str | None) -> str:
    """The report's latency key for the budget's shape (`BudgetSection.shape`), else the largest timed."""
    sizes = list(report["original"]["latency_ms"])
    return shape if shape in sizes else largest_key(sizes)


def precision(report: dict) -> str:
    """What the shipped model of a run computes in: `float` (no quantize section), `mixed` (a budget
    with precision per_layer kept some of its layers float) or `int8`."""
    if not report.get("quantization"):
        return "float"
    return "mixed" if (report.get("budget") or {}).get("float_layers") else "int8"


def _point(label: str, value, report: dict, batch: str | None) -> dict:
    b = _batch(report, batch)
    c = report["compressed"]
    return {"label": label, "budget": value, "precision": precision(report), "latency_ms": c["latency_ms"][b]["p50"],
            "speedup": report["ratios"]["speedup"].get(b), "params": c["params"], "macs": c["macs"],
            "metric": c.get("metric"), "budget_met": (report.get("budget") or {}).get("met"),
            "folder": folder_name(value)}


def _float_point(label: str, value, report: dict, batch: str | None) -> dict | None:
    """The same allocation in float (model.float.onnx beside an int8 model.onnx), timed in the same
    run as the shipped model; None when the run ships the float model itself."""
    f = report.get("compressed_float")
    if not f:
        return None
    b = _batch(report, batch)
    p50 = f["latency_ms"][b]["p50"]  # its speedup over the original, from the p50s of the same run
    return {"label": f"{label}, float", "budget": value, "precision": "float", "latency_ms": p50,
            "speedup": round(report["original"]["latency_ms"][b]["p50"] / p50, 4) if p50 else None,
            "params": f["params"], "macs": f["macs"],
            "metric": f.get("metric"), "folder": folder_name(value)}


def _summary(target: str, batch: str | None, first: dict, points: list[dict], float_points: list[dict]) -> dict:
    b = _batch(first, batch)
    o = first["original"]
    reference = [{"label": "original", "latency_ms": o["latency_ms"][b]["p50"], "params": o["params"],
                  "macs": o["macs"], "metric": o.get("metric")}]
    int8 = (first.get("baselines") or {}).get("int8_original")
    if int8 and not int8.get("error"):
        reference.append({"label": "int8 of the original", "latency_ms": int8["latency_ms"][b]["p50"],
                          "metric": int8.get("metric")})
    size, _, length = b.partition("x")
    return {"target": target, "batch": int(size), **({"seq_len": int(length)} if length else {}),
            "reference": reference, "points": points, "float_points": float_points,
            "note": "latencies are ONNX Runtime p50 at the batch size, each run measured beside its own original; "
                    "points are the shipped models (precision float, int8 or mixed), float_points the same "
                    "allocations in float where the run quantizes; the reference points are from the first run"}


def _markdown(summary: dict, png: str | None) -> str:
    def metric(m):
        return "-" if not m else f"{m['name']} {m['value']:.4f}"

    lines = [f"# Sweep over budget.{summary['target']}", "",
             f"Latency: ONNX Runtime p50 at batch {summary['batch']}"
             + (f", {summary['seq_len']} tokens." if "seq_len" in summary else "."), "",
             "| run | precision | latency ms | speedup | params | MACs | metric | budget met |",
             "|---|---|---|---|---|---|---|---|"]
    def count(value):
        return "-" if value is None else f"{value:,}"

    for r in summary["reference"]:
        kind = "int8" if r["label"].startswith("int8") else "float"
        lines.append(f"| {r['label']} | {kind} | {r['latency_ms']:.4f} | - | {count(r.get('params'))} | "
                     f"{count(r.get('macs'))} | {metric(r.get('metric'))} | - |")
    for p in summary["points"] + summary.get("float_points", []):
        lines.append(f"| {p['label']} | {p['precision']} | {p['latency_ms']:.4f} | {p['speedup']} | {p['params']:,} | "
                     f"{p['macs']:,} | {metric(p.get('metric'))} | {p.get('budget_met', '-')} |")
    lines += ["", png or "pareto.png skipped: matplotlib is not installed (pip install 'compress[plot]')", ""]
    return "\n".join(lines)


def _plot(summary: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = [p for p in summary["points"] if p.get("metric")]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["latency_ms"] for p in points], [p["metric"]["value"] for p in points], "-", color="0.6", zorder=1)
    for kind, marker in (("float", "o"), ("int8", "D"), ("mixed", "P")):  # the shipped models, by precision
        shown = [p for p in points if p.get("precision", "float") == kind]
        if shown:
            ax.plot([p["latency_ms"] for p in shown], [p["metric"]["value"] for p in shown], marker,
                    label=f"budgeted, {kind}" + (" (float and int8 layers)" if kind == "mixed" else ""), zorder=2)
    twins = [p for p in summary.get("float_points", []) if p.get("metric")]
    if twins:
        ax.plot([p["latency_ms"] for p in twins], [p["metric"]["value"] for p in twins], "x",
                label="the same allocations in float")
    for p in points:
        ax.annotate(f"{p['budget']:g}", (p["latency_ms"], p["metric"]["value"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    for r, marker in zip(summary["reference"], ("s", "^")):
        if r.get("metric"):
            ax.plot([r["latency_ms"]], [r["metric"]["value"]], marker, label=r["label"])
    ax.set_xlabel(f"ONNX Runtime p50 latency, batch {summary['batch']} (ms)")
    ax.set_ylabel(points[0]["metric"]["name"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return "pareto.png: metric against measured latency."
