"""Small models from outside the compress package, for loader and pipeline tests."""
import torch
import torch.nn.functional as F
from torch import nn


class SelfAttentionBlock(nn.Module):
    """A pre-norm Transformer block written the way model libraries write theirs: Linear layers
    on (batch, sequence, dim) activations, attention with a padding mask."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm1(x)
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        attn_mask = (mask != 0)[:, None, None, :]
        a = F.scaled_dot_product_attention(split(self.query(h)), split(self.key(h)), split(self.value(h)), attn_mask=attn_mask)
        x = x + self.output(a.transpose(1, 2).reshape(b, n, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TokenClassifier(nn.Module):
    """Integer tokens plus an attention mask (two inputs) -> class logits. One block of our own
    and one of torch's nn.TransformerEncoderLayer (whose fast path reads its Linear weights)."""

    def __init__(self, vocab: int = 17, dim: int = 32, classes: int = 10, length: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.block = SelfAttentionBlock(dim, heads=4, hidden=64)
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
