"""Model outputs to one number: accuracy, MSE, or agreement with the original model.

Scoring works on collected output tensors, so the torch model and the exported ONNX model are
scored by the same code on the same data.
"""
from __future__ import annotations

from typing import Any

import torch

HIGHER_IS_BETTER = {"accuracy": True, "agreement": True, "auc": True, "mse": False}


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
    if is_binary(target):
        return "auc"
    return "mse" if target.is_floating_point() else "accuracy"


def is_binary(target: torch.Tensor) -> bool:
    """Real-valued 0/1 labels (click or no click): scored by AUC and trained with BCE."""
    return target.is_floating_point() and bool(((target == 0) | (target == 1)).all())


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    scores = scores.reshape(-1).double()
    labels = labels.reshape(-1) > 0.5
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    sorted_scores = scores[order]  # average the ranks of tied scores
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


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
    if name == "auc":
        if target is None:
            raise ValueError("auc needs labels")
        return auc(outputs, target)
    if name == "agreement":
        if reference is None:
            raise ValueError("agreement needs the original model's outputs")
        return float((outputs.argmax(dim=1) == reference.float().argmax(dim=1)).float().mean())
    raise ValueError(f"unknown metric {name!r}")


def drop(name: str, before: float, after: float) -> float:
    """How much worse `after` is than `before` (positive = worse), whatever the metric's direction."""
    return before - after if HIGHER_IS_BETTER[name] else after - before
