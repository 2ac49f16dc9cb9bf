"""compress: compress PyTorch models by low-rank and structured methods, export verified ONNX.

`compress.plan`, `compress.apply`, `compress.export` and `compress.load` are the Python API
(see compress.api); the `compress` command line is a thin layer over them."""

from ._version import __version__  # a leaf module, so nothing imports the package for it

__all__ = ["__version__", "apply", "export", "load", "plan"]


def load(path, trust_checkpoint: bool = False, trust_factories=()):
    """Load a model: a compress checkpoint, an `apply` output folder (compression.json +
    model.safetensors, rebuilt without unpickling), or a pickled module with trust_checkpoint.
    A factory named by the file is imported only if it is a bundled example's or lies under one of
    `trust_factories` (e.g. ["mypackage.models"])."""
    from .checkpoint import load as load_any

    return load_any(path, trust_checkpoint, trust_factories)


def plan(model, recipe, **kwargs):
    """Per-layer decisions of `recipe` on `model`, without training (see compress.api.plan)."""
    from .api import plan as run

    return run(model, recipe, **kwargs)


def apply(model, recipe, **kwargs):
    """Compress `model` by `recipe` in memory; a Result with `.model` (see compress.api.apply)."""
    from .api import apply as run

    return run(model, recipe, **kwargs)


def export(result, out, **kwargs):
    """Write an `apply` result to a folder: ONNX, checks, latency, report (see compress.api.export)."""
    from .api import export as run

    return run(result, out, **kwargs)
