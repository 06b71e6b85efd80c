"""dynnet: the PyTorch tutorial's random-depth polynomial with shared weights, trained with Lightning."""

__version__ = "0.1.0"
