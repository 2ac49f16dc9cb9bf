"""Allocation for the factorizing methods (svd, afm, pela): per layer, the ranks that save what a
budget counts, each with its exact cost (params, MACs, bytes) or measured latency, and its
predicted error on the calibration data:
- a method that mimics the layer's outputs (afm, and pela `init: afm`): the eigenvalues of the
  output covariance the rank drops, exactly the expected squared error of the reconstruction;
- the others: the data-aware error of the truncated weight on the layer's inputs,
  E||(W - W_r) x||^2 = sum_{i > r} s_i^2 v_i^T M v_i with M the inputs' second moment (Linear, and
  Conv2d through its input patches, in the spatial scheme with W_r rebuilt per rank).
With `sensitivity: gradient` both are weighted by the output gradient's second moment at the
layer (first order). The budget makes them comparable across layers (compress.budget).
"""
from __future__ import annotations

import collections
import contextlib
from typing import Callable, ClassVar

import torch
from torch import nn

from .. import layers, linalg
from .allocation import MAX_CANDIDATES, Allocatable, AllocationRequest, Candidate, LayerChoice, layer_bytes
from .base import replace_module
from .lowrank import mimic, rank_rule_targets, run_hooked, unfactorizable, unswappable_layers

RULE_KEYS = ("rank", "ratio", "energy", "ranks", "rho")


