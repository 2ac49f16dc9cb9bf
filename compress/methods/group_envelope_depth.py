"""Depth groups for group_envelope: every residual block of a container (an nn.ModuleList or
nn.Sequential of blocks, e.g. a Transformer's layers) is one group, all its parameters together.
The envelope drives whole blocks to zero; a pre-norm residual block (x + f(norm(x)), the bundled
Transformer's) with every parameter at zero computes x, so it is removed as an identity (`Skip`).
Whether a block is such an identity is checked on the calibration sample, not assumed: a post-norm
block (norm(x + f(x)), BERT's) is not, and is refused.

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


def depth_group(path: str, container: nn.Module) -> ChannelGroup:
    """One group of `len(container)` units: each block's every parameter, whole."""
    slices = []
    for index, block in enumerate(container):
        for param in block.parameters():
            rows = param.shape[0] if param.dim() else 1
            slices.append(ChannelSlice(param, 0, torch.arange(rows), torch.full((rows,), index)))
    return ChannelGroup(len(container), slices, [f"{path}.{i}" for i in range(len(container))], depth=True)


@torch.no_grad()
def check_identity(model: nn.Module, container: nn.Module, path: str, sample: tuple, stage_index: int) -> None:
    """Refuse blocks that, with every parameter at zero, do not pass their input through: zeroing
    them would not remove them. Each block is checked on the calibration sample."""
    was_training = model.training
    model.eval()
    try:
        for index, block in enumerate(container):
            seen = {}

            def hook(module, args, output):
                seen["in"], seen["out"] = args[0], output

            saved = [p.detach().clone() for p in block.parameters()]
            handle = block.register_forward_hook(hook)
            try:
                for p in block.parameters():
                    p.zero_()
                model(*sample)
            finally:
                handle.remove()
                for p, value in zip(block.parameters(), saved):
                    p.copy_(value)
            out = seen.get("out")
            if not isinstance(out, torch.Tensor) or out.shape != seen["in"].shape or not torch.allclose(out, seen["in"]):
                raise UserError(f"stages[{stage_index}] (group_envelope, groups: depth): {path}.{index} does not pass its "
                                "input through with its parameters at zero (a post-norm block, or one that returns "
                                "more than a tensor), so it cannot be removed as an identity")
    finally:
        model.train(was_training)


def remove_blocks(container: nn.Module, dead: list[int]) -> None:
    for index in dead:
        container[index] = Skip()


def _check_remove_blocks(model: nn.Module, edit: dict) -> tuple[nn.Module, list[int]]:
    path, container = edit_module(model, edit, "container", (nn.ModuleList, nn.Sequential))
    indices = edit.get("indices")
    n = len(container)
    if (not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
            or any(not 0 <= i < n for i in indices) or len(set(indices)) != len(indices) or len(indices) >= n):
        raise UserError(f"structural edit {short(edit)}: indices must be distinct block indices of {path!r} in "
                        f"[0, {n}), leaving at least one block")
    return container, indices


def _apply_remove_blocks(model: nn.Module, checked, inputs) -> None:
    container, indices = checked
    remove_blocks(container, indices)


register_edit("remove_blocks", _check_remove_blocks, _apply_remove_blocks)
