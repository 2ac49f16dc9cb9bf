"""Model outputs to one number: accuracy, MSE, or agreement with the original model.

Scoring works on collected output tensors, so the torch model and the exported ONNX model are
scored by the same code on the same data.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch

HIGHER_IS_BETTER = {"accuracy": True, "agreement": True, "auc": True, "mse": False, "cosine": True, "neighbors": True}
NEIGHBORS_MAX = 4096  # samples the nearest-neighbour metric compares all-to-all (memory grows with the square)


OUTPUT_KEY: ContextVar[str | None] = ContextVar("output_key", default=None)


def primary_output(outputs: Any) -> torch.Tensor:
    """The tensor a metric or a loss looks at (the export's `output` too). The rule: a tensor is
    itself; with `model.output_key` set in the recipe, that key of a dict (a transformers
    ModelOutput is one), attribute, or tuple index; otherwise a dict's `logits`, else its first
    value; a tuple's or list's first element; an object's `logits` attribute."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    key = OUTPUT_KEY.get()
    if key is not None:
        try:
            if isinstance(outputs, dict):
                return primary_output(outputs[key])
            if isinstance(outputs, (tuple, list)) and key.lstrip("-").isdigit():
                return primary_output(outputs[int(key)])
            return primary_output(getattr(outputs, key))
        except (KeyError, IndexError, AttributeError):
            raise TypeError(f"model.output_key {key!r} is not in the model's {type(outputs).__name__} output") from None
    if isinstance(outputs, dict):
        return primary_output(outputs["logits"] if "logits" in outputs else next(iter(outputs.values())))
    if isinstance(outputs, (tuple, list)) and outputs:
        return primary_output(outputs[0])
    if hasattr(outputs, "logits"):
        return outputs.logits
    raise TypeError(f"cannot find a tensor in model output of type {type(outputs).__name__}")


def choose_metric(requested: str, target: torch.Tensor | None) -> str:
    """auto: accuracy for integer labels, auc for 0/1 labels, mse for real-valued targets, and
    without labels cosine to the original's outputs: never top-1 agreement, which means nothing for
    an embedding (a classifier without labels asks for `agreement` itself)."""
    if requested != "auto":
        return requested
    if target is None:
        return "cosine"
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
        return float((outputs.argmax(dim=-1) == target.reshape(outputs.shape[:-1])).float().mean())  # classes last
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
    if name == "cosine":
        if reference is None:
            raise ValueError("cosine needs the original model's outputs")
        return cosine(outputs, reference.float())
    if name == "neighbors":
        if reference is None:
            raise ValueError("neighbors needs the original model's outputs")
        return neighbors(outputs, reference.float())
    raise ValueError(f"unknown metric {name!r}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


def cosine(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of each sample's output to the original's; for one number per
    sample, the cosine of the two centred output vectors over the set."""
    a, b = _rows(outputs), _rows(reference)
    if a.shape[1] == 1:
        a, b = (a - a.mean()).T, (b - b.mean()).T
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


def neighbors(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Top-1 nearest-neighbour agreement: the share of samples whose most similar other sample
    (cosine, within the first NEIGHBORS_MAX of the set) is the same under both models."""
    def nearest(x):
        x = torch.nn.functional.normalize(_rows(x[:NEIGHBORS_MAX]), dim=1)
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(dim=1)

    if outputs.shape[0] < 2:
        raise ValueError("neighbors needs at least two samples")
    return float((nearest(outputs) == nearest(reference)).double().mean())


def drop(name: str, before: float, after: float) -> float:
    """How much worse `after` is than `before` (positive = worse), whatever the metric's direction."""
    return before - after if HIGHER_IS_BETTER[name] else after - before
