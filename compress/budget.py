"""`budget:` -- the user states what they pay for; the tool spends it across layers.

A recipe with a `budget:` section (one target: `speedup`, `latency_ms`, `params`, `macs` or
`onnx_bytes`) lets every svd, afm or pela stage whose rank rule is left out be *allocated*: each
of its layers gets one candidate -- dense, or a rank from a grid -- so that the model meets the
target with the least predicted damage. A group_envelope stage with `keep: auto` is allocated the same way, per coupled
channel group: keep all, or k channels (heads) on a grid; its error is what the final projection
to k drops (the smallest channel norms squared), its cost counts every parameter of the group's
channels, and where two pruned groups shrink the same parameter the total is made exact
(exact_envelope). Stages with an explicit rule stay as they are and count toward the target.

Cost of a candidate: params and MACs exactly (layers.factorized_cost); latency measured alone in
ONNX Runtime at the layer's real input shape at `budget.batch` (opcost.py, cached on disk); ONNX
bytes as a layer's parameters at 4 bytes each, or 1 per weight element where the int8 model
quantizes the layer. Latency and bytes are additive: the original's whole-model figure minus what
each changed layer saves. What that misses (a factorized layer is two ops, each with its own fixed
overhead; fusions; initializer and scale bytes) is checked: after the model is built, before
fine-tuning, it is exported and measured beside the original; when the measurement is more than
5 % (bytes: 1 %) off the prediction and its 95 % interval does not hold the prediction either, the
miss is spread over the factorized layers as a per-op overhead and the allocation is redone
(`budget.rounds`). When the recipe quantizes, every cost is the int8 model's (the original's
latency and size as ONNX Runtime's quantization of it would ship; each op measured quantized when
the recipe's settings quantize it), while the ratio stays against the float original, as in the
report.

Error of a candidate, per layer, on the calibration data:
- afm (and pela `init: afm`): the eigenvalues of the output covariance the rank drops -- exactly
  the expected squared error of afm's reconstruction of the layer's outputs;
- svd and pela: the data-aware error of the truncated weight on the layer's inputs,
  E||(W - W_r) x||^2 = sum_{i > r} s_i^2 v_i^T M v_i with M the inputs' second moment (Linear, and
  Conv2d through its input patches, in the spatial scheme with W_r rebuilt per rank);
- group_envelope: the n - k smallest channel norms squared, what the final projection to k drops.
Errors of different layers are made comparable by how much each moves the model's output
(`sensitivity: output`, the default): one calibration pass per layer with only that layer
replaced at a probe rank measures E||f(x) - f_l(x)||^2, and the layer's curve is scaled to it.
`sensitivity: gradient` weights each error by the second moment of the output's gradient at the
layer instead (first order, one backward pass per batch for all layers); `sensitivity: layer`
scales each curve by the layer's own output energy (relative error, no extra passes).

Solver: multiple-choice knapsack (knapsack.py), exact on a discretized cost axis, least total
predicted output error within the budget.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from . import layers, linalg
from .errors import RecipeError
from .knapsack import smallest_cost, solve
from .methods.base import Decision, Method, Strict, replace_module
from .methods.group_envelope import overcounted, slice_costs, unit_costs

ALLOCATABLE = ("svd", "afm", "pela")  # ranks; and group_envelope's kept channels with keep: auto
ENVELOPE = "group_envelope"
RULE_KEYS = ("rank", "ratio", "energy", "ranks", "rho")
TARGETS = ("speedup", "latency_ms", "params", "macs", "onnx_bytes")
TOLERANCE = {"speedup": 0.05, "latency_ms": 0.05,  # a latency within 5 % of the prediction needs no other round
             "onnx_bytes": 0.01, "params": 0.0, "macs": 0.0}  # a size is no noisier than its estimate
MAX_CANDIDATES = 24
AUTO_PROBES = 3  # probes per layer by default ...
PROBE_PASSES = 120  # ... unless that makes more calibration passes than this (102 layers: 1 probe each)


class BudgetSection(Strict):
    """What the compressed model may cost: exactly one target."""

    speedup: float | None = Field(None, gt=1, description="ORT p50 latency ratio original/compressed at `batch`")
    latency_ms: float | None = Field(None, gt=0, description="ORT p50 latency of the compressed model at `batch`")
    params: float | None = Field(None, gt=1, description="parameter ratio original/compressed (2: half the parameters)")
    macs: float | None = Field(None, gt=1, description="MAC ratio original/compressed per sample")
    onnx_bytes: float | None = Field(None, gt=1, description="file size ratio of the original's ONNX to the shipped "
                                     "model.onnx (int8 when the recipe quantizes)")
    batch: int | None = Field(None, gt=0, le=1 << 20, description="batch size of the latency targets (default: the largest "
                              "bench.batch_sizes)")
    rounds: int = Field(3, ge=1, le=10, description="latency targets: allocations at most, each checked by "
                        "measuring the whole model before fine-tuning")
    probes: int | Literal["auto"] = Field(
        "auto", description="sensitivity: output: ranks per layer at which the model's output error is measured "
        "(spread over the layer's candidates; the others are interpolated): one calibration pass each; auto = "
        f"{AUTO_PROBES} per layer, fewer when that would pass more than {PROBE_PASSES} times in all (at least 1)")
    probe_samples: int = Field(256, ge=1, le=65536, description="calibration samples each probe pass runs (whole "
                               "batches, at least this many)")
    sensitivity: Literal["output", "gradient", "layer"] = Field(
        "output", description="how layer errors are made comparable: output = scaled by calibration passes that "
        "measure the model's output error with the layer truncated (`probes` per layer); gradient = weighted by "
        "the output's gradients at the layer (first order, one backward pass per batch for all layers); layer = "
        "relative to the layer's own output energy")

    @model_validator(mode="after")
    def _probe_range(self):
        if self.probes != "auto" and not 1 <= self.probes <= MAX_CANDIDATES:
            raise ValueError(f"probes must be auto or between 1 and {MAX_CANDIDATES}")
        return self

    @model_validator(mode="after")
    def _one_target(self):
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(TARGETS)}"
                             + (f", not {' and '.join(given)}" if given else ""))
        return self

    @property
    def target(self) -> str:
        return next(k for k in TARGETS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.target)

    @property
    def in_latency(self) -> bool:
        return self.target in ("speedup", "latency_ms")

    @property
    def verified(self) -> bool:
        """Whether the built model is measured, and the allocation corrected, before fine-tuning
        (the targets whose per-layer costs are estimates: latency and file size)."""
        return self.target in ("speedup", "latency_ms", "onnx_bytes")


def allocated(method: Method) -> bool:
    """Whether a budget allocates this stage: an svd, afm or pela stage without a rank rule (its
    ranks), a group_envelope stage with keep: auto (its kept channels)."""
    if method.name == ENVELOPE:
        return getattr(method.stage, "keep", None) == "auto"
    return method.name in ALLOCATABLE and not (set(RULE_KEYS) & method.stage.model_fields_set)


def check(budget: BudgetSection, methods: list[Method]) -> None:
    """Recipe-level checks: something to allocate, and nothing a latency table cannot price."""
    if not any(allocated(m) for m in methods):
        raise RecipeError("budget: no stage to allocate; leave out the rank rule (rank, ratio, energy, ranks, rho) "
                          "of an svd, afm or pela stage, or set keep: auto on a group_envelope stage")
    if budget.in_latency:
        for m in methods:
            if m.name not in ALLOCATABLE:
                raise RecipeError(f"budget.{budget.target}: stages[{m.stage_index}] ({m.name}) changes the model in a "
                                  "way the latency table cannot price; use a params, macs or onnx_bytes budget with it")


@dataclass
class Candidate:
    rank: int | None  # None: dense; the rank, or for group_envelope the channels (heads) kept
    cost: float
    error: float  # predicted output error


@dataclass
class LayerChoice:
    method: Method
    name: str
    scheme: str
    candidates: list[Candidate]
    chosen: int = 0
    energy: float = 0.0  # the layer's error at rank 0: its output energy (afm: variance)
    group: dict | None = None  # group_envelope: the layer's channel group (channel_groups)


@dataclass
class Allocation:
    """The budget's outcome, for the plan and the report."""

    target: str
    value: float
    batch: int | None
    layers: list[LayerChoice]
    fixed: float  # the cost of everything not allocated
    reference: float  # the original's cost (params, MACs or ms)
    predicted: float  # the compressed model's predicted cost
    unpriced: list = field(default_factory=list)  # (method, layer): no candidate saves anything, stays dense
    rounds: int = 1
    measured: float | None = None
    newly_measured: int | None = None
    history: list[dict] = field(default_factory=list)

    def ratio(self, cost: float) -> float:
        return self.reference / cost if cost > 0 else float("inf")

    def summary(self) -> dict:
        pred = self.predicted if self.target == "latency_ms" else self.ratio(self.predicted)
        out = {"target": {self.target: self.value, **({"batch": self.batch} if self.batch else {})},
               "predicted": round(pred, 4), "rounds": self.rounds,
               "allocated_layers": len(self.layers),
               "dense_layers": sum(1 for c in self.layers if c.candidates[c.chosen].rank is None)}
        if self.history:
            out["history"] = self.history
        return out


