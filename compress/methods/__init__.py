"""The registry of compression methods: adding one is one file and one line here."""
from .base import Decision, LayerProfile, Method, Stage, Targets
from .svd import Svd

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Svd,)}

__all__ = ["METHODS", "Decision", "LayerProfile", "Method", "Stage", "Targets"]
