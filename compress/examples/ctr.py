"""The CTR example: a DeepFM-style click model on synthetic click data with known structure.

The data are *synthetic* (no click log ships in any package): a seeded generator draws 8
categorical fields with Zipf-like category frequencies; every category has a bias and a latent
vector in 4 dimensions, and the click probability is sigmoid(-1 + sum of biases + sum over field
pairs of latent dot products). So the true interaction structure has rank 4, which is what a
feature-mimicking compression of the 16-dimensional embedding tables should find.
Splits: train 30,000, calibration 3,000, test 10,000 impressions.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

VOCAB_SIZES = (2000, 1500, 1000, 500, 300, 100, 50, 20)
LATENT_DIM = 4
SPLITS = {"train": (0, 30_000), "calibration": (30_000, 33_000), "test": (33_000, 43_000)}
FACTORY = "compress.examples.ctr:deepfm"


@lru_cache(maxsize=1)
def _generate(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    total = SPLITS["test"][1]
    fields, logit = [], torch.full((total,), -1.0)
    latents = []
    for vocab in VOCAB_SIZES:
        popularity = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1  # Zipf-like
        ids = torch.multinomial(popularity, total, replacement=True, generator=gen)
        fields.append(ids)
        bias = 0.3 * torch.randn(vocab, generator=gen)
        latent = 0.45 * torch.randn(vocab, LATENT_DIM, generator=gen)
        logit += bias[ids]
        latents.append(latent[ids])
    stacked = torch.stack(latents, 1)  # (n, fields, latent)
    pairwise = 0.5 * (stacked.sum(1).pow(2).sum(1) - stacked.pow(2).sum((1, 2)))
    clicks = torch.bernoulli(torch.sigmoid(logit + pairwise), generator=gen)
    return torch.stack(fields, 1), clicks.float()


def ctr_split(split: str) -> dict[str, torch.Tensor]:
    """One split as {'fields': (n, 8) int64 category ids, 'target': (n,) float32 clicks 0/1}."""
    from ..errors import UserError

    if split not in SPLITS:
        raise UserError(f"bundled:ctr/{split}: no such split; available: {', '.join(SPLITS)}")
    fields, clicks = _generate()
    start, stop = SPLITS[split]
    return {"fields": fields[start:stop].clone(), "target": clicks[start:stop].clone()}


class DeepFM(nn.Module):
    """Per-field embeddings shared by a factorization machine (pairwise interactions) and an MLP,
    plus first-order terms; outputs one click logit per impression."""

    def __init__(self, vocab_sizes=VOCAB_SIZES, dim: int = 16, hidden=(128, 64)):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(v, dim) for v in vocab_sizes)
        self.first_order = nn.ModuleList(nn.Embedding(v, 1) for v in vocab_sizes)
        layers, width = [], len(vocab_sizes) * dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))
        self.bias = nn.Parameter(torch.zeros(1))
        for table in self.embeddings:
            nn.init.normal_(table.weight, std=0.05)
        for table in self.first_order:
            nn.init.zeros_(table.weight)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        e = torch.stack([table(fields[:, i]) for i, table in enumerate(self.embeddings)], 1)  # (B, F, d)
        first = torch.cat([table(fields[:, i]) for i, table in enumerate(self.first_order)], 1).sum(1)
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        deep = self.mlp(e.flatten(1)).squeeze(-1)
        return self.bias + first + fm + deep


def deepfm(dim: int = 16, hidden: tuple[int, ...] = (128, 64)) -> DeepFM:
    """Factory named in checkpoints: `compress.examples.ctr:deepfm`."""
    return DeepFM(VOCAB_SIZES, dim, tuple(hidden))
