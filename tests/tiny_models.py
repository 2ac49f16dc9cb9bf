"""Small models from outside the compress package, for loader and pipeline tests."""
import torch
from torch import nn

from compress.examples.digits_transformer import EncoderBlock


class TokenClassifier(nn.Module):
    """Integer tokens plus an attention mask (two inputs) -> class logits. One block of our own
    and one of torch's nn.TransformerEncoderLayer (whose fast path reads its Linear weights)."""

    def __init__(self, vocab: int = 17, dim: int = 32, classes: int = 10, length: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.block = EncoderBlock(dim, heads=4, hidden=64)  # written like a model library's block
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        x = self.encoder(self.block(x, mask), src_key_padding_mask=mask == 0)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled)


def token_classifier(**kwargs) -> TokenClassifier:
    return TokenClassifier(**kwargs)


def digits_as_tokens(split: str) -> dict[str, torch.Tensor]:
    """The bundled digits as 64 integer tokens (pixel intensities 0-16) with a full mask."""
    from compress.examples.digits import digits_split

    data = digits_split(split)
    tokens = (data["image"] * 16).round().long().reshape(len(data["target"]), 64)
    return {"tokens": tokens, "mask": torch.ones_like(tokens), "target": data["target"]}


class ClickProbability(nn.Module):
    """A CTR model as CTR libraries ship it: the click probability (a final sigmoid), not a logit."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.out = nn.Sigmoid()

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        return self.out(self.base(fields))


class DictEncoder(nn.Module):
    """An encoder that returns a dict, like a model library: a sentence embedding and (unused here)
    a per-token output; the recipe names which one is compressed for (model.output_key)."""

    def __init__(self, vocab: int = 17, dim: int = 32, length: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = EncoderBlock(dim, heads=4, hidden=64)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
        x = self.block(self.embed(tokens), mask)
        return {"tokens": x, "embedding": self.proj(x.mean(1))}