# ---------------------------------------------------------------- statistics and errors

def input_moments(model: nn.Module, names: list[str], batches) -> dict[str, linalg.OutputMoments]:
    """Uncentered second moments of each named layer's inputs (a Conv2d's input patches), one pass."""
    from .methods.lowrank import run_hooked

    moments: dict[str, linalg.OutputMoments] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):  # its inputs are indices: the weight spectrum stands in
            continue

        def hook(mod, args, name=name):
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                x = nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride).transpose(1, 2)
            moments.setdefault(name, linalg.OutputMoments(x.shape[-1])).update(x)

        hooks.append(module.register_forward_pre_hook(hook))
    run_hooked(model, hooks, batches())
    return moments


@torch.no_grad()
def weight_error_curve(layer: nn.Module, scheme: str, moments: linalg.OutputMoments | None,
                       ranks: list[int], gradient: torch.Tensor | None = None) -> dict[int, float]:
    """{rank: expected squared error of the rank-r truncated SVD of the weight on the layer's inputs}
    (summed over the output features, per position). With the inputs' second moment M (a Conv2d's
    input patches): E||(W - W_r) x||^2 = tr(D M D^T), D = W - W_r in the channel view; in the channel
    scheme (and for a Linear) that is sum_{i > r} s_i^2 v_i^T M v_i in closed form, in the spatial
    scheme W_r is rebuilt per rank. Without moments (an Embedding, whose inputs are indices): the
    weight spectrum per lookup, every row looked up equally often (for a table, each singular
    direction's output side is v_i, a row of the table's space).

    With `gradient` G (second moment of the model output's gradient at this layer's output, see
    output_gradient_moments) the error is weighted by it: tr(G D M D^T), the first-order estimate of
    the model's output error (gradients and inputs taken as independent, K-FAC's approximation)."""
    matrix = layers.layer_matrix(layer, scheme).double().cpu()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if moments is None:
        table = isinstance(layer, nn.Embedding)
        outputs = vh if table else u.T  # row i: the output-side direction of the i-th term
        per = s.pow(2) * (torch.einsum("ij,jk,ik->i", outputs, gradient, outputs) if gradient is not None else 1.0)
        per = per / matrix.shape[0] if table else per
        tail = torch.flip(torch.cumsum(torch.flip(per, [0]), 0), [0])
        return {r: float(tail[r]) if r < len(tail) else 0.0 for r in ranks}
    second = moments.second_moment()  # E[x x^T]
    if scheme == "channel" or not isinstance(layer, nn.Conv2d):
        if gradient is None:
            per = s.pow(2) * torch.einsum("ij,jk,ik->i", vh, second, vh)
            tail = torch.flip(torch.cumsum(torch.flip(per, [0]), 0), [0])
            return {r: max(0.0, float(tail[r])) if r < len(tail) else 0.0 for r in ranks}
        # sum over i, j >= r of s_i s_j (u_i^T G u_j)(v_j^T M v_i): a suffix sum over both indices
        terms = torch.outer(s, s) * (u.T @ gradient @ u) * (vh @ second @ vh.T)
        suffix = _suffix_sums(terms)
        return {r: max(0.0, float(suffix[r, r])) if r < len(s) else 0.0 for r in ranks}
    n, c, kh, kw = layer.weight.shape
    errors = {}
    for r in ranks:
        residual = (u[:, r:] * s[r:]) @ vh[r:]  # (C kh, N kw): what the truncation drops
        d = residual.reshape(c, kh, n, kw).permute(2, 0, 1, 3).reshape(n, c * kh * kw)
        weighted = gradient @ d if gradient is not None else d
        errors[r] = max(0.0, float(((weighted @ second) * d).sum()))
    return errors


