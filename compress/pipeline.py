"""The one pipeline: load -> plan -> prepare -> fine-tune -> finalize -> export -> verify -> bench -> report.

`apply(...)` is the whole library behind `compress apply`; `plan(...)` stops after the decisions.
Each step lives in its own file: loading and validation in `context.py`, planning (calibration,
allocation, decisions) in `planning.py`, execution (prepare, fine-tune, finalize) here, and
publishing (export, parity, quantize, baselines, bench, report, gates) in `publishing.py`.
Outputs are written into a temporary folder beside `--out` and renamed into place at the end, so a
failed run never leaves files that look finished.
"""
from __future__ import annotations

import copy
import os
from typing import Callable
from pathlib import Path

import torch

from . import bench, distributed, outdir
from . import report as reporting
from .errors import GateFailed, UserError
from .finetune import ResumePoint, finetune
from .context import Compressed, Context, Options, check_inputs, evaluate, load_context, resolve_device, timed
from .planning import Plan, make_methods, plan, plan_methods, planned_cost, verify_allocation
from .publishing import check_gates, publish, train_summary

SKIPPED = "the plan changed no layer: nothing to recover"  # report.json's finetune.skipped

__all__ = ["Compressed", "Context", "Options", "Plan", "apply", "check_gates", "check_inputs", "compress_model", "load_context",
           "make_methods", "plan", "plan_methods", "planned_cost", "publish", "resolve_device", "write"]


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
    failed = result.gates.failed()
    if failed:
        error = GateFailed("gate missed: " + "; ".join(f"{g.gate} {g.limit} (measured {g.value})" for g in failed)
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


def compress_model(ctx: Context, options: Options, seed: int, device: torch.device,
                   checkpoint: ResumePoint | None = None) -> Compressed:
    """Plan, prepare, fine-tune and finalize: the compressed model in memory, no file written."""
    r = ctx.recipe.recipe
    timings = ctx.timings
    original = ctx.loaded.model.cpu().eval()
    with timed(timings, "evaluate"):
        metric_before, reference = evaluate(original, ctx, device, None)
    original.cpu()  # evaluation may have moved it to the device; counting and planning run on the CPU
    original_macs = bench.count_macs(original, ctx.sample)
    planned = plan(ctx, original, options.progress)
    methods = list(planned.methods)
    compressed = copy.deepcopy(original)
    with timed(timings, "prepare"):
        for method in methods:
            method.prepare(compressed)
    if planned.allocation is not None and r.budget.verified and all(m.measurable_before_finetune for m in methods):
        # (a method that removes structure after fine-tuning leaves nothing to measure yet; its costs are exact)
        compressed, planned = verify_allocation(ctx, original, compressed, planned)
    train = ctx.data["train"]
    steps_wanted = r.finetune.steps or r.finetune.epochs
    if steps_wanted and train is None:
        raise UserError("finetune asks for training but the recipe names no `data.train`")
    # a plan that changed nothing (a budget met by the model as it is, e.g. int8 of the original) leaves
    # nothing to recover: training it would only move it (dropout, distillation noise) away from the
    # original (all-MiniLM-L6-v2, 100 steps of cosine distillation: cosine 0.9930 -> 0.9898 after int8)
    unchanged = (all(m.measurable_before_finetune for m in methods)
                 and all(d.action == "keep" for d in planned.decisions))
    with timed(timings, "finetune"):
        trained = None
        if train is not None and steps_wanted and unchanged:
            trained = SKIPPED
        elif train is not None and steps_wanted:
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
                      original_macs, train_summary(trained), train_summary(post), planned.allocation)
