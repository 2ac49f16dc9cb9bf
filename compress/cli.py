"""The `compress` command line (click). Every verb is a thin layer over the library."""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import click

from ._version import __version__
from .errors import CompressError, Terminated, UserError, first_line

EPILOG_FIRST_RUN = """\b
First run:
  compress example digits-resnet model.pt
  compress apply --recipe recipes/svd.yaml model.pt --out out/svd
"""


def _fail(message: str, code: int) -> None:
    from .distributed import is_main

    one_line = " ".join(message.split())  # a message is one line, whatever text it quotes
    if is_main():  # in a torchrun, rank 0 speaks for all
        click.echo(f"error: {one_line}", err=True)
    sys.exit(code)


def command_errors(fn):
    """One line and a distinct exit code for every failure; the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        previous = _terminate_on_sigterm()
        try:
            return fn(*args, **kwargs)
        except CompressError as exc:
            if debug:
                traceback.print_exc()
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; no output was written", 130)
        except Terminated:
            _fail("terminated (SIGTERM); no output was written", 143)
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
            if debug:
                traceback.print_exc()
            _fail(f"internal error ({type(exc).__name__}: {first_line(exc, 200)}); rerun with --debug for the traceback "
                  "and report it", 1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _terminate_on_sigterm():
    """SIGTERM raises Terminated (fine-tuning turns it into a saved state first); the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def common(fn):
    """--debug and --quiet on every verb, and the error handling above."""
    fn = command_errors(fn)
    fn = click.option("--quiet", "-q", is_flag=True, help="No progress bars, only results and errors.")(fn)
    fn = click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")(fn)
    return fn


recipe_option = click.option("--recipe", "-r", "recipe_path", type=click.Path(dir_okay=False), required=True,
                             help="Recipe YAML file (see `compress recipe schema`).")


def trust_option(fn):
    """--trust-checkpoint (pickles) and --trust-factory (model-building code named by a file)."""
    fn = click.option("--trust-factory", "trust_factory", multiple=True, metavar="PREFIX",
                      help="Trust model factories in modules under PREFIX (e.g. mypackage.models): a checkpoint, "
                           "compression.json or recipe naming one may import and call it. Repeatable. Without it "
                           "only the bundled examples' and installed plug-ins' factories are trusted; a recipe or a "
                           "file never trusts anything.")(fn)
    fn = click.option("--trust-checkpoint", is_flag=True,
                      help="Allow loading a whole pickled module (unpickling runs code: only for files you trust).")(fn)
    return fn

device_option = click.option("--device", default="cpu", show_default=True,
                             help="Device for fine-tuning: cpu, cuda, cuda:1, or auto (planning, calibration, "
                                  "export and benchmarks run on the CPU).")
seed_option = click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None,
                           help="Random seed, 0 to 2^32-1 (default: the recipe's `seed`, else 0).")


class Finite(click.ParamType):
    """A finite number above a bound (NaN and infinity would silently switch a gate off)."""

    name = "number"

    def __init__(self, minimum: float, inclusive: bool):
        self.minimum, self.inclusive = minimum, inclusive

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        ok = math.isfinite(number) and (number >= self.minimum if self.inclusive else number > self.minimum)
        if not ok:
            self.fail(f"{value!r} is not a finite number {'>=' if self.inclusive else '>'} {self.minimum:g}", param, ctx)
        return number


@click.group(epilog=EPILOG_FIRST_RUN, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="compress")
def cli():
    """Compress PyTorch models with low-rank and structured methods, export a verified ONNX model,
    and report size, MACs, accuracy and measured latency before and after.

    Exit codes: 0 success, 1 internal error, 2 user error (bad recipe, file or data),
    3 a gate missed, 4 ONNX parity failed, 130 interrupted, 143 terminated (SIGTERM).
    """


def _context(recipe_path, model, trust, factories=(), seed=None, device="cpu", quiet=False, **gates):
    from .pipeline import Options, load_context
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path)
    options = Options(seed=seed, device=device, trust_checkpoint=trust, trust_factories=tuple(factories),
                      progress=not quiet, **gates)
    return load_context(recipe, model, options), options


@cli.command(epilog="""\b
Example:
  compress apply --recipe recipes/svd.yaml model.pt --out out/svd
  compress apply -r recipes/svd.yaml model.pt --out out/svd --force --max-metric-drop 0.01
  compress apply -r examples/sentence-encoder/recipe.yaml ./all-MiniLM-L6-v2 --out out/minilm""")
