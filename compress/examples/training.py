"""Training a bundled example: the shared loop, its test score, and the safe checkpoint."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def train_example(path, *, name: str, build: Callable[[], nn.Module], factory: str, kwargs: dict, dataset: str,
                  inputs: list[dict], cfg, batch_size: int, metric: str, seed: int, progress: bool,
                  device: torch.device) -> dict:
    """Seed, build, train on `bundled:{dataset}/train` with the fine-tuning loop, score `metric` on
    `bundled:{dataset}/test`, and write a safe checkpoint to `path`; returns the summary."""
    from ..checkpoint import save_checkpoint
    from ..data import load_source
    from ..finetune import finetune, predict
    from ..metrics import score

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
