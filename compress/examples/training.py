"""Training the bundled examples (`compress example NAME PATH`): the shared loop, the test score,
and the safe checkpoint. The examples' models and data live in their own modules, which import
nothing of the pipeline; this module is the one that does."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..checkpoint import save_checkpoint
from ..data import load_source
from ..finetune import finetune, predict
from ..metrics import score
from ..recipe import FinetuneSection
from .ctr import FACTORY as CTR_FACTORY, VOCAB_SIZES, deepfm
from .digits import FACTORY as DIGITS_FACTORY, digits_resnet
from .digits_transformer import FACTORY as TRANSFORMER_FACTORY, digits_transformer


def train_example(path, *, name: str, build: Callable[[], nn.Module], factory: str, kwargs: dict, dataset: str,
                  inputs: list[dict], cfg, batch_size: int, metric: str, seed: int, progress: bool,
                  device: torch.device) -> dict:
    """Seed, build, train on `bundled:{dataset}/train` with the fine-tuning loop, score `metric` on
    `bundled:{dataset}/test`, and write a safe checkpoint to `path`; returns the summary."""
    torch.manual_seed(seed)
    model = build()
    names = [spec["name"] for spec in inputs]
    train, test = load_source(f"bundled:{dataset}/train"), load_source(f"bundled:{dataset}/test")
    result = finetune(model, train, names, "target", cfg, batch_size=batch_size, device=device, seed=seed,
                      progress=progress, desc=f"train {name}")
    model.cpu()
    value = score(metric, predict(model, test, names, 1024), test.tensors["target"], None)
    save_checkpoint(path, model, factory, kwargs, inputs=inputs,
                    metadata={"example": name, f"test_{metric}": value, "epochs": cfg.epochs})
    return {f"test_{metric}": value, "seconds": result.seconds, "epochs": cfg.epochs}


def train_digits_resnet(path, *, epochs: int = 15, width: int = 32, seed: int = 0, progress: bool = True,
                        device: torch.device = torch.device("cpu")) -> dict:
    """Train the example on the train split and write a safe checkpoint; returns its test accuracy."""
    return train_example(
        path, name="digits-resnet", build=lambda: digits_resnet(width), factory=DIGITS_FACTORY,
        kwargs={"width": width, "num_classes": 10}, dataset="digits",
        inputs=[{"name": "image", "shape": [1, 8, 8], "dtype": "float32"}],
        cfg=FinetuneSection(epochs=epochs, optimizer="adamw", lr=3e-3, weight_decay=1e-4, schedule="cosine"),
        batch_size=64, metric="accuracy", seed=seed, progress=progress, device=device)



def train_ctr_deepfm(path, *, epochs: int = 4, seed: int = 0, progress: bool = True,
                     device: torch.device = torch.device("cpu")) -> dict:
    """Train the example on the train split and write a safe checkpoint; returns its test AUC."""
    return train_example(
        path, name="ctr-deepfm", build=deepfm, factory=CTR_FACTORY, kwargs={"dim": 16, "hidden": [128, 64]},
        dataset="ctr", inputs=[{"name": "fields", "shape": [len(VOCAB_SIZES)], "dtype": "int64"}],
        cfg=FinetuneSection(epochs=epochs, optimizer="adamw", lr=3e-3, weight_decay=1e-5, schedule="cosine"),
        batch_size=256, metric="auc", seed=seed, progress=progress, device=device)



def train_digits_transformer(path, *, epochs: int = 40, seed: int = 0, progress: bool = True,
                             device: torch.device = torch.device("cpu")) -> dict:
    """Train on the train split, write a safe checkpoint; returns the test accuracy."""
    return train_example(
        path, name="digits-transformer", build=digits_transformer, factory=TRANSFORMER_FACTORY, kwargs={},
        dataset="digits-tokens", inputs=[{"name": "tokens", "shape": [64], "dtype": "int64"},
                                         {"name": "mask", "shape": [64], "dtype": "int64"}],
        cfg=FinetuneSection(epochs=epochs, optimizer="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine",
                            clip_grad_norm=1.0),
        batch_size=64, metric="accuracy", seed=seed, progress=progress, device=device)



# `compress example NAME PATH`: a callable that trains and writes a checkpoint, returning a summary
EXAMPLES: dict[str, tuple[Callable, str]] = {
    "digits-resnet": (train_digits_resnet, "residual CNN (BatchNorm) on scikit-learn's 8x8 handwritten digits"),
    "ctr-deepfm": (train_ctr_deepfm, "DeepFM-style click model on synthetic click data with rank-4 structure"),
    "digits-transformer": (train_digits_transformer, "Transformer encoder on the digits as 64 integer tokens + mask"),
}
