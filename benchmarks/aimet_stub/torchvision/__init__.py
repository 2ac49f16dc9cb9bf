"""Stand-in for torchvision in the AIMET benchmark environment (see transforms.py): the
submodules aimet-torch names at import time."""
from . import datasets, models, ops, transforms

__all__ = ["datasets", "models", "ops", "transforms"]