@recipe_option
@click.argument("model", type=click.Path())
@click.option("--out", "-o", type=click.Path(), default=None,
              help="Output folder (default: out/<recipe file name>). Holds model.pt, model.safetensors, "
                   "compression.json, model.onnx, report.json, report.md.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--resume", is_flag=True, help="Continue a killed or interrupted run into the same --out from its "
              "saved state (recipe finetune.checkpoint_every; Ctrl-C always saves).")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fine-tune in N processes with DistributedDataParallel (launches torchrun; gloo on the CPU).")
@seed_option
@device_option
@trust_option
@click.option("--max-metric-drop", type=Finite(0, True), default=None, help="Gate: exit 3 if the metric drops by more (accuracy as a fraction).")
@click.option("--min-speedup", type=Finite(0, False), default=None, help="Gate: exit 3 if p50 latency speedup is lower.")
@click.option("--min-size-ratio", type=Finite(0, False), default=None, help="Gate: exit 3 if the ONNX size ratio original/compressed is lower.")
@common
def apply(recipe_path, model, out, force, resume, nproc, seed, device, trust_checkpoint, trust_factory, max_metric_drop,
          min_speedup, min_size_ratio, debug, quiet):
    """Compress MODEL by RECIPE: plan, fine-tune, export ONNX, check parity, benchmark, report.

    MODEL is a compress checkpoint (e.g. from `compress example`), a compress output folder, a
    Hugging Face model folder (config.json and safetensors weights; pip install 'compress[hf]'),
    a .safetensors or state-dict file with model.factory in the recipe, or a pickled module with
    --trust-checkpoint.
    """
    from . import distributed
    from .pipeline import apply as run_apply

    if nproc > 1 and "LOCAL_RANK" not in os.environ:  # launch ourselves under torchrun
        from .pipeline import resolve_device
        from .recipe import load_recipe

        resolve_device(device)
        loaded = load_recipe(recipe_path).recipe  # fail here once, not in every process
        batch = loaded.data.batch_size
        if batch % nproc:
            raise UserError(f"--nproc {nproc}: data.batch_size {batch} must be divisible by the number of processes")
        if loaded.budget is not None and loaded.budget.in_latency:
            raise UserError(f"--nproc {nproc}: budget.{loaded.budget.target} is measured, and each process would "
                            "measure, and allocate, differently; run without --nproc or use a params, macs or onnx_bytes budget")
        sys.exit(distributed.launch(nproc, _without_nproc(sys.argv[1:])))
    distributed.init_from_env(device)
    try:
        _apply(recipe_path, model, out, force, resume, seed, device, trust_checkpoint, trust_factory, max_metric_drop,
               min_speedup, min_size_ratio, quiet, run_apply)
    finally:
        distributed.shutdown()


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _apply(recipe_path, model, out, force, resume, seed, device, trust_checkpoint, trust_factory, max_metric_drop,
           min_speedup, min_size_ratio, quiet, run_apply):
    from .distributed import is_main

    ctx, options = _context(recipe_path, model, trust_checkpoint, trust_factory, seed, device, quiet or not is_main(),
                            max_metric_drop=max_metric_drop, min_speedup=min_speedup, min_size_ratio=min_size_ratio,
                            resume=resume)
    out = Path(out) if out is not None else Path("out") / Path(recipe_path).stem
    try:
        result = run_apply(ctx, out, options, force=force)
    except CompressError as exc:
        if exc.exit_code == 3:  # the report was written; show it before failing
            _print_summary(getattr(exc, "result", None), out)
        raise
    _print_summary(result, out)


def _print_summary(report, out: Path | None = None) -> None:
    if report is None:
        return
    for line in report.summary():
        click.echo(line)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if out is not None:
        click.echo(f"wrote {out}: {', '.join(report.files)}")


