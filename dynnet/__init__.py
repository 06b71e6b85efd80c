"""dynnet: the PyTorch tutorial's random-depth polynomial with shared weights, trained with Lightning."""

import importlib

__all__ = ["DynamicNet", "DynamicPolynomial", "SineData", "StepProgressBar"]
__version__ = "0.1.0"

# Where each public class lives. They are imported on first use: the `dynnet` command starts from this package and
# takes over the stop signals before the seconds that importing torch and Lightning take (see dynnet.signals).
_HOMES = {
    "DynamicNet": "dynnet.module",
    "DynamicPolynomial": "dynnet.model",
    "SineData": "dynnet.data",
    "StepProgressBar": "dynnet.progress",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'dynnet' has no attribute {name!r}")
