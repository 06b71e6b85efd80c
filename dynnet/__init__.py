"""dynnet: the PyTorch tutorial's random-depth polynomial with shared weights, trained with Lightning."""

from dynnet.callbacks import StepProgressBar
from dynnet.data import SineData
from dynnet.model import DynamicPolynomial
from dynnet.module import DynamicNet

__all__ = ["DynamicNet", "DynamicPolynomial", "SineData", "StepProgressBar"]
__version__ = "0.1.0"
