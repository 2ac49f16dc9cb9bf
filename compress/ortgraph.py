"""Graph rewrites for ONNX Runtime's CPU kernels, measured before they are kept (`quantize.rewrites`).

Two kernels of ONNX Runtime's CPU provider are slower than the graph they stand for, on the
machines compress was measured on (`python benchmarks/rewrites.py --kernels`, 1 thread, at
all-MiniLM-L6-v2's shapes; what they buy on the model: benchmarks/README.md, "Graph rewrites"):

- **layer_norms.** The fused SkipLayerNormalization (a residual Add and a LayerNormalization in one
  kernel) took 1.0 ms on a [8, 64, 384] tensor, where the same Add with the normalization written
  as ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul, Add ran in 0.28 ms
  (LayerNormalization alone: 0.10 ms). ONNX Runtime fuses an Add and the LayerNormalization it
  feeds into SkipLayerNormalization when it loads a model, so the rewrite writes each
  SkipLayerNormalization, and each LayerNormalization fed by an Add, in that form, which its
  fusions do not match (they look for Pow and Div). A LayerNormalization fed by anything else stays
  as it is (its kernel is the faster there). Exact in float up to rounding.
- **attention_masks.** A fused Attention or QAttention adds `mask_filter_value` (-10,000 by
  default) to the scores of padded positions; an unfused attention adds a constant of its own
  (-inf or float's lowest in PyTorch's exports). After the softmax subtracts the row's largest score,
  exp() of those positions falls below float's smallest normal number (e^-87), and the CPU then
  takes a slow path for every such element: the softmax of a [8, 12, 64, 64] score tensor with
  three quarters of each row at a padded position's score took 1.6 ms (3.1 ms at -90, where the
  results are subnormal rather than zero) instead of 0.16-0.18 ms. At `MASK_FILTER` (-40) a padded
  position still gets e^-40 of the weight of a key that scores as well as it, 4e-18, far below
  float's resolution, and exp() stays in the normal range unless a padded key scores 47 below the
  row's best. Not exact in principle (a padded key that scores 24 or more above every real key
  would get a weight above float's resolution, and a sequence with no token at all, every key
  padded, averages its padded positions where -inf gave it no weights), so `choose` keeps it only
  where the outputs agree with the unrewritten model's (`MASK_AGREEMENT`).

Both depend on ONNX Runtime's version and the CPU, so `choose` times the model with and without
each rewrite, interleaved (bench.measure), and keeps the fastest variant only when its 95 %
interval over the unrewritten model lies above 1. The rewritten graphs contain standard operators
only (the attention's are ONNX Runtime's already).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REWRITES = ("layer_norms", "attention_masks")
MASK_FILTER = -40.0
MASK_DEPTH = 4  # nodes from the scores' Add up to an unfused attention's mask constant
MASK_AGREEMENT = 1e-4  # largest difference of any output from the unrewritten model's, over its largest value
TIMING_RUNS = 20
TIMING_S = 10.0  # at most, for the extra runs bench.measure takes while an interval is wide


@dataclass
class Rewrites:
    """What `choose` or `apply` did to a model, as report data."""

    applied: list[str]  # the rewrites the shipped model has
    nodes: dict[str, int]  # rewrite -> nodes it changes (every applicable rewrite, applied or not)
    shapes: list[str] = field(default_factory=list)  # the shapes it was timed at (`bench.shape_key`)
    speedup: dict[str, dict] = field(default_factory=dict)  # variant ("+"-joined) -> shape -> {speedup, ci}
    refused: dict[str, str] = field(default_factory=dict)  # rewrite -> why it was not kept


def decompose_layer_norms(model) -> int:
    """Write every ONNX Runtime SkipLayerNormalization of `model` (an onnx.ModelProto, changed in
    place), and every float LayerNormalization over the last axis that an Add feeds (which ONNX
    Runtime would fuse into one), as Add, ReduceMean and elementwise operators; the number of nodes
    rewritten. A node whose mean or inverse standard deviation output is used, or whose scale is
    not a float initializer, is left as it is."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    added_by = {out for node in graph.node if node.op_type == "Add" and node.domain in ("", "ai.onnx")
                for out in node.output}
    floats = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    taken = {name for node in graph.node for name in list(node.input) + list(node.output)} | {
        i.name for i in graph.initializer}
    constants: dict[tuple, str] = {}  # (value, dtype) -> its initializer's name
    added, nodes, count = [], [], 0

    def fresh(stem: str) -> str:
        name, k = stem, 0
        while name in taken:
            k += 1
            name = f"{stem}_{k}"
        taken.add(name)
        return name

    def constant(value, dtype) -> str:
        key = (float(value), dtype)
        if key not in constants:
            constants[key] = fresh("compress_norm_" + ("axes" if dtype == np.int64 else "eps"))
            added.append(numpy_helper.from_array(np.array([value] if dtype == np.int64 else value, dtype),
                                                 constants[key]))
        return constants[key]

    def mean(x: str, out: str):
        if opset >= 18:
            return helper.make_node("ReduceMean", [x, constant(-1, np.int64)], [out])
        return helper.make_node("ReduceMean", [x], [out], axes=[-1])

    for node in graph.node:
        parts = _norm_parts(node, used, floats, added_by)
        if parts is None:
            nodes.append(node)
            continue
        stem = fresh(f"compress_norm{count}")
        while any(name.startswith(stem + "/") for name in taken):  # its tensors are named stem/...
            stem = fresh(stem)
        nodes += _written_norm(parts, stem, mean, constant(parts[4], np.float32))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(added)
    return count


