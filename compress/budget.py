"""`budget:` -- the user states what they pay for; the tool spends it across layers.

A recipe with a `budget:` section (one target: `speedup`, `latency_ms`, `params` or `macs`) lets
every svd, afm or pela stage whose rank rule is left out be *allocated*: each of its layers gets
one candidate -- dense, or a rank from a grid -- so that the model meets the target with the least
predicted damage. Stages with an explicit rule stay as they are and count toward the target.

Cost of a candidate: params and MACs exactly (layers.factorized_cost); latency measured alone in
ONNX Runtime at the layer's real input shape at `budget.batch` (opcost.py, cached on disk). The
latency model is additive: the original's whole-model latency minus what each changed layer saves.
What it misses (a factorized layer is two ops, each with its own fixed overhead; fusions) is
checked: after the model is built, before fine-tuning, it is exported and measured beside the
original; when the measured latency is more than 5 % off the prediction, the miss is spread over
the factorized layers as a per-op overhead and the allocation is redone (`budget.rounds`).

Error of a candidate, per layer, on the calibration data:
- afm (and pela `init: afm`): the eigenvalues of the output covariance the rank drops -- exactly
  the expected squared error of afm's reconstruction of the layer's outputs;
- svd and pela: the data-aware error of the truncated weight on the layer's inputs,
  E||(W - W_r) x||^2 = sum_{i > r} s_i^2 v_i^T M v_i with M the inputs' second moment (Linear, and
  Conv2d in the channel scheme through its input patches); a Conv2d in the spatial scheme falls
  back to the weight spectrum scaled by the inputs' mean energy (isotropic inputs).
Errors of different layers are made comparable by how much each moves the model's output
(`sensitivity: output`, the default): one calibration pass per layer with only that layer
replaced at a probe rank measures E||f(x) - f_l(x)||^2, and the layer's curve is scaled to it.
`sensitivity: layer` scales each curve by the layer's own output energy instead (relative error,
no extra passes), kept to measure against.

Solver: multiple-choice knapsack (knapsack.py), exact on a discretized cost axis, least total
predicted output error within the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from . import layers, linalg
from .errors import RecipeError
from .knapsack import smallest_cost, solve
from .methods.base import Decision, Method, Strict, replace_module

ALLOCATABLE = ("svd", "afm", "pela")
RULE_KEYS = ("rank", "ratio", "energy", "ranks", "rho")
TOLERANCE = 0.05  # a latency measured within 5 % of the prediction needs no further round
MAX_CANDIDATES = 24


class BudgetSection(Strict):
    """What the compressed model may cost: exactly one target."""

    speedup: float | None = Field(None, gt=1, description="ORT p50 latency ratio original/compressed at `batch`")
    latency_ms: float | None = Field(None, gt=0, description="ORT p50 latency of the compressed model at `batch`")
    params: float | None = Field(None, gt=1, description="parameter ratio original/compressed (2: half the parameters)")
    macs: float | None = Field(None, gt=1, description="MAC ratio original/compressed per sample")
    batch: int | None = Field(None, gt=0, description="batch size of the latency targets (default: the largest "
                              "bench.batch_sizes)")
    rounds: int = Field(3, ge=1, le=10, description="latency targets: allocations at most, each checked by "
                        "measuring the whole model before fine-tuning")
    probes: int = Field(3, ge=1, le=MAX_CANDIDATES, description="sensitivity: output: ranks per layer at which the "
                        "model's output error is measured (spread over the layer's candidates; the others are "
                        "interpolated): one calibration pass each")
    probe_samples: int = Field(256, ge=1, le=65536, description="calibration samples each probe pass runs (whole "
                               "batches, at least this many)")
    sensitivity: Literal["output", "gradient", "layer"] = Field(
        "output", description="how layer errors are made comparable: output = scaled by calibration passes that "
        "measure the model's output error with the layer truncated (`probes` per layer); gradient = weighted by "
        "the output's gradients at the layer (first order, one backward pass per batch for all layers); layer = "
        "relative to the layer's own output energy")

    @model_validator(mode="after")
    def _one_target(self):
        given = [k for k in ("speedup", "latency_ms", "params", "macs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of speedup, latency_ms, params, macs"
                             + (f", not {' and '.join(given)}" if given else ""))
        return self

    @property
    def target(self) -> str:
        return next(k for k in ("speedup", "latency_ms", "params", "macs") if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.target)

    @property
    def in_latency(self) -> bool:
        return self.target in ("speedup", "latency_ms")


def allocated(method: Method) -> bool:
    """Whether a budget allocates this stage's ranks: an svd, afm or pela stage without a rank rule."""
    return method.name in ALLOCATABLE and not (set(RULE_KEYS) & method.stage.model_fields_set)


