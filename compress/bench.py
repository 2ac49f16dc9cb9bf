"""Counting and timing: parameters, MACs (torch's FlopCounterMode), per-layer shapes, and
ONNX Runtime latency with the same session options for every model and runs interleaved."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .methods.base import LAYER_TYPES, LayerProfile

PERCENTILES = (50, 90, 99)


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


def make_session(path: str, threads: int):
    """An ONNX Runtime CPU session with fixed threads and full graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    values = np.percentile(np.asarray(samples_ms), PERCENTILES)
    out = {f"p{p}": round(float(v), 4) for p, v in zip(PERCENTILES, values)}
    out["mean"] = round(float(np.mean(samples_ms)), 4)
    return out


def latency(models: dict[str, str], feeds: dict[int, dict[str, np.ndarray]], threads: int = 1,
            warmup: int = 10, runs: int = 50, progress: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """p50/p90/p99 latency in ms of each ONNX model per batch size.

    Every model gets an identically configured session; within each batch size the models are run
    alternately (A, B, A, B, ...) so that machine noise falls on all of them alike.
    Returns {label: {str(batch_size): {"p50", "p90", "p99", "mean"}}}.
    """
    from tqdm.auto import tqdm

    sessions = {label: make_session(path, threads) for label, path in models.items()}
    result: dict[str, dict[str, dict[str, float]]] = {label: {} for label in models}
    bar = tqdm(total=len(feeds) * (warmup + runs) * len(models), desc="benchmark", unit="run",
               disable=not progress, leave=False)
    for batch_size, feed in feeds.items():
        for _ in range(warmup):
            for session in sessions.values():
                session.run(None, feed)
                bar.update(1)
        samples: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(runs):
            for label, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                samples[label].append((time.perf_counter() - start) * 1e3)
                bar.update(1)
        for label in sessions:
            result[label][str(batch_size)] = percentiles(samples[label])
    bar.close()
    return result
