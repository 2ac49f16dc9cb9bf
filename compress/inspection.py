"""The stand-alone verbs: `inspect` (per-layer spectra and costs) and `export` (ONNX + parity),
and input feeds for `bench`, all working from a checkpoint alone or with a recipe."""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from pathlib import Path

import numpy as np
from torch import nn

from . import bench, exporting as export, linalg, outdir
from .checkpoint import load_model
from .outdir import current_umask
from .errors import UserError, first_line
from .layers import layer_matrix
from .methods.base import LAYER_TYPES
from .trust import trusted_prefixes


def _load(model_path, recipe_path, trust, factories=()):
    """(model, input names, one sample, recipe section or None, eval data or None)."""
    from .data import synthetic_sample
    from .context import Options, check_inputs, load_context
    from .recipe import load_recipe

    if recipe_path is not None:
        ctx = load_context(load_recipe(recipe_path), model_path,
                           Options(trust_checkpoint=trust, trust_factories=tuple(factories)))
        return ctx.loaded.model, ctx.input_names, ctx.sample, ctx.recipe.recipe, ctx.data["eval"]
    loaded = load_model(model_path, trust=trust, trusted=trusted_prefixes(factories))
    if not loaded.inputs:
        raise UserError(f"{model_path}: the checkpoint does not describe the model's inputs; "
                        "pass --recipe with `inputs:` or `data:`")
    sample = synthetic_sample(loaded.inputs)
    names = [s["name"] for s in loaded.inputs]
    check_inputs(loaded.model, names, sample, what="the checkpoint's declared inputs")
    return loaded.model, names, sample, None, None


def inspect_model(model_path, recipe_path=None, trust=False, factories=(), scheme: str | None = None
                  ) -> tuple[list[dict], dict]:
    model, names, sample, recipe, _ = _load(model_path, recipe_path, trust, factories)
    if scheme is None:  # line up with what the recipe factorizes
        scheme = next((getattr(s, "scheme", None) for s in (recipe.stages if recipe else [])
                       if getattr(s, "scheme", None)), "channel")
    macs = bench.macs_by_module(model, sample)
    rows = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, tuple(LAYER_TYPES.values())):
            continue
        weight = module.weight.detach()
        matrix = weight if isinstance(module, nn.Embedding) else layer_matrix(module, scheme)
        s = linalg.singular_values(matrix)
        rows.append({
            "name": name, "type": type(module).__name__, "weight_shape": list(weight.shape),
            "params": sum(p.numel() for p in module.parameters(recurse=False)), "macs": macs.get(name, 0),
            "scheme": scheme if isinstance(module, nn.Conv2d) else None,
            "rank_90": linalg.energy_rank(s, 0.90), "rank_95": linalg.energy_rank(s, 0.95),
            "rank_99": linalg.energy_rank(s, 0.99), "full_rank": min(matrix.shape),
            "effective_rank": round(linalg.effective_rank(s), 3),
        })
    totals = {"params": bench.count_params(model), "macs": bench.count_macs(model, sample), "inputs": names}
    return rows, totals


def export_model(model_path, out: Path, recipe_path=None, trust=False, force=False, factories=(),
                 quantize_mode: str | None = None) -> dict:
    """Export, check parity with torch, and with `quantize_mode` write the int8 model instead (the
    recipe's quantize section when it has one, held to its fidelity limits against the float model
    on the parity batch); static quantization calibrates on the recipe's data."""
    outdir.check_file_out(out, force, [model_path, recipe_path])
    model, names, sample, recipe, data = _load(model_path, recipe_path, trust, factories)
    opset, atol, rtol, declared, dynamic_batch = 17, 1e-4, 1e-3, {}, True
    if recipe is not None:
        opset, atol, rtol = recipe.export.opset, recipe.export.parity.atol, recipe.export.parity.rtol
        declared = {s.name: s.dynamic_axes for s in recipe.inputs or []}
        dynamic_batch = recipe.export.dynamic_batch
    batch = sample if data is None else tuple(data.head(min(64, len(data)))[n] for n in names)
    axes = export.dynamic_axes_for(names, sample, declared, dynamic_batch)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise UserError(f"{out}: cannot write ({exc.strerror or exc}); nothing was written") from None
    partial = Path(name)
    try:
        with outdir.writing(out, what="the file"):  # disk full, permissions: one line, no partial file left
            export.export_onnx(model, sample, names, partial, opset, axes)
            result = dataclasses.asdict(export.verify(model, partial, names, batch, atol, rtol, what=str(out)))
            if quantize_mode:
                eager = functools.partial(export.export_onnx, model, sample, names, opset=opset, dynamic_axes=axes,
                                          eager_attention=True)
                result["quantization"] = _quantize_file(partial, recipe, quantize_mode, names, batch, data, model, eager)
            os.chmod(partial, 0o666 & ~current_umask())
            outdir.check_file_out(out, True, [model_path, recipe_path])  # still a file we may overwrite
            partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    result["onnx_bytes"] = out.stat().st_size
    return result