def check(budget: BudgetSection, methods: list[Method]) -> None:
    """Recipe-level checks: something to allocate, and nothing a latency table cannot price."""
    if not any(allocated(m) for m in methods):
        raise RecipeError("budget: no stage to allocate; leave out the rank rule (rank, ratio, energy, ranks, rho) "
                          "of an svd, afm or pela stage")
    if budget.in_latency:
        for m in methods:
            if m.name not in ALLOCATABLE:
                raise RecipeError(f"budget.{budget.target}: stages[{m.stage_index}] ({m.name}) changes the model in a "
                                  "way the latency table cannot price; use a params or macs budget with it")


@dataclass
class Candidate:
    rank: int | None  # None: dense
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
    second = moments.outer / max(1, moments.count)  # E[x x^T]
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
    """Candidate ranks: every rank up to 16, else 1, 2, 4 and the multiples of 8 (thinned to at most
    MAX_CANDIDATES), keeping only those that `fits` (that save what the budget counts)."""
    if full <= 16:
        ranks = list(range(1, full + 1))
    else:
        ranks = [1, 2, 4] + list(range(8, full + 1, 8))
    ranks = [r for r in ranks if r < full and fits(r)]
    if len(ranks) > MAX_CANDIDATES:
        step = -(-len(ranks) // MAX_CANDIDATES)
        ranks = ranks[::-1][::step][::-1]
    return ranks


# ---------------------------------------------------------------- allocation

def _replacement(method: Method, layer: nn.Module, rank: int, scheme: str, moments) -> nn.Module:
    from .methods.lowrank import mimic

    if _uses_afm(method):
        return mimic(layer, moments, rank)
    return layers.factorize(layer, rank, scheme)


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
                    skip: set[str] = frozenset(), progress: bool = False) -> Allocation:
    """Candidates, costs, errors and the knapsack's choice for every allocatable layer.

    `costs(layer, rank, scheme, in_shape) -> ms` prices latency targets; `reference_cost` is the
    original's params, MACs or latency; `fixed_savings` what the stages with explicit rules save."""
    from .methods.lowrank import rank_rule_targets, unfactorizable, unswappable_layers
    from .progress import iterate

    target = budget.target
    choices: list[LayerChoice] = []
    unpriced: list[tuple[Method, str]] = []  # no rank of these would save anything: dense
    pending: list[tuple] = []  # (method, name, layer, scheme, ranks) of the layers with candidates
    for method in [m for m in methods if allocated(m)]:
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
    if not choices:
        raise RecipeError("budget: the stages it allocates have no layer whose factorization would save anything")
    # costs (latency: measured per op, cached)
    for choice in iterate(choices, len(choices), "price candidates", "layer", enabled=progress and budget.in_latency):
        layer = model.get_submodule(choice.name)
        shapes = profile[choice.name]
        for c in choice.candidates:
            if target in ("params", "macs"):
                dense = layers.dense_cost(layer, shapes.out_shape)
                c.cost = float(getattr(dense if c.rank is None else
                                       layers.factorized_cost(layer, c.rank, choice.scheme, shapes.in_shape,
                                                              shapes.out_shape), target))
            else:
                c.cost = costs(layer, c.rank, choice.scheme, (budget_batch(budget),) + tuple(shapes.in_shape))
    _scale_errors(budget, choices, model, batches, progress)
    dense_total = sum(c.candidates[0].cost for c in choices)
    fixed = reference_cost - fixed_savings - dense_total  # everything the allocation does not touch
    allocation = Allocation(target, budget.value, budget_batch(budget) if budget.in_latency else None, choices,
                            fixed, reference_cost, reference_cost, unpriced=unpriced)
    solve_allocation(allocation)
    return allocation