def _suffix_sums(terms: torch.Tensor) -> torch.Tensor:
    """out[i, j] = sum of terms[i:, j:]."""
    flipped = torch.flip(terms, [0, 1])
    return torch.flip(flipped.cumsum(0).cumsum(1), [0, 1])


@torch.no_grad()
def afm_error_curve(moments, ranks: list[int], gradient: torch.Tensor | None = None) -> dict[int, float]:
    """{rank: afm's reconstruction error}: the output covariance's eigenvalues beyond the rank,
    sum_{i > r} lambda_i, or with `gradient` G its first-order effect on the model's output,
    sum_{i > r} lambda_i u_i^T G u_i."""
    eigenvalues, vectors = linalg.principal_subspace(moments.covariance())
    per = eigenvalues.clamp_min(0).double()
    if gradient is not None:
        per = per * torch.einsum("ji,jk,ki->i", vectors.double(), gradient, vectors.double())
    tail = torch.flip(torch.cumsum(torch.flip(per, [0]), 0), [0])
    return {r: max(0.0, float(tail[r])) if r < len(tail) else 0.0 for r in ranks}


def output_gradient_moments(model: nn.Module, names: list[str], batches, samples: int) -> dict[str, torch.Tensor]:
    """{layer: E[g g^T]} with g the gradient of r . f(x) at the layer's output, r ~ N(0, I) per
    output element, summed over the layer's positions and averaged over samples: then
    E||J delta||^2 ~ tr(G Cov(delta)) for a perturbation delta of the layer's outputs (Hutchinson).
    One forward and one backward pass per calibration batch, for all layers at once."""
    from .methods.lowrank import output_features
    from .metrics import primary_output

    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        def hook(mod, args, output, name=name):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                def grad_hook(grad, mod=mod):
                    g = output_features(mod, grad).reshape(-1, grad.shape[1 if isinstance(mod, nn.Conv2d) else -1])
                    g = g.detach().double().cpu()
                    sums[name] = sums.get(name, 0) + g.T @ g
                output.register_hook(grad_hook)

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    count = 0
    generator = torch.Generator().manual_seed(0)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in _take(batches, samples):
                device = params[0].device
                out = primary_output(model(*(t.to(device) for t in batch)))
                r = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
                model.zero_grad(set_to_none=True)
                (out * r).sum().backward()
                count += out.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: total / max(1, count) for name, total in sums.items()}


