"""Coupled channels as slices of parameters, and what they cost: shared by group_envelope (which
prunes them) and its allocation (which prices keeping k of them)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import layers


@dataclass
class ChannelGroup:
    """One coupled group of channels that a stage prunes together (a Conv2d's or Linear's output
    channels with every layer that reads them), an attention module's heads, or the residual blocks
    of a container."""

    channels: int  # how many channels (or heads) the group has
    slices: list["ChannelSlice"]  # every parameter part that belongs to the channels, producers and consumers
    members: list[str]  # the layers the group spans
    reason: str | None = None  # why the group cannot be pruned; None when it can
    group: object | None = None  # channels: Torch-Pruning's dependency group, which prunes them
    layout: object | None = None  # heads: the attention module's AttentionLayout
    depth: bool = False  # depth: the units are whole residual blocks of a container (group_envelope_depth.py)

    @property
    def heads(self) -> bool:
        return self.layout is not None

    @property
    def unit(self) -> str:
        """What one of the group's units is called in plans and reports."""
        return "blocks" if self.depth else "heads" if self.heads else "channels"


@dataclass
class ChannelSlice:
    """The part of one parameter that belongs to the group's channels."""

    param: nn.Parameter
    dim: int
    idxs: torch.Tensor  # positions along `dim`
    channel: torch.Tensor  # which channel of the group each position belongs to


def channel_norms(slices: list[ChannelSlice], channels: int) -> torch.Tensor:
    """The l2 norm of every channel's parameters, over all the group's slices."""
    total = torch.zeros(channels, dtype=torch.float64)
    for s in slices:
        part = s.param.detach().index_select(s.dim, s.idxs.to(s.param.device)).double().cpu()
        squares = part.pow(2).movedim(s.dim, 0).reshape(len(s.idxs), -1).sum(1)
        total.index_add_(0, s.channel, squares)
    return total.sqrt()


def channel_sizes(slices: list[ChannelSlice], channels: int, units: dict[int, float] | None = None) -> torch.Tensor:
    """Each channel's parameter count, or with `units` (unit_costs) what its parameters cost."""
    total = torch.zeros(channels, dtype=torch.float64)
    for s in slices:
        per = s.param.numel() // s.param.shape[s.dim] * (1.0 if units is None else units.get(id(s.param), 0.0))
        total.index_add_(0, s.channel, torch.full((len(s.idxs),), float(per), dtype=torch.float64))
    return total


@torch.no_grad()
def scale_channels(slices: list[ChannelSlice], factors: torch.Tensor) -> None:
    """Multiply every channel's parameters by its factor (0 kills the channel exactly)."""
    for s in slices:
        full = torch.ones(s.param.shape[s.dim], dtype=s.param.dtype, device=s.param.device)
        full[s.idxs.to(full.device)] = factors[s.channel].to(full)
        shape = [1] * s.param.dim()
        shape[s.dim] = -1
        s.param.mul_(full.reshape(shape))


def unit_costs(model: nn.Module, profile: dict, kind: str,
               quantized=lambda name, module: False) -> dict[int, float]:
    """{id(parameter): what one of its elements costs}: 1 for params; for macs a weight's share of
    its Conv2d's or Linear's MACs per sample (other parameters 0); for onnx_bytes 4, or 1 for a
    weight the int8 model quantizes (`quantized(name, module)`)."""
    units = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if kind == "params":
                units[id(p)] = 1.0
            elif kind == "macs":
                layer = isinstance(module, (nn.Conv2d, nn.Linear)) and p is module.weight and name in profile
                units[id(p)] = layers.dense_cost(module, profile[name].out_shape).macs / p.numel() if layer else 0.0
            else:
                units[id(p)] = 1.0 if p.dim() >= 2 and quantized(name, module) else 4.0
    return units


def slice_costs(slices: list[ChannelSlice], units: dict[int, float]):
    """(parameter, its whole cost, the share of it the group's channels own) per slice: a layer's
    output channels, a consumer's input channels, BatchNorm entries. Removing a fraction of the
    channels removes that fraction of each share, exactly when no other group shrinks the same
    parameter (`overcounted` is what adding the shares up gets wrong then)."""
    for s in slices:
        yield s.param, units.get(id(s.param), 0.0) * s.param.numel(), len(s.idxs) / s.param.shape[s.dim]


def overcounted(parts: dict[int, tuple[float, list[float]]]) -> float:
    """{parameter: (its cost, the shares of it each shrinking group removes)} -> what adding the
    shares up overcounts: a parameter two groups shrink by a and b loses 1 - (1 - a)(1 - b) of its
    cost, not a + b."""
    total = 0.0
    for cost, shares in parts.values():
        remaining = 1.0
        for share in shares:
            remaining *= 1 - share
        total += cost * (sum(shares) - (1 - remaining))
    return total
