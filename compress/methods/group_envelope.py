"""`method: group_envelope` -- group sparse envelope regularization (WGSEF; Refael, Arbel,
Huleihel), docs/methods.md section 2.

Proximal training that leaves exactly k groups alive per layer, then removes the dead ones.

- Groups come from Torch-Pruning's dependency graph: a group is one channel of everything that
  must die together (a conv's output channel, its BatchNorm entries, the next layers' input
  channels, channels tied by residual additions or concatenation). A "layer" here is one coupled
  group of channels (a residual stage's stream counts once), named after its root module.
- After every optimizer step each layer's channels are shrunk by the proximal operator of
  lr * lambda * S_k on their weighted group norms (`linalg.envelope_prox_scale`), which sets some
  channels exactly to zero. `keep` gives k per layer: a ratio below 1 or a count. How lambda should
  relate to k is open in the paper; the recipe sets lambda.
- Momentum-aware: when the prox zeroes a channel, its optimizer state (SGD's momentum, Adam's
  moments) is zeroed too, as in proximal methods that reset the state of variables sent to zero;
  otherwise the next momentum step revives it and the prox never prunes (measured on the digits
  ResNet, layer2.1.conv1, lambda 60, momentum 0.9: 5 of 16 channels zeroed by step 9, all 16
  alive again before the last step without the reset, 11 with it; see the tests).
- Lambda continuation (`lambda_growth` > 1, off by default): every `lambda_every` steps a layer
  still above k live channels multiplies its lambda; once the prox alone has left at most k, its
  dead channels are held at zero and lambda returns to the recipe's. Measured on the digits
  ResNet: growth 1.2 or 1.3 every 10 steps does reach k by the prox alone (steps 72-116 of 152),
  but the grown lambda (12 to 54) shrinks the surviving channels so much on the way that the
  network collapses to chance accuracy, so it stays off: the envelope shrinks survivors like a
  weight decay of strength lambda, and reaching k needs a lambda this model cannot survive.
- Holding at k (`at_k: hold`, the default): once the prox alone has left at most k live groups in
  a layer, the dead ones are held at zero and the prox stops there. On k live groups S_k is
  1/2 ||x||^2, so its step would only keep shrinking the survivors. What reaches k on the digits
  ResNet is time, not a larger lambda: lambda 3 with 40 epochs instead of 8 reaches k by the prox
  in 6 of 6 layers (steps 124-242 of 760, seeds 0-2). Holding is what keeps the accuracy there: 0.9917,
  0.9944, 0.9944 over seeds 0-2 (original 0.9944), against 0.947 at 30 epochs with the prox
  kept on. Larger lambdas collapse the model before k (5: chance accuracy).
- Annealing the level (`anneal`, default 1/16): over the first share of the fine-tuning steps the
  envelope's level falls from all the layer's groups to k, cubically, and is k from then on. At a
  level no lower than the live count the step only scales (S_k is then 1/2 ||x||^2), so no group is
  driven to zero by the first steps. On the digits Transformer (AdamW, the step in Adam's metric)
  the prox at k from step 0 killed groups within about 50 steps and kept 0.850 test accuracy; with
  the level annealed over 1/32 to 1/8 of the steps, 0.887-0.894, ahead of magnitude pruning's 0.881
  at the same counts and epochs (seeds 0-2; docs/methods.md). On the digits ResNet (SGD) 1/16 kept
  0.9944 on seeds 0-2 (0.9935 without), the prox still reaching k in every layer.
- The step in Adam's metric (`prox_metric: adam`): AdamW gives every coordinate a step of about
  the learning rate whatever its gradient, so the plain step cannot tell a group with small
  gradients from one with large ones. The proximal step that matches an Adam update is taken in
  its metric, diag(sqrt(v^) + eps), with one scale d_j per group (the mean over its coordinates):
  the weighted envelope step on the norms sqrt(d_j) n_j with weights 1 / sqrt(d_j). A group Adam
  scales down is shrunk harder, and lambda means what it does for SGD (docs/methods.md, measured
  on the digits Transformer and all-MiniLM-L6-v2).
- At the end every layer has at most k non-zero channels: if the proximal steps have not got
  there, the smallest are cut (a hard projection). The report's layer rows say, per layer, how
  many channels the prox zeroed (`prox_zeroed`), at which step the prox alone reached k
  (`reached_k_step`) and how many the projection still cut (`projection_cut`).
- Attention heads are groups too: a module with a head count (`heads` or `num_heads`) and its own
  query/key/value and output Linears (ATTENTION_LAYOUTS, one line per naming convention) is one
  "layer" whose groups are its heads: head h owns rows h*d/H..(h+1)*d/H of query, key and value
  (weights and biases) and the same columns of the output projection. A zeroed head gives zero
  queries and keys (uniform attention) over zero values, so its output is exactly zero and removing
  it (the four Linears shrink, the head count drops) changes nothing. Torch-Pruning alone would
  couple the projections channel by channel through the reshape into heads, which leaves heads of
  unequal widths. FFN hidden channels (Linear -> activation -> Linear) come from Torch-Pruning's
  graph as for convolutions. Tested on the digits Transformer: pruned == masked.
- Dead channels are removed physically with Torch-Pruning, so the model is smaller and faster,
  and its outputs equal the masked model's (the removed channels were exactly zero).
- The prox shrinks the surviving channels too (S_k is 1/2 ||x||^2 on k-sparse vectors), like a
  weight decay of strength lambda: keep lr * lambda small, well below the learning rate.
- `weights`: uniform, by group size, or by MACs (the paper's weights "from hardware"): w_j is the
  square root of the group's parameter count or MACs over the layer's mean, so the penalty
  lambda w_j^2 grows with what the group costs. Within one layer all channels (or heads) cost the
  same, so the three coincide for channel groups; they differ for depth groups of unequal blocks.

Examples and data: the dependency graph is traced on one calibration sample.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn

from .. import layers, linalg
from ..metrics import primary_output
from ..errors import RecipeError, UserError
from .base import Decision, Method, Stage, edit_module, register_edit, select_targets, short
from .group_envelope_allocation import EnvelopeAllocation
from .group_envelope_depth import block_container, check_blocks, depth_group, remove_blocks
from .group_envelope_channels import (ChannelGroup, ChannelSlice, channel_norms, channel_sizes, overcounted, scale_channels,
                                      slice_costs, unit_costs)

# (module type, handler name) -> the parameters a channel owns there, as (name, dim)
CHANNEL_SLICES = {
    (nn.Conv2d, "prune_out_channels"): (("weight", 0), ("bias", 0)),
    (nn.Conv2d, "prune_in_channels"): (("weight", 1),),
    (nn.Linear, "prune_out_channels"): (("weight", 0), ("bias", 0)),
    (nn.Linear, "prune_in_channels"): (("weight", 1),),
    (nn.BatchNorm2d, "prune_out_channels"): (("weight", 0), ("bias", 0)),
    (nn.BatchNorm1d, "prune_out_channels"): (("weight", 0), ("bias", 0)),
}


class GroupEnvelopeStage(Stage):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: Literal["group_envelope"] = "group_envelope"
    keep: float | Literal["auto"] = Field(0.5, description="channels kept per layer: a ratio below 1, a count (1, 2, "
                                          "...), or auto: per layer, by the recipe's `budget:` (params, macs or "
                                          "onnx_bytes)")
    keeps: dict[str, int] | None = Field(None, description="kept count per layer (its root module's name); set by "
                                         "a budget with keep: auto")
    lambda_: float = Field(1.0, ge=0, le=1e6, alias="lambda", description="strength of the envelope regularizer")
    weights: Literal["uniform", "size", "macs"] = Field(
        "uniform", description="group weights w_j: uniform; size, the square root of each group's parameter count "
        "(relative to the layer's mean); macs, the same of its MACs, so that the envelope's penalty on a group grows "
        "with what it costs. Within one layer of channels or heads every group costs the same and all three "
        "coincide; they differ for depth groups of unequal blocks")
    post_finetune: int = Field(0, ge=0, le=10_000, description="epochs of fine-tuning after the channels are removed")
    round_to: int = Field(1, ge=1, le=1 << 20, description="round the kept count up to a multiple of this (runtimes "
                          "run channel counts that are multiples of 8 faster)")
    lambda_growth: float = Field(1.0, ge=1, le=100, description="continuation: every `lambda_every` steps, each layer that "
                                 "still has more than k live channels (and more than the annealed level) multiplies its lambda by this (1: "
                                 "constant)")
    lambda_every: int = Field(10, ge=1, le=10**9, description="steps between lambda increases")
    anneal: float = Field(0.0625, ge=0, le=1, description="share of the fine-tuning steps over which each layer's "
                          "level falls from all its groups to k, cubically (k + (n - k)(1 - t/T)^3, rounded up), so the "
                          "first steps do not decide which groups die; 0: the envelope at k from the first step, as the "
                          "paper states it (on the digits Transformer 0.850 against 0.893 with 1/16, docs/methods.md)")
    prox_metric: Literal["euclidean", "adam"] = Field(
        "euclidean", description="euclidean: the prox as the paper states it; adam: in the metric of Adam's own "
        "step (each group's mean sqrt of the second moment), the proximal step that matches an AdamW update; "
        "lambda then means what it means for SGD (survivors settle where the gradient equals lambda times "
        "the weights); with SGD, and until Adam has a second moment for every parameter, the euclidean step")
    at_k: Literal["hold", "prox"] = Field(
        "hold", description="once the prox alone has left at most k live groups in a layer: hold, keep the dead "
        "ones at zero and stop the prox there (on k live groups S_k is plain weight decay of strength lambda, "
        "which only shrinks the survivors); prox: keep applying it at the recipe's lambda")
    groups: Literal["channels", "depth"] = Field(
        "channels", description="channels: each layer's coupled channels and each attention module's heads (the "
        "targeted layers); depth: the residual blocks of `blocks`, each one unit with all its parameters, removed "
        "whole: a pre-norm block (at zero it passes its input through) as an identity, a post-norm block "
        "(BERT's) as its norms, which are then left out of its group (at zero the rest computes them alone)")
    blocks: str | None = Field(None, max_length=1000, description="groups: depth: the module that lists the blocks "
                               "(an nn.ModuleList or nn.Sequential, e.g. blocks); default: the largest such list")

    @field_validator("keeps")
    @classmethod
    def _not_given(cls, value):
        if value is not None:  # a budget sets it (model_copy, no validation); a recipe never does
            raise ValueError("keeps is set by a budget: give keep: auto and a budget: section instead")
        return value

    @field_validator("keep")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value <= 0:
            raise ValueError("keep must be greater than 0 (a ratio below 1 or a count), or auto")
        return value

    @model_validator(mode="after")
    def _depth(self):
        if self.blocks is not None and self.groups != "depth":
            raise ValueError("blocks names the residual blocks of groups: depth")
        return self

    def kept(self, channels: int, round_to: int | None = None) -> int:
        count = round(self.keep * channels) if self.keep < 1 else int(self.keep)
        step = self.round_to if round_to is None else round_to
        count = -(-count // step) * step
        return max(1, min(count, channels))


def annealed_level(n: int, k: int, step: int, steps: int) -> int:
    """The envelope's level after optimizer step `step` (0-based) when it falls from n groups to k over
    `steps` steps: k + (n - k)(1 - (step + 1)/steps)^3, rounded up (Zhu and Gupta's cubic pruning
    schedule: fast while many groups are left, slow near k); k from then on, and when steps is 0."""
    if steps <= 0 or step + 1 >= steps:
        return k
    return min(n, k + math.ceil((n - k) * (1 - (step + 1) / steps) ** 3))


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def build_graph(model: nn.Module, sample: tuple[torch.Tensor, ...]):
    """Torch-Pruning's dependency graph of `model`, traced on `sample`. Parameters that belong to no
    layer (position embeddings) follow the channels of their last dimension, Torch-Pruning's default;
    its warning saying so is not the user's business."""
    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.DependencyGraph().build_dependency(model, example_inputs=sample)


