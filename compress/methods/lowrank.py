"""The low-rank core every factorizing method shares (svd, trp, pela, afm): rank rules, the one
decision whether and at what rank to factorize a layer, which layers can be swapped at all, the
default exclusions, and the structural edit `factorize` with its replay and validation.

Methods import from here, never from a sibling method file.
"""
from __future__ import annotations

import functools
from typing import Annotated, Callable

import torch
from pydantic import Field, model_validator
from torch import nn

from .. import distributed, layers, linalg
from ..errors import RecipeError, UserError
from ..progress import iterate
from .base import (Decision, LayerProfile, Method, Stage, block_modules, edit_module, output_head, register_edit,
                   replace_module, select_targets, short)


DEFAULT_ENERGY = 0.9


class RankRule(Stage):
    """How a rank is chosen: at most one of `rank`, `ratio`, `energy` (default: energy 0.9), and
    optionally fixed ranks for named layers."""

    rank: int | None = Field(None, gt=0, le=1 << 24, description="fixed rank (capped at the layer's full rank)")
    ratio: float | None = Field(None, gt=0, le=1, description="fraction of the layer's parameters to keep")
    energy: float | None = Field(None, gt=0, le=1, description="fraction of sum(s^2) of singular values to keep")
    ranks: dict[str, Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict, description="fixed rank per layer name, overriding the rule for those layers "
        "(e.g. to match another run's ranks)")

    @model_validator(mode="after")
    def _one_rule(self):
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of rank, ratio, energy, not {' and '.join(given)}")
        return self

    def choose_rank(self, singular_values, rows: int, cols: int, name: str | None = None) -> int:
        full = min(rows, cols)
        if name in self.ranks:
            return min(self.ranks[name], full)
        if self.rank is not None:
            return min(self.rank, full)
        if self.ratio is not None:
            return min(linalg.rank_for_param_ratio(rows, cols, self.ratio), full)
        return linalg.energy_rank(singular_values, self.energy if self.energy is not None else DEFAULT_ENERGY)


def plan_factorization(method: Method, model: nn.Module, profile: dict[str, LayerProfile], rule: RankRule,
                       excluded: dict[str, str] | None = None, scheme: str | None = None) -> list[Decision]:
    """Per-layer weight-SVD factorization decisions for the targets of `rule` (svd, pela); a layer in
    `excluded` (name -> why) or one no module may swap stays dense with that reason."""
    blocked = {**unswappable_layers(model), **(excluded or {}), **method.budget_dense}
    scheme = scheme or getattr(rule, "scheme", "channel")
    decisions = []
    for name, layer in rank_rule_targets(model, rule, method):
        choose = functools.partial(rule.choose_rank, name=name)
        decisions.append(decide_factorization(method.name, name, layer, profile.get(name), scheme, choose,
                                              blocked.get(name)))
    return decisions


def rank_rule_targets(model: nn.Module, rule: RankRule, method: Method) -> list[tuple[str, nn.Module]]:
    """The stage's targets; a layer named in `ranks` that is not among them is a recipe error."""
    path = f"stages[{method.stage_index}]"
    targets = select_targets(model, rule.targets, f"{path}.targets", method.layer_types)
    names = {n for n, _ in targets}
    for name in rule.ranks:
        if name not in names:
            raise RecipeError(f"{path}.ranks.{name}: no targeted layer has this name")
    return targets


# parent types that read some children's `.weight` themselves instead of calling them (fused
# kernels, fast paths), so those children cannot be swapped for a factorized module
FUSED_CHILDREN: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
    nn.TransformerEncoderLayer: ("linear1", "linear2"),
    nn.TransformerDecoderLayer: ("linear1", "linear2"),
}


def unswappable_layers(model: nn.Module) -> dict[str, str]:
    """{layer name: why it must stay} for the layers whose weight a parent in FUSED_CHILDREN reads
    directly (the reason every method gives when it leaves such a layer alone)."""
    found = {}
    for name, module in model.named_modules():
        for parent_type, children in FUSED_CHILDREN.items():
            if isinstance(module, parent_type):
                prefix = f"{name}." if name else ""
                found.update({prefix + child: f"its weight is read directly by {type(module).__name__} {name!r}; "
                              "replacing the layer would break it" for child in children})
    return found


def unfactorizable(method: str, layer: nn.Module, shapes: LayerProfile | None, blocked: str | None = None) -> str | None:
    """Why a layer cannot be factorized at all, or None when it can."""
    if blocked:
        return blocked
    if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.sparse):
        return "embedding with max_norm or sparse gradients is not factorized"
    if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.Embedding)):
        return f"{method} factorizes Linear, Conv2d and Embedding layers only"
    if shapes is None:
        return "layer did not run in the forward pass"
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:
        return f"grouped convolution (groups={layer.groups}) is not factorized"
    return None


