"""`method: afm` -- feature-mimicking low-rank compression (Yu et al., KDD 2024), METHODS.md 4.

Approximates each target layer's *outputs* rather than its weight: on calibration data the
outputs y of a layer live near a low-dimensional subspace, so y ~ U_k U_k^T (y - mu) + mu with
U_k the top-k eigenvectors of the output covariance C. Needs only unlabeled calibration data and
no training; fine-tuning afterwards is optional.

- Statistics: one pass with forward hooks accumulates sum y and sum y y^T in float64 per layer
  (Linear on 2-D or 3-D activations, Conv2d per spatial position, Embedding per lookup, so table
  rows are weighted by how often the data looks them up); memory O(d^2) per layer.
- Linear / Conv2d: A = U_k^T W, B = U_k. The paper puts U_k^T b on A and (I - U_k U_k^T) mu on B;
  here both sit on B as U_k U_k^T b + (I - U_k U_k^T) mu, which computes exactly the same function
  with k fewer parameters. A Conv2d becomes a conv to k channels with the original geometry and a
  1x1 conv (the channel scheme).
- Embedding: E' = (E - mu^T) U_k, realized as an Embedding of width k and a Linear k -> d with
  weight U_k and bias mu. (Folding that Linear into a following Linear is left for later.)
- Rank: fixed (`rank`), a parameter ratio (`ratio`), or the share of the covariance's eigenvalues
  kept (`energy`). A Linear or Conv2d is left dense when the factorization would not reduce its
  MACs; an Embedding when it would not reduce its parameters (a table lookup costs no MACs,
  the added Linear k -> d does, and the report shows it).
- `sequential: true` calibrates each layer on the outputs of the already-compressed layers before
  it (one calibration pass per layer), which reduces the error of deep stacks.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .. import layers, linalg
from ..progress import iterate
from .base import Decision, Method, replace_module, select_targets
from .lowrank import RankRule, decide_factorization, factorize_edits, rank_rule_targets, unswappable_layers


class AfmStage(RankRule):
    method: Literal["afm"] = "afm"
    sequential: bool = Field(False, description="calibrate each layer on the outputs of the compressed layers before it")


def output_features(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """A layer's outputs with the feature axis last: Conv2d (B, N, H, W) -> (B, H, W, N)."""
    return output.movedim(1, -1) if isinstance(module, nn.Conv2d) else output


def from_inputs(module: nn.Module) -> bool:
    """Whether a layer's output moments are cheaper to derive from its inputs: a Linear no wider
    at its input than at its output (and so for a shared input, e.g. query/key/value)."""
    return isinstance(module, nn.Linear) and module.in_features <= module.out_features


@torch.no_grad()
def collect_moments(model: nn.Module, names: list[str], batches, progress: bool = False,
                    desc: str = "calibrate", derive: bool = True,
                    exact: bool = False) -> dict[str, linalg.OutputMoments | linalg.LinearOutputMoments]:
    """Streaming output moments of the named layers over every calibration batch, in one pass.

    A Linear whose input is no wider than its output accumulates its *input* moments instead (its
    output moments follow exactly, see linalg.LinearOutputMoments), and Linears that read the very
    same input tensor in a forward pass share one accumulator; every other layer accumulates its
    outputs. `derive=False, exact=True` is the slow reference path (every layer's outputs, float64
    products), kept for measuring against (benchmarks/scale.py)."""
    moments: dict[str, linalg.OutputMoments] = {}
    inputs: dict[str, linalg.OutputMoments] = {}  # accumulator owner -> input moments
    owner: dict[str, str] = {}  # layer -> the layer whose input accumulator it shares (decided on batch 1)
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # this batch's input tensors, by id, kept alive
    hooks = []
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():
        if derive and from_inputs(module):
            def pre_hook(mod, args, name=name):
                x = args[0]
                if name not in owner:  # the first batch decides who shares with whom
                    match = seen.get(id(x))
                    owner[name] = match[1] if match is not None and match[0] is x else name
                    seen.setdefault(id(x), (x, name))
                if owner[name] == name:
                    inputs.setdefault(name, linalg.OutputMoments(x.shape[-1])).update(x, exact)

            hooks.append(module.register_forward_pre_hook(pre_hook))
        else:
            def hook(mod, args, output, name=name):
                features = output_features(mod, output)
                moments.setdefault(name, linalg.OutputMoments(features.shape[-1])).update(features, exact)

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in iterate(batches(), getattr(batches, "total", None), desc, "batch", enabled=progress):
            device = next(model.parameters()).device
            model(*(t.to(device) for t in batch))
            seen.clear()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for name, source in owner.items():
        layer = modules[name]
        moments[name] = linalg.LinearOutputMoments(inputs[source], layer.weight, layer.bias)
    return moments


