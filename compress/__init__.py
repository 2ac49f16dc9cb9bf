"""compress: compress PyTorch models by low-rank and structured methods, export verified ONNX."""

__version__ = "0.1.0"


def load(path, trust_checkpoint: bool = False, trust_factories=()):
    """Load a model: a compress checkpoint, an `apply` output folder (compression.json +
    model.safetensors, rebuilt without unpickling), or a pickled module with trust_checkpoint.
    A factory named by the file is imported only if it is a bundled example's or lies under one of
    `trust_factories` (e.g. ["mypackage.models"])."""
    from .checkpoint import load as load_any

    return load_any(path, trust_checkpoint, trust_factories)
