"""The method lifecycle shared by every compression method, and target selection.

A method is one file: a pydantic `Stage` schema (its recipe parameters) and a `Method` subclass.
The pipeline drives every method the same way:

    calibrate(model, data)   statistics on calibration data, for methods that need them
    plan(model, profile)     -> per-layer decisions (data, printable; no weights change)
    prepare(model, plan)     structural change before fine-tuning (factorize, group map)
    start_finetune(model, teacher)  before the loop (hooks on student and frozen original); the
                             loop's length is in `finetune_steps` by then
    loss(model, batch, out)  extra loss terms during fine-tuning (regularizers, distillation)
    after_step(model, step, lr, optimizer)  hook after each optimizer step (projections, proximal steps)
    finalize(model)          structural change after fine-tuning (decompose, drop groups)
    post_finetune_epochs()   extra epochs on the finalized model, if the method wants them
    edits()                  the structural edits made, as data, to rebuild the model later

A structural edit kind (`factorize`, `prune_channels`, ...) is registered with `register_edit`
next to the method that makes it: how to check one against a freshly built model (before anything
is allocated: a checkpoint is someone else's file) and how to replay it. `checkpoint` only looks
them up, so a new structural method is one file plus one registry line.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterable, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import RecipeError, UserError
from ..schema import Strict

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv2d": nn.Conv2d,
    "Embedding": nn.Embedding,
}


class Targets(Strict):
    """Which layers a stage touches: module-name patterns and layer types.

    Patterns are shell globs over module names (`layer1.*.conv2`), or regular expressions when
    written `re:...`. A layer is targeted when its type is listed, it matches an `include`
    pattern and no `exclude` pattern. Every pattern must match at least one layer.
    """

    include: list[str] = Field(default_factory=lambda: ["*"], description="name globs or re:regex to include")
    exclude: list[str] = Field(default_factory=list, description="name globs or re:regex to leave alone")
    types: list[Literal["Linear", "Conv2d", "Embedding"]] | None = Field(
        None, description="layer types to consider (default: those the method handles)"
    )


class Stage(Strict):
    """Fields every stage has; each method's schema adds its own parameters."""

    method: str
    targets: Targets = Field(default_factory=Targets)


# What a decision may do to a layer (the report's readers know these): factorize into two factors,
# project onto a rank in place, prune channels or heads, refine an earlier stage's factors, keep it.
ACTIONS = ("factorize", "project", "prune", "refine", "keep")


@dataclass
class Decision:
    """What a method does to one layer, and what it costs before and after (per sample)."""

    name: str
    method: str
    layer_type: str
    action: str  # one of ACTIONS
    weight_shape: list[int]
    params_before: int
    macs_before: int
    params_after: int
    macs_after: int
    rank: int | None = None
    full_rank: int | None = None
    scheme: str | None = None
    energy: float | None = None
    factor_shapes: list[list[int]] | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row.update(row.pop("extra"))
        return {k: v for k, v in row.items() if v is not None}


