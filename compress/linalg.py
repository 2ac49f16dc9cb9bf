"""Pure tensor math for compression: truncated SVD, rank rules, spectra.

Everything here takes tensors (or numbers) and returns tensors (or numbers): no modules, no
recipe objects, so each formula can be tested alone against an independent computation.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D matrix, descending, computed in float64 for stable energy sums."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank r whose truncation keeps at least `energy` of sum(s^2).

    `energy` is a fraction in (0, 1]. A zero matrix has rank 1 by convention (a factorization
    needs at least one component).
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    squares = singular_values.to(torch.float64) ** 2
    total = squares.sum()
    if total <= 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    # A tiny slack so that energy=1.0 is reached despite rounding in the cumulative sum.
    rank = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
    return min(rank, singular_values.numel())


def energy_kept(singular_values: torch.Tensor, rank: int) -> float:
    """Fraction of sum(s^2) kept by the rank-`rank` truncation."""
    squares = singular_values.to(torch.float64) ** 2
    total = float(squares.sum())
    return 1.0 if total == 0 else float(squares[:rank].sum()) / total


def effective_rank(singular_values: torch.Tensor) -> float:
    """Entropy effective rank exp(H(p)), p = s / sum(s) (Roy and Vetterli, 2007)."""
    s = singular_values.to(torch.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def rank_for_param_ratio(rows: int, cols: int, ratio: float) -> int:
    """Largest rank whose two factors hold at most `ratio` of a dense rows x cols matrix's entries.

    r (rows + cols) <= ratio * rows * cols; at least 1. Computed in exact rational arithmetic on
    the decimal the ratio was written as (0.5 is 1/2), so an exact integer bound is not missed by
    a floating-point rounding.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    return max(1, math.floor(Fraction(str(ratio)) * rows * cols / (rows + cols)))


def rank_for_rho(rows: int, cols: int, rho: float) -> int:
    """PELA's rank rule r = floor(m n / (rho (m + n))): about rho times fewer parameters, in exact
    rational arithmetic (320 x 960 at rho 1.5 is exactly 160, which floating point makes 159)."""
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    return max(1, math.floor(Fraction(rows * cols) / (Fraction(str(rho)) * (rows + cols))))


