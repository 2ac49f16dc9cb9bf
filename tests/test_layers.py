import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compress import layers


def _macs(module, x):
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


CONVS = [
    dict(in_channels=6, out_channels=10, kernel_size=3, stride=1, padding=1),
    dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, padding=2),
    dict(in_channels=5, out_channels=8, kernel_size=(3, 5), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
    dict(in_channels=4, out_channels=7, kernel_size=5, stride=3, padding=0, bias=False),
    dict(in_channels=4, out_channels=7, kernel_size=3, padding="same"),
]


@pytest.mark.parametrize("scheme", layers.SCHEMES)
@pytest.mark.parametrize("kwargs", CONVS)
def test_full_rank_conv_factorization_is_exact(scheme, kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    rows, cols = layers.conv_matrix(conv.weight, scheme).shape
    fact = layers.factorize(conv, min(rows, cols), scheme)
    x = torch.randn(2, conv.in_channels, 13, 11, dtype=torch.float64)
    assert torch.allclose(fact(x), conv(x), atol=1e-10)
    assert torch.allclose(layers.dense_weight(fact), conv.weight, atol=1e-10)


@pytest.mark.parametrize("scheme", layers.SCHEMES)
@pytest.mark.parametrize("kwargs", CONVS)
def test_conv_cost_matches_flop_counter(scheme, kwargs):
    conv = nn.Conv2d(**kwargs)
    x = torch.randn(1, conv.in_channels, 13, 11)
    out_shape = tuple(conv(x).shape[1:])
    fact = layers.factorize(conv, 2, scheme)
    cost = layers.factorized_cost(conv, 2, scheme, tuple(x.shape[1:]), out_shape)
    assert cost.macs == _macs(fact, x)
    assert cost.params == sum(p.numel() for p in fact.parameters())
    dense = layers.dense_cost(conv, out_shape)
    assert dense.macs == _macs(conv, x)


def test_conv_matrix_round_trip():
    w = torch.randn(5, 3, 2, 4)
    for scheme in layers.SCHEMES:
        assert torch.equal(layers.conv_from_matrix(layers.conv_matrix(w, scheme), w.shape, scheme), w)


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_linear_factorization_is_exact_on_3d_activations(bias):
    torch.manual_seed(0)
    linear = nn.Linear(9, 6, bias=bias).double()
    fact = layers.factorize(linear, 6)
    x = torch.randn(3, 4, 9, dtype=torch.float64)
    assert torch.allclose(fact(x), linear(x), atol=1e-10)
    cost = layers.factorized_cost(linear, 6, "channel", (4, 9), (4, 6))
    assert cost.macs == _macs(fact, x[:1])
    assert layers.dense_cost(linear, (4, 6)).macs == _macs(linear, x[:1])


def test_truncated_linear_error_is_the_dropped_spectrum():
    torch.manual_seed(0)
    linear = nn.Linear(20, 16, bias=False).double()
    fact = layers.factorize(linear, 5)
    s = torch.linalg.svdvals(linear.weight.detach())
    err = float(torch.linalg.norm(layers.dense_weight(fact) - linear.weight).detach())
    assert err == pytest.approx(float((s[5:] ** 2).sum().sqrt()), rel=1e-8)


def test_full_rank_embedding_factorization_is_exact():
    torch.manual_seed(0)
    table = nn.Embedding(30, 8).double()
    fact = layers.factorize(table, 8)
    ids = torch.randint(0, 30, (4, 5))
    assert torch.allclose(fact(ids), table(ids), atol=1e-10)
    assert torch.allclose(layers.dense_weight(fact), table.weight, atol=1e-10)
    cost = layers.factorized_cost(table, 3, "channel", (5,), (5, 8))
    assert cost.params == sum(p.numel() for p in layers.factorize(table, 3).parameters())
    assert cost.macs == _macs(layers.factorize(table, 3), ids[:1])


@pytest.mark.parametrize("make,scheme", [
    (lambda: nn.Linear(9, 6), "channel"),
    (lambda: nn.Conv2d(4, 7, 3, padding=1), "channel"),
    (lambda: nn.Conv2d(4, 7, (3, 2), stride=2), "spatial"),
    (lambda: nn.Embedding(12, 5), "channel"),
])
def test_factor_matrices_multiply_back_to_the_layer_matrix(make, scheme):
    torch.manual_seed(0)
    layer = make().double()
    full = min(layers.layer_matrix(layer, scheme).shape)
    b, a = layers.factor_matrices(layers.factorize(layer, full, scheme))
    assert torch.allclose(b @ a, layers.layer_matrix(layer, scheme), atol=1e-10)


def test_max_abs_deviation_value_and_gradient_match_autograd():
    from compress.linalg import max_abs_deviation

    gen = torch.Generator().manual_seed(11)
    left = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    right = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    value = max_abs_deviation(left, right, target)
    (value * 2.5).backward()
    ref_left, ref_right = left.detach().clone().requires_grad_(), right.detach().clone().requires_grad_()
    reference = (ref_left @ ref_right - target).abs().max()
    (reference * 2.5).backward()
    assert float(value.detach()) == pytest.approx(float(reference.detach()), abs=1e-12)
    assert torch.allclose(left.grad, ref_left.grad) and torch.allclose(right.grad, ref_right.grad)
