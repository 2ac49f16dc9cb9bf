"""Model outputs to one number: accuracy, MSE, or agreement with the original model.

Scoring works on collected output tensors, so the torch model and the exported ONNX model are
scored by the same code on the same data.
"""
from __future__ import annotations

from typing import Any

import torch

HIGHER_IS_BETTER = {"accuracy": True, "agreement": True, "mse": False}


def primary_output(outputs: Any) -> torch.Tensor:
    """The tensor a metric or a loss looks at: the output itself, the first of a tuple, or `logits`."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        return outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))
    if isinstance(outputs, (tuple, list)) and outputs:
        return primary_output(outputs[0])
    if hasattr(outputs, "logits"):
        return outputs.logits
    raise TypeError(f"cannot find a tensor in model output of type {type(outputs).__name__}")


def choose_metric(requested: str, target: torch.Tensor | None) -> str:
    """auto: accuracy for integer labels, mse for real-valued targets, agreement without labels."""
    if requested != "auto":
        return requested
    if target is None:
        return "agreement"
    return "mse" if target.is_floating_point() else "accuracy"


def score(name: str, outputs: torch.Tensor, target: torch.Tensor | None, reference: torch.Tensor | None) -> float:
    """The metric `name` of collected `outputs` (all samples) against labels or reference outputs."""
    outputs = outputs.float()
    if name == "accuracy":
        if target is None:
            raise ValueError("accuracy needs labels")
        return float((outputs.argmax(dim=1) == target).float().mean())
    if name == "mse":
        other = target if target is not None else reference
        return float(((outputs - other.float().reshape(outputs.shape)) ** 2).mean())
    if name == "agreement":
        if reference is None:
            raise ValueError("agreement needs the original model's outputs")
        return float((outputs.argmax(dim=1) == reference.float().argmax(dim=1)).float().mean())
    raise ValueError(f"unknown metric {name!r}")


def drop(name: str, before: float, after: float) -> float:
    """How much worse `after` is than `before` (positive = worse), whatever the metric's direction."""
    return before - after if HIGHER_IS_BETTER[name] else after - before
