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
