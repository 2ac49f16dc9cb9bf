"""`method: pela` -- PELA (Guo, Wang, Kankanhalli, CVPR 2024), docs/methods.md section 3.

SVD-compress a pre-trained model once, then recover it in a training stage where the low-rank
student mimics the frozen original:

    L = L_task (only with labels) + alpha * L_fd + beta * L_out + gamma * L_wp

- rank: r = floor(m n / (rho (m + n))) per Linear (Conv2d through the channel scheme), so each
  layer has about rho times fewer parameters; or `rank` / `ratio` / `energy`. A = sqrt(S_r) V_r^T,
  B = U_r sqrt(S_r), bias on B;
- L_fd: mean over the `features` modules (default: each block of the model's first ModuleList,
  e.g. every Transformer layer) of MSE(student output, teacher output). Hooks capture both sides;
  the teacher runs in eval mode without gradients, and the captured features are dropped every step;
- L_out: MSE, or KL with a temperature, between student and teacher outputs (beta = 0 by default,
  as in the authors' scripts);
- L_wp: mean over factorized layers of (||B A - W_orig||_max - eps)^2, docs/methods.md's formula
  (`wp_form: squared`, the default). Read literally it also pushes a student that is *within* eps
  of the original back out to eps; `wp_form: hinge` uses max(0, ||.||_max - eps)^2 instead, which
  is 0 there. Measured on the digits Transformer (`python benchmarks/pela_wp.py`, `recipes/pela.yaml`,
  seeds 0 and 1): no difference at all (test accuracy 0.9139 and final L_wp 0.016 with either form),
  because the largest weight change (about 0.13) never falls below eps = 1e-3, where the forms
  differ; so the default is the spec's formula. Each layer's product exists only inside its own
  term (see `linalg.max_abs_deviation`).

Default targets (when `targets` is not given) skip what the authors skip: embeddings and norms
(not Linear/Conv2d), the output head (the last Linear), the patch embedding or stem (the first
Conv2d), downsampling convs (stride > 1) and layers with fewer than 10 outputs.
Without labels PELA is pure distillation and the report's metric is agreement with the original.

Chains: a `pela` stage after an `afm` (or `svd`) stage may target the layers that stage factorized.
It then trains those factors as they are (no new SVD, the earlier stage's rank; its own rank rule
applies to its other layers), with its distillation losses and L_wp against the original weight.
The report's row for such a layer has action `refine` and `chain: "stages[0] afm -> stages[1] pela"`;
`compression.json` replays the earlier stage's `factorize` edit, annotated with the same chain.
`init: afm` is the one-stage form of the same start.
"""
from __future__ import annotations

import fnmatch
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .. import layers, linalg
from ..errors import RecipeError
from ..losses import distill_loss
from ..metrics import primary_output
from .base import Method, block_modules as default_feature_modules, chain_refinements, replace_module
from .lowrank import (RankRule, collect_moments, factorize_edits, factorize_planned, head_exclusion, mimic,
                      plan_factorization, plan_mimicking, rank_rule_targets)
from .rank_allocation import RankAllocation


class PelaStage(RankRule):
    method: Literal["pela"] = "pela"
    rho: float = Field(2.0, gt=1, description="compression ratio per layer: r = floor(m n / (rho (m + n))) "
                       "(used unless rank, ratio or energy is given)")
    features: list[str] | None = Field(None, description="globs of module names whose outputs are matched "
                                       "(default: each block of the model's first ModuleList)")
    alpha: float = Field(1.0, ge=0, description="weight of the feature distillation L_fd")
    beta: float = Field(0.0, ge=0, description="weight of the output distillation L_out")
    output_loss: Literal["mse", "kl"] = "mse"
    temperature: float = Field(1.0, gt=0, description="for output_loss: kl")
    gamma: float = Field(0.0, ge=0, description="weight of the weight-perturbation regularizer L_wp (authors: 0 or 1)")
    eps: float = Field(1e-3, ge=0, description="L_wp tolerance on the largest absolute weight change")
    init: Literal["svd", "afm"] = Field(
        "svd", description="where the factors start: svd = the weight's truncated SVD (the paper); afm = the "
        "feature-mimicking factors of the outputs on data.calibration (docs/methods.md section 4), which the "
        "distillation then repairs; the rank rule is the same")
    wp_form: Literal["squared", "hinge"] = Field(
        "squared", description="L_wp per layer: squared = (||B A - W||_max - eps)^2, the paper's formula; "
        "hinge = max(0, ||B A - W||_max - eps)^2, which leaves a student within eps of the original alone")
    min_outputs: int = Field(10, ge=1, le=1 << 30, description="default targets skip layers with fewer outputs")

    def choose_rank(self, singular_values, rows: int, cols: int, name: str | None = None) -> int:
        if name in self.ranks or any(v is not None for v in (self.rank, self.ratio, self.energy)):
            return super().choose_rank(singular_values, rows, cols, name)
        return min(linalg.rank_for_rho(rows, cols, self.rho), rows, cols)