def budget_batch(budget: BudgetSection) -> int:
    return budget.batch or 1


def _scale_errors(budget, choices: list[LayerChoice], model, batches, progress: bool) -> None:
    """Make the layers' error curves comparable: scale each by its measured effect on the model's
    output at a probe rank (`sensitivity: output`) or by the layer's output energy (`layer`)."""
    from .progress import iterate

    if budget.sensitivity == "gradient":  # the curves are already first-order output errors
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
    for choice in iterate(choices, len(choices), "layer sensitivity", "layer", enabled=progress):
        ranked = [c for c in choice.candidates if c.rank is not None]
        count = min(budget.probes, len(ranked))  # spread from the smallest to the largest rank
        picks = sorted({round(i * (len(ranked) - 1) / max(1, count - 1)) for i in range(count)})
        layer = model.get_submodule(choice.name)
        moments = getattr(choice.method, "moments", {}).get(choice.name)
        measured = {}  # rank -> output error / layer error
        for index in picks:
            pick = ranked[index]
            replace_module(model, choice.name, _replacement(choice.method, layer, pick.rank,
                                                            choice.scheme, moments))
            try:
                out = _output_error(model, probe_fn, reference)
            finally:
                replace_module(model, choice.name, layer)
            if pick.error > 0:
                measured[pick.rank] = out / pick.error
        for c in ranked:
            c.error *= interpolate_coefficient(measured, c.rank)


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


def record(allocation: Allocation, measured_ms: float) -> bool:
    """Note a whole-model latency measurement of the allocation; True when it is within TOLERANCE
    of the prediction."""
    allocation.measured = measured_ms
    allocation.history.append({"round": allocation.rounds, "predicted_ms": round(allocation.predicted, 4),
                               "measured_ms": round(measured_ms, 4)})
    return abs(measured_ms - allocation.predicted) <= TOLERANCE * measured_ms


def correct(allocation: Allocation, measured_ms: float) -> None:
    """Spread the miss between measurement and prediction over the factorized layers as a per-op
    overhead (what an additive model of ops measured alone misses), and solve again."""
    miss = measured_ms - allocation.predicted
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
    if target == "params":
        measured, met = report.ratios.params, report.ratios.params >= value
    elif target == "macs":
        measured, met = report.ratios.macs, report.ratios.macs >= value
    elif target == "speedup":
        measured = report.ratios.speedup.get(str(allocation.batch))
        met = measured is not None and measured >= value * (1 - TOLERANCE)
    else:
        measured = report.compressed.latency_ms.get(str(allocation.batch), {}).get("p50")
        met = measured is not None and measured <= value * (1 + TOLERANCE)
    out.update(measured=measured, met=bool(met))
    if allocation.newly_measured is not None:
        out["ops_measured"] = allocation.newly_measured  # 0 when the latency cache had them all
    return out


def assign(allocation: Allocation) -> None:
    """Hand the chosen ranks to the methods: fixed ranks for factorized layers, a reason for dense ones."""
    by_method: dict[int, dict] = {}
    for method, name in allocation.unpriced:
        entry = by_method.setdefault(id(method), {"method": method, "ranks": {}, "dense": {}})
        entry["dense"][name] = "budget: no rank of this layer would save what the budget counts"
    for choice in allocation.layers:
        entry = by_method.setdefault(id(choice.method), {"method": choice.method, "ranks": {}, "dense": {}})
        c = choice.candidates[choice.chosen]
        if c.rank is None:
            entry["dense"][choice.name] = "budget: left dense, the better use of the budget"
        else:
            entry["ranks"][choice.name] = c.rank
    for entry in by_method.values():
        method = entry["method"]
        method.stage = method.stage.model_copy(update={"ranks": entry["ranks"]})
        method.budget_dense = entry["dense"]
        method.budget_rows = {choice.name: {"budget_cost": round(choice.candidates[choice.chosen].cost, 6),
                                            "budget_error": float(f"{choice.candidates[choice.chosen].error:.6g}"),
                                            "budget_candidates": len(choice.candidates)}
                              for choice in allocation.layers if choice.method is method}


def annotate(decisions: list[Decision], method: Method) -> None:
    for d in decisions:
        d.extra.update(getattr(method, "budget_rows", {}).get(d.name, {}))

