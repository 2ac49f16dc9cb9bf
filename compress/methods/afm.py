"""`method: afm` -- feature-mimicking low-rank compression (Yu et al., KDD 2024),
docs/methods.md section 4.

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
- `sequential` calibrates layers on the outputs of the already-compressed layers before them, which
  reduces the error of deep stacks: `layers` (or `true`) one layer at a time, one calibration pass
  per layer; `blocks` one block at a time (each Transformer layer of the model's first ModuleList;
  the layers inside a block see the compressed blocks before them but each other uncompressed), as
  GPTQ and SparseGPT do, one pass per block. Every pass stops once the group's last layer has run,
  so a group late in the model costs little more than the layers before it. Measured in
  benchmarks/compose.py (`sequential` rows).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Method, replace_module, select_targets
from .lowrank import (RankRule, collect_moments, factorize_edits, from_inputs, mimic, output_features,
                      plan_mimicking, sequential_groups)
from .rank_allocation import RankAllocation

# the feature-mimicking core lives in lowrank.py (pela's `init: afm` uses it too); re-exported here
__all__ = ["Afm", "AfmStage", "collect_moments", "from_inputs", "mimic", "output_features"]


class AfmStage(RankRule):
    method: Literal["afm"] = "afm"
    sequential: bool | Literal["layers", "blocks"] = Field(
        False, description="calibrate on the outputs of the layers compressed before: layers (or true) one layer "
        "at a time, one calibration pass each; blocks: one block (Transformer layer) at a time, one pass per block; "
        "false: every layer on the original's outputs, one pass")


class Afm(RankAllocation, Method):
    name = "afm"
    schema = AfmStage
    needs_calibration = True
    calibration_state = ("moments", "batches", "progress")  # what calibrate sets
    layer_types = ("Linear", "Conv2d", "Embedding")
    mimics = True  # a budget predicts its error from the output covariance

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
        self.decisions = plan_mimicking(self, model, profile, self.stage, self.moments)
        return self.decisions

    def prepare(self, model):
        ranks = {d.name: d.rank for d in self.decisions if d.action == "factorize"}
        mode = self.stage.sequential
        if not mode or not ranks:
            groups, moments = [list(ranks)], self.moments
        else:  # on the outputs of the layers compressed so far, group by group
            groups = sequential_groups(model, list(ranks), next(iter(self.batches())),
                                       "layers" if mode is True else mode)
        for group in groups:
            if mode and ranks:
                moments = collect_moments(model, group, self.batches, self.progress, stop_after=group[-1],
                                          desc=f"calibrate {group[0]}" + (f" (+{len(group) - 1})" if len(group) > 1 else ""))
            for name in group:
                replace_module(model, name, mimic(model.get_submodule(name), moments[name], ranks[name]))

    def edits(self):
        return factorize_edits(self.decisions, bias=True)