def truncated_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the best rank-`rank` approximation of `matrix` (m, n) into B (m, r) @ A (r, n).

    The singular values are shared as sqrt(S) on both sides, so neither factor dominates in scale
    (which keeps fine-tuning of the two factors well conditioned).
    """
    work = matrix.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    root = torch.sqrt(s[:rank])
    first = root[:, None] * vh[:rank]  # A: (r, n)
    second = u[:, :rank] * root[None, :]  # B: (m, r)
    return first.to(matrix.dtype), second.to(matrix.dtype)


def energy_ranks(singular_values: torch.Tensor, energy: float) -> torch.Tensor:
    """`energy_rank` for a batch of spectra (..., k): the minimal rank per matrix, as a tensor."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    squares = singular_values.to(torch.float64) ** 2
    total = squares.sum(-1, keepdim=True)
    kept = torch.cumsum(squares, -1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    ranks = (kept < energy - 1e-12).sum(-1) + 1
    return ranks.clamp(max=singular_values.shape[-1])


def energy_truncation(matrices: torch.Tensor, energy: float):
    """Trained Rank Pruning's projection T_e for a batch of matrices (..., m, n).

    For each matrix: SVD, keep the smallest rank r whose energy sum_{i<=r} s_i^2 / sum s_i^2 is
    at least `energy`. Returns (U_r S_r V_r^T, U_r V_r^T, r): the projection, the nuclear norm's
    sub-gradient at it, and the ranks (a tensor of the batch shape).
    """
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return truncate_svd_by_energy(u, s, vh, energy)


def truncate_svd_by_energy(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, energy: float):
    """`energy_truncation` from an SVD already computed: (U_r S_r V_r^T, U_r V_r^T, ranks)."""
    ranks = energy_ranks(s, energy)
    return _truncate(u, s, vh, ranks) + (ranks,)


def _truncate(u, s, vh, ranks):
    keep = (torch.arange(s.shape[-1], device=s.device) < ranks.to(s.device)[..., None]).to(s.dtype)
    return (u * (s * keep)[..., None, :]) @ vh, (u * keep[..., None, :]) @ vh


def threshold_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """How many singular values are at least `threshold` times the largest (at least 1)."""
    s = singular_values.to(torch.float64)
    if s.numel() == 0 or s[0] <= 0:
        return 1
    return max(1, int((s >= threshold * s[0]).sum()))


def energy_truncation_in_subspace(matrices: torch.Tensor, basis: torch.Tensor, energy: float):
    """`energy_truncation` computed within a tracked subspace: the cheap path for TRP.

    One subspace iteration refines `basis` (..., m, q) towards the top-q left singular vectors of
    `matrices` (..., m, n); the truncation is then taken within span(basis), whose SVD is exact
    and small (q x n). The energy is measured against the full ||M||_F^2, so every projection
    returned keeps at least `energy`; the rank is minimal up to how well the subspace has
    converged (it tracks the weights step by step, so it converges while training runs).
    Returns (projected, subgradient, ranks, reached, new_basis): `reached` is False for a
    matrix whose energy the subspace cannot reach (use `energy_truncation` for it).
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    q, _ = torch.linalg.qr(matrices @ (matrices.mT @ basis))
    ub, s, vh = torch.linalg.svd(q.mT @ matrices, full_matrices=False)
    u = q @ ub
    total = matrices.square().sum((-2, -1)).to(torch.float64)
    kept = torch.cumsum(s.to(torch.float64) ** 2, -1) / total.clamp_min(torch.finfo(torch.float64).tiny)[..., None]
    reached = kept[..., -1] >= energy - 1e-12
    ranks = ((kept < energy - 1e-12).sum(-1) + 1).clamp(max=s.shape[-1])
    projected, subgradient = _truncate(u, s, vh, ranks)
    return projected, subgradient, ranks, reached, u


class OutputMoments:
    """Streaming first and second moments of feature vectors, in float64.

    `update(features)` takes any tensor whose last axis is the feature axis (d) and counts every
    other position as a sample; memory is O(d^2) whatever the number of samples, and the result
    does not depend on how the samples were batched. Sums are taken about a shift (the first
    batch's mean), so that features far from zero keep their precision: with an offset of 1000,
    E[x x^T] - mu mu^T from raw float32 products lost 20 % of the covariance.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.shift = torch.zeros(dim, dtype=torch.float64)  # total and outer are sums of (x - shift)
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor, exact: bool = False) -> None:
        """Add a batch. Its products are taken in the batch's own floating dtype (float32: several
        times faster than float64 on a CPU; relative error ~1e-7 per batch, see the tests) and
        accumulated across batches in float64; `exact` takes them in float64."""
        rows = features.detach().reshape(-1, features.shape[-1])
        if exact or not rows.is_floating_point() or rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.to(torch.float64)
        if rows.shape[0] == 0:
            return
        if self.count == 0:  # the shift, as the batch's dtype holds it, so that it is subtracted exactly
            self.shift = rows.mean(0).to(torch.float64).cpu()
        centred = rows - self.shift.to(rows)
        self.count += rows.shape[0]
        self.total += centred.sum(0, dtype=torch.float64).cpu()
        self.outer += (centred.T @ centred).to(torch.float64).cpu()

    def raw_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of x, sum of x x^T) about zero, in float64."""
        n, c, s = self.count, self.shift, self.total
        return s + n * c, self.outer + torch.outer(c, s) + torch.outer(s, c) + n * torch.outer(c, c)

    def to_raw(self) -> None:
        """Re-express the sums about zero, e.g. before adding them up across processes, whose shifts differ."""
        self.total, self.outer = self.raw_sums()
        self.shift = torch.zeros_like(self.shift)

    def merge(self, other: "OutputMoments") -> None:
        self.to_raw()
        total, outer = other.raw_sums()
        self.count += other.count
        self.total += total
        self.outer += outer

    def mean(self) -> torch.Tensor:
        return self.shift + self.total / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """Population covariance E[y y^T] - mu mu^T."""
        offset = self.total / max(self.count, 1)
        return self.outer / max(self.count, 1) - torch.outer(offset, offset)

    def second_moment(self) -> torch.Tensor:
        """E[y y^T] (uncentered)."""
        mu = self.mean()
        return self.covariance() + torch.outer(mu, mu)


class LinearOutputMoments:
    """The moments of y = W x + b derived from the moments of the layer's inputs x, in float64:
    E[y] = W E[x] + b and Cov(y) = W Cov(x) W^T. Cheaper than accumulating the outputs when the
    layer is wider than its input (d_in^2 instead of d_out^2 per sample), and one input accumulator
    can serve every layer that reads the same tensor (query, key and value projections)."""

    def __init__(self, inputs: OutputMoments, weight: torch.Tensor, bias: torch.Tensor | None):
        self.inputs = inputs
        self.weight = weight.detach().to(torch.float64).cpu()
        self.bias = None if bias is None else bias.detach().to(torch.float64).cpu()

    @property
    def count(self) -> int:
        return self.inputs.count

    def mean(self) -> torch.Tensor:
        mu = self.weight @ self.inputs.mean()
        return mu if self.bias is None else mu + self.bias

    def covariance(self) -> torch.Tensor:
        return self.weight @ self.inputs.covariance() @ self.weight.T


def principal_subspace(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors (columns, same order) of a
    symmetric covariance matrix."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.to(torch.float64))
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvalues[order].clamp_min(0.0), eigenvectors[:, order]


def eigen_energy_rank(eigenvalues: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k eigenvalues hold at least `energy` of their sum (the output energy
    a feature-mimicking projection keeps)."""
    return energy_rank(eigenvalues.clamp_min(0.0).sqrt(), energy)