def decide_factorization(method: str, name: str, layer: nn.Module, shapes: LayerProfile | None, conv_scheme: str,
                         choose_rank: Callable, blocked: str | None = None, spectrum: torch.Tensor | None = None,
                         bias: bool | None = None) -> Decision:
    """Whether and at what rank to factorize one layer, the one decision every factorizing method
    makes. `choose_rank(spectrum, rows, cols)` picks the rank from `spectrum`: the weight's singular
    values by default, or what a data-aware method ranks by (afm: the square roots of its output
    covariance's eigenvalues, whose squares are the energy). A rank that would not reduce MACs (for
    an Embedding, parameters) leaves the layer dense, with the break-even rank in the reason. `bias`
    as in layers.empty_factorized."""
    kind = type(layer).__name__
    weight_shape = list(layer.weight.shape)
    params = sum(p.numel() for p in layer.parameters())

    def keep(reason: str, macs: int = 0, **extra) -> Decision:
        return Decision(name, method, kind, "keep", weight_shape, params, macs, params, macs, reason=reason, **extra)

    reason = unfactorizable(method, layer, shapes, blocked)
    known = shapes is not None and isinstance(layer, (nn.Linear, nn.Conv2d, nn.Embedding))
    dense = layers.dense_cost(layer, shapes.out_shape) if known else layers.LayerCost(params, 0)
    if reason:
        return keep(reason, dense.macs)
    scheme = conv_scheme if isinstance(layer, nn.Conv2d) else None
    rows, cols = layers.matrix_shape(layer, scheme or "channel")
    s = linalg.singular_values(layers.layer_matrix(layer, scheme or "channel")) if spectrum is None else spectrum
    full = min(rows, cols, s.numel())
    rank = min(choose_rank(s, rows, cols), full)
    after = layers.factorized_cost(layer, rank, scheme or "channel", shapes.in_shape, shapes.out_shape, bias)
    info = dict(rank=rank, full_rank=full, scheme=scheme, energy=round(linalg.energy_kept(s, rank), 6))
    if isinstance(layer, nn.Embedding):  # a lookup costs no MACs: a table pays off in parameters
        if after.params >= dense.params:
            return keep(f"rank {rank} would not reduce parameters ({after.params} >= {dense.params})", 0, **info)
    elif after.macs >= dense.macs:
        limit = _breakeven_rank(layer, scheme or "channel", shapes, dense.macs)
        hint = f"factorizing pays off only below rank {limit}" if limit > 1 else "factorizing never pays off here"
        return keep(f"rank {rank} would not reduce MACs ({after.macs} >= {dense.macs}); {hint}", dense.macs, **info)
    module = layers.empty_factorized(layer, rank, scheme or "channel", bias)
    factor_shapes = [list(module.first.weight.shape), list(module.second.weight.shape)]
    return Decision(name, method, kind, "factorize", weight_shape, params, dense.macs, after.params, after.macs,
                    factor_shapes=factor_shapes, **info)


def _breakeven_rank(layer, scheme, shapes, dense_macs) -> int:
    """The smallest rank at which the factorization costs at least as many MACs as the dense layer."""
    rank = 1
    while layers.factorized_cost(layer, rank, scheme, shapes.in_shape, shapes.out_shape).macs < dense_macs:
        rank += 1
    return rank


def factorize_planned(model: nn.Module, decisions: list[Decision]) -> None:
    """Replace every layer planned as `factorize` by its truncated-SVD factorization."""
    for d in decisions:
        if d.action == "factorize":
            layer = model.get_submodule(d.name)
            replace_module(model, d.name, layers.factorize(layer, d.rank, d.scheme or "channel"))


def factorize_edits(decisions: list[Decision], bias: bool | None = None) -> list[dict]:
    """The `factorize` edits of the decisions that factorize (with `bias` when the factors carry one
    the original layer did not have)."""
    extra = {} if bias is None else {"bias": bias}
    return [{"op": "factorize", "name": d.name, "rank": d.rank, "scheme": d.scheme or "channel", **extra}
            for d in decisions if d.action == "factorize"]


def head_exclusion(model: nn.Module, method: str) -> dict[str, str]:
    """{output head: why}: the authors of trp and pela leave the last Linear dense."""
    head = output_head(model)
    return {head: f"{method.upper()} default: the output head (last Linear) stays dense"} if head else {}


