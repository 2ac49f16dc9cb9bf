"""The sparse envelope function and its proximal operator, against independent computations."""
import pytest
import torch

from compress import linalg


def variational(x: torch.Tensor, k: int) -> float:
    """1/2 min over u in D_k of sum x_i^2 / u_i, solved from its optimality conditions instead of
    the sorted closed form: u_i = min(1, |x_i| / tau) with tau found by bisection so that
    sum u_i = k (u_i = 1 on the non-zeros when there are at most k)."""
    a = x.abs().double()
    nonzero = a > 0
    if int(nonzero.sum()) <= k:
        return 0.5 * float((a ** 2).sum())
    lo, hi = 1e-12, float(a.sum())
    for _ in range(300):
        tau = (lo + hi) / 2
        lo, hi = (lo, tau) if float(torch.clamp(a / tau, max=1.0).sum()) < k else (tau, hi)
    u = torch.clamp(a / hi, max=1.0)
    return 0.5 * float((a[nonzero] ** 2 / u[nonzero]).sum())


def test_envelope_is_a_minimum_over_feasible_weights():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, generator=gen, dtype=torch.float64)
    value = float(linalg.sparse_envelope(x, 2))
    for _ in range(2000):  # random points of D_k never do better
        u = torch.rand(6, generator=gen, dtype=torch.float64).clamp_min(1e-3)
        u = u * min(1.0, 2 / float(u.sum()))
        assert 0.5 * float((x ** 2 / u).sum()) >= value - 1e-12


def test_envelope_is_half_squared_norm_when_sparse_enough():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(8, generator=gen, dtype=torch.float64)
        x[torch.randperm(8, generator=gen)[:5]] = 0  # 3 non-zeros
        for k in (3, 4, 8):
            assert float(linalg.sparse_envelope(x, k)) == pytest.approx(0.5 * float((x ** 2).sum()), rel=1e-12)
        assert float(linalg.sparse_envelope(x, 2)) > 0.5 * float((x ** 2).sum())


@pytest.mark.parametrize("seed", range(10))
def test_envelope_closed_form_equals_the_variational_form(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, generator=gen, dtype=torch.float64)
    for k in (1, 2, 4, 6):
        assert float(linalg.sparse_envelope(x, k)) == pytest.approx(variational(x, k), rel=1e-9)


def test_envelope_is_batched():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    batch = linalg.sparse_envelope(x, 3)
    assert torch.allclose(batch, torch.stack([linalg.sparse_envelope(row, 3) for row in x]))


def brute_force_prox(x: torch.Tensor, k: int, lam: float, w: torch.Tensor) -> torch.Tensor:
    """argmin_v 1/2 ||v - x||^2 + lam S_k(w * v) by L-BFGS from the prox formula's own start and
    from x, keeping the better (S_k is convex: both must reach the same minimum)."""
    def objective(v):
        return 0.5 * ((v - x) ** 2).sum() + lam * linalg.sparse_envelope(w * v, k)

    best, best_value = None, float("inf")
    for start in (x.clone(), x * 0.5, torch.zeros_like(x) + 1e-3):
        v = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([v], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = objective(v)
            value.backward()
            return value

        opt.step(closure)
        value = float(objective(v.detach()))
        if value < best_value:
            best, best_value = v.detach(), value
    return best


@pytest.mark.parametrize("seed", range(8))
def test_prox_agrees_with_a_numerical_minimizer(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 5
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    w = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64) if seed % 2 else torch.ones(n, dtype=torch.float64)
    for k, lam in ((2, 0.3), (3, 1.0), (1, 0.1)):
        prox = x * linalg.envelope_prox_scale(x.abs(), k, lam, w)
        objective = lambda v: 0.5 * ((v - x) ** 2).sum() + lam * linalg.sparse_envelope(w * v, k)  # noqa: E731
        numeric = brute_force_prox(x, k, lam, w)
        # the formula's point is at least as good as a numerical minimizer's (L-BFGS stalls near
        # the kinks of S_k, up to about 1e-2 away, always at a higher objective) ...
        assert float(objective(prox)) <= float(objective(numeric)) + 1e-9
        # ... and no direction improves on it: for a convex objective that is global optimality
        value = float(objective(prox))
        for _ in range(300):
            d = torch.randn(n, generator=gen, dtype=torch.float64)
            d /= d.norm()
            for t in (1e-2, 1e-4, 1e-6):
                assert float(objective(prox + t * d)) >= value - 1e-12


def test_prox_zeroes_exactly_the_groups_theory_says():
    x = torch.tensor([3.0, 2.0, 0.5, 0.1, 0.05], dtype=torch.float64)
    lam, k = 0.5, 2
    scale = linalg.envelope_prox_scale(x, k, lam)
    # recompute eta independently by bisection on sum clip(|x| eta - lam, 0, 1) = k
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(((x * mid - lam).clamp(0, 1)).sum()) < k else (lo, mid)
    u = (x * hi - lam).clamp(0, 1)
    assert torch.equal(scale == 0, u == 0)
    assert torch.allclose(scale, torch.where(u > 0, u / (u + lam), torch.zeros_like(u)), atol=1e-9)
    assert int((scale == 0).sum()) >= 1  # entries with |x_i| <= lam / eta are exactly zero


def test_prox_when_few_groups_are_nonzero_just_shrinks():
    x = torch.tensor([[1.0, 0.0, -2.0, 0.0]], dtype=torch.float64)
    scale = linalg.envelope_prox_scale(x.abs(), 2, 0.25)
    # the live groups shrink by 1 / (1 + lam); the zero ones stay zero, with factor 0, so that the count
    # of factors > 0 is the count of live groups (it was 4 here, and the continuation never stopped)
    assert torch.allclose(scale, torch.tensor([[1 / 1.25, 0.0, 1 / 1.25, 0.0]], dtype=torch.float64))
    assert torch.equal(x * scale, x / 1.25) and int((scale > 0).sum()) == 2
