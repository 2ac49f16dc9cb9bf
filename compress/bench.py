"""Counting and timing: parameters, MACs (torch's FlopCounterMode), per-layer shapes, and
ONNX Runtime latency with the same session options for every model and runs interleaved."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .methods.base import LAYER_TYPES, LayerProfile

PERCENTILES = (50, 90, 99)
MAX_SEQ_LEN = 1 << 16  # tokens: the longest sequence a benchmark or budget may time at


def shape_key(batch: int, seq_len: int | None = None) -> str:
    """How latency is keyed in a Measurement and the report: the batch size ("8"), with the
    sequence length when tokenized text is timed at one ("8x128")."""
    return str(batch) if seq_len is None else f"{batch}x{seq_len}"


def describe_key(key: str) -> str:
    """A `shape_key` in words: "batch 8" or "batch 8, 128 tokens"."""
    size, _, length = str(key).partition("x")
    return f"batch {size}" + (f", {length} tokens" if length else "")


def largest_key(keys) -> str:
    """The largest of `shape_key`s: by batch size, then sequence length."""
    return max(keys, key=lambda k: tuple(int(x) for x in str(k).split("x")))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of one forward pass per sample, counted by torch (FLOPs / 2)."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2 // max(1, _batch(inputs))


@torch.no_grad()
def macs_by_module(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Per-module MACs per sample, keyed by module name ('' for the whole model)."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    root = type(model).__name__
    out = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key.removeprefix(root + ".")
        out[name] = sum(ops.values()) // 2 // max(1, _batch(inputs))
    return out


def _batch(inputs: tuple[torch.Tensor, ...]) -> int:
    return inputs[0].shape[0] if inputs and inputs[0].dim() else 1


@torch.no_grad()
def profile_layers(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, LayerProfile]:
    """Per-sample input and output shapes of every Linear, Conv2d and Embedding, from one forward pass."""
    shapes: dict[str, LayerProfile] = {}
    hooks = []
    for name, module in model.named_modules():
        if name and isinstance(module, tuple(LAYER_TYPES.values())):
            def hook(mod, args, output, name=name):
                shapes.setdefault(name, LayerProfile(tuple(args[0].shape[1:]), tuple(output.shape[1:])))
            hooks.append(module.register_forward_hook(hook))
    try:
        model.eval()
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return shapes


@torch.no_grad()
def activation_bytes_per_sample(model: nn.Module, inputs: tuple[torch.Tensor, ...], meta_only: bool = False
                                ) -> int | None:
    """Bytes of the inputs plus every leaf module's output for one sample: an upper bound on what
    a runtime keeps alive per sample (it reuses most of it), for refusing batches that cannot fit.
    Traced on the meta device (shapes only, nothing allocated, no arithmetic), so a huge declared
    input is measured in milliseconds. A model whose forward cannot run on meta tensors (it reads
    values, e.g. `.item()`) is run for real, or with `meta_only` gives None."""
    total = [0]

    def hook(module, args, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model.eval()
        try:
            _meta_forward(model, inputs)
        except Exception:  # noqa: BLE001 - the model needs real values
            if meta_only:
                return None
            total[0] = 0
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return (total[0] + sum(t.numel() * t.element_size() for t in inputs)) // max(1, _batch(inputs))


def _meta_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...]):
    """The model's forward with its weights and the inputs swapped for meta tensors of the same
    shapes (the model itself is untouched)."""
    from torch.func import functional_call

    state = {k: torch.empty_like(v, device="meta")
             for k, v in (*model.named_parameters(), *model.named_buffers())}
    meta_inputs = tuple(torch.empty_like(t, device="meta") for t in inputs)
    return functional_call(model, state, meta_inputs, strict=False)


ONNX_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


def onnx_bytes_per_sample(path: str, dims: dict[str, int] | None = None) -> int:
    """Bytes of every tensor in an ONNX graph for one sample, from ONNX shape inference: the batch
    axis (any symbolic axis not named in `dims`) counts 1, unknown sizes count 1."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    except Exception:  # shape inference can fail on exotic graphs: then estimate from inputs and outputs only
        model = onnx.load(path, load_external_data=False)
    graph = model.graph
    total = 0
    for value in (*graph.input, *graph.value_info, *graph.output):
        kind = value.type.tensor_type
        if not kind.HasField("shape"):
            continue
        count = 1
        for d in kind.shape.dim:
            count *= d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (dims or {}).get(d.dim_param, 1)
        total += count * ONNX_ELEMENT_BYTES.get(kind.elem_type, 4)
    return total