def _check_factorize(model: nn.Module, edit: dict) -> tuple[str, nn.Module, int, str, bool | None]:
    name, layer = edit_module(model, edit, "name", (nn.Linear, nn.Conv2d, nn.Embedding))
    scheme = edit.get("scheme", "channel")
    if scheme not in layers.SCHEMES:
        raise UserError(f"structural edit {short(edit)}: scheme must be one of {', '.join(layers.SCHEMES)}")
    if edit.get("bias") is not None and not isinstance(edit.get("bias"), bool):
        raise UserError(f"structural edit {short(edit)}: bias must be true, false or absent")
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise UserError(f"structural edit {short(edit)}: {name!r} is a grouped convolution, which is never factorized")
    rows, cols = layers.matrix_shape(layer, scheme)
    rank = edit.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(rows, cols):
        raise UserError(f"structural edit {short(edit)}: rank must be an integer from 1 to {min(rows, cols)} "
                        f"(the full rank of {name!r})")
    return name, layer, rank, scheme, edit.get("bias")


def _apply_factorize(model: nn.Module, checked, inputs) -> None:
    name, layer, rank, scheme, bias = checked
    replace_module(model, name, layers.empty_factorized(layer, rank, scheme, bias))


register_edit("factorize", _check_factorize, _apply_factorize)




# ---- feature mimicking (docs/methods.md section 4): factors from the outputs' principal subspace ----

def output_features(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """A layer's outputs with the feature axis last: Conv2d (B, N, H, W) -> (B, H, W, N)."""
    return output.movedim(1, -1) if isinstance(module, nn.Conv2d) else output


def from_inputs(module: nn.Module) -> bool:
    """Whether a layer's output moments are cheaper to derive from its inputs: a Linear no wider
    at its input than at its output (and so for a shared input, e.g. query/key/value)."""
    return isinstance(module, nn.Linear) and module.in_features <= module.out_features


class _StopForward(Exception):
    """Raised by a hook to end a calibration forward pass once every layer it needs has run."""


@torch.no_grad()
def run_hooked(model: nn.Module, hooks: list, batches) -> None:
    """Every batch of `batches` through `model` in eval mode for what `hooks` record; then the hooks
    are removed and the model's mode restored, whatever happens."""
    was_training = model.training
    try:
        model.eval()
        for batch in batches:
            device = next(model.parameters()).device
            model(*(t.to(device) for t in batch))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def execution_order(model: nn.Module, names: list[str], batch: tuple) -> list[str]:
    """`names` in the order a forward pass on `batch` first runs them (those that never run last)."""
    order: list[str] = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, name=n: order.append(name) if name not in order else None) for n in names]
    run_hooked(model, hooks, [batch])
    return order + [n for n in names if n not in order]


def sequential_groups(model: nn.Module, names: list[str], batch: tuple, mode: str) -> list[list[str]]:
    """The order in which `sequential` afm calibrates and compresses layers: one layer at a time
    (`layers`), or one block at a time (`blocks`: the layers inside each block of base.block_modules
    together, every other layer on its own), each group in execution order."""
    order = execution_order(model, names, batch)
    if mode == "layers":
        return [[n] for n in order]
    blocks = block_modules(model)
    groups: list[list[str]] = []
    keys: list[str] = []
    for name in order:
        key = next((b for b in blocks if name.startswith(b + ".")), name)
        if keys and keys[-1] == key:
            groups[-1].append(name)
        else:
            groups.append([name])
            keys.append(key)
    return groups


@torch.no_grad()
def collect_moments(model: nn.Module, names: list[str], batches, progress: bool = False,
                    desc: str = "calibrate", derive: bool = True, exact: bool = False,
                    stop_after: str | None = None) -> dict[str, linalg.OutputMoments | linalg.LinearOutputMoments]:
    """Streaming output moments of the named layers over every calibration batch, in one pass.

    A Linear whose input is no wider than its output accumulates its *input* moments instead (its
    output moments follow exactly, see linalg.LinearOutputMoments), and Linears that read the very
    same input tensor in a forward pass share one accumulator; every other layer accumulates its
    outputs. Under torchrun each process calibrates its share of the batches and the sums are
    all-reduced, so every process ends with the statistics of all the data. `derive=False, exact=True`
    is the slow reference path (every layer's outputs, float64 products), kept for measuring against
    (benchmarks/scale.py). With `stop_after`, each forward pass ends once that layer has run (the
    last of `names` to run): what comes after it is not needed."""
    modules = {name: model.get_submodule(name) for name in names}
    hooks = _MomentHooks(modules, derive, exact)
    if stop_after is not None:  # registered last, so the layer's own statistics are taken first
        def stop(mod, args, output):
            raise _StopForward

        hooks.handles.append(model.get_submodule(stop_after).register_forward_hook(stop))
    was_training = model.training
    model.eval()
    rank, processes = distributed.world()
    total = getattr(batches, "total", None)
    # under torchrun each process takes every `processes`-th batch and the sums are added up after;
    # with fewer batches than processes every process takes them all (and nothing is added up)
    split = processes > 1 and total is not None and total >= processes
    try:
        for i, batch in enumerate(iterate(batches(), total, desc, "batch", enabled=progress)):
            if split and i % processes != rank:
                continue
            device = next(model.parameters()).device
            try:
                model(*(t.to(device) for t in batch))
            except _StopForward:
                pass
            if hooks.first_batch:
                hooks.decide_sharing()
    finally:
        hooks.remove()
        model.train(was_training)
    if split:
        _sum_over_processes([hooks.moments[n] for n in sorted(hooks.moments)]
                            + [hooks.inputs[n] for n in sorted(hooks.inputs)])
    moments = hooks.moments
    for name, source in hooks.owner.items():
        layer = modules[name]
        moments[name] = linalg.LinearOutputMoments(hooks.inputs[source], layer.weight, layer.bias)
    return moments


