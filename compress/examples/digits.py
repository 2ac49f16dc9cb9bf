"""The digits example: a small residual CNN on scikit-learn's bundled 8x8 handwritten digits.

The data are real (1,797 images of 10 digits, UCI), ship inside scikit-learn, and are split
deterministically into train (1,237), calibration (200) and test (360) sets.
"""
from __future__ import annotations

import torch
from torch import nn

SPLITS = {"train": slice(560, None), "calibration": slice(360, 560), "test": slice(0, 360)}
FACTORY = "compress.examples.digits:digits_resnet"


def digits_split(split: str) -> dict[str, torch.Tensor]:
    """One split of the digits as {'image': (n, 1, 8, 8) float32 in [0, 1], 'target': (n,) int64}."""
    from sklearn.datasets import load_digits

    from ..errors import UserError

    if split not in SPLITS:
        raise UserError(f"bundled:digits/{split}: no such split; available: {', '.join(SPLITS)}")
    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))[SPLITS[split]]
    images = torch.tensor(digits.images, dtype=torch.float32)[order].unsqueeze(1) / 16.0
    return {"image": images, "target": torch.tensor(digits.target, dtype=torch.int64)[order]}


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a skip connection (1x1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """stem conv -> 2 blocks at `width` -> 2 blocks at 2*width (stride 2) -> pool -> classifier."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(image)))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_resnet(width: int = 32, num_classes: int = 10) -> DigitsResNet:
    """Factory named in checkpoints: `compress.examples.digits:digits_resnet`."""
    return DigitsResNet(width, num_classes)
