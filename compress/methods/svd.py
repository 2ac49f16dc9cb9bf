"""`method: svd` -- plain truncated-SVD factorization, no training of its own.

The floor every other method must beat at the same budget. Each targeted Linear or Conv2d is
replaced by two thinner layers (docs/methods.md section 0) at a rank chosen by a fixed value, a
parameter ratio or a singular-value energy. A layer whose factorization would not reduce MACs
is left dense, and the plan says why. Embedding tables (when `targets.types` lists Embedding)
become a narrow table and a Linear, when that reduces parameters.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Method
from .lowrank import RankRule, factorize_edits, factorize_planned, plan_factorization
from .rank_allocation import RankAllocation


class SvdStage(RankRule):
    method: Literal["svd"] = "svd"
    scheme: Literal["channel", "spatial"] = Field(
        "channel", description="how a Conv2d weight becomes a matrix: channel (N x C kh kw) or spatial (C kh x N kw)"
    )


class Svd(RankAllocation, Method):
    name = "svd"
    schema = SvdStage

    def plan(self, model, profile):
        self.decisions = plan_factorization(self, model, profile, self.stage)
        return self.decisions

    def prepare(self, model):
        factorize_planned(model, self.decisions)

    def edits(self):
        return factorize_edits(self.decisions)
