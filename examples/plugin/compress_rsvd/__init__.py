"""`method: rsvd` -- a compress method that lives outside compress, as a plug-in.

Each targeted Linear or Conv2d (channel view, N x C kh kw) is replaced by two thinner layers from a
*randomized* SVD of its weight (Halko, Martinsson and Tropp, "Finding structure with randomness",
SIAM Review 2011; `torch.svd_lowrank`): project the weight on `rank + oversample` random
directions, sharpen with `power_iterations` passes of W W^T, and take the SVD of the small
projected matrix. On wide layers that is far cheaper than a full SVD and, with a couple of power
iterations, nearly as accurate.

The stage either gives `rank` (or `ranks` per layer), or leaves both out and lets a `budget:`
choose a rank per layer: the method offers its candidates through compress's allocation interface
(compress.methods.allocation): ranks that save what the budget counts, each costed exactly, each
with its predicted error (the weight's squared singular values beyond the rank, a data-free
estimate the budget then scales by each layer's measured effect on the model's output).

The structural edit is compress's own `factorize`, so `compression.json` replays it without this
package's code: the factors are ordinary weights.
"""
from __future__ import annotations

import contextlib
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from compress import layers
from compress.errors import RecipeError
from compress.methods import Decision, Method, Stage
from compress.methods.allocation import Allocatable, Candidate, LayerChoice, layer_bytes
from compress.methods.base import output_head, replace_module, select_targets


class RsvdStage(Stage):
    method: Literal["rsvd"] = "rsvd"
    rank: int | None = Field(None, gt=0, le=1 << 16, description="rank of every targeted layer (leave out, with "
                             "`ranks`, to let a budget choose)")
    ranks: dict[str, Annotated[int, Field(gt=0, le=1 << 16)]] = Field(
        default_factory=dict, description="rank per layer name, overriding `rank`")
    oversample: int = Field(8, ge=0, le=256, description="extra random directions beyond the rank")
    power_iterations: int = Field(2, ge=0, le=16, description="passes of W W^T that sharpen the spectrum")


def randomized_factors(matrix: torch.Tensor, rank: int, oversample: int, power_iterations: int, seed: int = 0):
    """(first (r, cols), second (rows, r)) with second @ first ~ matrix, from a randomized SVD;
    the singular values split evenly between the two factors."""
    q = min(rank + oversample, *matrix.shape)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same factors on every run
    try:
        u, s, v = torch.svd_lowrank(matrix.double(), q=q, niter=power_iterations)
    finally:
        torch.random.set_rng_state(state)
    root = s[:rank].sqrt()
    return (root[:, None] * v[:, :rank].T).to(matrix.dtype), (u[:, :rank] * root).to(matrix.dtype)


