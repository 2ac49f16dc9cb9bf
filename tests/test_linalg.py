import math

import pytest
import torch

from compress import linalg


def test_energy_rank_is_minimal_rank_reaching_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert linalg.energy_rank(s, 16 / 22) == 1
    assert linalg.energy_rank(s, 16 / 22 + 1e-6) == 2
    assert linalg.energy_rank(s, 0.95) == 3
    assert linalg.energy_rank(s, 1.0) == 4


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_energy_rank_keeps_energy_on_random_spectra(energy):
    gen = torch.Generator().manual_seed(0)
    s = torch.sort(torch.rand(40, generator=gen), descending=True).values
    r = linalg.energy_rank(s, energy)
    assert linalg.energy_kept(s, r) >= energy - 1e-12
    if r > 1:
        assert linalg.energy_kept(s, r - 1) < energy


def test_energy_rank_rejects_out_of_range():
    with pytest.raises(ValueError):
        linalg.energy_rank(torch.ones(3), 0.0)
    with pytest.raises(ValueError):
        linalg.energy_rank(torch.ones(3), 1.5)


def test_rank_for_param_ratio():
    # 64 x 64 at half the parameters: r * 128 <= 2048 -> r = 16
    assert linalg.rank_for_param_ratio(64, 64, 0.5) == 16
    r = linalg.rank_for_param_ratio(100, 30, 0.4)
    assert r * 130 <= 0.4 * 3000 < (r + 1) * 130
    assert linalg.rank_for_param_ratio(3, 3, 0.01) == 1


def test_effective_rank_of_flat_and_single_spectra():
    assert linalg.effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert linalg.effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_truncated_factors_full_rank_reconstructs_and_truncation_is_optimal():
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    a, b = linalg.truncated_factors(m, 7)
    assert torch.allclose(b @ a, m, atol=1e-10)
    a, b = linalg.truncated_factors(m, 3)
    s = torch.linalg.svdvals(m)
    # Eckart-Young: the Frobenius error of the best rank-3 approximation is the dropped tail.
    assert torch.linalg.norm(m - b @ a) == pytest.approx(math.sqrt(float((s[3:] ** 2).sum())), rel=1e-9)


def test_energy_ranks_batch_matches_single():
    gen = torch.Generator().manual_seed(3)
    spectra = torch.sort(torch.rand(5, 12, generator=gen), descending=True).values
    for energy in (0.3, 0.9, 0.99, 1.0):
        batch = linalg.energy_ranks(spectra, energy)
        assert batch.tolist() == [linalg.energy_rank(s, energy) for s in spectra]


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_truncation_keeps_energy_with_minimal_rank(energy):
    gen = torch.Generator().manual_seed(4)
    mats = torch.randn(3, 10, 7, generator=gen, dtype=torch.float64)
    projected, subgradient, ranks = linalg.energy_truncation(mats, energy)
    for m, p, g, r in zip(mats, projected, subgradient, ranks.tolist()):
        s = torch.linalg.svdvals(m)
        assert torch.linalg.matrix_rank(p) == r
        assert float((torch.linalg.svdvals(p) ** 2).sum() / (s ** 2).sum()) >= energy - 1e-12
        assert float((s[: r - 1] ** 2).sum() / (s ** 2).sum()) < energy  # one fewer would not do
        # the truncation is the best rank-r approximation and G = U_r V_r^T has r unit singular values
        assert torch.allclose(torch.linalg.svdvals(g)[:r], torch.ones(r, dtype=torch.float64))
        assert torch.linalg.norm(m - p) ** 2 == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-9)


def test_nuclear_subgradient_equals_autograd_gradient():
    gen = torch.Generator().manual_seed(5)
    for shape in [(6, 6), (8, 5), (4, 9)]:
        w = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
        torch.linalg.matrix_norm(w, "nuc").backward()
        _, subgradient, ranks = linalg.energy_truncation(w.detach(), 1.0)
        assert int(ranks) == min(shape)
        assert torch.allclose(subgradient, w.grad, atol=1e-10)


def test_threshold_rank():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5])
    assert linalg.threshold_rank(s, 0.1) == 3
    assert linalg.threshold_rank(s, 0.9) == 1
    assert linalg.threshold_rank(s, 0.0) == 4


