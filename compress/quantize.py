"""Int8 ONNX as a stage: onnxruntime.quantization applied to an exported float model, the layer
exclusions mapped from torch module names to ONNX nodes, and the fidelity check of the result.

Nothing here quantizes by hand: `quantize_dynamic` (int8 weights, activations quantized at run
time; MatMul/Gemm by default, since dynamic ConvInteger runs several times slower than a float
Conv on ONNX Runtime's CPU provider) and `quantize_static` (QDQ format, activations calibrated on
calibration data; Conv too) do the work. The float model is pre-processed first with ORT's
`quant_pre_process` (shape inference and graph optimization), as ORT recommends; where that fails
(symbolic shape inference on attention graphs) it is retried without that step, then skipped, and
the report says which (`preprocessed`). With `fuse`, ONNX Runtime's transformer optimizer fuses a
BERT-style encoder's attention, layer norms, GELU and embeddings first (the model exported with
eager attention, the pattern it recognises), and the attention is quantized as QAttention, ONNX
Runtime's integer attention kernel (`benchmarks/fusion.py` measures what it buys on
all-MiniLM-L6-v2). It runs in a temporary directory: where symbolic shape inference fails, ORT
leaves `<uuid>.data` files in the current directory. Measured on the digits ResNet, static: no difference either way
(without pre-processing 1.02x [0.97, 1.08] at batch 1, 1.02x [0.97, 1.07] at batch 32).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import fnmatch
import functools
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import torch
from pydantic import Field

from .errors import CompressError, UserError, first_line
from .schema import Strict

DEFAULT_OP_TYPES = {"dynamic": ["MatMul", "Gemm"], "static": ["Conv", "MatMul", "Gemm"]}
QUANTIZED_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
                 "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm",
                 "QAttention", "GatherBlockQuantized"}


class TablesSection(Strict):
    """Lookup tables (embeddings, ONNX Gather) in 4 bits: ONNX Runtime's block-wise weight-only
    quantization (`MatMulNBitsQuantizer`, GatherBlockQuantized), applied after the int8 step."""

    bits: Literal[4] = Field(4, description="bits per table entry (ONNX Runtime's GatherBlockQuantized: 4)")
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="entries along the embedding dimension that "
                                                      "share one scale (and zero point)")
    symmetric: bool = Field(False, description="signed 4-bit values around zero, no zero point")


class QuantizeSection(Strict):
    """Int8 quantization of the exported model with ONNX Runtime (absent: the float model ships)."""

    mode: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: int8 weights, activations quantized at run time (no data needed); "
        "static: QDQ format, activation ranges calibrated on data.calibration")
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = Field(True, description="one scale per output channel of each weight")
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weights: needed for accurate int8 on x86 CPUs without VNNI (AVX2/AVX-512 "
        "only), where ONNX Runtime's u8 x s8 kernel saturates; auto: on when this CPU lacks VNNI")
    op_types: list[str] | None = Field(None, description="ONNX operator types to quantize (default: MatMul and Gemm "
                                       "for dynamic, also Conv for static)")
    exclude: list[str] = Field(default_factory=list, description="module-name globs kept in float (a module's "
                               "children too), e.g. ['fc', 'layer1.*']")
    calibration_batches: int = Field(16, gt=0, le=100_000, description="static: calibration batches of data.batch_size")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    tables: TablesSection | None = Field(None, description="lookup tables (embeddings) in 4 bits, e.g. {bits: 4, "
                                         "block_size: 32}: the word-embedding table is most of a small text "
                                         "encoder's file, and int8's op types leave it float")
    fuse: bool = Field(False, description="ONNX Runtime's transformer optimizer before int8, for BERT-style "
                       "encoders (Hugging Face folders): attention, layer norms, GELU and embeddings fused, the "
                       "attention quantized as QAttention (measured on all-MiniLM-L6-v2: as fast as unfused int8 at "
                       "batch 8 x 64 tokens, 1.27x faster at 32 x 128, same cosine); mode dynamic only; the output "
                       "then runs on ONNX Runtime alone (com.microsoft operators)")
    rewrites: Literal["auto"] | list[Literal["layer_norms", "attention_masks"]] = Field(
        "auto", description="graph rewrites of the int8 model for ONNX Runtime's CPU kernels (compress/ortgraph.py): "
        "layer_norms writes layer norms as elementwise operators, attention_masks keeps a fused attention's padded "
        "positions out of float's subnormal range; auto: each timed on this machine at the bench shapes and "
        "kept only where measurably faster at the largest and not slower at any (all-MiniLM-L6-v2, fused, batch 8 x 64: both together 1.41-1.48x "
        "over int8 of the original at 1 thread, 1.26-1.31x at 2); a list applies those named, untimed; [] none")
    max_metric_drop: float = Field(0.02, ge=0, description="largest allowed drop of the metric from the float "
                                   "compressed model to the quantized one (exit 4 when missed)")
    min_agreement: float = Field(0.9, ge=0, le=1, description="smallest allowed agreement of the quantized model with "
                                 "the float one: top-1 for class outputs, mean cosine otherwise (exit 4 when missed)")


class QuantizationError(CompressError):
    """The quantized model strays too far from the float one: nothing is kept (exit 4, like parity)."""

    exit_code = 4


@functools.lru_cache(maxsize=1)  # the CPU does not change; op-cost keys ask once per candidate
def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (AVX512_VNNI or AVX_VNNI); None when that cannot be read
    (not Linux, not x86), where ONNX Runtime's int8 kernels do not saturate."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        with open("/proc/cpuinfo", "rb") as f:
            text = f.read(1 << 20).decode("ascii", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"})
    return None


def resolve_reduce_range(cfg: QuantizeSection) -> bool:
    """reduce_range as ONNX Runtime gets it: `auto` turns it on for an x86 CPU without VNNI, whose
    u8 x s8 multiply (VPMADDUBSW) saturates on full-range int8 weights. The model is quantized for
    the machine it is measured on; the report records the choice."""
    if cfg.reduce_range != "auto":
        return bool(cfg.reduce_range)
    return cpu_has_vnni() is False


def supported_op_types(mode: str) -> set[str]:
    from onnxruntime.quantization import registry

    return set(registry.IntegerOpsRegistry if mode == "dynamic" else registry.QDQRegistry) | {"Gemm", "MatMul"}


def check_section(cfg: QuantizeSection, module_names: Iterable[str], has_calibration: bool,
                  model: torch.nn.Module | None = None) -> None:
    """Mistakes found before any work: static without data, unknown op types, exclusions that match
    no module of the model, fusion of a model without the attention it fuses (one-line errors, exit 2)."""
    if cfg.mode == "static" and not has_calibration:
        raise UserError("quantize.mode static needs calibration data: set data.calibration (or data.train)")
    if cfg.fuse and cfg.mode != "dynamic":
        raise UserError("quantize.fuse needs mode: dynamic (the fused attention runs as QAttention, ONNX Runtime's "
                        "dynamic int8 kernel)")
    if cfg.fuse and model is not None and attention_heads(model) is None:
        raise UserError("quantize.fuse: the model has no attention module that says its heads (num_attention_heads "
                        "and attention_head_size, as a Hugging Face BERT-style encoder's do), so ONNX Runtime's "
                        "transformer optimizer has no attention to fuse; remove quantize.fuse")
    supported = supported_op_types(cfg.mode)
    if cfg.tables is not None and "Gather" in (cfg.op_types or []):
        raise UserError("quantize.tables: Gather is also in quantize.op_types (int8 tables); keep it in one of them")
    for i, op in enumerate(cfg.op_types or []):
        if op not in supported:
            raise UserError(f"quantize.op_types[{i}]: ONNX Runtime's {cfg.mode} quantization does not handle {op!r}; "
                            f"it handles {', '.join(sorted(supported))}")
    names = list(module_names)
    for i, pattern in enumerate(cfg.exclude):
        if not any(_matches(pattern, name) for name in names):
            raise UserError(f"quantize.exclude[{i}]: pattern {pattern!r} matches no module of the model")


def excluded_module(cfg: QuantizeSection, module: str) -> bool:
    """Whether the settings keep `module` in float (one of `exclude`'s patterns matches it or a module
    it lies inside)."""
    return any(_matches(p, module) for p in cfg.exclude)


def _matches(pattern: str, module: str) -> bool:
    """A pattern matches a module or any module it lies inside (`fc` keeps `fc.first` in float too)."""
    parts = module.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def attention_heads(model: torch.nn.Module) -> tuple[int, int] | None:
    """(heads, heads x head size) of the model's attention modules, as ONNX Runtime's transformer
    optimizer takes them for the whole model: read from the modules that say `num_attention_heads`
    and `attention_head_size` (Hugging Face's BERT family; group_envelope keeps them up to date when
    it removes heads); (0, 0) when they differ from layer to layer (the optimizer takes one value, so
    the attention is then left unfused); None when the model has none."""
    found = {(m.num_attention_heads, m.num_attention_heads * m.attention_head_size) for m in model.modules()
             if isinstance(getattr(m, "num_attention_heads", None), int)
             and isinstance(getattr(m, "attention_head_size", None), int)}
    if not found:
        return None
    return found.pop() if len(found) == 1 else (0, 0)


LAYER_OPS = {"Linear": {"MatMul", "Gemm"}, "Conv2d": {"Conv"}, "Embedding": {"Gather"}}  # what each exports to


def quantizes_layer(cfg: QuantizeSection | None, name: str, layer: torch.nn.Module) -> bool:
    """Whether these settings quantize the op(s) the torch layer `name` exports to (its type's ONNX
    op among the op types, the layer not excluded); False without settings."""
    if cfg is None:
        return False
    ops = set(cfg.op_types or DEFAULT_OP_TYPES[cfg.mode])
    kinds = next((v for k, v in LAYER_OPS.items() if isinstance(layer, getattr(torch.nn, k))), set())
    return bool(ops & kinds) and not excluded_module(cfg, name)


def node_module(node_name: str) -> str:
    """The torch module an exported node came from: '/model/layer1/layer1.0/conv1/Conv' -> 'layer1.0.conv1'
    (the exporter's scopes are the module path, each level either a child name or a dotted full name)."""
    scopes = [s for s in node_name.split("/") if s][:-1]
    if scopes and scopes[0] == "model":  # export.PrimaryOutput wraps the model as `model`
        scopes = scopes[1:]
    current = ""
    for scope in scopes:
        current = scope if not current or scope.startswith(current + ".") else f"{current}.{scope}"
    return current


class _Reader:
    """A CalibrationDataReader over a list of input feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):  # pragma: no cover - part of ORT's interface, not used by its MinMax path
        pass


@contextlib.contextmanager
def _working_directory(path: str):
    """ORT's pre-processing leaves `<uuid>.data` files in the *current* directory when its symbolic
    shape inference fails (seen on the digits Transformer): run it where that cannot touch anything
    of the user's."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _preprocess(source: Path, target: Path) -> str | None:
    """ORT's recommended pre-processing (shape inference, graph optimization); symbolic shape
    inference is skipped when it fails (it does on attention graphs). How it went, or None."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for how, skip_symbolic in (("full", False), ("without symbolic shape inference", True)):
        try:
            quant_pre_process(str(source), str(target), skip_symbolic_shape=skip_symbolic)
            return how
        except Exception:  # ORT raises plain Exception here; the next attempt or none
            continue
    return None


@contextlib.contextmanager
def _quiet_ort_logging():
    """ORT's quantization tools log advice to the root logger ("consider pre-processing ..."), which
    would land in every CI log; what was done is in the report instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@dataclass
class Fidelity:
    """How closely a quantized model follows its float model, and the limits it was held to."""

    agreement_kind: str  # top1 (class outputs) or cosine
    agreement: float
    max_abs_deviation: float
    metric_drop: float | None = None  # the metric's drop from the float model, where there is eval data
    max_metric_drop: float | None = None
    min_agreement: float | None = None
    passed: bool | None = None


@dataclass
class Quantized:
    """What ONNX Runtime's quantization did to a model (report.json's `quantization`)."""

    mode: str
    weight_type: str
    per_channel: bool
    reduce_range: bool
    op_types: list[str]
    excluded: list[str]  # ONNX nodes kept in float
    preprocessed: str | None  # how ORT's pre-processing went: full, without symbolic shape inference, or None
    quantized_ops: dict[str, int]  # operator -> count in the quantized model
    calibration_batches: int | None = None
    calibrate_method: str | None = None
    fidelity: Fidelity | None = None
    tables: dict | None = None  # quantize.tables: {bits, block_size, symmetric, quantized: Gather nodes in 4 bits}
    fused: dict[str, int] | None = None  # quantize.fuse: operator -> nodes ONNX Runtime's optimizer fused
    rewrites: dict | None = None  # quantize.rewrites: ortgraph.Rewrites (applied, nodes, shape, speedup, refused)


@dataclass(frozen=True)
class Timing:
    """Where `quantize.rewrites: auto` times its variants: ONNX feeds by `bench.shape_key`, threads."""

    feeds: dict[str, dict[str, np.ndarray]]
    threads: int


def quantize(float_path: Path, out_path: Path, cfg: QuantizeSection,
             calibration: list[dict[str, np.ndarray]] | None = None,
             heads: tuple[int, int] | None = None, timing: Timing | None = None) -> Quantized:
    """Write the quantized `out_path` from `float_path`; what was done, as report data. With
    `cfg.fuse`, `heads` is the exported model's `attention_heads` (and `float_path` its export with
    eager attention, `exporting.export_onnx(..., eager_attention=True)`). `timing`: where
    `cfg.rewrites: auto` times them (without it, auto rewrites nothing)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)

    op_types = cfg.op_types or DEFAULT_OP_TYPES[cfg.mode] + (["Attention"] if cfg.fuse else [])
    float_path, out_path = Path(float_path).resolve(), Path(out_path).resolve()
    # ORT's histogram calibrators print their progress ("Collecting tensor data ...") on stdout, which
    # is the CLI's (and `--json`'s): kept out of it, like its log advice
    with (tempfile.TemporaryDirectory(prefix="compress-quantize-") as tmp, _quiet_ort_logging(),
          contextlib.redirect_stdout(io.StringIO()), _working_directory(tmp)):
        source, preprocessed, fused = _prepare(float_path, Path(tmp), cfg, heads)
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if fused is not None else {}  # fused ops: untyped
        nodes = onnx.load(str(source), load_external_data=False).graph.node
        # node -> torch modules where a node is not named after its one module: a fused Attention's projections
        modules = ({} if fused is None
                   else _attention_modules(onnx.load(str(float_path), load_external_data=False).graph.node, nodes))
        candidates = [n for n in nodes if n.op_type in op_types]
        excluded = sorted(n.name for n in candidates
                          if any(excluded_module(cfg, m) for m in modules.get(n.name, [node_module(n.name)])))
        if not [n for n in candidates if n.name not in excluded]:
            raise UserError(f"quantize: the model has no {'/'.join(op_types)} operator left to quantize "
                            f"({len(candidates)} found, {len(excluded)} excluded)")
        weight_type = QuantType.QInt8 if cfg.weight_type == "int8" else QuantType.QUInt8
        reduce_range = resolve_reduce_range(cfg)
        try:
            if cfg.mode == "dynamic":
                quantize_dynamic(str(source), str(out_path), op_types_to_quantize=op_types, per_channel=cfg.per_channel,
                                 weight_type=weight_type, nodes_to_exclude=excluded, reduce_range=reduce_range,
                                 extra_options=extra)
            else:
                if not calibration:
                    raise UserError("quantize.mode static needs calibration data: set data.calibration (or data.train)")
                reader = type("Reader", (_Reader, CalibrationDataReader), {})(calibration)
                method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[cfg.calibrate_method]
                quantize_static(str(source), str(out_path), reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=op_types, per_channel=cfg.per_channel,
                                activation_type=QuantType.QUInt8, weight_type=weight_type,
                                nodes_to_exclude=excluded, calibrate_method=method, reduce_range=reduce_range)
            tables = _quantize_tables(out_path, cfg) if cfg.tables is not None else None
            rewrites = _rewrite(out_path, cfg, timing)
        except UserError:
            out_path.unlink(missing_ok=True)  # no half-quantized model left behind
            raise
        except Exception as exc:  # ORT raises many types; the user needs the first line
            out_path.unlink(missing_ok=True)
            raise UserError(f"quantize: ONNX Runtime could not quantize the model ({type(exc).__name__}: "
                            f"{first_line(exc)})") from None
    ops = collections.Counter(n.op_type for n in onnx.load(str(out_path), load_external_data=False).graph.node)
    quantized = {op: count for op, count in sorted(ops.items()) if op in QUANTIZED_OPS}
    if not quantized:
        raise UserError(f"quantize: ONNX Runtime left the model in float (no {'/'.join(op_types)} it could quantize)")
    return Quantized(cfg.mode, cfg.weight_type, cfg.per_channel, reduce_range, op_types, excluded, preprocessed,
                     quantized, len(calibration) if cfg.mode == "static" and calibration else None,
                     cfg.calibrate_method if cfg.mode == "static" else None, tables=tables, fused=fused,
                     rewrites=rewrites)


def _rewrite(path: Path, cfg: QuantizeSection, timing: Timing | None) -> dict | None:
    """ortgraph's rewrites of the int8 model at `path` by `cfg.rewrites`, in place; report data."""
    from . import ortgraph

    if cfg.rewrites == "auto":
        done = ortgraph.choose(path, timing.feeds, timing.threads) if timing is not None else None
    else:
        done = ortgraph.apply(path, cfg.rewrites) if cfg.rewrites else None
    return dataclasses.asdict(done) if done is not None else None


def _prepare(float_path: Path, tmp: Path, cfg: QuantizeSection, heads: tuple[int, int] | None):
    """(model to quantize, how pre-processing went, fused operators): with `fuse`, the model fused by
    ONNX Runtime's optimizer (which optimizes the graph itself; a fused Attention node is kept float
    when a projection it took in is); else pre-processed, or as it is where pre-processing fails
    (quantization works without it)."""
    if cfg.fuse:
        source = tmp / "fused.onnx"
        return source, None, _fuse(float_path, source, heads or (0, 0), keep_tables=cfg.tables is not None)
    source = tmp / "pre.onnx"
    preprocessed = _preprocess(float_path, source)
    return (source if preprocessed else float_path), preprocessed, None


@contextlib.contextmanager
def int8_source(cfg: QuantizeSection | None, model: torch.nn.Module, exported: Path,
                export_eager: Callable[[Path], None]):
    """(float ONNX file, heads) that int8 by `cfg` starts from, for `quantize`'s `float_path` and
    `heads`: the model as `exported`, or with `cfg.fuse` the model exported again by `export_eager(path)`
    with eager attention (the pattern ONNX Runtime's optimizer fuses; SDPA's fuses no attention) into
    a temporary folder that lasts as long as the block."""
    if cfg is None or not cfg.fuse:
        yield Path(exported), None
        return
    with tempfile.TemporaryDirectory(prefix="compress-eager-") as tmp:
        path = Path(tmp) / "eager.onnx"
        export_eager(path)
        yield path, attention_heads(model)


def _fuse(source: Path, target: Path, heads: tuple[int, int], keep_tables: bool) -> dict[str, int]:
    """Write `source` fused by ONNX Runtime's BERT optimizer to `target`; the fused operators' counts.
    The embedding fusion is left out when the tables go to 4 bits (it takes in the Gather they need),
    the attention fusion when `heads` is (0, 0) (heads differ from layer to layer)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_embed_layer_norm = not keep_tables
    options.enable_attention = heads[0] > 0
    try:
        optimized = optimize_model(str(source), model_type="bert", num_heads=heads[0], hidden_size=heads[1],
                                   optimization_options=options, opt_level=1)
        optimized.save_model_to_file(str(target))
    except Exception as exc:  # ORT raises many types; the user needs the first line
        raise UserError(f"quantize.fuse: ONNX Runtime's transformer optimizer failed on the model "
                        f"({type(exc).__name__}: {first_line(exc)}); remove quantize.fuse") from None
    return {op: count for op, count in sorted(optimized.get_fused_operator_statistics().items()) if count}


def _attention_modules(before, after) -> dict[str, list[str]]:
    """The torch modules each fused Attention node of `after` took in: the MatMul/Gemm nodes of
    `before` that fusion removed, each given to the Attention node whose consumers' module shares
    the longest dotted prefix with it (the attention's output projection keeps its node name)."""
    kept = {n.name for n in after}
    gone = [node_module(n.name) for n in before if n.op_type in ("MatMul", "Gemm") and n.name not in kept]
    consumers = collections.defaultdict(list)
    for node in after:
        for name in node.input:
            consumers[name].append(node_module(node.name))
    owners = {n.name: [m for out in n.output for m in consumers[out]] for n in after if n.op_type == "Attention"}
    taken: dict[str, list[str]] = {name: [] for name in owners}

    def shared(a: str, b: str) -> int:
        return len(os.path.commonprefix([a.split("."), b.split(".")]))

    for module in gone:
        best = max(owners, key=lambda n: max((shared(module, m) for m in owners[n]), default=0), default=None)
        if best is not None:
            taken[best].append(module)
    return taken


def _quantize_tables(path: Path, cfg: QuantizeSection) -> dict:
    """Rewrite the int8 model at `path` with its constant lookup tables (Gather nodes not excluded)
    in 4 bits, block-wise along the embedding dimension; what was done, for the report."""
    import onnx
    from onnxruntime.quantization import QuantFormat

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise UserError(f"quantize.tables needs ONNX Runtime's block-wise quantizer, which did not import "
                        f"({first_line(exc)}); pip install -U onnxruntime onnx-ir") from None

    model = onnx.load(str(path))
    tables = {i.name for i in model.graph.initializer if len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT}
    every = [n for n in model.graph.node if n.op_type == "Gather"]
    for i, node in enumerate(every):
        node.name = node.name or f"compress_gather_{i}"  # the quantizer tells nodes apart by name
    gathers = [n for n in every if n.input[0] in tables]
    excluded = [n.name for n in gathers if excluded_module(cfg, node_module(n.name))]
    chosen = [n.name for n in gathers if n.name not in excluded]  # a float (rows, width) table, nothing else
    if not chosen:
        raise UserError("quantize.tables: the model has no lookup table (a Gather of a constant float table) to "
                        "quantize" + (f" ({len(excluded)} excluded)" if excluded else ""))
    t = cfg.tables
    quantizer = MatMulNBitsQuantizer(model, bits=t.bits, block_size=t.block_size, is_symmetric=t.symmetric,
                                     nodes_to_exclude=[n.name for n in every if n.name not in chosen],
                                     quant_format=QuantFormat.QOperator,
                                     op_types_to_quantize=("Gather",))
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block: ORT divides by its zero scale, then
        quantizer.process()                                # replaces the result (np.where(scale == 0, ...))
    out = quantizer.model.model
    onnx.save(out, str(path))
    count = sum(1 for n in out.graph.node if n.op_type == "GatherBlockQuantized")
    return {"bits": t.bits, "block_size": t.block_size, "symmetric": t.symmetric, "quantized": count}


def calibration_feeds(data, names: list[str], batch_size: int, cfg: QuantizeSection) -> list[dict[str, np.ndarray]]:
    """Static quantization's calibration batches: the first `cfg.calibration_batches` of `data`, as ONNX feeds."""
    from .exporting import to_feed

    return [to_feed(names, tuple(b[n] for n in names))
            for b, _ in zip(data.batches(batch_size), range(cfg.calibration_batches))]


def check_fidelity(fid: Fidelity, cfg: QuantizeSection, metric_name: str | None = None,
                   what: str = "quantized model.onnx", kept: str = "no ONNX model kept") -> Fidelity:
    """Hold `fid` (see `fidelity`, with `metric_drop` when measured) to the section's limits;
    QuantizationError (exit 4) naming every limit missed."""
    missed = []
    if fid.agreement < cfg.min_agreement:
        missed.append(f"{fid.agreement_kind} agreement with the float model {fid.agreement:.4f} < "
                      f"quantize.min_agreement {cfg.min_agreement}")
    if fid.metric_drop is not None and fid.metric_drop > cfg.max_metric_drop:
        missed.append(f"{metric_name} drops by {fid.metric_drop:.4f} from the float model > "
                      f"quantize.max_metric_drop {cfg.max_metric_drop}")
    if missed:
        raise QuantizationError(f"{what} strays too far from the float model: {'; '.join(missed)}; {kept} "
                                "(exclude sensitive layers with quantize.exclude, or try mode: static)")
    return dataclasses.replace(fid, max_metric_drop=cfg.max_metric_drop, min_agreement=cfg.min_agreement, passed=True)


def fidelity(float_out: torch.Tensor, quant_out: torch.Tensor, classes: bool = False) -> Fidelity:
    """How closely the quantized outputs follow the float model's: top-1 agreement for class
    outputs (`classes`: the model is scored against class labels, outputs (B, C > 1)), mean cosine
    otherwise (an embedding's top-1 dimension means nothing), and the largest absolute deviation."""
    a, b = float_out.double(), quant_out.double().reshape(float_out.shape)
    deviation = round(float((a - b).abs().max()), 6) if a.numel() else 0.0
    if classes and a.dim() == 2 and a.shape[1] > 1:
        return Fidelity("top1", round(float((a.argmax(1) == b.argmax(1)).double().mean()), 6), deviation)
    flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if flat_a.shape[1] == 1:  # one number per sample: cosine is meaningless, compare the whole vector
        flat_a, flat_b = flat_a.T, flat_b.T
    cosine = torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=1, eps=1e-12)
    return Fidelity("cosine", round(float(cosine.mean()), 6), deviation)
