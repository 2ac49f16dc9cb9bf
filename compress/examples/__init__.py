"""Bundled examples: small models on real data that ships with a package (no downloads).

This package's modules hold the models and the data only; training them (`compress example`) is
in `compress.examples.training`, the one module here that imports the pipeline."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError


def _digits(split: str) -> dict[str, torch.Tensor]:
    from .digits import digits_split

    return digits_split(split)


def _ctr(split: str) -> dict[str, torch.Tensor]:
    from .ctr import ctr_split

    return ctr_split(split)


def _digits_tokens(split: str) -> dict[str, torch.Tensor]:
    from .digits_transformer import tokens_split

    return tokens_split(split)


def _digits_tokens_unlabeled(split: str) -> dict[str, torch.Tensor]:
    data = _digits_tokens(split)
    return {"tokens": data["tokens"], "mask": data["mask"]}


# the model factories of the bundled examples: the only code a checkpoint may name without the user's
# --trust-factory (see compress.trust); each example module's FACTORY is one of these
FACTORIES = ("compress.examples.digits:digits_resnet", "compress.examples.ctr:deepfm",
             "compress.examples.digits_transformer:digits_transformer")

# bundled data sets, `bundled:NAME/SPLIT` in a recipe
DATASETS: dict[str, Callable[[str], dict[str, torch.Tensor]]] = {
    "digits": _digits, "ctr": _ctr, "digits-tokens": _digits_tokens,
    "digits-tokens-unlabeled": _digits_tokens_unlabeled,
}


def bundled_data(spec: str) -> dict[str, torch.Tensor]:
    name, _, split = spec.partition("/")
    if name not in DATASETS:
        raise UserError(f"bundled:{spec}: no bundled data set {name!r}; available: {', '.join(DATASETS)}")
    return DATASETS[name](split or "train")