def dependency_groups(model: nn.Module, sample: tuple[torch.Tensor, ...], ignored: list[nn.Module]):
    """Torch-Pruning's coupled channel groups of `model`, rooted at Conv2d and Linear layers."""
    graph = build_graph(model, sample)
    groups = graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear])
    return graph, list(groups)


def group_slices(group, names: dict[nn.Module, str]) -> tuple[list[ChannelSlice], str | None]:
    """The parameter slices of a group's channels, or the reason the group is not supported."""
    slices = []
    for item in group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        params = [p for p in module.parameters(recurse=False)]
        handler = getattr(dep.handler, "__name__", str(dep.handler))
        spec = next((v for (kind, h), v in CHANNEL_SLICES.items() if isinstance(module, kind) and h == handler), None)
        label = f"{names.get(module, type(module).__name__)} ({type(module).__name__})"
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            return [], f"{label} normalizes over these channels: removing even zero channels would change its " \
                       "statistics, so the pruned model would not equal the masked one"
        if spec is None:
            if params:
                return [], f"{label} is coupled to these channels and its channel removal is not supported"
            continue
        depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not depthwise:
            return [], f"{label} is a grouped convolution (groups={module.groups})"
        index = torch.as_tensor(list(idxs), dtype=torch.long)
        channel = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        for name, dim in spec:
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                slices.append(ChannelSlice(param, dim, index, channel))
    return slices, None


