"""Stand-in: the index's torchvision wheel needs CUDA libraries this CPU machine lacks. AIMET's
spatial SVD never calls torchvision; it only names a few of its classes in lookup tables."""
class Resize:  # noqa: D101
    pass
