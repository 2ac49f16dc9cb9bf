"""compress: compress PyTorch models by low-rank and structured methods, export verified ONNX."""

__version__ = "0.1.0"