def rank_grid(full: int, fits: Callable[[int], bool]) -> list[int]:
    """Candidate ranks among those that `fits` (that save what the budget counts): all of them when
    there are at most MAX_CANDIDATES; else 1, 2, 4 and the multiples of 4 or of 8 (narrow layers:
    a step of 8 would leave a handful of choices); on wide layers, where even the multiples of 8 are
    too many, multiples of 8 spaced geometrically (as fine at rank 16 as at rank 1000, relatively)."""
    fitting = [r for r in range(1, full) if fits(r)]
    if len(fitting) <= MAX_CANDIDATES:
        return fitting
    small = [r for r in (1, 2, 4) if r in fitting]
    for step in (4, 8):
        multiples = [r for r in fitting if r % step == 0 and r > 4]
        if len(small) + len(multiples) <= MAX_CANDIDATES:
            return small + multiples
    count = MAX_CANDIDATES - len(small)
    low, high = multiples[0], multiples[-1]
    targets = [low * (high / low) ** (i / (count - 1)) for i in range(count)]
    return small + sorted({min(multiples, key=lambda r: abs(r - t)) for t in targets})


# ---------------------------------------------------------------- allocation

def _replacement(method: Method, layer: nn.Module, rank: int, scheme: str, moments) -> nn.Module:
    from .methods.lowrank import mimic

    if _uses_afm(method):
        return mimic(layer, moments, rank)
    return layers.factorize(layer, rank, scheme)


@contextlib.contextmanager
def _applied(model: nn.Module, choice: LayerChoice, rank: int):
    """The model with one layer at one candidate, restored afterwards: the layer replaced by its
    factorization, or (group_envelope) all but its `rank` largest channels zeroed."""
    if choice.group is not None:
        from .methods.group_envelope import channel_norms, scale_channels

        slices, n = choice.group["slices"], choice.group["channels"]
        saved = {id(s.param): (s.param, s.param.detach().clone()) for s in slices}
        keep = torch.zeros(n, dtype=torch.float64)
        keep[torch.argsort(channel_norms(slices, n), descending=True)[:rank]] = 1.0
        scale_channels(slices, keep)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, data in saved.values():
                    param.copy_(data)
        return
    layer = model.get_submodule(choice.name)
    moments = getattr(choice.method, "moments", {}).get(choice.name)
    replace_module(model, choice.name, _replacement(choice.method, layer, rank, choice.scheme, moments))
    try:
        yield
    finally:
        replace_module(model, choice.name, layer)


def _uses_afm(method: Method) -> bool:
    return method.name == "afm" or getattr(method.stage, "init", "svd") == "afm"


@torch.no_grad()
def _output_error(model: nn.Module, batches, reference: list[torch.Tensor]) -> float:
    from .metrics import primary_output

    total, count = 0.0, 0
    for batch, ref in zip(batches(), reference):
        out = primary_output(model(*batch)).double()
        total += float(((out - ref) ** 2).reshape(out.shape[0], -1).sum(1).sum())
        count += out.shape[0]
    return total / max(1, count)


