"""A run that diverged: where, and what to change, in one line."""

import math

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from dynnet.errors import DivergenceError
from dynnet.model import ExpectedLoss


def check_finite(module: LightningModule, losses: Tensor, first: int, x: Tensor, y: Tensor) -> None:
    """Raise DivergenceError when a loss of the steps from ``first`` on, or a parameter now, is not finite."""
    finite = torch.isfinite(losses)
    if bool(finite.all()) and bool(torch.isfinite(module.model.flat()).all()):
        return
    # All processes hold the same parameters, so they all stop here together.
    bad = int((~finite).nonzero()[0]) if not bool(finite.all()) else len(losses) - 1
    step = first + bad + 1
    advice = _advice(module, step, first, x, y)
    raise DivergenceError(f"training diverged at step {step}: the loss became {losses[bad].item()}; {advice}")


def _advice(module: LightningModule, step: int, first: int, x: Tensor, y: Tensor) -> str:
    """What to change: the learning rate only when an update can have caused the blow-up."""
    optimizer = module.optimizers().optimizer
    group = optimizer.param_groups[0]
    lr = group.get("initial_lr", group["lr"])  # the lr the user gave, which a schedule starts from
    model = module.model
    dtype = model.shared.dtype
    if lr == 0 or (step == 1 and first == 0):
        return (
            f"no update caused it (it happened {'with lr 0' if lr == 0 else 'at the first step'}): {dtype} "
            f"overflows (its largest value is {torch.finfo(dtype).max:.3g}); train in float64 "
            "(--trainer.precision 64-true), or use a smaller --model.max_degree or a narrower interval"
        )
    if not lr > 0:  # a crafted or mistyped state: no smaller step fixes an lr that is not positive
        return f"the learning rate is {lr:g}: give a positive one (--optimizer.lr)"
    suggestion = lr / 10
    if isinstance(optimizer, torch.optim.SGD):
        # Gradient descent with heavy-ball momentum m is stable on this quadratic while lr * curvature stays
        # below 2 (1 + m); a quarter of that bound leaves room for the switching between degrees.
        quadratic = ExpectedLoss(x, y, model.min_degree, model.max_degree)
        if module.trainer.world_size > 1:  # each process holds one slice of the points: the sums add
            quadratic.gram = module.trainer.strategy.reduce(quadratic.gram, reduce_op="sum")
        curvature = quadratic.largest_curvature()
        suggestion = min(suggestion, 0.5 * (1 + group.get("momentum", 0)) / curvature)
    return f"try a smaller learning rate, e.g. --optimizer.lr {_round_down(suggestion):g}"


def _round_down(value: float) -> float:
    """value rounded down to one significant digit, so a suggested learning rate reads as a plain number."""
    exponent = math.floor(math.log10(value))
    return math.floor(value / 10**exponent) * 10**exponent