class _MaxAbsDeviation(torch.autograd.Function):
    """max |left @ right - target| with a sub-gradient that touches one row of `left` and one
    column of `right`: the product exists only inside forward, so a regularizer summed over many
    layers keeps at most one layer's product in memory at a time."""

    @staticmethod
    def forward(ctx, left, right, target):
        diff = left @ right - target
        index = int(torch.argmax(diff.abs()))
        row, col = divmod(index, diff.shape[1])
        sign = torch.sign(diff[row, col])
        ctx.save_for_backward(left, right, sign)
        ctx.row, ctx.col = row, col
        return diff[row, col].abs()

    @staticmethod
    def backward(ctx, grad):
        left, right, sign = ctx.saved_tensors
        grad_left = torch.zeros_like(left)
        grad_right = torch.zeros_like(right)
        grad_left[ctx.row] = grad * sign * right[:, ctx.col]
        grad_right[:, ctx.col] = grad * sign * left[ctx.row]
        return grad_left, grad_right, None


def max_abs_deviation(left: torch.Tensor, right: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||left @ right - target||_max (largest absolute entry), differentiable in left and right."""
    return _MaxAbsDeviation.apply(left, right, target.detach())


def sparse_envelope(x: torch.Tensor, k: int) -> torch.Tensor:
    """The sparse envelope function S_k(x) (Refael, Arbel, Huleihel) for a batch of vectors (..., n).

    S_k(x) = 1/2 min over u in D_k of sum_i x_i^2 / u_i, D_k = {0 <= u_i <= 1, sum u_i <= k}, in
    closed form: with a = |x| sorted descending (a_0 = +inf) and N the unique integer in
    {0, ..., k-1} with a_N > (sum_{i>N} a_i) / (k - N) >= a_{N+1},
    S_k(x) = 1/2 sum_{i<=N} a_i^2 + (sum_{i>N} a_i)^2 / (2 (k - N)). Equals 1/2 ||x||^2 when
    ||x||_0 <= k (half the squared k-support norm in general). O(n log n).
    """
    n = x.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    a = torch.sort(x.abs(), dim=-1, descending=True).values
    prefix = torch.cumsum(a, -1)
    total = prefix[..., -1:]
    head = torch.arange(k, device=x.device)  # N = 0 .. k-1
    tail = total - torch.cat([torch.zeros_like(total), prefix[..., : k - 1]], -1)  # sum_{i>N} a_i
    ratio = tail / (k - head).to(x.dtype)
    above = torch.cat([torch.full_like(total, float("inf")), a[..., : k - 1]], -1)  # a_N (a_0 = inf)
    below = a[..., :k]  # a_{N+1}
    slack = 1e-12 * total  # rounding in the prefix sums must not rule out the right N
    valid = (above > ratio - slack) & (ratio >= below - slack)
    # the first valid N (unique in exact arithmetic; at a tie both candidates give the same value)
    first = torch.argmax(valid.to(torch.int8), dim=-1, keepdim=True)
    squares = torch.cat([torch.zeros_like(total), torch.cumsum(a ** 2, -1)[..., : k - 1]], -1)
    value = 0.5 * squares + tail ** 2 / (2 * (k - head).to(x.dtype))
    return value.gather(-1, first).squeeze(-1)


def envelope_prox_scale(norms: torch.Tensor, k: int, lam: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group factors of the proximal operator of lam * S_k on weighted group norms.

    For groups with norms n_j (..., g) and weights w_j, the prox of lam * S_k(w * n) scales group j
    by u_j / (u_j + lam w_j^2), u_j = clip(w_j n_j eta - lam w_j^2, 0, 1), with eta > 0 solving
    sum_j u_j = k; when at most k groups are non-zero the factor is 1 / (1 + lam w_j^2) (0 for a zero
    group, which stays zero). The left
    side is piecewise linear in eta: its breakpoints are swept in sorted order with prefix sums,
    O(g log g), for a whole batch at once. Groups with u_j = 0 become exactly zero.
    """
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    w = torch.ones_like(norms) if weights is None else weights.to(norms).expand_as(norms)
    g = norms.shape[-1]
    if not 1 <= k <= g:
        raise ValueError(f"k must be in [1, {g}], got {k}")
    penalty = lam * w ** 2
    slope = w * norms
    alive = slope > 0
    inf = torch.tensor(float("inf"), dtype=norms.dtype, device=norms.device)
    starts = torch.where(alive, penalty / slope.clamp_min(1e-300), inf)  # u_j leaves 0
    ends = torch.where(alive, (1 + penalty) / slope.clamp_min(1e-300), inf)  # u_j reaches 1
    points = torch.sort(torch.cat([starts, ends], -1), dim=-1).values
    value = _envelope_count(points, starts, ends, slope, penalty)
    reached = value >= k - 1e-12
    index = torch.argmax(reached.to(torch.int8), dim=-1, keepdim=True)  # first breakpoint with sum >= k
    previous = torch.gather(points, -1, (index - 1).clamp_min(0))
    at_previous = torch.gather(value, -1, (index - 1).clamp_min(0))
    active = ((starts <= previous) & (ends > previous)).to(norms.dtype)
    rate = (slope * active).sum(-1, keepdim=True)
    eta = torch.where(rate > 0, previous + (k - at_previous) / rate.clamp_min(1e-300), torch.gather(points, -1, index))
    u = (slope * eta - penalty).clamp(0.0, 1.0)
    shrink = u / (u + penalty).clamp_min(1e-300)
    few = alive.sum(-1, keepdim=True) <= k
    zero = torch.zeros_like(u)
    # a group already at zero stays at zero (factor 0, not 1/(1+lam)): counting the factors > 0 then
    # counts the live groups, which is what tells the continuation that k was reached
    return torch.where(few, torch.where(alive, 1.0 / (1.0 + penalty), zero), torch.where(u > 0, shrink, zero))


def _envelope_count(points, starts, ends, slope, penalty):
    """sum_j clip(slope_j eta - penalty_j, 0, 1) at every eta in `points` (..., p), by prefix sums."""
    order_s = torch.argsort(starts, dim=-1)
    order_e = torch.argsort(ends, dim=-1)
    s_sorted, e_sorted = torch.gather(starts, -1, order_s), torch.gather(ends, -1, order_e)
    finite = lambda t: torch.where(torch.isfinite(t), t, torch.zeros_like(t))  # noqa: E731
    cum = lambda t, order: torch.cat([torch.zeros_like(t[..., :1]), torch.cumsum(finite(torch.gather(t, -1, order)), -1)], -1)  # noqa: E731
    started = torch.searchsorted(s_sorted.contiguous(), points.contiguous(), right=True)
    ended = torch.searchsorted(e_sorted.contiguous(), points.contiguous(), right=True)
    slope_on = torch.gather(cum(slope, order_s), -1, started) - torch.gather(cum(slope, order_e), -1, ended)
    penalty_on = torch.gather(cum(penalty, order_s), -1, started) - torch.gather(cum(penalty, order_e), -1, ended)
    return ended.to(points.dtype) + finite(points) * slope_on - penalty_on