@dataclass(frozen=True)
class AttentionLayout:
    """How a self-attention module names its parts (dotted paths below the module): the int
    attribute holding its head count, its query/key/value Linears (output features split into equal
    heads), its output Linear, and any int attributes that hold the heads' total width."""

    heads: str
    qkv: tuple[str, str, str]
    output: str
    widths: tuple[str, ...] = ()


# one line per naming convention: the bundled Transformer; Llama/Mistral-style attention modules;
# Hugging Face BERT-style encoders (BertAttention: the heads in `.self`, the output in `.output.dense`)
ATTENTION_LAYOUTS = (
    AttentionLayout("heads", ("query", "key", "value"), "output"),
    AttentionLayout("num_heads", ("q_proj", "k_proj", "v_proj"), "out_proj"),
    AttentionLayout("self.num_attention_heads", ("self.query", "self.key", "self.value"), "output.dense",
                    ("self.all_head_size",)),
)


def _part(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _set_part(module: nn.Module, path: str, value) -> None:
    *parents, name = path.split(".")
    setattr(_part(module, ".".join(parents)) if parents else module, name, value)


def attention_layout(module: nn.Module) -> AttentionLayout | None:
    """The layout `module` follows, when it is a self-attention module whose heads can be removed."""
    for layout in ATTENTION_LAYOUTS:
        heads = _part(module, layout.heads)
        parts = [_part(module, n) for n in (*layout.qkv, layout.output)]
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 2:
            continue
        if not all(type(p) is nn.Linear for p in parts):
            continue
        widths = {p.out_features for p in parts[:3]}
        if len(widths) == 1 and parts[3].in_features in widths and parts[3].in_features % heads == 0 \
                and all(_part(module, w) == parts[3].in_features for w in layout.widths):
            return layout
    return None


def head_slices(module: nn.Module, layout: AttentionLayout) -> list[ChannelSlice]:
    """Each head's parameters: its rows of query, key and value (weight and bias), its columns of
    the output projection."""
    width = _part(module, layout.output).in_features
    heads = _part(module, layout.heads)
    idxs = torch.arange(width)
    channel = idxs // (width // heads)
    slices = []
    for name in layout.qkv:
        linear = _part(module, name)
        slices += [ChannelSlice(p, 0, idxs, channel) for p in (linear.weight, linear.bias) if p is not None]
    return slices + [ChannelSlice(_part(module, layout.output).weight, 1, idxs, channel)]


@torch.no_grad()
def remove_heads(module: nn.Module, layout: AttentionLayout, dead: list[int]) -> None:
    """Remove the `dead` heads: query/key/value lose their rows, the output its columns."""
    heads = _part(module, layout.heads)
    width = _part(module, layout.output).in_features
    size = width // heads
    keep = torch.tensor([i for i in range(width) if i // size not in set(dead)], dtype=torch.long)
    for name in (*layout.qkv, layout.output):
        old = _part(module, name)
        rows = name != layout.output
        new = nn.Linear(old.in_features if rows else len(keep), len(keep) if rows else old.out_features,
                        bias=old.bias is not None).to(old.weight)
        new.weight.copy_(old.weight[keep] if rows else old.weight[:, keep])
        if old.bias is not None:
            new.bias.copy_(old.bias[keep] if rows else old.bias)
        new.train(old.training)
        _set_part(module, name, new)
    _set_part(module, layout.heads, heads - len(dead))
    for path in layout.widths:
        _set_part(module, path, len(keep))


class GroupEnvelope(EnvelopeAllocation, Method):
    name = "group_envelope"
    schema = GroupEnvelopeStage
    needs_calibration = True  # the dependency graph is traced on one calibration sample
    calibration_state = ("sample",)  # what calibrate sets

    def __init__(self, stage: GroupEnvelopeStage, stage_index: int):
        super().__init__(stage, stage_index)
        self.sample: tuple[torch.Tensor, ...] | None = None
        self.groups: dict[str, dict] = {}  # root name -> {"slices", "channels", "k", "weights"}
        self.edits_made: list[dict] = []
        self.twice = (0, 0)  # (params, MACs) the planned rows save twice over (counted_twice)
        self.post_norm: bool | None = None  # groups: depth: post-norm blocks (their norms stay), once checked
        self.group_macs: dict[str, torch.Tensor] = {}  # root -> each group's MACs, for weights: macs

    def calibrate(self, model, batches, progress=False):
        first = next(iter(batches()), None)
        if first is None:
            raise UserError(f"stages[{self.stage_index}] (group_envelope): the calibration data is empty")
        self.sample = tuple(t[:1] for t in first)

    def _targets(self, model: nn.Module) -> tuple[list[str], list[nn.Module]]:
        path = f"stages[{self.stage_index}].targets"
        chosen = [n for n, _ in select_targets(model, self.stage.targets, path)]
        if "targets" not in self.stage.model_fields_set:  # the output layer keeps its outputs
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            chosen = [n for n in chosen if not linears or n != linears[-1]]
        ignored = [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in chosen]
        return chosen, ignored

    def channel_groups(self, model: nn.Module) -> dict[str, ChannelGroup]:
        """The groups this stage prunes by the layer (or attention module) that roots them; for a budget."""
        if self.sample is None:
            raise RecipeError(f"stages[{self.stage_index}] (group_envelope) needs calibration data")
        return self._collect(model)[1]

    def _collect(self, model: nn.Module):
        if self.stage.groups == "depth":
            path, container = block_container(model, self.stage.blocks, self.stage_index)
            if self.post_norm is None:  # checked once, on the model as planned: how a dead block goes
                self.post_norm = check_blocks(model, container, path, self.sample, self.stage_index)
            return None, {path: depth_group(path, container, self.post_norm)}
        targets, ignored = self._targets(model)
        graph, groups = dependency_groups(model, self.sample, ignored)
        names = _module_names(model)
        found = {}
        in_heads = set()  # the Linears of attention modules whose heads are the groups
        for name, module in model.named_modules():
            layout = attention_layout(module)
            members = [f"{name}.{part}" if name else part for part in (*layout.qkv, layout.output)] if layout else []
            if layout and any(m in targets for m in members):
                found[name] = ChannelGroup(_part(module, layout.heads), head_slices(module, layout), members,
                                           layout=layout)
                in_heads.update(members)
        for group in groups:
            root = names[group[0].dep.target.module]
            if root not in targets or root in in_heads:
                continue
            slices, reason = group_slices(group, names)
            found[root] = ChannelGroup(len(group[0].idxs), slices, sorted({names[item.dep.target.module] for item in group
                                                                           if item.dep.target.module in names}),
                                       reason, group=group)
        return graph, found

    def plan(self, model, profile):
        if self.sample is None:
            raise RecipeError(f"stages[{self.stage_index}] (group_envelope) needs calibration data")
        _, found = self._collect(model)  # depth: the blocks checked to be removable
        units = unit_costs(model, profile, "params"), unit_costs(model, profile, "macs")
        self.decisions = []
        for root, info in found.items():
            n = info.channels
            heads = info.heads or info.depth  # counted in whole units, not rounded to round_to
            if info.slices:  # the group's share of every parameter its channels own, producers and consumers
                params, macs = (round(sum(cost * share for _, cost, share in slice_costs(info.slices, u)))
                                for u in units)
            else:  # unsupported: the layers that produce these channels, for the row
                producers = [m for m in info.members if self._produces(model, m, info)]
                params = sum(p.numel() for m in producers for p in model.get_submodule(m).parameters(recurse=False))
                macs = sum(layers.dense_cost(model.get_submodule(m), profile[m].out_shape).macs
                           for m in producers if m in profile)
            kind = unit = info.unit
            extra = {"channels": n, "members": info.members}
            if info.reason:
                self.decisions.append(Decision(root, self.name, kind, "keep", [n], params, macs, params, macs,
                                               reason=info.reason, extra=extra))
                continue
            if self.stage.keep == "auto":  # a budget's allocation; none for a layer it leaves whole
                k = (self.stage.keeps or {}).get(root)
                if k is None or k >= n:
                    self.decisions.append(Decision(root, self.name, kind, "keep", [n], params, macs, params, macs,
                                                   reason=self.budget_dense.get(root, "budget: left whole"),
                                                   extra=extra))
                    continue
            else:
                k = self.stage.kept(n, round_to=1 if heads else None)  # a head count is not rounded to 8
            extra.update({"keep": k, "note": f"keep {k} of {n} {unit} (members: {', '.join(info.members)})"})
            self.decisions.append(Decision(root, self.name, kind, "prune", [n], params, macs,
                                           params * k // n, macs * k // n, extra=extra))
            self.group_macs[root] = channel_sizes(info.slices, n, units[1])
        self.twice = self._counted_twice(found, units)
        return self.decisions

    def counted_twice(self) -> tuple[int, int]:
        return self.twice

    def _counted_twice(self, found: dict, units: tuple[dict, dict]) -> tuple[int, int]:
        """(params, MACs) the prune rows save twice over: a parameter two pruned groups shrink."""
        removed: tuple[dict, dict] = ({}, {})
        for d in self.decisions:
            if d.action != "prune":
                continue
            dropped = 1 - d.extra["keep"] / d.extra["channels"]
            for parts, u in zip(removed, units):
                for param, cost, share in slice_costs(found[d.name].slices, u):
                    parts.setdefault(id(param), (cost, []))[1].append(share * dropped)
        return round(overcounted(removed[0])), round(overcounted(removed[1]))

    @staticmethod
    def _produces(model, member: str, info) -> bool:
        """Whether `member` produces the group's channels (its output channels, or its BatchNorm
        entries, are in the group)."""
        module = model.get_submodule(member)
        return any(item.dep.target.module is module and getattr(item.dep.handler, "__name__", "") == "prune_out_channels"
                   for item in info.group)

    def prepare(self, model):
        _, found = self._collect(model)  # the same groups, on the model being trained
        self.groups = {}
        for d in self.decisions:
            if d.action != "prune":
                continue
            slices = found[d.name].slices
            n = d.extra["channels"]
            weights = None
            sizes = {"size": lambda: channel_sizes(slices, n), "macs": lambda: self.group_macs.get(d.name)}.get(
                self.stage.weights, lambda: None)()
            if sizes is not None and bool((sizes > 0).all()):  # (a group that costs nothing: uniform weights)
                weights = (sizes / sizes.mean()).sqrt()
            self.groups[d.name] = {"slices": slices, "channels": n, "k": d.extra["keep"], "weights": weights,
                                   "lambda": self.stage.lambda_, "reached_k_step": None}

    def after_step(self, model, step, lr, optimizer=None):
        """The proximal step on each layer's channel norms. A channel the prox sets to zero has its
        optimizer state (momentum, Adam's moments) zeroed too: otherwise the next step's momentum
        brings it straight back and the prox never gets to prune (measured: with SGD momentum 0.9
        every channel was alive again before each prox step). Lambda continuation: a layer still
        above k live channels (and, while annealing, above the annealed level) every `lambda_every`
        steps multiplies its lambda by `lambda_growth`;
        once the prox alone has left at most k, the layer's dead channels stay dead and its lambda
        returns to the recipe's (a grown lambda would keep shrinking the survivors); with `at_k: hold`
        its prox stops there altogether."""
        for g in self.groups.values():
            if g.get("dead") is not None:  # reached k: hold the support, train the survivors
                scale_channels(g["slices"], (~g["dead"]).to(torch.float32))
                if optimizer is not None:
                    reset_optimizer_state(optimizer, g["slices"], g["dead"])
                if self.stage.at_k == "hold":
                    continue
            step_size = lr * g["lambda"]
            if step_size <= 0:
                continue
            norms = channel_norms(g["slices"], g["channels"])
            level = annealed_level(g["channels"], g["k"], step, round(self.stage.anneal * (self.finetune_steps or 0)))
            metric = adam_metric(optimizer, g["slices"], g["channels"]) if self.stage.prox_metric == "adam" else None
            if metric is None:
                scale = linalg.envelope_prox_scale(norms, level, step_size, g["weights"])
            else:  # prox of lr lambda S_k in the metric diag(d): scaled norms sqrt(d) n, weights w / sqrt(d)
                root = metric.sqrt()
                weights = (1.0 if g["weights"] is None else g["weights"]) / root
                scale = linalg.envelope_prox_scale(norms * root, level, step_size, weights)
            scale_channels(g["slices"], scale)
            if optimizer is not None:
                reset_optimizer_state(optimizer, g["slices"], scale == 0)
            if g.get("dead") is not None:
                continue
            live = int((scale > 0).sum())
            if live <= g["k"]:
                g["reached_k_step"], g["dead"], g["lambda"] = step + 1, scale == 0, self.stage.lambda_
            elif (step + 1) % self.stage.lambda_every == 0 and live > level:  # (behind the annealed level)
                g["lambda"] *= self.stage.lambda_growth
                g["largest"] = g["lambda"]

    def state_dict(self):
        return {"groups": {root: {"lambda": g["lambda"], "reached_k_step": g["reached_k_step"], "dead": g.get("dead")}
                           for root, g in self.groups.items()}}

    def load_state_dict(self, state):
        for root, saved in state.get("groups", {}).items():
            if root in self.groups:
                self.groups[root].update(saved)

    def finalize(self, model):
        self.edits_made = []
        dead_by_root = {}
        prox = {}
        for root, g in self.groups.items():
            norms = channel_norms(g["slices"], g["channels"])
            alive = int((norms > 0).sum())
            prox[root] = g["channels"] - alive
            cut = max(0, alive - g["k"])
            if cut:  # the hard projection onto the k largest channels
                keep = torch.zeros_like(norms)
                keep[torch.argsort(norms, descending=True)[: g["k"]]] = 1.0
                scale_channels(g["slices"], keep)
                norms = norms * keep
            dead_by_root[root] = (torch.nonzero(norms == 0).flatten().tolist(), cut)
        graph, found = self._collect(model)
        heads_to_remove = []  # (name, layout, dead): heads, or with layout None a container's blocks
        for d in self.decisions:
            if d.name not in dead_by_root:
                continue
            dead, cut = dead_by_root[d.name]
            n = d.extra["channels"]
            layout = found[d.name].layout
            if dead and found[d.name].depth:
                heads_to_remove.append((d.name, None, dead))
            elif dead and layout is not None:
                heads_to_remove.append((d.name, layout, dead))
            elif dead:
                group = found[d.name].group
                root = group[0].dep.target.module
                pruning = graph.get_pruning_group(root, group[0].dep.handler, idxs=dead)
                pruning.prune()
            kept = n - len(dead)
            unit = found[d.name].unit
            d.params_after = d.params_before * kept // n
            d.macs_after = d.macs_before * kept // n
            g = self.groups[d.name]
            d.extra.update({"kept": kept, "kept_channels": [i for i in range(n) if i not in set(dead)],
                            "prox_zeroed": prox[d.name], "reached_k_step": g["reached_k_step"],
                            "projection_cut": cut, "largest_lambda": round(g.get("largest", g["lambda"]), 6),
                            "note": f"{kept} of {n} {unit} kept" + (f"; the hard projection cut {cut}" if cut else "")})
            if layout is None and not found[d.name].depth:
                self.edits_made.append({"op": "prune_channels", "root": d.name, "idxs": dead})
        if heads_to_remove:  # after Torch-Pruning's graph has done its part
            self._remove_units_checked(model, heads_to_remove)

    @torch.no_grad()
    def _remove_units_checked(self, model: nn.Module, heads_to_remove: list[tuple[str, AttentionLayout, list[int]]]):
        """Remove the heads (or whole blocks) module by module, checking after each on the calibration
        sample that the model still computes what the masked one did: a forward that reads a head
        count or width from attributes other than `layout.heads` (e.g. a fixed head_dim * num_heads
        reshape) would silently change. The masked model's output is computed once: every removal
        must keep it."""
        device = next(model.parameters()).device
        sample = tuple(t.to(device) for t in self.sample)
        was_training = model.training
        model.eval()
        try:
            masked = primary_output(model(*sample))
            for name, layout, dead in heads_to_remove:  # (layout None: whole blocks of a container)
                if layout is None:
                    remove_blocks(model.get_submodule(name), dead, self.post_norm)
                else:
                    remove_heads(model.get_submodule(name), layout, dead)
                try:
                    after = primary_output(model(*sample))
                    same = after.shape == masked.shape and torch.allclose(after, masked, atol=1e-4, rtol=1e-3)
                except Exception:  # noqa: BLE001 - any failure of the forward is the same finding
                    same = False
                if not same:
                    raise UserError(f"stages[{self.stage_index}] (group_envelope): removing "
                                    f"{'blocks' if layout is None else 'heads'} of {name!r} "
                                    "changed the model's outputs (its forward reads head counts, widths or blocks "
                                    "that compress does not update); leave them out of "
                                    f"stages[{self.stage_index}]")
                self.edits_made.append({"op": "remove_blocks", "container": name, "indices": dead,
                                        **({"post_norm": True} if self.post_norm else {})} if layout is None
                                       else {"op": "prune_heads", "module": name, "heads": dead})
        finally:
            model.train(was_training)

    def post_finetune_epochs(self) -> int:
        return self.stage.post_finetune

    def edits(self):
        return list(self.edits_made)


@torch.no_grad()
def adam_metric(optimizer, slices: list[ChannelSlice], channels: int) -> torch.Tensor | None:
    """Each channel's mean of Adam's per-coordinate step scale, sqrt(bias-corrected second moment)
    + eps, over the group's parameters; None before Adam has a second moment for all of them (or
    without Adam)."""
    if optimizer is None:
        return None
    total = torch.zeros(channels, dtype=torch.float64)
    count = torch.zeros(channels, dtype=torch.float64)
    settings = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for s in slices:
        state = optimizer.state.get(s.param, {})
        square, group = state.get("exp_avg_sq"), settings.get(id(s.param))
        if square is None or group is None or "betas" not in group:
            return None
        correction = 1 - group["betas"][1] ** float(state["step"])
        part = square.index_select(s.dim, s.idxs.to(square.device)).double().cpu()  # only the group's coordinates
        part = ((part / correction).sqrt() + group["eps"]).movedim(s.dim, 0).reshape(len(s.idxs), -1)
        total.index_add_(0, s.channel, part.sum(1))
        count.index_add_(0, s.channel, torch.full((len(s.idxs),), float(part.shape[1]), dtype=torch.float64))
    return total / count.clamp_min(1)


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, slices: list[ChannelSlice], dead: torch.Tensor) -> None:
    """Zero the optimizer's per-parameter state (momentum buffers, Adam's moments) at the positions
    of the `dead` channels, so that a channel the prox zeroed stays zero unless its gradient
    genuinely revives it."""
    if not bool(dead.any()):
        return
    for s in slices:
        positions = s.idxs[dead.to(s.channel.device)[s.channel]]
        if positions.numel() == 0:
            continue
        for value in optimizer.state.get(s.param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == s.param.shape:
                value.index_fill_(s.dim, positions.to(value.device), 0)


def _check_prune(model: nn.Module, edit: dict) -> tuple[str, list[int]]:
    root, module = edit_module(model, edit, "root", (nn.Conv2d, nn.Linear))
    channels = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    idxs = edit.get("idxs")
    if (not isinstance(idxs, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idxs)
            or any(not 0 <= i < channels for i in idxs) or len(set(idxs)) != len(idxs) or len(idxs) >= channels):
        raise UserError(f"structural edit {short(edit)}: idxs must be distinct channel indices of {root!r} "
                        f"in [0, {channels}), leaving at least one channel")
    return root, idxs


def _apply_prune(model: nn.Module, checked: tuple[str, list[int]], inputs: list[dict] | None) -> None:
    """Remove the channels again through Torch-Pruning's dependency graph, traced on a sample built
    from the checkpoint's input description."""
    import torch_pruning as tp

    from ..data import synthetic_sample

    root, idxs = checked
    if not idxs:
        return
    if not inputs:
        raise UserError("the checkpoint removes channels but does not describe the model's inputs")
    graph = build_graph(model, synthetic_sample(inputs))
    module = model.get_submodule(root)
    handler = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
    graph.get_pruning_group(module, handler, idxs=idxs).prune()


register_edit("prune_channels", _check_prune, _apply_prune)


def _check_prune_heads(model: nn.Module, edit: dict) -> tuple[nn.Module, AttentionLayout, list[int]]:
    name = edit.get("module")
    if not isinstance(name, str):
        raise UserError(f"structural edit {short(edit)}: 'module' must name an attention module")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise UserError(f"structural edit {short(edit)}: the model built by the factory has no module {name!r}") from None
    layout = attention_layout(module)
    if layout is None:
        raise UserError(f"structural edit {short(edit)}: {name!r} is not an attention module whose heads can be removed")
    count = _part(module, layout.heads)
    heads = edit.get("heads")
    if (not isinstance(heads, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in heads)
            or any(not 0 <= i < count for i in heads) or len(set(heads)) != len(heads) or len(heads) >= count):
        raise UserError(f"structural edit {short(edit)}: heads must be distinct head indices of {name!r} "
                        f"in [0, {count}), leaving at least one head")
    return module, layout, heads


def _apply_prune_heads(model: nn.Module, checked, inputs) -> None:
    module, layout, heads = checked
    if heads:
        remove_heads(module, layout, heads)


register_edit("prune_heads", _check_prune_heads, _apply_prune_heads)