class BudgetList(click.ParamType):
    """Comma-separated finite positive numbers: `1.5,2,3`."""

    name = "budgets"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            numbers = [float(part) for part in str(value).split(",") if part.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers, e.g. 1.5,2,3", param, ctx)
        if not numbers or len(numbers) > 32 or not all(math.isfinite(x) and x > 0 for x in numbers):
            self.fail(f"{value!r}: give 1 to 32 finite positive numbers, e.g. 1.5,2,3", param, ctx)
        if len(set(numbers)) != len(numbers):
            self.fail(f"{value!r}: a budget is given twice", param, ctx)
        return sorted(numbers)


@cli.command(epilog="""\b
Example:
  compress sweep --recipe recipes/svd-budget.yaml model.pt --budgets 1.3,1.6,2 --out out/sweep""")
@recipe_option
@click.argument("model", type=click.Path())
@click.option("--budgets", type=BudgetList(), required=True,
              help="Values for the recipe's budget target (its speedup, latency_ms, params, macs or onnx_bytes), comma-separated.")
@click.option("--out", "-o", type=click.Path(), default=None,
              help="Output folder (default: out/sweep-<recipe file name>): budget-<value>/ per run, pareto.json, "
                   "pareto.md, pareto.png (with compress[plot]).")
@click.option("--force", is_flag=True, help="Replace the output folder if it is a previous sweep.")
@seed_option
@device_option
@trust_option
@common
def sweep(recipe_path, model, budgets, out, force, seed, device, trust_checkpoint, trust_factory, debug, quiet):
    """One budgeted `apply` per value of --budgets, sharing calibration and the latency cache; the
    metric against measured latency of every run, beside the original and int8 of the original."""
    from .sweep import run as run_sweep

    ctx, options = _context(recipe_path, model, trust_checkpoint, trust_factory, seed, device, quiet)
    out = Path(out) if out is not None else Path("out") / f"sweep-{Path(recipe_path).stem}"
    try:
        summary = run_sweep(ctx, budgets, out, options, force)
    except CompressError as exc:
        if exc.exit_code == 3:  # written, but a run missed a gate: show the front before failing
            _print_sweep(exc.result, out)
        raise
    _print_sweep(summary, out)


def _print_sweep(summary: dict, out: Path) -> None:
    for point in summary["points"]:
        m = point.get("metric")
        click.echo(f"{point['label']}: {point['latency_ms']:.4f} ms at batch {summary['batch']}, "
                   f"speedup {point['speedup']}x, " + (f"{m['name']} {m['value']:.4f}" if m else "no metric")
                   + f", budget met: {point['budget_met']}")
    click.echo(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))


@cli.command(epilog="""\b
Example:
  compress plan --recipe recipes/svd.yaml model.pt
  compress plan -r recipes/svd.yaml model.pt --json > plan.json""")
@recipe_option
@click.argument("model", type=click.Path())
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the decisions as JSON.")
@common
def plan(recipe_path, model, trust_checkpoint, trust_factory, as_json, debug, quiet):
    """Dry run: print the per-layer decisions RECIPE would make on MODEL, without training."""
    from .bench import count_macs, count_params
    from .pipeline import plan as make_plan
    from .report import budget_line, layers_table, planning_line

    ctx, _ = _context(recipe_path, model, trust_checkpoint, trust_factory, quiet=quiet)
    planned = make_plan(ctx)
    if as_json:
        click.echo(json.dumps(planned.rows, indent=2))
        return
    click.echo("\n".join(layers_table(planned.rows)))
    params, macs = count_params(ctx.loaded.model), count_macs(ctx.loaded.model, ctx.sample)
    params_after, macs_after = planned.cost(params, macs)
    click.echo(f"\nmodel: {params:,} params -> {params_after:,} ({params / max(1, params_after):.2f}x); "
               f"{macs:,} MACs per sample -> {macs_after:,} ({macs / max(1, macs_after):.2f}x); "
               f"{planned.changed()} of {planned.targeted()} targeted layers changed")
    click.echo(f"output: {ctx.output['kind']} ({ctx.output['reason']})")
    if planned.allocation is not None:
        click.echo(budget_line(planned.allocation.summary()))
    click.echo(planning_line(ctx.timings, planned.allocation))


@cli.command(epilog="""\b
Example:
  compress inspect model.pt
  compress inspect model.pt --recipe recipes/svd.yaml --json""")
