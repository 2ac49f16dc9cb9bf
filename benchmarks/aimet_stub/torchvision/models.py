"""Stand-in (see transforms.py)."""
from types import SimpleNamespace

resnet = SimpleNamespace()