def check_fits(batch_sizes: Sequence[int], per_sample_bytes: int, what: str, copies: int = 2) -> None:
    """Refuse, before allocating, a batch size whose tensors (`copies` models' worth) would need more
    than half the memory available now."""
    from .errors import UserError
    from .system import available_memory

    budget = available_memory() // 2
    for bs in batch_sizes:
        need = bs * per_sample_bytes * copies
        if need > budget:
            fits = budget // max(1, per_sample_bytes * copies)
            if fits < 1:
                raise UserError(f"{what}: one sample needs about {per_sample_bytes * copies / 2**30:.1f} GiB for its "
                                f"tensors, more than half the {budget * 2 / 2**30:.1f} GiB available; refusing to "
                                "run the model on it")
            raise UserError(f"{what}: batch size {bs:,} needs about {need / 2**30:.1f} GiB for its tensors, more than "
                            f"half the {budget * 2 / 2**30:.1f} GiB available; use at most about {fits:,}")


def make_session(path: str, threads: int):
    """An ONNX Runtime CPU session with fixed threads and full graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # errors come back as exceptions, with their message
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    values = np.percentile(np.asarray(samples_ms), PERCENTILES)
    out = {f"p{p}": round(float(v), 4) for p, v in zip(PERCENTILES, values)}
    out["mean"] = round(float(np.mean(samples_ms)), 4)
    return out


CONFIDENCE = 0.95
BOOTSTRAP = 2000
TARGET_HALF_WIDTH = 0.05  # stop adding runs once the speedup's interval is within +-5 % of it
WARN_HALF_WIDTH = 0.10  # still wider than +-10 % after all the runs: say the machine was too noisy
MAX_RUNS_FACTOR = 8  # ... or after 8x the requested runs
BUDGET_S = 60.0  # ... or after a minute per batch size
TAIL_RATIO = 3.0  # p90 more than 3x p50: the machine interrupted the runs
# Two sessions of the *same* ONNX model on one machine differ by up to ~4 % in p50 however long
# they run (memory placement; measured with `compress bench a.onnx a.onnx`, 12 runs: 0.98-1.04x),
# which no resampling of runs can see. Reported intervals are therefore never narrower than
# +-RESOLUTION around the estimate: a speedup under 5 % is not distinguished from none.
RESOLUTION = 0.05


def speedup_interval(reference_ms: Sequence[float], candidate_ms: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95 % interval of p50(reference) / p50(candidate) from paired runs (run i of both
    models was taken back to back, so pairs are resampled together and shared noise cancels)."""
    a, b = np.asarray(reference_ms, dtype=np.float64), np.asarray(candidate_ms, dtype=np.float64)
    n = min(len(a), len(b))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    ratios = np.median(a[:n][idx], axis=1) / np.median(b[:n][idx], axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return round(float(lo), 4), round(float(hi), 4)


def _reported(interval: tuple[float, float], estimate: float) -> list[float]:
    """The interval as reported: the bootstrap's, widened to at least +-RESOLUTION around the estimate."""
    lo, hi = interval
    return [round(min(lo, estimate * (1 - RESOLUTION)), 4), round(max(hi, estimate * (1 + RESOLUTION)), 4)]


def half_width(interval: tuple[float, float], estimate: float) -> float:
    return (interval[1] - interval[0]) / 2 / max(estimate, 1e-12)


def latency(models: dict[str, str], feeds: dict[int, dict[str, np.ndarray]], threads: int = 1,
            warmup: int = 10, runs: int = 50, progress: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """p50/p90/p99 latency in ms of each ONNX model per batch size (see `measure`)."""
    return measure(models, feeds, threads, warmup, runs, progress).latency_ms


@dataclass
class Speedup:
    """How many times faster a model is than another at one batch size: the ratio of p50s from
    paired runs, and its 95 % interval as reported (see `_reported`)."""

    estimate: float
    low: float
    high: float


@dataclass
class Measurement:
    """What `measure` timed. Shapes are `shape_key` strings, "8" or "8x128" (JSON keys in the report)."""

    labels: list[str]
    latency_ms: dict[str, dict[str, dict[str, float]]]  # label -> batch -> {p50, p90, p99, mean, runs}
    speedups: dict[tuple[str, str], dict[str, Speedup]]  # (A, B) -> batch -> B's speedup over A
    paired: list[tuple[str, str]] = field(default_factory=list)  # the pairs asked for beside the first model
    warnings: list[str] = field(default_factory=list)

    def over_reference(self, label: str) -> dict[str, Speedup]:
        """`label`'s speedup over the first model, per batch size."""
        return self.speedups[(self.labels[0], label)]

    @property
    def speedup(self) -> dict[str, dict[str, float]]:
        """label -> batch -> the point estimate over the first model (the report's `speedup`)."""
        return {o: {b: s.estimate for b, s in self.over_reference(o).items()} for o in self.labels[1:]}

    @property
    def speedup_ci(self) -> dict[str, dict[str, list[float]]]:
        """label -> batch -> [low, high] over the first model (the report's `speedup_ci`)."""
        return {o: {b: [s.low, s.high] for b, s in self.over_reference(o).items()} for o in self.labels[1:]}

    def pair(self, a: str, b: str) -> dict[str, dict]:
        """batch -> {"speedup", "ci"}: B over A, as the report's baselines write it."""
        return {bs: {"speedup": s.estimate, "ci": [s.low, s.high]} for bs, s in self.speedups[(a, b)].items()}

    def to_json(self) -> dict:
        """What `compress bench --json` prints (its keys are an interface)."""
        return {"latency_ms": self.latency_ms, "speedup": self.speedup, "speedup_ci": self.speedup_ci,
                "pairs": {f"{a}/{b}": self.pair(a, b) for a, b in self.paired},
                "warnings": self.warnings}


def _first_run(session, feed: dict[str, np.ndarray], path: str) -> None:
    """Run once; a model that ONNX Runtime cannot run on these inputs (a dynamic axis it declares
    but cannot take, say) is a one-line error naming the file and the input shapes."""
    import re

    from .errors import UserError

    try:
        session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own classes, all of them are this
        text = " ".join(str(exc).split())
        node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
        reason = re.split(r"Status Message: (?:\S+:\d+ .*? was false\. )?", text)[-1]
        shapes = ", ".join(f"{name} {list(array.shape)}" for name, array in feed.items())
        where = f" at its {node.group(1)} node {node.group(2)!r}" if node else ""
        raise UserError(f"{path}: ONNX Runtime cannot run it on {shapes}{where}: {reason[:300]} (does the model "
                        "take every size its dynamic axes declare? e.g. a sequence longer than it was exported "
                        "at)") from None


def measure(models: dict[str, str], feeds: dict[int | str, dict[str, np.ndarray]], threads: int = 1,
            warmup: int = 10, runs: int = 50, progress: bool = False, budget_s: float = BUDGET_S,
            pairs: Sequence[tuple[str, str]] = ()) -> Measurement:
    """Latency of each ONNX model per batch size, and the speedup of every model over the first
    (and of B over A for each (A, B) in `pairs`, from the same runs) with a bootstrap 95 % interval.
    `feeds` is keyed by batch size or by `shape_key` (a batch size with a sequence length).

    Every model gets an identically configured session. Within each batch size the models run
    back to back in rounds (`round_order`: each round the order turns by one, so that machine noise
    falls on all of them alike, none always runs first, and no model ever runs twice in a row: a
    model's second run straight after its first finds its weights in the CPU's caches, and on
    all-MiniLM-L6-v2 at batch 8 that made the same model up to 25 % faster where the old A B, B A
    order put it first or last). After `runs` pairs, more pairs are taken (in
    chunks of `runs`, up to 8x, within `budget_s`) while any speedup's interval is wider than
    +-5 %. A speedup still wider than +-10 % at the end, or a model whose p90 is over 3x its p50,
    gets a warning. The reported interval is the bootstrap's, widened to at least +-RESOLUTION.
    """
    from .progress import bar as progress_bar

    sessions = {label: make_session(path, threads) for label, path in models.items()}
    labels = list(sessions)
    paired = [(a, b) for a, b in pairs]
    result = Measurement(labels, {label: {} for label in labels},
                         {p: {} for p in [(labels[0], o) for o in labels[1:]] + paired}, paired)
    bar = progress_bar(len(feeds) * (warmup + runs) * len(labels), "benchmark", "run", enabled=progress)
    for batch_size, feed in feeds.items():
        for label, session in sessions.items():
            _first_run(session, feed, models[label])
        for _ in range(warmup):
            for session in sessions.values():
                session.run(None, feed)
                bar.update(1)
        samples, taken, known = _paired_runs(sessions, feed, runs, budget_s, bar)
        _summarize(result, str(batch_size), samples, taken, known)
    bar.close()
    return result


def round_order(labels: list[str], index: int) -> list[str]:
    """The order of the models in round `index`: turned by one place each round, so that every model
    takes every place and the last of a round is never the first of the next (with two models, A B
    every round: turning them would run B twice in a row)."""
    if len(labels) < 3:
        return list(labels)
    turn = index % len(labels)
    return labels[turn:] + labels[:turn]


def _paired_runs(sessions: dict, feed: dict[str, np.ndarray], runs: int, budget_s: float, bar
                 ) -> tuple[dict[str, list[float]], int, dict[tuple[str, str], tuple[float, tuple[float, float]]]]:
    """Milliseconds per run of every session, in `round_order`, until every speedup over the
    first is known to +-TARGET_HALF_WIDTH (or MAX_RUNS_FACTOR x runs, or budget_s); how many
    rounds were taken; and each speedup over the first with its interval, as last computed."""
    labels = list(sessions)
    reference, others = labels[0], labels[1:]
    samples: dict[str, list[float]] = {label: [] for label in labels}
    started, taken = time.perf_counter(), 0
    while True:
        for _ in range(runs):
            for label in round_order(labels, taken):
                start = time.perf_counter()
                sessions[label].run(None, feed)
                samples[label].append((time.perf_counter() - start) * 1e3)
                bar.update(1)
            taken += 1
        known = {(reference, o): (_p50_ratio(samples[reference], samples[o]),
                                  speedup_interval(samples[reference], samples[o])) for o in others}
        wide = [pair for pair, (estimate, interval) in known.items() if half_width(interval, estimate) > TARGET_HALF_WIDTH]
        if not wide or taken >= MAX_RUNS_FACTOR * runs or time.perf_counter() - started > budget_s:
            return samples, taken, known
        if hasattr(bar, "total"):
            bar.total += runs * len(labels)


def _p50_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.median(a) / np.median(b))


def _summarize(result: Measurement, key: str, samples: dict[str, list[float]], taken: int,
               known: dict[tuple[str, str], tuple[float, tuple[float, float]]]) -> None:
    """One batch size's percentiles and speedups into `result` (those in `known` as computed there),
    with a warning for each speedup too noisy to trust and for runs the machine interrupted."""
    for label in result.labels:
        result.latency_ms[label][key] = {**percentiles(samples[label]), "runs": taken}
    for a, b in result.speedups:
        estimate, interval = known.get((a, b)) or (_p50_ratio(samples[a], samples[b]),
                                                   speedup_interval(samples[a], samples[b]))
        result.speedups[(a, b)][key] = Speedup(round(estimate, 4), *_reported(interval, estimate))
        if half_width(interval, estimate) > WARN_HALF_WIDTH:
            result.warnings.append(
                f"{describe_key(key)}: {b} speedup over {a} {estimate:.3f}x has a wide 95% interval "
                f"[{interval[0]:.3f}, {interval[1]:.3f}] after {taken} paired runs: the machine was noisy")
    tails = [label for label in result.labels if samples[label] and
             np.percentile(samples[label], 90) > TAIL_RATIO * np.percentile(samples[label], 50)]
    if tails:
        result.warnings.append(f"{describe_key(key)}: p90 latency over {TAIL_RATIO:g}x p50 for {', '.join(tails)}: "
                               "runs were interrupted (a busy machine); percentiles above p50 are unreliable")