def _written_norm(parts: tuple, p: str, mean: Callable, eps: str) -> list:
    """The nodes that compute a layer norm (`_norm_parts`) as `decompose_layer_norms` writes it, its
    tensors named `p`/..., `mean(x, out)` a ReduceMean over the last axis, `eps` the epsilon's name."""
    from onnx import helper

    x, adds, scale, bias, _, out, total = parts
    nodes = []
    for k, term in enumerate(adds):  # SkipLayerNormalization: input + skip (+ bias) first
        s = total if k == len(adds) - 1 and total else f"{p}/sum{k}"
        nodes.append(helper.make_node("Add", [x, term], [s]))
        x = s
    nodes += [mean(x, f"{p}/mean"), helper.make_node("Sub", [x, f"{p}/mean"], [f"{p}/centred"]),
              helper.make_node("Mul", [f"{p}/centred", f"{p}/centred"], [f"{p}/squared"]),
              mean(f"{p}/squared", f"{p}/var"),
              helper.make_node("Add", [f"{p}/var", eps], [f"{p}/var_eps"]),
              helper.make_node("Sqrt", [f"{p}/var_eps"], [f"{p}/std"]),
              helper.make_node("Reciprocal", [f"{p}/std"], [f"{p}/inv_std"]),
              helper.make_node("Mul", [f"{p}/centred", f"{p}/inv_std"], [f"{p}/normed"]),
              helper.make_node("Mul", [f"{p}/normed", scale], [out if not bias else f"{p}/scaled"])]
    if bias:
        nodes.append(helper.make_node("Add", [f"{p}/scaled", bias], [out]))
    return nodes


