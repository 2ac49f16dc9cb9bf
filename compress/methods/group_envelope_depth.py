"""Depth groups for group_envelope: every residual block of a container (an nn.ModuleList or
nn.Sequential of blocks, e.g. a Transformer's layers) is one group, all its parameters together.
The envelope drives whole blocks to zero; a pre-norm residual block (x + f(norm(x)), the bundled
Transformer's) with every parameter at zero computes x, so it is removed as an identity (`Skip`).
A post-norm block (norm2(h + g(h)) with h = norm1(x + f(x)), BERT's) at zero is not an identity:
its norms' parameters are then left out of the group, and with every other parameter at zero it
computes norm2(norm1(x)), so it is replaced by its norms alone (`Norms`), which is exact. Which of
the two a block is, is checked on the calibration sample, not assumed; any other block is refused.

Kept apart from group_envelope.py, which calls these where it collects, plans and finalizes its
groups; the edit `remove_blocks` replays the removal when compression.json rebuilds the model."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import RecipeError, UserError
from .base import edit_module, register_edit, short
from .group_envelope_channels import ChannelGroup, ChannelSlice


class Skip(nn.Module):
    """A removed residual block: passes its first input through (further arguments, e.g. a mask,
    are ignored)."""

    def forward(self, x, *args, **kwargs):
        return x


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: LayerNorm, GroupNorm, BatchNorm, or an RMSNorm by any library's name."""
    return (isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase))
            or type(module).__name__.endswith("RMSNorm"))


def block_norms(block: nn.Module) -> list[nn.Module]:
    """The block's normalization layers, in the order they were registered (BERT's: the attention's
    output norm, then the FFN's)."""
    return [m for m in block.modules() if is_norm(m)]


def norm_parameters(block: nn.Module) -> set[int]:
    """The ids of the parameters of the block's normalization layers."""
    return {id(p) for m in block_norms(block) for p in m.parameters()}


class Norms(nn.Module):
    """A removed post-norm residual block: what it computes with every parameter but its norms' at
    zero, its norms applied in turn to its first input (further arguments are ignored)."""

    def __init__(self, norms: list[nn.Module]):
        super().__init__()
        self.norms = nn.ModuleList(norms)

    def forward(self, x, *args, **kwargs):
        for norm in self.norms:
            x = norm(x)
        return x


def block_container(model: nn.Module, path: str | None, stage_index: int) -> tuple[str, nn.Module]:
    """The container of residual blocks: the one named, or the only ModuleList/Sequential of two or
    more children of one type that holds the most parameters."""
    where = f"stages[{stage_index}].blocks"
    if path is not None:
        try:
            container = model.get_submodule(path)
        except AttributeError:
            raise RecipeError(f"{where}: the model has no module {path!r}") from None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            raise RecipeError(f"{where}: {path!r} is a {type(container).__name__}, not a list of two or more blocks")
        return path, container
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2
             and len({type(c) for c in m}) == 1 and any(True for _ in m.parameters())]
    if not found:
        raise RecipeError(f"{where}: the model has no list of residual blocks; name one (e.g. blocks: layers)")
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def depth_group(path: str, container: nn.Module, post_norm: bool = False) -> ChannelGroup:
    """One group of `len(container)` units: each block's every parameter, whole; for post-norm blocks
    every parameter but its norms' (they stay when the block goes)."""
    slices = []
    for index, block in enumerate(container):
        kept = norm_parameters(block) if post_norm else set()
        for param in block.parameters():
            if id(param) in kept:
                continue
            rows = param.shape[0] if param.dim() else 1
            slices.append(ChannelSlice(param, 0, torch.arange(rows), torch.full((rows,), index)))
    return ChannelGroup(len(container), slices, [f"{path}.{i}" for i in range(len(container))], depth=True)


@torch.no_grad()
def _zeroed_block(model: nn.Module, block: nn.Module, sample: tuple, keep_norms: bool):
    """(input, output) of `block` on the calibration sample with its parameters at zero (its norms'
    kept when `keep_norms`); the weights are restored."""
    kept = norm_parameters(block) if keep_norms else set()
    params = [p for p in block.parameters() if id(p) not in kept]
    seen = {}

    def hook(module, args, output):
        seen["in"], seen["out"] = args[0] if args else None, output  # (an input by keyword: refused)

    saved = [p.detach().clone() for p in params]
    handle = block.register_forward_hook(hook)
    try:
        for p in params:
            p.zero_()
        model(*sample)
    finally:
        handle.remove()
        for p, value in zip(params, saved):
            p.copy_(value)
    return seen.get("in"), seen.get("out")


def _same(out, expected) -> bool:
    return (isinstance(out, torch.Tensor) and isinstance(expected, torch.Tensor) and out.shape == expected.shape
            and torch.allclose(out, expected, rtol=1e-4, atol=1e-5))


@torch.no_grad()
def check_blocks(model: nn.Module, container: nn.Module, path: str, sample: tuple, stage_index: int) -> bool:
    """Whether the blocks are post-norm (removed as `Norms`: True) or pre-norm (removed as `Skip`:
    False). Refuses blocks that are neither: zeroing them would not remove them. Every block is
    checked on the calibration sample, and all must be of one kind."""
    was_training = model.training
    model.eval()
    try:
        kinds = []
        for index, block in enumerate(container):
            x, out = _zeroed_block(model, block, sample, keep_norms=False)
            if _same(out, x):
                kinds.append(False)
                continue
            x, out = _zeroed_block(model, block, sample, keep_norms=True)
            norms = block_norms(block)
            if norms and isinstance(x, torch.Tensor) and _same(out, Norms(norms)(x)):
                kinds.append(True)
                continue
            raise UserError(f"stages[{stage_index}] (group_envelope, groups: depth): {path}.{index} neither passes "
                            "its input through with its parameters at zero (a pre-norm block) nor computes its norms "
                            "alone with every other parameter at zero (a post-norm block), or it returns more than a "
                            "tensor, so it cannot be removed")
        if len(set(kinds)) > 1:
            raise UserError(f"stages[{stage_index}] (group_envelope, groups: depth): the blocks of {path} mix pre-norm "
                            "and post-norm blocks")
        return kinds[0]
    finally:
        model.train(was_training)


def remove_blocks(container: nn.Module, dead: list[int], post_norm: bool = False) -> None:
    for index in dead:
        container[index] = Norms(block_norms(container[index])) if post_norm else Skip()


def _check_remove_blocks(model: nn.Module, edit: dict) -> tuple[nn.Module, list[int], bool]:
    path, container = edit_module(model, edit, "container", (nn.ModuleList, nn.Sequential))
    indices = edit.get("indices")
    if not isinstance(edit.get("post_norm", False), bool):
        raise UserError(f"structural edit {short(edit)}: post_norm must be true or false")
    n = len(container)
    if (not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
            or any(not 0 <= i < n for i in indices) or len(set(indices)) != len(indices) or len(indices) >= n):
        raise UserError(f"structural edit {short(edit)}: indices must be distinct block indices of {path!r} in "
                        f"[0, {n}), leaving at least one block")
    return container, indices, edit.get("post_norm", False)


def _apply_remove_blocks(model: nn.Module, checked, inputs) -> None:
    container, indices, post_norm = checked
    remove_blocks(container, indices, post_norm)


register_edit("remove_blocks", _check_remove_blocks, _apply_remove_blocks)