@dataclass
class LayerProfile:
    """Per-sample input and output shapes of a layer, recorded from one forward pass."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


class Method:
    """Base class: a method that does nothing. Subclasses override what they need."""

    name: ClassVar[str]
    schema: ClassVar[type[Stage]]
    layer_types: ClassVar[tuple[str, ...]] = ("Linear", "Conv2d")  # targets.types when not given
    # methods whose factorized layers this one may continue training from (a chain, e.g. afm -> pela):
    # its decision for such a layer is `refine`, at the earlier stage's rank, and the factors are kept
    refines: ClassVar[tuple[str, ...]] = ()
    # what a budget may assume of the stage (the allocation capability itself: methods/allocation.py):
    # that per-op latencies price what it does, and that the model it builds can be measured before
    # fine-tuning (not so when it removes structure only after)
    latency_priced: ClassVar[bool] = False
    measurable_before_finetune: ClassVar[bool] = True

    def __init__(self, stage: Stage, stage_index: int):
        self.stage = stage
        self.stage_index = stage_index
        self.decisions: list[Decision] = []
        # layers earlier stages changed: name -> (stage index, decision); the pipeline sets it before plan
        self.earlier: dict[str, tuple[int, Decision]] = {}
        # a budget's allocation (budget.assign): layers it leaves dense, and what it predicted per layer
        self.budget_dense: dict[str, str] = {}
        self.budget_rows: dict[str, dict] = {}
        self.budget_inputs: dict | None = None  # statistics a method gathered for a budget, kept for a sweep
        self.output_kind = "logits"  # what the model returns (losses.KINDS); the pipeline sets it

    needs_calibration: ClassVar[bool] = False
    # the attributes `calibrate` sets: a sweep's later runs of the same stage on the same data get
    # them back instead of calibrating again (empty: calibrate every run)
    calibration_state: ClassVar[tuple[str, ...]] = ()

    def calibrate(self, model: nn.Module, batches: Callable[[], Iterable[tuple]], progress: bool = False) -> None:
        """Collect statistics on calibration data before planning (only if `needs_calibration`).
        `batches()` yields tuples of model inputs and may be called again (e.g. by `prepare`)."""

    def plan(self, model: nn.Module, profile: dict[str, LayerProfile]) -> list[Decision]:
        raise NotImplementedError

    def default_exclusions(self, model: nn.Module) -> dict[str, str]:
        """{layer: why} the method leaves dense by default (a budget never allocates them)."""
        return {}

    def counted_twice(self) -> tuple[int, int]:
        """(params, MACs) that this stage's last planned rows save twice over: a layer two of its
        rows shrink at once (group_envelope: a conv between two pruned channel groups). The plan's
        whole-model line subtracts it; 0 for methods whose rows never share a layer."""
        return 0, 0

    def prepare(self, model: nn.Module) -> None:
        """Structural change before fine-tuning, following `self.decisions`."""

    uses_teacher: ClassVar[bool] = False  # the loop runs the frozen original on every batch for it
    finetune_steps: int | None = None  # the optimizer steps of the fine-tuning, set before start_finetune

    def start_finetune(self, model: nn.Module, teacher: nn.Module | None) -> None:
        """Called once before the fine-tuning loop (e.g. to hook the student's and teacher's modules)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        """Extra named loss terms for this step (added to the task loss)."""
        return {}

    def after_step(self, model: nn.Module, step: int, lr: float, optimizer=None) -> None:
        """Called after every optimizer step, with the learning rate that step used and the
        optimizer (whose state a proximal step may have to reset)."""

    def finalize(self, model: nn.Module) -> None:
        """Structural change after fine-tuning."""

    def state_dict(self) -> dict[str, Any]:
        """What the method carries from step to step, for resuming a killed run (tensors, lists, numbers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def post_finetune_epochs(self) -> int:
        """Epochs of fine-tuning this method asks for after `finalize` (the same loop, no hooks)."""
        return 0

    def edits(self) -> list[dict[str, Any]]:
        """The structural edits this method made, as JSON-able data (see checkpoint.apply_edits)."""
        return []


def chain_refinements(method: Method, decisions: list[Decision]) -> list[Decision]:
    """`decisions` with each layer an earlier stage factorized, by a method `method` refines, turned
    into a `refine` decision: the earlier stage's rank and costs, its factors kept as the start. The
    row says so for people (`chain`) and as data (`refines`: the earlier stage's index and method)."""
    out = []
    for d in decisions:
        index, prior = method.earlier.get(d.name, (None, None))
        if prior is not None and prior.method in method.refines and prior.action == "factorize":
            chain = f"stages[{index}] {prior.method} -> stages[{method.stage_index}] {method.name}"
            d = replace(prior, method=method.name, action="refine", reason=None,
                        extra={**prior.extra, "chain": chain, "refines": {"stage": index, "method": prior.method}})
        out.append(d)
    return out


def block_modules(model: nn.Module) -> list[str]:
    """The model's blocks: each block of the first ModuleList with at least two blocks (Transformer
    layers), or else the top-level children that have parameters. PELA matches their outputs; afm's
    `sequential: blocks` calibrates one block at a time."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            return [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())]


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class PatternMatch:
    """The layers one pattern of a stage's `targets` matches."""

    key: str  # "include" or "exclude"
    index: int
    pattern: str
    layers: list[str]

    @property
    def label(self) -> str:
        return f"{self.key}[{self.index}]"


def pattern_matches(model: nn.Module, targets: Targets, path: str,
                    default_types: tuple[str, ...] = ("Linear", "Conv2d")) -> list[PatternMatch]:
    """What each pattern of `targets` matches among the layers of the listed types (or
    `default_types`), includes first. A pattern that matches nothing, or an invalid regex, is a
    recipe error naming its key path (`path` is where `targets` sits, e.g. `stages[0].targets`)."""
    type_names = targets.types or list(default_types)
    types = tuple(LAYER_TYPES[t] for t in type_names)
    names = [n for n, m in model.named_modules() if n and isinstance(m, types)]
    matches = []
    for key in ("include", "exclude"):
        for i, pattern in enumerate(getattr(targets, key)):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise RecipeError(f"{path}.{key}[{i}]: invalid regular expression {pattern!r}: {exc}") from None
            found = [n for n in names if _matches(pattern, n)]
            if not found:
                close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
                hint = f"; close layer names: {', '.join(close)}" if close else f"; layers of types {type_names}: {_preview(names)}"
                raise RecipeError(f"{path}.{key}[{i}]: pattern {pattern!r} matches no layer{hint}")
            matches.append(PatternMatch(key, i, pattern, found))
    return matches


def select_targets(model: nn.Module, targets: Targets, path: str,
                   default_types: tuple[str, ...] = ("Linear", "Conv2d")) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a stage's `targets` picks, in model order (see pattern_matches)."""
    matches = pattern_matches(model, targets, path, default_types)
    included = {n for m in matches if m.key == "include" for n in m.layers}
    excluded = {n for m in matches if m.key == "exclude" for n in m.layers}
    chosen = [(n, m) for n, m in model.named_modules() if n in included and n not in excluded]
    if included and not chosen:  # a stage that can change nothing is a mistake, not a silent success
        raise RecipeError(f"{path}.exclude: leaves none of the {len(included)} included layers "
                          f"({_preview(sorted(included))}); the stage would change nothing")
    return chosen


def _preview(names: list[str], limit: int = 6) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


@dataclass(frozen=True)
class EditKind:
    """How to replay one kind of structural edit: `check(model, edit)` validates the edit against
    the model (raising UserError, allocating nothing) and returns what `apply(model, checked, inputs)`
    needs; `inputs` is the checkpoint's input description (for edits that trace the model)."""

    op: str
    check: Callable[[nn.Module, dict], Any]
    apply: Callable[[nn.Module, Any, "list[dict] | None"], None]


EDITS: dict[str, EditKind] = {}


def register_edit(op: str, check: Callable[[nn.Module, dict], Any],
                  apply: Callable[[nn.Module, Any, "list[dict] | None"], None]) -> None:
    EDITS[op] = EditKind(op, check, apply)


def short(value: Any, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: for quoting someone else's data in a one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def edit_module(model: nn.Module, edit: dict, key: str, types: tuple[type, ...]) -> tuple[str, nn.Module]:
    """The layer an edit names under `key`, which must exist and be one of `types` (else UserError)."""
    name = edit.get(key)
    if not isinstance(name, str) or not name:
        raise UserError(f"structural edit {short(edit)}: {key!r} must name a layer")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise UserError(f"structural edit {short(edit)}: the model built by the factory has no layer {name!r}") from None
    if not isinstance(module, types):
        raise UserError(f"structural edit {short(edit)}: {name!r} is a {type(module).__name__}, "
                        f"not one of {', '.join(t.__name__ for t in types)}")
    return name, module


def output_head(model: nn.Module) -> str | None:
    """The name of the model's last Linear (its output head), which the methods' defaults leave dense."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