@click.argument("model", type=click.Path())
@click.option("--recipe", "-r", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe for the factory, inputs or data when the checkpoint does not carry them.")
@click.option("--scheme", type=click.Choice(["channel", "spatial"]), default=None,
              help="How a Conv2d weight becomes a matrix for the ranks (default: the recipe's first stage's "
                   "scheme, else channel), so the table lines up with what the recipe factorizes.")
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@common
def inspect(model, recipe_path, scheme, trust_checkpoint, trust_factory, as_json, debug, quiet):
    """Per-layer type, weight shape, params, MACs, singular-value energy ranks (90/95/99%) and
    effective rank of MODEL's Linear, Conv2d and Embedding layers."""
    from .inspection import inspect_model

    rows, totals = inspect_model(model, recipe_path, trust_checkpoint, trust_factory, scheme)
    if as_json:
        click.echo(json.dumps({"layers": rows, "total": totals}, indent=2))
        return
    from .report import table

    click.echo("\n".join(table(
        ["layer", "type", "weight", "params", "MACs", "rank@90%", "rank@95%", "rank@99%", "full rank", "eff. rank"],
        [[r["name"], r["type"], "x".join(map(str, r["weight_shape"])), f"{r['params']:,}", f"{r['macs']:,}",
          r["rank_90"], r["rank_95"], r["rank_99"], r["full_rank"], f"{r['effective_rank']:.1f}"] for r in rows])))
    click.echo(f"\ntotal: {totals['params']:,} params, {totals['macs']:,} MACs per sample"
               + (f" (inputs: {', '.join(totals['inputs'])})" if totals.get("inputs") else ""))


@cli.command("export", epilog="""\b
Example:
  compress export out/svd/model.pt --out model.onnx
  compress export model.pt --recipe recipes/svd.yaml --out model.onnx --force
  compress export out/svd --out model.int8.onnx --quantize dynamic""")
@click.argument("model", type=click.Path())
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="ONNX file to write.")
@click.option("--recipe", "-r", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe for export options, data for the parity batch, factory or inputs.")
@click.option("--force", is_flag=True, help="Overwrite the ONNX file if it exists.")
@click.option("--quantize", "quantize_mode", type=click.Choice(["dynamic", "static"]), default=None,
              help="Write the int8 model (ONNX Runtime quantization) after the float one passed parity; static "
                   "calibrates on the recipe's data.")
@trust_option
@common
def export_cmd(model, out, recipe_path, force, quantize_mode, trust_checkpoint, trust_factory, debug, quiet):
    """Export MODEL to ONNX, run onnx.checker, and check ONNX Runtime against torch (parity)."""
    from .inspection import export_model

    result = export_model(model, Path(out), recipe_path, trust_checkpoint, force, trust_factory, quantize_mode)
    click.echo(f"wrote {out}: {result['onnx_bytes']:,} bytes; parity max abs diff {result['max_abs_diff']:.2e}, "
               f"max rel diff {result['max_rel_diff']:.2e} (passed)")
    if "quantization" in result:
        q = result["quantization"]
        click.echo(f"quantized ({q['mode']}, {', '.join(f'{k} x{v}' for k, v in q['quantized_ops'].items())}): "
                   f"{q['fidelity']['agreement_kind']} agreement with the float model {q['fidelity']['agreement']:.4f}")


@cli.command(epilog="""\b
Example:
  compress bench out/svd/model.onnx
  compress bench original.onnx out/svd/model.onnx --batch-sizes 1,32 --runs 100
  compress bench encoder.onnx --dim sequence=128
  compress bench model.onnx --quantize dynamic""")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--batch-sizes", default="1,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True, help="ONNX Runtime intra-op threads.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs per model and batch size.")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed runs per model and batch size (more, up to 8x, while the speedup's interval is wide).")
@click.option("--dim", "dims", multiple=True, help="Size of a named dynamic axis other than the batch, NAME=SIZE.")
@click.option("--quantize", "quantize_mode", type=click.Choice(["dynamic", "static"]), default=None,
              help="Also benchmark each model quantized to int8 by ONNX Runtime (static calibrates on the random "
                   "inputs: fine for latency, not for accuracy).")
@click.option("--json", "as_json", is_flag=True, help="Print latencies as JSON.")
@common
def bench(models, batch_sizes, threads, warmup, runs, dims, quantize_mode, as_json, debug, quiet):
    """ONNX Runtime latency (p50/p90/p99 ms) of one or more ONNX MODELS, run in turns (never one
    twice in a row); with two or more, the speedup of each over the first with a bootstrap 95% interval."""
    from .bench import measure
    from .inspection import onnx_feeds

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes {batch_sizes!r}: expected comma-separated integers like 1,32") from None
    if not sizes or min(sizes) < 1:
        raise UserError("--batch-sizes: give positive batch sizes, e.g. 1,32")
    named = {}
    for d in dims:
        key, _, value = d.partition("=")
        if not key or not value.isdigit() or int(value) < 1:
            raise UserError(f"--dim {d!r}: expected NAME=SIZE with a positive SIZE, e.g. sequence=128")
        named[key] = int(value)
    labels = {}
    for path in models:
        label = path if path not in labels else f"{path}#{len(labels)}"
        labels[label] = path
    feeds = onnx_feeds(list(models), sizes, named)
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        if quantize_mode:
            from .quantize import QuantizeSection, quantize

            cfg = QuantizeSection(mode=quantize_mode)
            for i, (label, path) in enumerate(list(labels.items())):
                int8 = Path(tmp) / f"{i}.int8.onnx"
                quantize(Path(path), int8, cfg, list(feeds.values()) if quantize_mode == "static" else None)
                labels[f"{label} (int8 {quantize_mode})"] = str(int8)
        result = measure(labels, feeds, threads, warmup, runs, progress=not quiet)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    from .report import table

    reference = next(iter(labels))
    rows = []
    for label, per_batch in result.latency_ms.items():
        for bs, s in per_batch.items():
            over = None if label == reference else result.over_reference(label)[bs]
            speedup = "reference" if over is None else f"{over.estimate:.3f}x [{over.low:.3f}, {over.high:.3f}]"
            rows.append([label, bs, f"{s['p50']:.3f}", f"{s['p90']:.3f}", f"{s['p99']:.3f}", s["runs"], speedup])
    click.echo("\n".join(table(["model", "batch", "p50 ms", "p90 ms", "p99 ms", "runs", "speedup (95% interval)"], rows)))


@cli.command(epilog="""\b
Example:
  compress example digits-resnet model.pt""")
@click.argument("name", type=click.Choice(sorted(__import__("compress.examples.training", fromlist=["EXAMPLES"]).EXAMPLES)))
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (default: the example's own).")
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists (a regular file only).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Random seed for the training (default 0).")
@click.option("--device", default="cpu", show_default=True, help="Device for the training: cpu, cuda, cuda:1, or auto.")
@common
def example(name, path, epochs, force, seed, device, debug, quiet):
    """Train a bundled example model on bundled real data and write a safe checkpoint to PATH."""
    from .examples.training import EXAMPLES
    from .pipeline import resolve_device

    from .outdir import check_file_out

    check_file_out(Path(path), force)
    train, _ = EXAMPLES[name]
    kwargs = {"seed": seed or 0, "progress": not quiet, "device": resolve_device(device)}
    if epochs is not None:
        kwargs["epochs"] = epochs
    summary = train(path, **kwargs)
    details = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
    click.echo(f"wrote {path} ({name}): {details}")


@cli.group()
def recipe():
    """Recipe tools."""


@recipe.command(epilog="""\b
Example:
  compress recipe schema > recipe.schema.json""")
@common
def schema(debug, quiet):
    """Print the recipe's JSON Schema (for editor completion and validation)."""
    from .recipe import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@recipe.command("check", epilog="""\b
Example:
  compress recipe check recipes/svd.yaml
  compress recipe check recipes/svd.yaml model.pt""")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.argument("model", required=False, type=click.Path())
@trust_option
@common
def check(recipe_path, model, trust_checkpoint, trust_factory, debug, quiet):
    """Validate RECIPE without running it. With MODEL, also load the model and the data, show
    what each target pattern matched, and plan every stage (no training)."""
    from .methods import METHODS
    from .methods.base import pattern_matches, select_targets
    from .pipeline import Options, load_context, plan as make_plan
    from .recipe import load_recipe

    loaded = load_recipe(recipe_path)
    stages = loaded.recipe.stages
    click.echo(f"{recipe_path}: valid recipe, {len(stages)} stage(s): " + ", ".join(s.method for s in stages))
    if model is None:
        return
    ctx = load_context(loaded, model, Options(trust_checkpoint=trust_checkpoint, trust_factories=tuple(trust_factory)))
    for i, stage in enumerate(stages):
        path = f"stages[{i}].targets"
        types = tuple(stage.targets.types or METHODS[stage.method].layer_types)
        click.echo(f"stages[{i}] ({stage.method}), types {', '.join(types)}:")
        for match in pattern_matches(ctx.loaded.model, stage.targets, path, types):
            click.echo(f"  {match.label} {match.pattern!r} matches {len(match.layers)}: {', '.join(match.layers)}")
        chosen = [n for n, _ in select_targets(ctx.loaded.model, stage.targets, path, types)]
        click.echo(f"  targets {len(chosen)} layer(s): {', '.join(chosen) or 'none'}")
    planned = make_plan(ctx)
    click.echo(f"plan: {planned.changed()} of {planned.targeted()} targeted layers would change (see `compress plan`)")


def main() -> None:
    """The console script: click's own usage errors become one line and exit 2, like every user error."""
    try:
        code = cli.main(prog_name="compress", standalone_mode=False)
    except click.exceptions.ClickException as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
        click.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted; no output was written", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
