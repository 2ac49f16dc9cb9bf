"""Precision as a per-layer choice: `budget.precision: per_layer`.

With a `quantize:` section the recipe's int8 settings normally apply to every layer they match.
With `precision: per_layer` each allocated layer those settings would quantize is offered twice:
every candidate (left as it is, or each rank) in int8 *and* in float. The budget then picks size
and precision together, so "int8 everywhere, nothing factorized" (int8 of the original, for the
allocated layers) and "float everywhere" are both in the search space, and the knapsack keeps a
layer in float only where the time or bytes that costs buy more than the int8 error it saves.
Layers kept float are excluded from quantization in the exported model (`shipped_settings`), and
the plan's rows say each layer's precision.

Cost of an int8 candidate: its op(s) timed quantized in ONNX Runtime (opcost.py), or a byte per
weight; of a float candidate: timed in float, 4 bytes per weight. Damage of an int8 candidate: its
factorization error (the method's, scaled to the output as usual) plus the layer's quantization
error: the model's output error on the probe samples with only this layer quantized, simulated in
torch the way ONNX Runtime's integer kernels round (`simulated_int8`: symmetric weights per output
channel, 7-bit where reduce_range; activations asymmetric uint8 per tensor, their range taken per
batch -- static QDQ calibrates a fixed range instead, which the simulation does not model). One
pass per such layer. The sum is an approximation (a factorized layer's two int8 ops are charged
the dense layer's quantization error); the objective check (`Allocation._best_objective`) measures
each candidate allocation with both applied.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator

import torch
from torch import nn

from . import quantize
from .methods.allocation import LayerChoice

SIMULATED = (nn.Linear, nn.Conv2d, nn.Embedding)


@torch.no_grad()
def fake_quant_weight(weight: torch.Tensor, per_channel: bool, reduce_range: bool) -> torch.Tensor:
    """The weight as symmetric int8 rounds it (one scale per output channel, dim 0, or per tensor)."""
    top = 63 if reduce_range else 127
    w = weight.detach().float()
    if per_channel and w.dim() > 1:
        scale = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-12) / top
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -top, top).to(weight.dtype)
    scale = float(w.abs().max().clamp_min(1e-12)) / top
    return torch.fake_quantize_per_tensor_affine(w, scale, 0, -top, top).to(weight.dtype)


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """x as ONNX Runtime's DynamicQuantizeLinear rounds it: uint8, asymmetric, one range (holding 0)
    for the whole tensor."""
    if not x.is_floating_point() or x.numel() == 0:
        return x
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255 or 1.0
    zero = int(min(255, max(0, round(-low / scale))))
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)


@contextlib.contextmanager
def simulated_int8(module: nn.Module, cfg: quantize.QuantizeSection) -> Iterator[None]:
    """A context in which every Linear, Conv2d and Embedding in `module` (itself included: a
    factorized layer's factors) computes as its int8 version would: weights rounded, inputs rounded
    (not an Embedding's indices). Restored afterwards."""
    reduce = quantize.resolve_reduce_range(cfg)
    saved, hooks = [], []
    try:
        for leaf in [m for m in module.modules() if isinstance(m, SIMULATED)]:
            saved.append((leaf, leaf.weight.data))
            leaf.weight.data = fake_quant_weight(leaf.weight.data, cfg.per_channel and not isinstance(leaf, nn.Embedding),
                                                 reduce)
            if not isinstance(leaf, nn.Embedding):
                hooks.append(leaf.register_forward_pre_hook(
                    lambda mod, args: (fake_quant_activation(args[0]), *args[1:])))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for leaf, data in saved:
            leaf.weight.data = data


def offers_precision(choice: LayerChoice, cfg: quantize.QuantizeSection | None) -> bool:
    """Whether a unit takes a precision: it is one layer that the recipe's int8 settings quantize."""
    return cfg is not None and isinstance(choice.unit, nn.Module) and quantize.quantizes_layer(cfg, choice.name,
                                                                                                choice.unit)


def add_float_twins(offered, model: nn.Module, profile: dict, request, cfg) -> int:
    """Mark each precision-taking unit's candidates (priced as the recipe quantizes them) int8 and
    append a float twin of each, priced in float by the method itself. Returns the units offered."""
    float_request = dataclasses.replace(
        request, quantized=lambda name, layer: False, unpriced=[],
        costs=functools.partial(request.costs, quantized=False) if request.costs is not None else None)
    count = 0
    for method, choices in offered:
        for choice in choices:
            if not offers_precision(choice, cfg):
                continue
            shadow = dataclasses.replace(choice, candidates=[dataclasses.replace(c) for c in choice.candidates])
            method.price_choices([shadow], model, profile, float_request)
            for c in choice.candidates:
                c.precision = "int8"
            choice.candidates += [dataclasses.replace(c, precision="float") for c in shadow.candidates]
            count += 1
    return count


def measure_quantization_errors(choices: list[LayerChoice], probe) -> int:
    """Each precision-taking unit's quantization error, in the model's output units: one probe pass
    with the layer alone in (simulated) int8, charged to all of its int8 candidates. Returns passes."""
    passes = 0
    for choice in choices:
        int8 = [c for c in choice.candidates if c.precision == "int8"]
        if not int8:
            continue
        error = probe.error([(choice, None, True)])
        for c in int8:
            c.quant_error = error
        passes += 1
    return passes


def float_layers(allocation) -> list[str]:
    """The layers the allocation keeps in float although the recipe's settings would quantize them."""
    if allocation is None:
        return []
    return [choice.name for choice in allocation.layers if choice.candidate.precision == "float"]


def shipped_settings(cfg: quantize.QuantizeSection | None, allocation) -> quantize.QuantizeSection | None:
    """The int8 settings the shipped model is quantized with: the recipe's, with the layers the
    allocation keeps in float excluded (a module's name excludes its factors too)."""
    kept = float_layers(allocation)
    if cfg is None or not kept:
        return cfg
    return cfg.model_copy(update={"exclude": [*cfg.exclude, *kept]})