class RandomizedSvd(Allocatable, Method):
    name = "rsvd"
    schema = RsvdStage
    allocation_hint = "leave out rank and ranks of a stage of {names}"

    # ------------------------------------------------------------ the lifecycle

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        chosen = select_targets(model, self.stage.targets, f"stages[{self.stage_index}].targets", self.layer_types)
        head = output_head(model) if "targets" not in self.stage.model_fields_set else None
        return [(n, m) for n, m in chosen if n != head and getattr(m, "groups", 1) == 1]

    def plan(self, model, profile):
        self.decisions = []
        for name, layer in self._targets(model):
            rank = self.stage.ranks.get(name, self.stage.rank)
            if rank is None and name not in self.budget_dense:
                raise RecipeError(f"stages[{self.stage_index}] (rsvd): no rank for {name!r}; give rank (or ranks), "
                                  "or a budget: section to choose them")
            self.decisions.append(self._decide(name, layer, profile.get(name), rank))
        return self.decisions

    def _decide(self, name: str, layer: nn.Module, shapes, rank: int | None) -> Decision:
        params = sum(p.numel() for p in layer.parameters())
        kind, weight_shape = type(layer).__name__, list(layer.weight.shape)
        dense = layers.dense_cost(layer, shapes.out_shape) if shapes is not None else layers.LayerCost(params, 0)

        def keep(reason):
            return Decision(name, self.name, kind, "keep", weight_shape, params, dense.macs, params, dense.macs,
                            reason=reason)

        if shapes is None:
            return keep("layer did not run in the forward pass")
        if rank is None:
            return keep(self.budget_dense[name])
        full = min(layers.matrix_shape(layer, "channel"))
        rank = min(rank, full)
        after = layers.factorized_cost(layer, rank, "channel", shapes.in_shape, shapes.out_shape)
        if after.macs >= dense.macs:
            return keep(f"rank {rank} would not reduce MACs ({after.macs} >= {dense.macs})")
        s2 = torch.linalg.svdvals(layers.layer_matrix(layer, "channel").detach().double()).pow(2)
        return Decision(name, self.name, kind, "factorize", weight_shape, params, dense.macs, after.params, after.macs,
                        rank=rank, full_rank=full, scheme="channel" if isinstance(layer, nn.Conv2d) else None,
                        energy=round(float(s2[:rank].sum() / s2.sum()), 6))

    def _factorized(self, layer: nn.Module, rank: int) -> nn.Module:
        with torch.no_grad():
            first, second = randomized_factors(layers.layer_matrix(layer, "channel").detach(), rank, self.stage.oversample,
                                               self.stage.power_iterations)
            module = layers.empty_factorized(layer, rank, "channel").to(layer.weight)
            layers.set_factors(module, first, second)
            if layer.bias is not None:
                module.second.bias.copy_(layer.bias)
        return module

    def prepare(self, model):
        for d in self.decisions:
            if d.action == "factorize":
                replace_module(model, d.name, self._factorized(model.get_submodule(d.name), d.rank))

    def edits(self):
        return [{"op": "factorize", "name": d.name, "rank": d.rank, "scheme": "channel"}
                for d in self.decisions if d.action == "factorize"]

    # ------------------------------------------------------------ allocation (compress.methods.allocation)

    def allocates(self) -> bool:
        return not ({"rank", "ranks"} & self.stage.model_fields_set)

    def allocation_choices(self, model, profile, request):
        choices = []
        for name, layer in self._targets(model):
            shapes = profile.get(name)
            if name in request.skip or shapes is None:
                continue
            dense = layers.dense_cost(layer, shapes.out_shape)
            kind = "params" if request.target == "params" else "macs"
            full = min(layers.matrix_shape(layer, "channel"))
            ranks = [r for r in sorted({max(1, round(full * i / 16)) for i in range(1, 16)})
                     if getattr(layers.factorized_cost(layer, r, "channel", shapes.in_shape, shapes.out_shape), kind)
                     < getattr(dense, kind)]
            if not ranks:
                request.unpriced.append((self, name))
                continue
            s2 = torch.linalg.svdvals(layers.layer_matrix(layer, "channel").detach().double()).pow(2)
            tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # tail[r]: what rank r drops
            candidates = [Candidate(None, 0.0, 0.0)] + [Candidate(r, 0.0, float(tail[r])) for r in ranks]
            choices.append(LayerChoice(self, name, "channel", candidates, energy=float(tail[0]), unit=layer))
        return choices

    def price_choices(self, choices, model, profile, request):
        for choice in choices:
            layer, shapes = choice.unit, profile[choice.name]
            for c in choice.candidates:
                cost = (layers.dense_cost(layer, shapes.out_shape) if c.size is None else
                        layers.factorized_cost(layer, c.size, "channel", shapes.in_shape, shapes.out_shape))
                c.cost = (layer_bytes(layer, cost.params, request.quantized(choice.name, layer))
                          if request.target == "onnx_bytes" else float(getattr(cost, request.target)))

    @contextlib.contextmanager
    def applied(self, model, choice, size):
        replace_module(model, choice.name, self._factorized(choice.unit, size))
        try:
            yield
        finally:
            replace_module(model, choice.name, choice.unit)

    def take_allocation(self, sizes, left, rows):
        self.stage = self.stage.model_copy(update={"ranks": sizes})
        self.budget_dense, self.budget_rows = left, rows