def _norm_parts(node, used: set[str], floats: set[str], added_by: set[str]):
    """(input, terms added to it first, scale, bias, epsilon, output, the sum's output name) of a
    layer-norm node `decompose_layer_norms` rewrites (`added_by`: the outputs of Add nodes); None
    for any other node."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    extra = [o for o in node.output[1:] if o and o in used]
    if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
        if attrs.get("axis", -1) != -1 or attrs.get("stash_type", 1) != 1 or extra or node.input[0] not in added_by:
            return None
        x, scale, bias = (list(node.input) + ["", ""])[:3]
        adds, total = [], None
    elif node.op_type == "SkipLayerNormalization" and node.domain == "com.microsoft":
        total = node.output[3] if len(node.output) > 3 and node.output[3] in used else None
        if [o for o in node.output[1:3] if o and o in used]:
            return None
        x, skip, scale, bias, add_bias = (list(node.input) + ["", "", ""])[:5]
        adds = [skip] + ([add_bias] if add_bias else [])
    else:
        return None
    if scale not in floats or (bias and bias not in floats):
        return None
    return x, adds, scale, bias, float(attrs.get("epsilon", 1e-5)), node.output[0], total


def soften_attention_masks(model, value: float | None = None) -> int:
    """Set `mask_filter_value` (default MASK_FILTER) on every ONNX Runtime Attention and QAttention
    node of `model` that takes a mask, and give the same value to every unfused attention's mask
    constant (`_mask_constants`); changed in place; the number of masks changed."""
    from onnx import helper, numpy_helper

    value = MASK_FILTER if value is None else value
    mask_input = {"Attention": 3, "QAttention": 5}
    count = 0
    for node in model.graph.node:
        k = mask_input.get(node.op_type)
        if node.domain != "com.microsoft" or k is None or len(node.input) <= k or not node.input[k]:
            continue
        kept = [a for a in node.attribute if a.name != "mask_filter_value"]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("mask_filter_value", float(value))])
        count += 1
    taken = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    for node, index in _mask_constants(model.graph):
        name = next(n for n in (f"compress_mask_filter{k}" for k in range(len(taken) + 1)) if n not in taken)
        taken.add(name)
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
        node.input[index] = name  # a constant of its own: the one it had may feed other nodes
        count += 1
    return count


MASK_OPS = {"Where", "Mul"}  # where an unfused attention's mask meets its padding value
PASS_OPS = {"Expand", "Cast", "Unsqueeze", "Reshape", "Sub"}  # what may lie between that and the scores


def _mask_constants(graph) -> list[tuple]:
    """(node, input index) of each float constant of -10,000 or less (-inf included) that a Where or
    Mul puts at the padded positions of an unfused attention: on the way from a Softmax's input,
    an Add of the scores and the mask, up through at most MASK_DEPTH Where, Mul, Expand, Cast,
    Unsqueeze, Reshape and Sub nodes."""
    from onnx import numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    values = {i.name: i for i in graph.initializer}
    values.update({node.output[0]: node.attribute[0].t for node in graph.node
                   if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"})

    def padding(name: str) -> bool:
        tensor = values.get(name)
        if tensor is None or tensor.data_type != 1 or np.prod(tensor.dims, dtype=np.int64) > 1:
            return False
        return float(numpy_helper.to_array(tensor).reshape(-1)[0]) <= -1e4

    found, seen = [], set()

    def walk(name: str, depth: int):
        node = producers.get(name)
        if node is None or depth > MASK_DEPTH or id(node) in seen or node.op_type not in MASK_OPS | PASS_OPS:
            return
        seen.add(id(node))
        for index, source in enumerate(node.input):
            if node.op_type in MASK_OPS and padding(source):
                found.append((node, index))
            elif source:
                walk(source, depth + 1)

    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        add = producers.get(softmax.input[0])
        if add is not None and add.op_type == "Add":
            for source in add.input:
                walk(source, 1)
    return found


FUNCTIONS: dict[str, Callable] = {"layer_norms": decompose_layer_norms, "attention_masks": soften_attention_masks}


def apply(path: Path, names: list[str]) -> Rewrites:
    """Apply the rewrites `names` to the ONNX file at `path` in place, untimed (a recipe's explicit list)."""
    names = list(dict.fromkeys(names))  # a rewrite named twice is applied once
    model = _load(path)
    if model is None:
        return Rewrites(applied=[], nodes={name: 0 for name in names})
    rewritten, nodes = _rewritten(model, names)
    applied = [name for name in names if nodes[name]]
    if applied:
        _save(path, lambda f: f.write(rewritten.SerializeToString()))
    return Rewrites(applied=applied, nodes=nodes)


def choose(path: Path, feeds: dict[str, dict[str, np.ndarray]], threads: int) -> Rewrites:
    """Time the ONNX file at `path` beside its variants with each applicable rewrite (and with all of
    them) on each of `feeds` (`bench.shape_key` -> feed), interleaved; rewrite `path` in place to the
    variant fastest at the largest shape among those whose 95 % interval over the unrewritten model
    lies above 1 there and reaches 1 at every other shape (none surely slower anywhere), if any.
    attention_masks is tried only where it leaves the outputs within MASK_AGREEMENT of the
    unrewritten model's."""
    from . import bench

    largest = bench.largest_key(feeds)
    with tempfile.TemporaryDirectory(prefix="compress-rewrites-") as tmp:
        paths, variants, nodes = _variant_files(path, Path(tmp))
        result = Rewrites(applied=[], nodes=nodes, shapes=list(feeds))
        if not nodes:
            return result
        if "attention_masks" in nodes:
            gap = _disagreement(str(path), paths["attention_masks"], feeds[largest], threads)
            if gap > MASK_AGREEMENT:
                result.refused["attention_masks"] = (f"changed the outputs by {gap:.1e} of their largest value "
                                                     f"(more than {MASK_AGREEMENT:g})")
                paths = {k: v for k, v in paths.items() if "attention_masks" not in variants.get(k, [])}
        if len(paths) == 1:
            return result
        measured = bench.measure(paths, feeds, threads, warmup=3, runs=TIMING_RUNS, budget_s=TIMING_S)
        result.speedup = {label: measured.pair("as quantized", label) for label in list(paths)[1:]}
        kept = {label: _why_not(by_shape, largest) for label, by_shape in result.speedup.items()}
        faster = [label for label, why in kept.items() if why is None]
        if faster:
            best = max(faster, key=lambda label: result.speedup[label][largest]["speedup"])
            result.applied = variants[best]
            with open(paths[best], "rb") as written:  # the file just timed, put in the model's place
                _save(path, lambda f: shutil.copyfileobj(written, f))
        for name in nodes:
            if name not in result.applied and name not in result.refused:
                result.refused[name] = kept[name] or "faster alone, but not as fast as the variant kept"
    return result


def _variant_files(path: Path, folder: Path) -> tuple[dict[str, str], dict[str, list[str]], dict[str, int]]:
    """({"as quantized": `path`, variant: its file in `folder`}, variant -> the rewrites it has,
    rewrite -> nodes it changes) for each rewrite that changes the model at `path`, and for all of
    them together; the model is read once, and each variant is written as soon as it is made."""
    model = _load(path)
    paths, variants, nodes = {"as quantized": str(path)}, {}, {}

    def keep(label: str, names: list[str], rewritten) -> None:
        variants[label], paths[label] = names, str(folder / f"{label.replace('+', '_')}.onnx")
        Path(paths[label]).write_bytes(rewritten.SerializeToString())

    for name in REWRITES if model is not None else ():
        rewritten, counts = _rewritten(model, [name])
        if counts[name]:
            nodes[name] = counts[name]
            keep(name, [name], rewritten)
    if len(nodes) > 1:
        keep("+".join(nodes), list(nodes), _rewritten(model, list(nodes))[0])
    return paths, variants, nodes


def _load(path: Path):
    """The ONNX model at `path`; None where its weights lie in external data files, which a rewrite
    would have to copy."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return None if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer) else model


def _rewritten(model, names: list[str]) -> tuple:
    """(a copy of `model` with the rewrites `names` applied, rewrite -> nodes it changed)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, {name: FUNCTIONS[name](copy) for name in names}


def _save(path: Path, write: Callable) -> None:
    """`write(file)` over the ONNX file at `path`, atomically and never through a link, with the
    umask's permissions like the file it replaces (outdir.write_atomic)."""
    from .outdir import write_atomic

    write_atomic(path, write, public=True)


def _why_not(by_shape: dict[str, dict], largest: str) -> str | None:
    """Why a variant timed at each shape (shape -> {speedup, ci} over the model without it) is not
    kept: not surely faster at the largest shape, or surely slower at another; None when it may be."""
    from .bench import describe_key

    def said(shape: str) -> str:
        s = by_shape[shape]
        return f"{s['speedup']:.2f}x [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] at {describe_key(shape)}"

    if by_shape[largest]["ci"][0] <= 1:
        return f"not surely faster ({said(largest)})"
    slower = [shape for shape, s in by_shape.items() if s["ci"][1] < 1]
    return f"slower at a smaller shape ({said(slower[0])})" if slower else None


def _disagreement(a: str, b: str, feed: dict[str, np.ndarray], threads: int) -> float:
    """The largest difference between the outputs of the ONNX files `a` and `b` on `feed`, over the
    largest absolute value of `a`'s."""
    from . import bench

    outs = [bench.make_session(p, threads).run(None, feed) for p in (a, b)]
    gaps = []
    for x, y in zip(*outs):
        if not np.array_equal(np.isnan(x), np.isnan(y)):  # a NaN where the other has a number: no agreement
            return float("inf")
        gaps.append(float(np.nanmax(np.abs(x - y), initial=0)) / max(float(np.nanmax(np.abs(x), initial=0)), 1e-30))
    return max(gaps, default=0.0)