def plan_allocation(budget: BudgetSection, methods: list[Method], model: nn.Module, profile: dict,
                    batches, costs: Callable | None, reference_cost: float, fixed_savings: float,
                    skip: set[str] = frozenset(), progress: bool = False,
                    base_cost: float | None = None,
                    quantized: Callable[[str, nn.Module], bool] = lambda name, layer: False) -> Allocation:
    """Candidates, costs, errors and the knapsack's choice for every allocatable layer.

    `costs(name, layer, rank, scheme, in_shape) -> ms or bytes` prices latency and file size
    targets; `reference_cost` is the original's params, MACs, latency or bytes (what the target's
    ratio is against); `base_cost` the original as it would ship (int8 when the recipe quantizes;
    default: the reference); `fixed_savings` what the stages with explicit rules save;
    `quantized(name, layer)` whether the int8 model quantizes a layer (its weights take a byte)."""
    from .methods.lowrank import rank_rule_targets, unfactorizable, unswappable_layers
    from .progress import iterate

    target = budget.target
    choices: list[LayerChoice] = []
    unpriced: list[tuple[Method, str]] = []  # no rank of these would save anything: dense
    pending: list[tuple] = []  # (method, name, layer, scheme, ranks) of the layers with candidates
    envelope: list[LayerChoice] = []
    for method in [m for m in methods if allocated(m)]:
        if method.name == ENVELOPE:
            envelope += envelope_choices(method, model, skip, unpriced)
            continue
        excluded = {**unswappable_layers(model), **method.default_exclusions(model)}
        scheme = getattr(method.stage, "scheme", "channel")
        names = [(n, l) for n, l in rank_rule_targets(model, method.stage, method)
                 if n not in skip and not unfactorizable(method.name, l, profile.get(n), excluded.get(n))]
        if not _uses_afm(method) and method.budget_inputs is None:  # a sweep's later runs have them
            method.budget_inputs = input_moments(model, [n for n, _ in names], batches)
        for name, layer in names:
            shapes = profile[name]
            s = scheme if isinstance(layer, nn.Conv2d) else "channel"
            dense = layers.dense_cost(layer, shapes.out_shape)
            full = min(layers.matrix_shape(layer, s))

            def saves(rank, layer=layer, s=s, shapes=shapes, dense=dense):
                after = layers.factorized_cost(layer, rank, s, shapes.in_shape, shapes.out_shape)
                kind = "params" if target == "params" or isinstance(layer, nn.Embedding) else "macs"
                return getattr(after, kind) < getattr(dense, kind)

            ranks = rank_grid(full, saves)
            if not ranks:
                unpriced.append((method, name))
                continue
            pending.append((method, name, layer, s, ranks))
    gradients = (output_gradient_moments(model, [p[1] for p in pending], batches, budget.probe_samples)
                 if budget.sensitivity == "gradient" and pending else {})
    for method, name, layer, s, ranks in pending:
        weight = gradients.get(name)
        if _uses_afm(method):  # rank 0 drops everything: the layer's output energy
            curve = afm_error_curve(method.moments[name], [0, *ranks], weight)
        else:
            curve = weight_error_curve(layer, s, method.budget_inputs.get(name), [0, *ranks], weight)
        energy = curve.pop(0)
        choices.append(LayerChoice(method, name, s, [Candidate(None, 0.0, 0.0)] +
                                   [Candidate(r, 0.0, curve[r]) for r in ranks], energy=energy))
    choices += envelope
    if not choices:
        raise RecipeError("budget: the stages it allocates have no layer whose factorization (or pruning) would save "
                          "anything")
    units = unit_costs(model, profile, target, quantized) if envelope else {}
    # costs (latency: measured per op, cached)
    for choice in iterate(choices, len(choices), "price candidates", "layer", enabled=progress and budget.in_latency):
        if choice.group is not None:
            for c in choice.candidates:
                c.cost = envelope_cost(choice, c.rank, units)
            continue
        layer = model.get_submodule(choice.name)
        shapes = profile[choice.name]
        for c in choice.candidates:
            if target in ("params", "macs", "onnx_bytes"):
                cost = (layers.dense_cost(layer, shapes.out_shape) if c.rank is None else
                        layers.factorized_cost(layer, c.rank, choice.scheme, shapes.in_shape, shapes.out_shape))
                c.cost = (layer_bytes(layer, cost.params, quantized(choice.name, layer)) if target == "onnx_bytes"
                          else float(getattr(cost, target)))
            else:
                c.cost = costs(choice.name, layer, c.rank, choice.scheme,
                               (budget_batch(budget),) + tuple(shapes.in_shape))
    _scale_errors(budget, choices, model, batches, progress)
    dense_total = sum(c.candidates[0].cost for c in choices)
    base = reference_cost if base_cost is None else base_cost
    fixed = base - fixed_savings - dense_total  # everything the allocation does not touch
    allocation = Allocation(target, budget.value, budget_batch(budget) if budget.in_latency else None, choices,
                            fixed, reference_cost, reference_cost, unpriced=unpriced)
    solve_allocation(allocation)
    if envelope:
        exact_envelope(allocation, units)
    return allocation