class _MomentHooks:
    """The forward hooks collect_moments accumulates with: a Linear that derives its output moments
    from its inputs (`from_inputs`) accumulates its input, every other layer its output.

    On the first batch every such Linear accumulates its own inputs and records the tensors it was
    called on (kept alive, so their ids stay unique); after it, a layer called on exactly the same
    tensors as an earlier one (the q, k, v projections of one input) shares that layer's
    accumulator from then on. A layer called twice per forward shares only with one called on the
    same two tensors."""

    def __init__(self, modules: dict[str, nn.Module], derive: bool, exact: bool):
        self.moments: dict[str, linalg.OutputMoments] = {}
        self.inputs: dict[str, linalg.OutputMoments] = {}  # accumulator owner -> input moments
        self.owner: dict[str, str] = {}  # layer -> the layer whose input accumulator it shares
        self.calls: dict[str, list[torch.Tensor]] = {}
        self.first_batch = True
        self.exact = exact
        self.handles = []
        for name, module in modules.items():
            if derive and from_inputs(module):
                self.handles.append(module.register_forward_pre_hook(functools.partial(self._input, name)))
            else:
                self.handles.append(module.register_forward_hook(functools.partial(self._output, name)))

    def _input(self, name: str, module: nn.Module, args) -> None:
        x = args[0]
        if self.first_batch:
            self.calls.setdefault(name, []).append(x)
        elif self.owner.setdefault(name, name) != name:
            return
        self.inputs.setdefault(name, linalg.OutputMoments(x.shape[-1])).update(x, self.exact)

    def _output(self, name: str, module: nn.Module, args, output) -> None:
        features = output_features(module, output)
        self.moments.setdefault(name, linalg.OutputMoments(features.shape[-1])).update(features, self.exact)

    def decide_sharing(self) -> None:
        by_inputs: dict[tuple[int, ...], str] = {}
        for name, tensors in self.calls.items():
            key = tuple(id(t) for t in tensors)
            self.owner[name] = by_inputs.setdefault(key, name)
            if self.owner[name] != name:
                del self.inputs[name]  # identical to the owner's: the same tensors, the same products
        self.calls.clear()
        self.first_batch = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _sum_over_processes(accumulators: list[linalg.OutputMoments]) -> None:
    """Every process's sums added up (all-reduce), in the same order on every process."""
    for accumulator in accumulators:
        accumulator.to_raw()  # each process's sums are about its own shift
        accumulator.count, accumulator.total, accumulator.outer = distributed.sum_tensors(
            [torch.tensor(float(accumulator.count), dtype=torch.float64), accumulator.total, accumulator.outer])
        accumulator.count = int(accumulator.count)


def plan_mimicking(method: Method, model: nn.Module, profile: dict[str, LayerProfile], rule: RankRule,
                   moments: dict, excluded: dict[str, str] | None = None) -> list[Decision]:
    """Per-layer decisions ranked by each layer's output covariance spectrum (from `moments`)
    instead of its weight's; factors carry a bias (the output mean). Used by afm, and by pela with
    `init: afm`."""
    blocked = {**unswappable_layers(model), **(excluded or {}), **method.budget_dense}
    decisions = []
    for name, layer in rank_rule_targets(model, rule, method):
        spectrum, reason = None, blocked.get(name)
        if name in moments:
            eigenvalues, _ = linalg.principal_subspace(moments[name].covariance())
            spectrum = eigenvalues.clamp_min(0).sqrt()
        elif reason is None:
            reason = "layer did not run on the calibration data"
        decisions.append(decide_factorization(method.name, name, layer, profile.get(name), "channel",
                                              functools.partial(rule.choose_rank, name=name), reason,
                                              spectrum=spectrum, bias=True))
    return decisions


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
