"""`method: trp` -- Trained Rank Pruning (Xu et al., IJCAI 2020), docs/methods.md section 1.

Keeps target layers low-rank *during* fine-tuning, so that the final decomposition loses almost
nothing:

- every `period` steps each target's weight matrix (Linear as is, Conv2d by the channel or
  spatial scheme) is replaced in place by its energy truncation T_e(W) = U_r S_r V_r^T, r the
  smallest rank keeping energy e; the optimizer's momentum buffers are kept, as the authors do;
- at those steps the nuclear norm's sub-gradient lambda * U_r V_r^T is added to the gradient.
  It is added as the loss term lambda * <U_r V_r^T, W> with U_r V_r^T held constant, whose
  gradient is exactly that sub-gradient and whose value at the projection is lambda * ||W||_*;
- after fine-tuning each target is factorized at the rank of its last projection (or by a
  singular-value threshold), keeping stride, padding and dilation (the authors hard-code padding
  1; this does not); optional `post_finetune` epochs then train the factorized model.

Default targets (when `targets` is not given): every Conv2d and Linear except the first conv, 1x1
convs and the classifier (the last Linear). The authors decompose convolutions only (their
ResNets' 3x3 convs); the Linear layers are this project's extension, so that TRP also applies to
MLPs and Transformers: `targets: {types: [Conv2d]}` gives the authors' set. Projections of layers whose
matrices share a shape run as one batched SVD.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from pydantic import ConfigDict, Field
from torch import nn

from .. import layers, linalg
from ..errors import RecipeError
from .base import Method, Stage, Strict, replace_module, select_targets
from .lowrank import decide_factorization, factorize_edits, head_exclusion, unfactorizable, unswappable_layers


class NuclearSection(Strict):
    """Nuclear-norm regularization at projection steps."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(3e-4, ge=0, alias="lambda", description="weight of the nuclear norm (authors: 3e-4)")


class TrpStage(Stage):
    method: Literal["trp"] = "trp"
    scheme: Literal["channel", "spatial"] = Field(
        "channel", description="Conv2d as N x (C kh kw) (channel, 'TRP1') or (C kh) x (N kw) (spatial, 'TRP2')")
    energy: float = Field(0.9, gt=0, le=1, description="energy kept by each projection (authors: 0.9)")
    period: int = Field(1, ge=1, le=10**9, description="project every `period` optimizer steps (authors: 1; their script 5)")
    nuclear: NuclearSection | None = Field(default_factory=NuclearSection,
                                           description="nuclear-norm sub-gradient at projection steps; null turns it off")
    threshold: float | None = Field(None, gt=0, lt=1, description="final rank: singular values >= threshold * largest "
                                    "(default: the rank of the last projection)")
    post_finetune: int = Field(0, ge=0, le=10_000, description="epochs of fine-tuning after the decomposition")
    solver: Literal["auto", "exact"] = Field(
        "auto", description="auto: full SVD until ranks fall below half, then a tracked subspace (same energy "
        "guarantee, far cheaper); exact: a full SVD at every projection")