class Pela(RankAllocation, Method):
    name = "pela"
    schema = PelaStage
    uses_teacher = True
    refines = ("afm", "svd")  # `afm` then `pela` on the same layers: PELA trains afm's factors

    def __init__(self, stage: PelaStage, stage_index: int):
        super().__init__(stage, stage_index)
        self.originals: dict[str, torch.Tensor] = {}
        self.feature_names: list[str] = []
        self.student_features: dict[str, torch.Tensor] = {}
        self.teacher_features: dict[str, torch.Tensor] = {}
        self.teacher_output: torch.Tensor | None = None
        self.hooks = []
        self.moments: dict = {}  # init: afm only

    @property
    def needs_calibration(self) -> bool:  # noqa: D401 - the lifecycle's flag, per stage
        return self.stage.init == "afm"

    calibration_state = ("moments",)

    def calibrate(self, model, batches, progress=False):
        names = [n for n, _ in rank_rule_targets(model, self.stage, self)]
        self.moments = collect_moments(model, names, batches, progress)

    def plan(self, model, profile):
        stage: PelaStage = self.stage
        excluded = self.default_exclusions(model)
        if stage.init == "afm":
            self.decisions = plan_mimicking(self, model, profile, stage, self.moments, excluded)
        else:
            self.decisions = plan_factorization(self, model, profile, stage, excluded, scheme="channel")
        self.decisions = chain_refinements(self, self.decisions)
        for d in self.decisions:
            if d.action == "refine":
                d.extra["init"] = "stages[{stage}] {method}".format(**d.extra["refines"])
                if stage.gamma > 0:  # L_wp measures against the original weight, which prepare no longer sees
                    self.originals[d.name] = layers.layer_matrix(model.get_submodule(d.name)).detach().clone()
            else:
                d.extra["init"] = stage.init
        self.feature_names = self._features(model)
        return self.decisions

    def default_exclusions(self, model: nn.Module) -> dict[str, str]:
        if "targets" in self.stage.model_fields_set:  # the user's targets replace the authors' defaults
            return {}
        excluded = {}
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        for name, module in convs:
            if max(module.stride) > 1:
                excluded[name] = "PELA default: downsampling convs (stride > 1) stay dense"
        if convs:
            excluded[convs[0][0]] = "PELA default: the patch embedding / stem (the first conv) stays dense"
        for name, module in model.named_modules():
            outputs = getattr(module, "out_features", getattr(module, "out_channels", None))
            if isinstance(module, (nn.Linear, nn.Conv2d)) and outputs < self.stage.min_outputs:
                excluded[name] = f"PELA default: fewer than {self.stage.min_outputs} outputs"
        return {**excluded, **head_exclusion(model, self.name)}

    def _features(self, model: nn.Module) -> list[str]:
        patterns = self.stage.features
        if patterns is None:
            return default_feature_modules(model)
        names = [n for n, _ in model.named_modules() if n]
        chosen = []
        for i, pattern in enumerate(patterns):
            found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not found:
                raise RecipeError(f"stages[{self.stage_index}].features[{i}]: pattern {pattern!r} matches no module")
            chosen += [n for n in found if n not in chosen]
        return chosen

    def prepare(self, model):
        for d in self.decisions:
            if d.action == "factorize":
                self.originals[d.name] = layers.layer_matrix(model.get_submodule(d.name)).detach().clone()
        if self.stage.init == "svd":
            factorize_planned(model, self.decisions)
            return
        for d in self.decisions:  # the afm factors: PELA's distillation starts from them
            if d.action == "factorize":
                replace_module(model, d.name, mimic(model.get_submodule(d.name), self.moments[d.name], d.rank))

    def start_finetune(self, model, teacher):
        self.remove_hooks()

        def capture(store, name):
            def hook(module, args, output):
                store[name] = primary_output(output)
            return hook

        for name in self.feature_names:
            self.hooks.append(model.get_submodule(name).register_forward_hook(capture(self.student_features, name)))
            self.hooks.append(teacher.get_submodule(name).register_forward_hook(capture(self.teacher_features, name)))
        self.hooks.append(teacher.register_forward_hook(lambda m, a, out: setattr(self, "teacher_output", primary_output(out))))

    def loss(self, model, batch, outputs):
        stage: PelaStage = self.stage
        terms = {}
        if stage.alpha > 0 and self.feature_names:
            fd = sum(F.mse_loss(self.student_features[n], self.teacher_features[n]) for n in self.feature_names)
            terms["feature"] = stage.alpha * fd / len(self.feature_names)
        if stage.beta > 0:
            terms["output"] = stage.beta * distill_loss(stage.output_loss, primary_output(outputs),
                                                        self.teacher_output, stage.temperature, self.output_kind)
        if stage.gamma > 0 and self.originals:
            terms["weight"] = stage.gamma * self.weight_perturbation(model)
        self.student_features.clear()  # free the captured activations every step
        self.teacher_features.clear()
        self.teacher_output = None
        return terms

    def weight_perturbation(self, model: nn.Module) -> torch.Tensor:
        """L_wp = mean over factorized layers of (||B A - W_orig||_max - eps)^2 (`wp_form: squared`,
        docs/methods.md) or of max(0, ||B A - W_orig||_max - eps)^2 (`hinge`)."""
        total = 0.0
        for name, original in self.originals.items():
            left, right = layers.factor_matrices(model.get_submodule(name))
            excess = linalg.max_abs_deviation(left, right, original.to(left.device)) - self.stage.eps
            total = total + (torch.relu(excess) if self.stage.wp_form == "hinge" else excess) ** 2
        return total / len(self.originals)

    def remove_hooks(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def finalize(self, model):
        self.remove_hooks()

    def edits(self):
        return factorize_edits(self.decisions, bias=True if self.stage.init == "afm" else None)