def layer_bytes(layer: nn.Module, params: int, quantized: bool) -> float:
    """Bytes `params` parameters of (a candidate for) `layer` take in the ONNX file: 4 each, or 1
    per weight element where the int8 model quantizes the layer (its bias vector stays float)."""
    if not quantized:
        return 4.0 * params
    bias = (layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features if isinstance(layer, nn.Linear)
            else 0) if getattr(layer, "bias", None) is not None else 0
    return float(4 * bias + (params - bias))


# ---------------------------------------------------------------- group_envelope: kept channels

def envelope_choices(method: Method, model: nn.Module, skip: set[str], unpriced: list) -> list[LayerChoice]:
    """One choice per channel group (attention module) of a keep: auto group_envelope stage: keep
    all n, or k on a grid (multiples of the stage's round_to; every count for heads). A candidate's
    error is what the hard projection to k drops, the n - k smallest channel norms squared, scaled
    by its measured effect on the output like every other layer's (`_scale_errors`)."""
    from .methods.group_envelope import channel_norms

    out = []
    for root, info in method.channel_groups(model).items():
        n = info["channels"]
        if root in skip or info["reason"] or n < 2:
            if not info["reason"] and root not in skip:
                unpriced.append((method, root))
            continue
        step = 1 if info.get("layout") is not None else method.stage.round_to
        counts = list(range(step, n, step))
        if not counts:
            unpriced.append((method, root))
            continue
        if len(counts) > MAX_CANDIDATES:
            stride = -(-len(counts) // MAX_CANDIDATES)
            counts = counts[::-1][::stride][::-1]
        squares = torch.sort(channel_norms(info["slices"], n).pow(2)).values  # ascending
        dropped = torch.cumsum(squares, 0)  # dropped[i]: the i + 1 smallest
        candidates = [Candidate(None, 0.0, 0.0)] + [Candidate(k, 0.0, float(dropped[n - k - 1])) for k in counts]
        out.append(LayerChoice(method, root, "channels", candidates, energy=float(dropped[-1]), group=info))
    return out


def envelope_cost(choice: LayerChoice, kept: int | None, units: dict[int, float]) -> float:
    """The group's parameters' cost with `kept` of its n channels (None: all), as if no other group
    shrank (additive; exact_envelope corrects where two groups shrink the same parameter)."""
    fraction = 1.0 if kept is None else kept / choice.group["channels"]
    return sum(cost * share * fraction for _, cost, share in slice_costs(choice.group["slices"], units))


def envelope_interaction(allocation: Allocation, units: dict[int, float]) -> float:
    """What the additive prediction misses: a parameter two groups shrink (a conv between two pruned
    groups loses rows and columns) saves 1 - (1 - a)(1 - b), not a + b, of its cost."""
    removed: dict[int, tuple[float, list[float]]] = {}
    for choice in allocation.layers:
        if choice.group is None:
            continue
        c = choice.candidates[choice.chosen]
        dropped = 0.0 if c.rank is None else 1 - c.rank / choice.group["channels"]
        for param, cost, share in slice_costs(choice.group["slices"], units):
            removed.setdefault(id(param), (cost, []))[1].append(share * dropped)
    return overcounted(removed)


def exact_envelope(allocation: Allocation, units: dict[int, float], rounds: int = 10) -> None:
    """Make the prediction exact where pruned groups share parameters; while the exact cost is over
    the target, add the excess to the pruned groups' candidates and solve again (a few rounds)."""
    true_cost = {id(c): c.cost for choice in allocation.layers for c in choice.candidates}
    total = _limit(allocation) + allocation.fixed

    def exact() -> float:
        chosen = sum(true_cost[id(choice.candidates[choice.chosen])] for choice in allocation.layers)
        return allocation.fixed + chosen + envelope_interaction(allocation, units)

    try:
        for _ in range(rounds):
            cost = exact()
            if cost <= total:
                allocation.predicted = cost
                return
            pruned = [c for c in allocation.layers if c.group is not None and c.candidates[c.chosen].rank is not None]
            for choice in pruned:
                for c in choice.candidates:
                    if c.rank is not None:
                        c.cost += (cost - total) / len(pruned)
            solve_allocation(allocation)
    finally:
        for choice in allocation.layers:
            for c in choice.candidates:
                c.cost = true_cost[id(c)]
    raise RecipeError(f"budget.{allocation.target} {allocation.value:g}: the pruned channel groups share layers, and "
                      f"no allocation found in {rounds} rounds meets the target once that is counted; lower it")


def budget_batch(budget: BudgetSection) -> int:
    return budget.batch or 1


def _scale_errors(budget, choices: list[LayerChoice], model, batches, progress: bool) -> None:
    """Make the layers' error curves comparable: scale each by its measured effect on the model's
    output at a probe rank (`sensitivity: output`) or by the layer's output energy (`layer`)."""
    from .progress import iterate

    if budget.sensitivity == "gradient":  # the curves are already first-order output errors ...
        choices = [c for c in choices if c.group is not None]  # ... but for channels, which are probed
        if not choices:
            return
    if budget.sensitivity == "layer":
        for choice in choices:
            coefficient = 1.0 / choice.energy if choice.energy > 0 else 0.0
            for c in choice.candidates:
                c.error *= coefficient
        return
    probe = list(_take(batches, budget.probe_samples))
    with torch.no_grad():
        from .metrics import primary_output

        reference = [primary_output(model(*b)).double() for b in probe]
    probe_fn = lambda: iter(probe)  # noqa: E731
    per_layer = probes_per_layer(budget.probes, len(choices))
    for choice in iterate(choices, len(choices), "layer sensitivity", "layer", enabled=progress):
        ranked = [c for c in choice.candidates if c.rank is not None]
        count = min(per_layer, len(ranked))  # spread from the smallest to the largest rank
        picks = sorted({round(i * (len(ranked) - 1) / max(1, count - 1)) for i in range(count)})
        measured = {}  # rank -> output error / layer error
        for index in picks:
            pick = ranked[index]
            with _applied(model, choice, pick.rank):
                out = _output_error(model, probe_fn, reference)
            if pick.error > 0:
                measured[pick.rank] = out / pick.error
        for c in ranked:
            c.error *= interpolate_coefficient(measured, c.rank)


def probes_per_layer(probes: int | str, layers: int) -> int:
    """`probes` as given, or for auto: AUTO_PROBES per layer while that stays within PROBE_PASSES
    calibration passes in all, else as many as fit (at least one). Each pass runs the whole model
    on the probe samples, so a 100-layer model with 3 probes spends most of its planning there
    (52 s of 55 s on the 102-Linear model of benchmarks/budget.py, against 16 s with 1)."""
    if probes != "auto":
        return int(probes)
    return max(1, min(AUTO_PROBES, PROBE_PASSES // max(1, layers)))


def interpolate_coefficient(measured: dict[int, float], rank: int) -> float:
    """The output-per-layer error ratio at `rank`: measured at a few ranks, interpolated linearly in
    the log between them (by rank), the nearest measured value outside them; 0 when none was
    measured (the layer's truncation changes nothing measurable)."""
    import math

    points = sorted((r, v) for r, v in measured.items() if v > 0)
    if not points:
        return 0.0
    if rank <= points[0][0]:
        return points[0][1]
    if rank >= points[-1][0]:
        return points[-1][1]
    for (r0, v0), (r1, v1) in zip(points, points[1:]):
        if r0 <= rank <= r1:
            t = (rank - r0) / (r1 - r0)
            return math.exp((1 - t) * math.log(v0) + t * math.log(v1))
    return points[-1][1]


def _take(batches, samples: int):
    """Whole batches from the start of `batches()` until at least `samples` samples."""
    taken = 0
    for batch in batches():
        if taken >= samples:
            break
        taken += batch[0].shape[0]
        yield batch


def solve_allocation(allocation: Allocation) -> None:
    """Pick one candidate per layer: least predicted error within the target."""
    choices = allocation.layers
    limit = _limit(allocation)
    options = [[(c.cost, c.error) for c in choice.candidates] for choice in choices]
    solution = solve(options, limit)
    if solution is None:
        best = allocation.fixed + smallest_cost(options)
        reach = (f"{best:.4g} ms" if allocation.target == "latency_ms"
                 else f"{allocation.ratio(best):.3g}x")
        raise RecipeError(f"budget.{allocation.target} {allocation.value:g} cannot be met even with every allocated "
                          f"layer at its smallest candidate; the best reachable is {reach}")
    for choice, index in zip(choices, solution.choice):
        choice.chosen = index
    allocation.predicted = allocation.fixed + solution.cost


def _limit(allocation: Allocation) -> float:
    """The most the allocated layers may cost together."""
    total = allocation.value if allocation.target == "latency_ms" else allocation.reference / allocation.value
    return total - allocation.fixed


def record(allocation: Allocation, measured: float, interval: list[float] | None = None) -> bool:
    """Note a whole-model measurement of the allocation (ms, or bytes); True when it is within the
    target's TOLERANCE of the prediction, or (latency) the prediction lies inside the measurement's
    95 % interval: a noisy run is no reason to move the allocation."""
    allocation.measured = measured
    unit = "bytes" if allocation.target == "onnx_bytes" else "ms"
    row = {"round": allocation.rounds, f"predicted_{unit}": round(allocation.predicted, 4),
           f"measured_{unit}": round(measured, 4)}
    if interval is not None and interval[0] != interval[1]:
        row["measured_interval"] = [round(x, 4) for x in interval]
    allocation.history.append(row)
    inside = interval is not None and interval[0] <= allocation.predicted <= interval[1]
    return inside or abs(measured - allocation.predicted) <= TOLERANCE[allocation.target] * measured


def correct(allocation: Allocation, measured: float) -> None:
    """Spread the miss between measurement and prediction over the factorized layers as a per-op
    overhead (what an additive model of ops measured alone misses: launch costs, an initializer's
    and a quantization scale's bytes), and solve again."""
    miss = measured - allocation.predicted
    factorized = [c for c in allocation.layers if c.candidates[c.chosen].rank is not None]
    if not factorized:  # nothing factorized: the miss is the fixed part's
        allocation.fixed += miss
    else:
        overhead = miss / len(factorized)
        for choice in allocation.layers:
            for c in choice.candidates:
                if c.rank is not None:
                    c.cost = max(1e-6, c.cost + overhead)
    allocation.rounds += 1
    solve_allocation(allocation)


def outcome(allocation: Allocation, report) -> dict:
    """report.json's `budget`: the target, what the allocation predicted, what was measured on the
    shipped model, whether it met the target (latency within TOLERANCE), and the rounds it took."""
    out = allocation.summary()
    target, value = allocation.target, allocation.value
    if target in ("params", "macs", "onnx_bytes"):  # exact for params and MACs (no tolerance)
        measured = getattr(report.ratios, target)
        met = measured is not None and measured >= value * (1 - TOLERANCE[target])
    elif target == "speedup":
        measured = report.ratios.speedup.get(str(allocation.batch))
        met = measured is not None and measured >= value * (1 - TOLERANCE[target])
    else:
        measured = report.compressed.latency_ms.get(str(allocation.batch), {}).get("p50")
        met = measured is not None and measured <= value * (1 + TOLERANCE[target])
    out.update(measured=measured, met=bool(met))
    if allocation.newly_measured is not None:
        out["ops_measured"] = allocation.newly_measured  # 0 when the latency cache had them all
    return out


def assign(allocation: Allocation) -> None:
    """Hand the chosen ranks to the methods: fixed ranks for factorized layers, a reason for dense ones."""
    by_method: dict[int, dict] = {}
    for method, name in allocation.unpriced:
        entry = by_method.setdefault(id(method), {"method": method, "ranks": {}, "dense": {}})
        entry["dense"][name] = "budget: no candidate of this layer (rank, kept channels) saves what the budget counts"
    for choice in allocation.layers:
        entry = by_method.setdefault(id(choice.method), {"method": choice.method, "ranks": {}, "dense": {}})
        c = choice.candidates[choice.chosen]
        if c.rank is None:
            entry["dense"][choice.name] = ("budget: left whole, the better use of the budget" if choice.group
                                           else "budget: left dense, the better use of the budget")
        else:
            entry["ranks"][choice.name] = c.rank
    for entry in by_method.values():
        method = entry["method"]
        method.stage = method.stage.model_copy(update={"keeps" if method.name == ENVELOPE else "ranks": entry["ranks"]})
        method.budget_dense = entry["dense"]
        method.budget_rows = {choice.name: {"budget_cost": round(choice.candidates[choice.chosen].cost, 6),
                                            "budget_error": float(f"{choice.candidates[choice.chosen].error:.6g}"),
                                            "budget_candidates": len(choice.candidates)}
                              for choice in allocation.layers if choice.method is method}


def annotate(decisions: list[Decision], method: Method) -> None:
    for d in decisions:
        d.extra.update(getattr(method, "budget_rows", {}).get(d.name, {}))