class Afm(Method):
    name = "afm"
    schema = AfmStage
    needs_calibration = True
    layer_types = ("Linear", "Conv2d", "Embedding")

    def __init__(self, stage: AfmStage, stage_index: int):
        super().__init__(stage, stage_index)
        self.moments: dict = {}  # layer -> OutputMoments or LinearOutputMoments
        self.batches = None
        self.progress = False

    def calibrate(self, model, batches, progress=False):
        path = f"stages[{self.stage_index}].targets"
        names = [n for n, _ in select_targets(model, self.stage.targets, path, self.layer_types)]
        self.batches, self.progress = batches, progress
        self.moments = collect_moments(model, names, batches, progress)

    def plan(self, model, profile):
        blocked = unswappable_layers(model)
        self.decisions = [self._decide(name, layer, profile.get(name), blocked.get(name))
                          for name, layer in rank_rule_targets(model, self.stage, self)]
        return self.decisions

    def _decide(self, name: str, layer: nn.Module, shapes, blocked: str | None) -> Decision:
        """The shared decision, ranked by the output covariance's spectrum instead of the weight's."""
        spectrum = None
        if name in self.moments:
            eigenvalues, _ = linalg.principal_subspace(self.moments[name].covariance())
            spectrum = eigenvalues.clamp_min(0).sqrt()
        elif blocked is None:
            blocked = "layer did not run on the calibration data"
        return decide_factorization(self.name, name, layer, shapes, "channel",
                                    lambda s, rows, cols: self.stage.choose_rank(s, rows, cols, name=name),
                                    blocked, spectrum=spectrum, bias=True)

    def prepare(self, model):
        for decision in self.decisions:
            if decision.action != "factorize":
                continue
            moments = self.moments[decision.name]
            if self.stage.sequential:  # on the outputs of the layers compressed so far
                moments = collect_moments(model, [decision.name], self.batches, self.progress,
                                          desc=f"calibrate {decision.name}")[decision.name]
            layer = model.get_submodule(decision.name)
            replace_module(model, decision.name, mimic(layer, moments, decision.rank))

    def edits(self):
        return factorize_edits(self.decisions, bias=True)


@torch.no_grad()
def mimic(layer: nn.Module, moments, rank: int) -> nn.Module:
    """The rank-`rank` feature-mimicking replacement of `layer` from its output moments."""
    _, vectors = linalg.principal_subspace(moments.covariance())
    u = vectors[:, :rank]  # (m, k), float64
    mu = moments.mean()
    module = layers.empty_factorized(layer, rank, "channel", bias=True).to(layer.weight)
    dtype = layer.weight.dtype
    if isinstance(layer, nn.Embedding):
        module.first.weight.copy_(((layer.weight.double().cpu() - mu) @ u).to(dtype))
        module.second.weight.copy_(u.to(dtype))
        module.second.bias.copy_(mu.to(dtype))
        return module
    weight = layers.layer_matrix(layer, "channel").double().cpu()  # (m, cols)
    bias = layer.bias.double().cpu() if layer.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    layers.set_factors(module, (u.T @ weight).to(dtype), u.to(dtype))
    module.second.bias.copy_((u @ (u.T @ bias) + mu - u @ (u.T @ mu)).to(dtype))
    return module
