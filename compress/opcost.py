"""What one layer costs in ONNX Runtime, measured alone, cached on disk.

A budget in latency (`budget: {speedup: 2}`) needs the latency of every candidate of every layer:
the dense layer, or its factorization at a rank. Each is measured by exporting exactly the module
compress would ship (layers.empty_factorized, or the layer itself) to ONNX at the layer's real
input shape at the budget's batch size, and timing it alone in a session configured as the
whole-model benchmark's (bench.make_session: same threads, full graph optimization). Weights are
random (latency does not depend on their values). When the recipe quantizes, a layer the int8
model would quantize is measured quantized: the op is put through the same `quantize.quantize`
with the recipe's settings (static mode calibrated on the op's random input), because a
factorized layer quantized dynamically pays the activation quantization twice, which a float
table would not see.

Measurements are cached in a JSON file keyed by everything the number depends on: the layer's
kind and geometry, the rank and scheme, the input shape, the thread count, the ONNX Runtime
version and the quantization setting, so a second run measures nothing new. The file lives under
the user's cache folder (`$COMPRESS_CACHE_DIR`, else `$XDG_CACHE_HOME/compress`, else
`~/.cache/compress`); a cache that cannot be read is ignored (and rewritten), never trusted for
more than numbers: each entry must be a finite positive float.
"""
from __future__ import annotations

import io
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from . import layers
from .files import loads_json, read_regular

CACHE_NAME = "op-latency-v1.json"
MAX_ENTRIES = 200_000  # a bigger cache file is someone else's: start afresh


def cache_dir() -> Path:
    if os.environ.get("COMPRESS_CACHE_DIR"):
        return Path(os.environ["COMPRESS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "compress"


def signature(layer: nn.Module, rank: int | None, scheme: str, in_shape: tuple[int, ...]) -> str:
    """What a measurement depends on, besides threads, versions and quantization."""
    if isinstance(layer, nn.Conv2d):
        geometry = (f"conv{layer.in_channels}x{layer.out_channels}k{tuple(layer.kernel_size)}s{tuple(layer.stride)}"
                    f"p{layer.padding}d{tuple(layer.dilation)}g{layer.groups}b{layer.bias is not None}")
    elif isinstance(layer, nn.Embedding):
        geometry = f"embedding{layer.num_embeddings}x{layer.embedding_dim}"
    else:
        geometry = f"linear{layer.in_features}x{layer.out_features}b{layer.bias is not None}"
    form = "dense" if rank is None else f"rank{rank}-{scheme}"
    return f"{geometry}|{form}|in{list(in_shape)}"


def quantization_key(cfg) -> str:
    """What of a QuantizeSection an op's latency depends on ("float" without one)."""
    if cfg is None:
        return "float"
    ops = ",".join(sorted(cfg.op_types or [])) or "default"
    from .quantize import resolve_reduce_range

    return f"{cfg.mode}-{cfg.weight_type}-pc{int(cfg.per_channel)}-rr{int(resolve_reduce_range(cfg))}-{ops}"


class OpCosts:
    """Per-candidate latency in milliseconds, measured on demand and cached. With `quantize` (the
    recipe's QuantizeSection) a candidate asked for `quantized` is measured as int8."""

    def __init__(self, threads: int = 1, quantize=None, path: Path | None = None):
        import onnxruntime as ort

        self.threads = threads
        # one op alone: nothing to exclude, no lookup table to put in 4 bits (quantize.tables), no attention to
        # fuse (quantize.fuse: a Linear is priced as the unfused int8 MatMul it stays outside the Attention node)
        self.quantize = (quantize.model_copy(update={"exclude": [], "tables": None, "fuse": False})
                         if quantize is not None else None)
        self.suffix = f"|t{threads}|ort{ort.__version__}|torch{torch.__version__}"
        self.path = path or cache_dir() / CACHE_NAME
        self.entries = self._read()
        self.measured = 0  # measurements taken by this object (not from the cache)

    def _read(self) -> dict[str, float]:
        try:
            data = loads_json(read_regular(self.path, 64 * MAX_ENTRIES))
        except (OSError, ValueError, UnicodeDecodeError):  # unreadable, a FIFO, /dev/zero, too deep: ignored
            return {}
        if not isinstance(data, dict) or len(data) > MAX_ENTRIES:
            return {}
        return {k: float(v) for k, v in data.items()
                if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v > 0}

    def save(self) -> None:
        """Write the cache atomically (a failure to write only loses the cache, never the run)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as f:
                json.dump(self.entries, f)
            os.replace(f.name, self.path)
        except OSError:
            pass

    def latency_ms(self, layer: nn.Module, rank: int | None, scheme: str, in_shape: tuple[int, ...],
                   quantized: bool = False) -> float:
        cfg = self.quantize if quantized else None
        key = f"{signature(layer, rank, scheme, in_shape)}{self.suffix}|{quantization_key(cfg)}"
        if key not in self.entries:
            self.entries[key] = measure(layer, rank, scheme, in_shape, self.threads, cfg)
            self.measured += 1
        return self.entries[key]


@torch.no_grad()
def candidate_module(layer: nn.Module, rank: int | None, scheme: str) -> nn.Module:
    """The module compress would ship for this candidate, with random weights."""
    module = layers.empty_factorized(layer, rank, scheme) if rank is not None else _copy_shape(layer)
    for p in module.parameters():
        p.normal_(0, 0.02)
    return module.eval()


def _copy_shape(layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None)
    if isinstance(layer, nn.Embedding):
        return nn.Embedding(layer.num_embeddings, layer.embedding_dim)
    return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)


def measure(layer: nn.Module, rank: int | None, scheme: str, in_shape: tuple[int, ...], threads: int,
            quantize=None, runs: int = 30, warmup: int = 5) -> float:
    """Median latency in ms of the candidate alone in ONNX Runtime at input shape `in_shape`, int8
    by `quantize` (a QuantizeSection) when given and the op is one it quantizes."""
    from .bench import make_session
    from .errors import UserError

    module = candidate_module(layer, rank, scheme)
    if isinstance(layer, nn.Embedding):
        x = torch.randint(0, layer.num_embeddings, in_shape)
    else:
        x = torch.randn(in_shape)
    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "op.onnx"
        path.write_bytes(buffer.getvalue())
        if quantize is not None:  # the op as the recipe's int8 model would run it
            from .quantize import quantize as quantize_file

            quantized = Path(folder) / "op.int8.onnx"
            try:
                quantize_file(path, quantized, quantize, [{"x": x.numpy()}] * 4)
                path = quantized
            except UserError:  # not an op these settings quantize (a Conv under dynamic): it runs in float
                pass
        session = make_session(str(path), threads)
        feed = {"x": x.numpy()}
        for _ in range(warmup):
            session.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
    return max(1e-6, statistics.median(times) * 1000)