class RankAllocation(Allocatable):
    """The allocation capability of a factorizing method: a stage without a rank rule has its
    ranks chosen by the budget."""

    latency_priced: ClassVar[bool] = True
    allocation_hint: ClassVar[str] = "leave out the rank rule (rank, ratio, energy, ranks, rho) of a stage of {names}"
    mimics: ClassVar[bool] = False  # the method reconstructs the layer's outputs (afm)

    def mimics_outputs(self) -> bool:
        return self.mimics or getattr(self.stage, "init", None) == "afm"

    def factor_bias(self) -> bool | None:
        """Whether the factors carry a bias of their own (a mimicking method's output mean)."""
        return True if self.mimics_outputs() else None

    def allocates(self) -> bool:
        return not (set(RULE_KEYS) & self.stage.model_fields_set)

    def allocation_choices(self, model: nn.Module, profile: dict, request: AllocationRequest) -> list[LayerChoice]:
        excluded = {**unswappable_layers(model), **self.default_exclusions(model)}
        scheme = getattr(self.stage, "scheme", "channel")
        names = [(n, l) for n, l in rank_rule_targets(model, self.stage, self)
                 if n not in request.skip and not unfactorizable(self.name, l, profile.get(n), excluded.get(n))]
        if not self.mimics_outputs() and self.budget_inputs is None:  # a sweep's later runs have them
            self.budget_inputs = input_moments(model, [n for n, _ in names], request.batches)
        choices = []
        bias = self.factor_bias()
        for name, layer in names:
            shapes = profile[name]
            s = scheme if isinstance(layer, nn.Conv2d) else "channel"
            dense = layers.dense_cost(layer, shapes.out_shape)
            # a candidate saves what the budget counts, and is one the plan builds (decide_factorization
            # keeps a layer whose MACs, for a table its parameters, would not fall)
            kinds = {"params" if request.target == "params" or isinstance(layer, nn.Embedding) else "macs",
                     "params" if isinstance(layer, nn.Embedding) else "macs"}

            def after(rank, layer=layer, s=s, shapes=shapes):
                return layers.factorized_cost(layer, rank, s, shapes.in_shape, shapes.out_shape, bias)

            def saves(rank, after=after, dense=dense, kinds=kinds):
                return all(getattr(after(rank), kind) < getattr(dense, kind) for kind in kinds)

            ranks = rank_grid(min(layers.matrix_shape(layer, s)), saves)
            if not ranks:
                request.unpriced.append((self, name))
                continue
            sizes = [Candidate(r, 0.0, 0.0, kept=after(r).params / dense.params) for r in ranks]
            choices.append(LayerChoice(self, name, s, [Candidate(None, 0.0, 0.0)] + sizes, unit=layer))
        self.allocated_units = len(choices)
        return choices

    def wants_gradients(self, choice: LayerChoice) -> bool:
        return True

    def estimate_errors(self, choices: list[LayerChoice], request: AllocationRequest, gradients: dict) -> None:
        first_order = request.budget.sensitivity == "gradient"
        for choice in choices:
            weight = gradients.get(choice.name)
            sizes = [0, *(c.size for c in choice.candidates[1:])]
            if self.mimics_outputs():  # rank 0 drops everything: the layer's output energy
                curve = afm_error_curve(self.moments[choice.name], sizes, weight)
            else:
                curve = weight_error_curve(choice.unit, choice.scheme, self.budget_inputs.get(choice.name), sizes,
                                           weight)
            choice.energy = curve.pop(0)
            for c in choice.candidates[1:]:
                c.error = curve[c.size]
            choice.gradient_weighted = first_order

    def price_choices(self, choices: list[LayerChoice], model: nn.Module, profile: dict,
                      request: AllocationRequest) -> None:
        target = request.target
        for choice in choices:
            layer, shapes = choice.unit, profile[choice.name]
            for c in choice.candidates:
                if target in ("params", "macs", "onnx_bytes"):
                    cost = (layers.dense_cost(layer, shapes.out_shape) if c.size is None else
                            layers.factorized_cost(layer, c.size, choice.scheme, shapes.in_shape, shapes.out_shape,
                                                   self.factor_bias()))
                    c.cost = (layer_bytes(layer, cost.params, request.quantized(choice.name, layer))
                              if target == "onnx_bytes" else float(getattr(cost, target)))
                else:
                    c.cost = request.costs(choice.name, layer, c.size, choice.scheme,
                                           (request.batch,) + tuple(shapes.in_shape))

    @contextlib.contextmanager
    def applied(self, model: nn.Module, choice: LayerChoice, size: int):
        layer = model.get_submodule(choice.name)
        replace_module(model, choice.name, self._replacement(layer, choice, size))
        try:
            yield
        finally:
            replace_module(model, choice.name, layer)

    def _replacement(self, layer: nn.Module, choice: LayerChoice, size: int) -> nn.Module:
        """The layer factorized at `size`, built once and kept while the budget probes and searches: a
        search pass applies every unit at once, and rebuilding each (an SVD, or afm's eigenvectors) per
        pass made a pass 4x slower than the model's forward on all-MiniLM-L6-v2 (2.2 s against 0.55).
        At most twice this method's units are kept (the least recently used dropped first)."""
        cache = self.__dict__.setdefault("applied_cache", collections.OrderedDict())
        key = (choice.name, size, choice.scheme)
        hit = cache.get(key)
        if hit is not None and hit[0] is layer:  # built from this very layer (a sweep reloads the model)
            cache.move_to_end(key)
            return hit[1]
        if self.mimics_outputs():
            replacement = mimic(layer, self.moments.get(choice.name), size)
        else:
            replacement = layers.factorize(layer, size, choice.scheme)
        cache[key] = (layer, replacement)
        while len(cache) > 2 * max(1, getattr(self, "allocated_units", 0)) + 8:
            cache.popitem(last=False)
        return replacement

    def take_allocation(self, sizes: dict[str, int], left: dict[str, str], rows: dict[str, dict]) -> None:
        self.stage = self.stage.model_copy(update={"ranks": sizes})
        self.budget_dense, self.budget_rows = left, rows
        self.__dict__.pop("applied_cache", None)  # planning is over: the factorized copies go


def input_moments(model: nn.Module, names: list[str], batches) -> dict[str, linalg.OutputMoments]:
    """Uncentered second moments of each named layer's inputs (a Conv2d's input patches), one pass."""
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
