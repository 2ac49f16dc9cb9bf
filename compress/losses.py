"""Losses that know what kind of output a model produces.

Models from other libraries end in different places: logits (a final Linear), probabilities (a
final sigmoid or softmax: CTR libraries usually return a click probability), or log-probabilities
(a final log-softmax). A loss written for logits silently does the wrong thing on the others:
binary cross-entropy "with logits" on a probability drives negatives to exactly 0.0, and a KL over
`dim=1` of a (B, 1) output is identically zero. Every loss here takes the output kind and the
shape into account:

- task losses: cross-entropy / NLL for class labels, binary cross-entropy for 0/1 labels (on
  clamped probabilities when the model returns them), MSE for real-valued targets;
- distillation `kl`: between Bernoulli distributions for one output per sample ((B,) or (B, 1)),
  over the last axis otherwise ((B, C), (B, L, V)), averaged over every position;
  `mse`; and `cosine` (1 - cosine similarity over the last axis, for embeddings).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("logits", "probabilities", "log_probabilities")
EPS = 1e-7


def detect_output_kind(model: nn.Module, outputs: torch.Tensor, affine_output: bool = False) -> tuple[str, str]:
    """(kind, why) from the model's last module and a sample of its outputs (auto mode).
    `affine_output`: the outputs are an affine layer's own (a Linear head, nothing after it), which
    are logits even when the sample happens to lie in [0, 1]."""
    last = [m for m in model.modules() if not list(m.children())]
    final = type(last[-1]).__name__ if last else ""
    if final in ("Sigmoid", "Softmax"):
        return "probabilities", f"the model ends in {final}"
    if final == "LogSoftmax":
        return "log_probabilities", "the model ends in LogSoftmax"
    if affine_output:
        return "logits", f"the output is the last layer's own ({final}, unbounded)"
    out = outputs.detach().double()
    if out.numel() == 0 or not torch.isfinite(out).all():
        return "logits", "outputs are not all finite"
    multi = out.dim() >= 2 and out.shape[-1] > 1
    if bool(((out >= 0) & (out <= 1)).all()):
        if not multi:
            return "probabilities", f"every one of {out.shape[0]} sampled outputs lies in [0, 1]"
        if torch.allclose(out.sum(-1), torch.ones(()).double(), atol=1e-3):
            return "probabilities", f"every one of {out.shape[0]} sampled output rows lies in [0, 1] and sums to 1"
    if multi and bool((out <= 0).all()) and torch.allclose(out.exp().sum(-1), torch.ones(()).double(), atol=1e-3):
        return "log_probabilities", f"every one of {out.shape[0]} sampled output rows exponentiates to a distribution"
    return "logits", "outputs are not probabilities"


def _single(output: torch.Tensor) -> bool:
    return output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1)


def _binary_log_probs(output: torch.Tensor, kind: str, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log (1 - p)) of a one-output-per-sample model, with the temperature on the logit."""
    if kind == "logits":
        logit = output
    elif kind == "probabilities":
        p = output.clamp(EPS, 1 - EPS)
        logit = torch.log(p) - torch.log1p(-p)
    else:
        logp = output.clamp(max=-EPS)
        logit = logp - torch.log(-torch.expm1(logp))
    logit = logit / temperature
    return F.logsigmoid(logit), F.logsigmoid(-logit)


def _log_probs(output: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities over the last axis, with the temperature on the logits."""
    if kind == "logits":
        scores = output
    elif kind == "probabilities":
        scores = torch.log(output.clamp_min(EPS))
    else:
        scores = output
    return F.log_softmax(scores / temperature, dim=-1)


def task_loss(loss: str, output: torch.Tensor, target: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """The task loss `loss` (auto, cross_entropy, bce, mse) of an output of `kind` against labels."""
    from .metrics import is_binary

    if loss == "auto":
        loss = "bce" if is_binary(target) else ("mse" if target.is_floating_point() else "cross_entropy")
    if loss == "cross_entropy":
        if output.dim() > 2:  # one class score vector per position (B, L, V) with labels (B, L): classes last
            output, target = output.reshape(-1, output.shape[-1]), target.reshape(-1)
        if kind == "logits":
            return F.cross_entropy(output, target)
        logp = torch.log(output.clamp_min(EPS)) if kind == "probabilities" else output
        return F.nll_loss(logp, target)
    if loss == "bce":
        y = target.float()
        if kind == "logits":
            return F.binary_cross_entropy_with_logits(output.reshape(target.shape), y)
        log_p, log_q = _binary_log_probs(output.reshape(target.shape), kind)
        return -(y * log_p + (1 - y) * log_q).mean()
    return F.mse_loss(output.reshape(target.shape).float(), target.float())


def distill_loss(loss: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                 kind: str = "logits") -> torch.Tensor:
    """Distillation of a student's outputs towards the frozen teacher's (both of `kind`). Embeddings
    are not distributions: kl (the default) distills them by cosine."""
    if kind == "embeddings" and loss == "kl":
        loss = "cosine"
    if loss == "mse":
        return F.mse_loss(student, teacher)
    if loss == "cosine":
        if _single(student):  # one number per sample: compare the batch's vectors
            return 1 - F.cosine_similarity(student.reshape(1, -1), teacher.reshape(1, -1), dim=-1, eps=1e-12).mean()
        return 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-12).mean()
    t = temperature
    if _single(student):  # Bernoulli KL(teacher || student) per sample
        s_p, s_q = _binary_log_probs(student.reshape(-1), kind, t)
        t_p, t_q = _binary_log_probs(teacher.reshape(-1), kind, t)
        kl = t_p.exp() * (t_p - s_p) + t_q.exp() * (t_q - s_q)
        return kl.mean() * t * t
    s = _log_probs(student, kind, t).reshape(-1, student.shape[-1])
    r = _log_probs(teacher, kind, t).reshape(-1, teacher.shape[-1])
    return F.kl_div(s, r, reduction="batchmean", log_target=True) * t * t