class Trp(Method):
    name = "trp"
    schema = TrpStage

    def __init__(self, stage: TrpStage, stage_index: int):
        super().__init__(stage, stage_index)
        self.profile = {}
        self.names: list[str] = []  # the layers projected during training
        self.ranks: dict[str, int] = {}
        self.subgradients: dict[str, torch.Tensor] = {}
        self.bases: dict[tuple, torch.Tensor] = {}  # tracked subspace per matrix shape
        self.step = 0

    def plan(self, model, profile):
        stage: TrpStage = self.stage
        path = f"stages[{self.stage_index}]"
        candidates = select_targets(model, stage.targets, f"{path}.targets")
        excluded = {} if "targets" in stage.model_fields_set else default_exclusions(model)
        unswappable = unswappable_layers(model)
        self.profile = profile
        self.decisions, self.names = [], []
        for name, layer in candidates:
            if name not in excluded and stage.scheme == "spatial" and _is_pointwise(layer):
                raise RecipeError(f"{path}.scheme: the spatial scheme needs a kernel larger than 1x1, and target "
                                  f"{name!r} is a 1x1 conv; exclude it in {path}.targets or use scheme: channel")
            blocked = excluded.get(name) or unswappable.get(name)
            decision = decide_factorization(self.name, name, layer, profile.get(name), stage.scheme,
                                            lambda s, rows, cols: linalg.energy_rank(s, stage.energy), blocked)
            if unfactorizable(self.name, layer, profile.get(name), blocked) is None:
                self.names.append(name)
                # the plan can only estimate: the rank is decided by the last projection in training
                decision.action = "project"
                decision.reason = None
                decision.extra["note"] = "rank estimated from the current weights; training lowers it"
            self.decisions.append(decision)
        return self.decisions

    def prepare(self, model):
        self.step = 0
        self.project(model)

    @torch.no_grad()
    def project(self, model: nn.Module) -> None:
        """Replace every target weight by its energy truncation; keep U_r V_r^T and the rank.

        Layers whose matrices share a shape are projected as one batch. Once their ranks are well
        below full, a tracked subspace of rank + margin replaces the full SVD (exact energy check,
        full SVD again whenever the subspace falls short): the projection then costs a few
        matrix products instead of an SVD per layer per step.
        """
        scheme, energy = self.stage.scheme, self.stage.energy
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name in self.names:
            groups[tuple(layers.layer_matrix(model.get_submodule(name), scheme).shape)].append(name)
        for shape, names in groups.items():
            modules = [model.get_submodule(n) for n in names]
            stacked = torch.stack([layers.layer_matrix(m, scheme) for m in modules])
            basis = self.bases.get(shape)
            basis = None if basis is None else basis.to(stacked.device)
            result = None
            if basis is not None and self.stage.solver == "auto":
                *result, reached, u = linalg.energy_truncation_in_subspace(stacked, basis, energy)
                if not bool(reached.all()):
                    result = None
            if result is None:
                u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
                result = linalg.truncate_svd_by_energy(u, s, vh, energy)
            projected, subgradient, ranks = result
            self.bases[shape] = _next_basis(u, ranks, min(shape))
            for name, module, p, g, r in zip(names, modules, projected, subgradient, ranks.tolist()):
                module.weight.copy_(_as_weight(p, module, scheme))
                self.subgradients[name] = _as_weight(g, module, scheme)
                self.ranks[name] = int(r)

    def loss(self, model, batch, outputs):
        nuclear = self.stage.nuclear
        if nuclear is None or nuclear.lambda_ == 0 or self.step % self.stage.period or not self.names:
            return {}
        total = 0.0
        for n in self.names:
            weight = model.get_submodule(n).weight
            self.subgradients[n] = self.subgradients[n].to(weight.device)  # after a resume they come from disk
            total = total + (weight * self.subgradients[n]).sum()
        return {"nuclear": nuclear.lambda_ * total}

    def after_step(self, model, step, lr, optimizer=None):
        self.step = step + 1
        if self.step % self.stage.period == 0:
            self.project(model)

    def finalize(self, model):
        stage: TrpStage = self.stage
        by_name = {d.name: i for i, d in enumerate(self.decisions)}
        for name in self.names:
            layer = model.get_submodule(name)
            if stage.threshold is not None:
                choose = lambda s, rows, cols: linalg.threshold_rank(s, stage.threshold)  # noqa: E731
            else:
                choose = lambda s, rows, cols, r=self.ranks[name]: r  # noqa: E731
            decision = decide_factorization(self.name, name, layer, self.profile[name], stage.scheme, choose)
            self.decisions[by_name[name]] = decision
            if decision.action == "factorize":
                replace_module(model, name, layers.factorize(layer, decision.rank, stage.scheme))

    def state_dict(self):
        return {"step": self.step, "ranks": dict(self.ranks), "subgradients": dict(self.subgradients),
                "bases": [[list(shape), basis] for shape, basis in self.bases.items() if basis is not None]}

    def load_state_dict(self, state):
        self.step = state["step"]
        self.ranks = dict(state["ranks"])
        self.subgradients = dict(state["subgradients"])
        self.bases = {tuple(shape): basis for shape, basis in state["bases"]}

    def post_finetune_epochs(self) -> int:
        return self.stage.post_finetune

    def edits(self):
        return factorize_edits(self.decisions)


def _next_basis(u: torch.Tensor, ranks: torch.Tensor, full: int) -> torch.Tensor | None:
    """The subspace to track next: the top rank + margin vectors, or None (full SVD next time)
    while the ranks are too close to full for a subspace to be cheaper."""
    top = int(ranks.max())
    width = top + max(4, -(-top // 4))
    if width > full // 2 or width > u.shape[-1]:
        return None
    return u[..., :width].contiguous()


def _is_pointwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1)


def _as_weight(matrix: torch.Tensor, module: nn.Module, scheme: str) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return layers.conv_from_matrix(matrix, module.weight.shape, scheme)
    return matrix


def default_exclusions(model: nn.Module) -> dict[str, str]:
    """The layers the TRP authors leave dense: the first conv, 1x1 convs, the classifier."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    excluded = {n: "TRP default: 1x1 convs stay dense" for n, m in convs if _is_pointwise(m)}
    if convs:
        excluded[convs[0][0]] = "TRP default: the first conv stays dense"
    return {**excluded, **head_exclusion(model, "trp")}
