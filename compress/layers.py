"""Factorized layers (docs/methods.md section 0) and the matrix views they are cut from.

A factorized layer is a plain `nn.Module` with two children, `first` and `second`, so it exports
to ONNX as two ordinary ops and its state_dict keys are predictable (`<name>.first.weight`, ...),
which lets a compressed model be rebuilt from the original factory plus a list of edits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .linalg import truncated_factors

SCHEMES = ("channel", "spatial")


class LowRankLinear(nn.Module):
    """y = second(first(x)) = B (A x) + b with A (r, n) and B (m, r); bias on B."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class LowRankConv2d(nn.Module):
    """A Conv2d split in two convolutions by the channel or the spatial scheme.

    channel: conv kh x kw C -> r (original stride, padding, dilation), then 1x1 r -> N (bias).
    spatial: conv kh x 1 C -> r (stride/padding/dilation of the height axis), then
             conv 1 x kw r -> N (those of the width axis, and the bias).
    """

    def __init__(self, conv: nn.Conv2d, rank: int, scheme: str, bias: bool | None = None):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown conv scheme {scheme!r}; expected one of {SCHEMES}")
        self.rank = rank
        self.scheme = scheme
        n_out, c_in = conv.out_channels, conv.in_channels
        kh, kw = conv.kernel_size
        (sh, sw), (dh, dw) = conv.stride, conv.dilation
        has_bias = conv.bias is not None if bias is None else bias
        pad = conv.padding
        if scheme == "channel":
            self.first = nn.Conv2d(c_in, rank, (kh, kw), stride=(sh, sw), padding=pad, dilation=(dh, dw),
                                   bias=False, padding_mode=conv.padding_mode)
            self.second = nn.Conv2d(rank, n_out, 1, bias=has_bias)
        else:
            pad_h, pad_w = (pad, pad) if isinstance(pad, str) else ((pad[0], 0), (0, pad[1]))
            self.first = nn.Conv2d(c_in, rank, (kh, 1), stride=(sh, 1), padding=pad_h, dilation=(dh, 1),
                                   bias=False, padding_mode=conv.padding_mode)
            self.second = nn.Conv2d(rank, n_out, (1, kw), stride=(1, sw), padding=pad_w, dilation=(1, dw),
                                    bias=has_bias, padding_mode=conv.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class LowRankEmbedding(nn.Module):
    """An embedding table of width r followed by a Linear r -> d: e = U z + mu for a table of
    codes z, which is how feature-mimicking compression realizes a table (docs/methods.md section 4)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None):
        super().__init__()
        self.rank = rank
        self.first = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.second = nn.Linear(rank, embedding_dim)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(indices))


def conv_matrix(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """The 2-D matrix a conv weight (N, C, kh, kw) is factorized as, per scheme.

    channel: (N, C kh kw).  spatial: permute to (C, kh, N, kw), reshape to (C kh, N kw).
    """
    n, c, kh, kw = weight.shape
    if scheme == "channel":
        return weight.reshape(n, c * kh * kw)
    if scheme == "spatial":
        return weight.permute(1, 2, 0, 3).reshape(c * kh, n * kw)
    raise ValueError(f"unknown conv scheme {scheme!r}; expected one of {SCHEMES}")


def conv_from_matrix(matrix: torch.Tensor, shape: torch.Size | tuple, scheme: str) -> torch.Tensor:
    """Inverse of `conv_matrix`: back to a conv weight of `shape` (N, C, kh, kw)."""
    n, c, kh, kw = shape
    if scheme == "channel":
        return matrix.reshape(n, c, kh, kw)
    if scheme == "spatial":
        return matrix.reshape(c, kh, n, kw).permute(2, 0, 1, 3).contiguous()
    raise ValueError(f"unknown conv scheme {scheme!r}; expected one of {SCHEMES}")


def layer_matrix(layer: nn.Module, scheme: str = "channel") -> torch.Tensor:
    """The weight matrix of a Linear (as is), a Conv2d (by `scheme`) or an Embedding (the table,
    one row per category)."""
    if isinstance(layer, (nn.Linear, nn.Embedding)):
        return layer.weight
    if isinstance(layer, nn.Conv2d):
        return conv_matrix(layer.weight, scheme)
    raise TypeError(f"cannot factorize {type(layer).__name__}")


def matrix_shape(layer: nn.Module, scheme: str = "channel") -> tuple[int, int]:
    """The shape of `layer_matrix(layer, scheme)`, from the layer's sizes alone (no weight is read)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    if isinstance(layer, nn.Conv2d):
        (kh, kw), c, n = layer.kernel_size, layer.in_channels // layer.groups, layer.out_channels
        return (n, c * kh * kw) if scheme == "channel" else (c * kh, n * kw)
    raise TypeError(f"cannot factorize {type(layer).__name__}")


def factorize(layer: nn.Module, rank: int, scheme: str = "channel") -> nn.Module:
    """The rank-`rank` truncated-SVD factorization of a Linear, Conv2d or Embedding, as a new module."""
    with torch.no_grad():
        first, second = truncated_factors(layer_matrix(layer, scheme), rank)
        module = empty_factorized(layer, rank, scheme).to(layer.weight)
        set_factors(module, first, second)
        if getattr(layer, "bias", None) is not None:
            module.second.bias.copy_(layer.bias)
        elif isinstance(module, LowRankEmbedding):
            module.second.bias.zero_()
    return module


def empty_factorized(layer: nn.Module, rank: int, scheme: str = "channel", bias: bool | None = None) -> nn.Module:
    """A factorized module with the right shapes for `layer` at `rank` (weights uninitialised).
    The second factor has a bias when the layer has one, or when `bias` says so."""
    if isinstance(layer, nn.Embedding):
        return LowRankEmbedding(layer.num_embeddings, layer.embedding_dim, rank, layer.padding_idx)
    if isinstance(layer, nn.Linear):
        return LowRankLinear(layer.in_features, layer.out_features, rank,
                             bias=layer.bias is not None if bias is None else bias)
    if isinstance(layer, nn.Conv2d):
        return LowRankConv2d(layer, rank, scheme, bias)
    raise TypeError(f"cannot factorize {type(layer).__name__}")


def set_factors(module: nn.Module, first: torch.Tensor, second: torch.Tensor) -> None:
    """Write matrix factors A (r, cols) and B (rows, r) into a factorized module's weights."""
    with torch.no_grad():
        if isinstance(module, LowRankLinear):
            module.first.weight.copy_(first)
            module.second.weight.copy_(second)
            return
        if isinstance(module, LowRankEmbedding):  # table (num, d) ~ B (num, r) @ A (r, d)
            module.first.weight.copy_(second)
            module.second.weight.copy_(first.T)
            return
        r = module.rank
        if module.scheme == "channel":
            # A (r, C kh kw) -> (r, C, kh, kw); B (N, r) -> (N, r, 1, 1)
            module.first.weight.copy_(first.reshape(module.first.weight.shape))
            module.second.weight.copy_(second.reshape(module.second.weight.shape))
        else:
            # matrix rows index (c, h), columns (n, w): A (r, N kw) is the width conv,
            # B (C kh, r) the height conv.
            c, kh = module.first.in_channels, module.first.kernel_size[0]
            n, kw = module.second.out_channels, module.second.kernel_size[1]
            height = second.reshape(c, kh, r).permute(2, 0, 1).unsqueeze(-1)  # (r, C, kh, 1)
            width = first.reshape(r, n, kw).permute(1, 0, 2).unsqueeze(2)  # (N, r, 1, kw)
            module.first.weight.copy_(height)
            module.second.weight.copy_(width)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight a factorized module computes (B A reshaped back), for checks and regularizers."""
    if isinstance(module, LowRankLinear):
        return module.second.weight @ module.first.weight
    if isinstance(module, LowRankEmbedding):
        return module.first.weight @ module.second.weight.T
    if module.scheme == "channel":
        n, r = module.second.weight.shape[:2]
        w = module.second.weight.reshape(n, r) @ module.first.weight.reshape(r, -1)
        return w.reshape(n, *module.first.weight.shape[1:])
    first, second = module.first.weight, module.second.weight  # (r, C, kh, 1), (N, r, 1, kw)
    return torch.einsum("rch,nrw->nchw", first[..., 0], second[:, :, 0, :])


def factor_matrices(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of a factorized module as differentiable matrices with B @ A equal to the original
    layer's `layer_matrix` (in the module's scheme)."""
    if isinstance(module, LowRankLinear):
        return module.second.weight, module.first.weight
    if isinstance(module, LowRankEmbedding):
        return module.first.weight, module.second.weight.T
    r = module.rank
    if module.scheme == "channel":
        return module.second.weight.reshape(-1, r), module.first.weight.reshape(r, -1)
    height = module.first.weight[..., 0].permute(1, 2, 0).reshape(-1, r)  # (C kh, r)
    width = module.second.weight[:, :, 0, :].permute(1, 0, 2).reshape(r, -1)  # (r, N kw)
    return height, width


@dataclass(frozen=True)
class LayerCost:
    """Parameters and multiply-accumulates of one layer for one sample (batch size 1)."""

    params: int
    macs: int


def dense_cost(layer: nn.Module, out_shape: tuple[int, ...]) -> LayerCost:
    """Cost of a dense Linear or Conv2d, given its output shape for one sample."""
    params = sum(p.numel() for p in layer.parameters())
    if isinstance(layer, nn.Embedding):
        return LayerCost(params, 0)  # a lookup multiplies nothing
    if isinstance(layer, nn.Linear):
        positions = _numel(out_shape) // layer.out_features
        return LayerCost(params, positions * layer.weight.numel())
    h_out, w_out = out_shape[-2:]
    return LayerCost(params, h_out * w_out * layer.weight.numel())


def factorized_cost(layer: nn.Module, rank: int, scheme: str, in_shape: tuple[int, ...],
                    out_shape: tuple[int, ...], bias: bool | None = None) -> LayerCost:
    """Cost of `layer` factorized at `rank`, given its input and output shapes for one sample.
    `bias` as in empty_factorized: the second factor has a bias when the layer has one, or when
    `bias` says so (afm's factors carry the output mean)."""
    if isinstance(layer, nn.Embedding):
        num, dim = layer.weight.shape
        positions = _numel(out_shape) // dim
        return LayerCost(num * rank + rank * dim + dim, positions * rank * dim)
    has_bias = layer.bias is not None if bias is None else bias
    bias = layer.weight.shape[0] if has_bias else 0
    if isinstance(layer, nn.Linear):
        m, n = layer.out_features, layer.in_features
        positions = _numel(out_shape) // m
        return LayerCost(rank * (m + n) + bias, positions * rank * (m + n))
    n_out, c_in, kh, kw = layer.weight.shape
    h_out, w_out = out_shape[-2:]
    if scheme == "channel":
        return LayerCost(rank * (c_in * kh * kw + n_out) + bias, h_out * w_out * rank * (c_in * kh * kw + n_out))
    # spatial: the height conv runs at every (h_out, w_in) position (its width axis has kernel 1,
    # stride 1 and no padding), the width conv at every (h_out, w_out) position.
    w_in = in_shape[-1]
    macs = rank * c_in * kh * h_out * w_in + n_out * rank * kw * h_out * w_out
    return LayerCost(rank * (c_in * kh + n_out * kw) + bias, macs)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