def test_subspace_truncation_keeps_energy_and_converges_to_the_exact_one():
    gen = torch.Generator().manual_seed(6)
    # matrices with a decaying spectrum, like trained weights
    u, _ = torch.linalg.qr(torch.randn(3, 40, 40, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(3, 30, 30, generator=gen, dtype=torch.float64))
    s = 0.8 ** torch.arange(30, dtype=torch.float64)
    mats = (u[..., :30] * s) @ v.mT
    exact, exact_g, exact_r = linalg.energy_truncation(mats, 0.95)
    basis = torch.linalg.qr(torch.randn(3, 40, 16, generator=gen, dtype=torch.float64))[0]
    for _ in range(8):
        projected, subgradient, ranks, reached, basis = linalg.energy_truncation_in_subspace(mats, basis, 0.95)
        assert bool(reached.all())
        kept = (projected ** 2).sum((-2, -1)) / (mats ** 2).sum((-2, -1))
        assert bool((kept >= 0.95 - 1e-12).all())  # the guarantee holds at every iteration
    assert ranks.tolist() == exact_r.tolist()
    assert torch.allclose(projected, exact, atol=1e-8) and torch.allclose(subgradient, exact_g, atol=1e-6)


def test_subspace_truncation_says_when_the_subspace_is_too_small():
    gen = torch.Generator().manual_seed(7)
    mats = torch.randn(2, 20, 20, generator=gen, dtype=torch.float64)  # flat spectrum
    basis = torch.linalg.qr(torch.randn(2, 20, 3, generator=gen, dtype=torch.float64))[0]
    *_, reached, _ = linalg.energy_truncation_in_subspace(mats, basis, 0.9)
    assert not bool(reached.any())


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_streaming_moments_equal_batch_statistics_for_any_batch_size(batch):
    gen = torch.Generator().manual_seed(8)
    y = torch.randn(500, 3, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 2.0
    moments = linalg.OutputMoments(6)
    flat = y.reshape(-1, 6)
    for start in range(0, len(y), batch):
        moments.update(y[start:start + batch])
    reference = flat.double()
    assert moments.count == flat.shape[0]
    assert torch.allclose(moments.mean(), reference.mean(0), atol=1e-10)
    assert torch.allclose(moments.covariance(), torch.cov(reference.T, correction=0), atol=1e-9)


def test_principal_subspace_orders_eigenpairs():
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    cov = a @ a.T
    values, vectors = linalg.principal_subspace(cov)
    assert torch.all(values[:-1] >= values[1:])
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, cov, atol=1e-9)
    assert linalg.eigen_energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.7) == 2
    assert linalg.eigen_energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.71) == 3


def test_auc_matches_pairwise_definition_with_ties():
    from compress.metrics import auc

    gen = torch.Generator().manual_seed(10)
    scores = torch.randint(0, 5, (60,), generator=gen).float()  # many ties
    labels = (torch.rand(60, generator=gen) < 0.4).float()
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert auc(scores, labels) == pytest.approx(float(pairwise), abs=1e-12)


def test_pela_rank_rule_is_exact_at_integer_boundaries():
    assert linalg.rank_for_rho(320, 960, 1.5) == 160  # floating point gives 159
    assert linalg.rank_for_rho(300, 600, 3) == 66
    assert linalg.rank_for_rho(64, 64, 2) == 16 and linalg.rank_for_rho(10, 10, 2) == 2
    for m, n, rho in [(320, 960, 1.5), (96, 384, 3), (128, 128, 2), (77, 13, 1.5)]:
        r = linalg.rank_for_rho(m, n, rho)
        assert r * rho * (m + n) <= m * n < (r + 1) * rho * (m + n)  # the largest such rank
    assert linalg.rank_for_param_ratio(320, 960, 0.5) == 120


def test_moments_keep_their_precision_far_from_zero():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 500, 16, generator=gen) * 0.5 + 1000.0  # features sitting far from zero, float32
    m = linalg.OutputMoments(16)
    for batch in x:
        m.update(batch)
    rows = x.reshape(-1, 16).double()
    truth = torch.cov(rows.T, correction=0)
    error = float((m.covariance() - truth).norm() / truth.norm())
    assert error < 1e-4, error  # raw float32 products gave 20 % here
    assert torch.allclose(m.mean(), rows.mean(0), rtol=1e-9)
    assert torch.allclose(m.second_moment(), rows.T @ rows / len(rows), rtol=1e-6)
    other = linalg.OutputMoments(16)  # merging accumulators of different shifts
    other.update(x[0] - 2000.0)
    m.merge(other)
    both = torch.cat([rows, (x[0] - 2000.0).double()])
    assert torch.allclose(m.covariance(), torch.cov(both.T, correction=0), rtol=1e-6, atol=1e-6)
