"""Pure tensor math for compression: truncated SVD, rank rules, spectra.

Everything here takes tensors (or numbers) and returns tensors (or numbers): no modules, no
recipe objects, so each formula can be tested alone against an independent computation.
"""
from __future__ import annotations

import math

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

    r (rows + cols) <= ratio * rows * cols; at least 1.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    return max(1, math.floor(ratio * rows * cols / (rows + cols)))


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
    does not depend on how the samples were batched.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        rows = features.detach().reshape(-1, features.shape[-1]).to(torch.float64)
        self.count += rows.shape[0]
        self.total += rows.sum(0).cpu()
        self.outer += (rows.T @ rows).cpu()

    def merge(self, other: "OutputMoments") -> None:
        self.count += other.count
        self.total += other.total
        self.outer += other.outer

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """Population covariance E[y y^T] - mu mu^T."""
        mu = self.mean()
        return self.outer / max(self.count, 1) - torch.outer(mu, mu)


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
