"""The digits Transformer example: each 8x8 digit as a sequence of 64 integer tokens (pixel
intensities 0-16) with an attention mask, classified by a small Transformer encoder.

Real data (scikit-learn's bundled digits, the same splits as the digits ResNet); the model is
written the way model libraries write theirs: Linear layers on (batch, sequence, dim) activations
and two integer inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FACTORY = "compress.examples.digits_transformer:digits_transformer"
VOCAB = 17  # pixel intensities 0..16


def tokens_split(split: str) -> dict[str, torch.Tensor]:
    """{'tokens': (n, 64) int64, 'mask': (n, 64) int64 (1 = attend), 'target': (n,) int64}."""
    from .digits import digits_split

    data = digits_split(split)
    tokens = (data["image"] * 16).round().long().reshape(len(data["target"]), 64)
    return {"tokens": tokens, "mask": torch.ones_like(tokens), "target": data["target"]}


class EncoderBlock(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm1(x)

        def heads(t: torch.Tensor) -> torch.Tensor:  # the projections' width, not d: heads can be pruned
            return t.reshape(b, n, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        attend = (mask != 0)[:, None, None, :]
        a = F.scaled_dot_product_attention(heads(self.query(h)), heads(self.key(h)), heads(self.value(h)),
                                           attn_mask=attend)
        x = x + self.output(a.transpose(1, 2).reshape(b, n, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class DigitsTransformer(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, hidden: int = 128, length: int = 64,
                 num_classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        side = int(length ** 0.5)  # tokens are the pixels of a side x side image, row by row
        self.rows = nn.Parameter(torch.randn(side, 1, dim) * 0.7)  # comparable to the token embedding
        self.cols = nn.Parameter(torch.randn(1, side, dim) * 0.7)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        position = (self.rows + self.cols).reshape(1, -1, self.rows.shape[-1])  # row + column embedding
        x = self.embed(tokens) + position[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (self.norm(x) * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled)


def digits_transformer(**kwargs) -> DigitsTransformer:
    """Factory named in checkpoints: `compress.examples.digits_transformer:digits_transformer`."""
    return DigitsTransformer(**kwargs)