def _quantize_file(path: Path, recipe, mode: str, names, batch, data, model, export_eager) -> dict:
    """Replace the float ONNX file at `path` by its int8 version, if it stays faithful to it
    (`export_eager`: the model's export with eager attention, for the recipe's quantize.fuse)."""
    from . import quantize

    cfg = (recipe.quantize if recipe is not None and recipe.quantize is not None else quantize.QuantizeSection())
    cfg = cfg.model_copy(update={"mode": mode})
    calibration = None
    if mode == "static":
        if data is None:
            raise UserError("--quantize static needs calibration data: pass --recipe with data.calibration")
        calibration = quantize.calibration_feeds(data, names, recipe.data.batch_size, cfg)
    quantize.check_section(cfg, [n for n, _ in model.named_modules() if n], True, model)
    quantized = path.with_name(path.name + ".int8")
    feed = export.to_feed(names, batch)
    timing = quantize.Timing({bench.shape_key(len(batch[0])): feed}, recipe.bench.threads if recipe is not None else 1)
    try:
        with quantize.int8_source(cfg, model, path, export_eager) as (source, heads):
            info = quantize.quantize(source, quantized, cfg, calibration, heads, timing)
        float_out, int8_out = (export.run(p, feed) for p in (path, quantized))
        labels = data.tensors.get(recipe.data.target) if data is not None else None
        fid = quantize.check_fidelity(quantize.fidelity(float_out, int8_out, classes=labels is not None
                                                        and not labels.is_floating_point()),
                                      cfg, what="the quantized model", kept="nothing written")
        quantized.replace(path)
    finally:
        quantized.unlink(missing_ok=True)
    info.fidelity = fid
    return dataclasses.asdict(info)


ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def onnx_feeds(paths: list[str], batch_sizes: list[int], dims: dict[str, int]) -> dict[int, dict[str, np.ndarray]]:
    """Random inputs for ONNX models per batch size: axis 0 is the batch, other dynamic axes take
    their size from `dims` (by name). Every model must load and take the same inputs, and the
    largest batch must fit in memory (estimated from the graph's tensor shapes) before any is made."""
    signatures, first_inputs = {}, None
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: ONNX file not found")
        try:
            session = bench.make_session(path, 1)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise UserError(f"{path}: not a loadable ONNX model ({first_line(exc)})") from None
        signatures[path] = [(i.name, i.type, [d if isinstance(d, int) else None for d in i.shape])
                            for i in session.get_inputs()]
        first_inputs = first_inputs or session.get_inputs()
    first = paths[0]
    for path, signature in signatures.items():
        if signature != signatures[first]:
            raise UserError(f"{path}: takes inputs {_describe(signature)}, but {first} takes "
                            f"{_describe(signatures[first])}; bench compares models with the same inputs")
    shapes = {}
    for inp in first_inputs:
        shape = []
        for axis, size in enumerate(inp.shape):
            if isinstance(size, int):
                shape.append(size)
            elif axis == 0:
                shape.append(None)
            elif size in dims:
                shape.append(dims[size])
            else:
                raise UserError(f"{first}: axis {axis} ({size!r}) of input {inp.name!r} is dynamic; "
                                f"give its size with --dim {size}=N")
        dtype = ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise UserError(f"{first}: input {inp.name!r} has type {inp.type}, which bench cannot fill")
        shapes[inp.name] = (shape, dtype)
    per_sample = max(bench.onnx_bytes_per_sample(p, dims) for p in paths)
    bench.check_fits(batch_sizes, per_sample, "--batch-sizes")
    rng = np.random.default_rng(0)
    feeds = {}
    for bs in batch_sizes:
        feed = {}
        for name, (shape, dtype) in shapes.items():
            full = [bs if s is None else s for s in shape]
            feed[name] = (rng.standard_normal(full).astype(dtype) if np.issubdtype(dtype, np.floating)
                          else np.zeros(full, dtype=dtype))
        feeds[bs] = feed
    return feeds


def _describe(signature) -> str:
    return ", ".join(f"{name} {kind.removeprefix('tensor(').rstrip(')')}{['?' if d is None else d for d in dims]}"
                     for name, kind, dims in signature)
