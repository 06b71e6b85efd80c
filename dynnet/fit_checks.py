"""A fit's checks: what any fit refuses, whoever built its Trainer, each in one line and once.

DynamicNet calls ``check_start`` from its first hook (``configure_callbacks``, before Lightning checks its own
settings and before anything is set up or written), and ``check_optimization`` from ``on_fit_start``, the first
moment the fit's optimizers and schedulers exist. The command refuses what it can from its config before it makes
a run folder (dynnet.cli.checks).
"""

import contextlib
import math
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    EarlyStopping,
    GradientAccumulationScheduler,
    LearningRateFinder,
    ModelCheckpoint,
    ModelPruning,
)
from lightning.pytorch.trainer.states import TrainerFn

from dynnet.data import SineData, training_dtype
from dynnet.lightning_internals import checkpoint_saves_by_time
from dynnet.steps import MONITORABLE, VALIDATION_METRICS, validation_steps


def check_start(module, trainer: Trainer) -> None:
    """What a DynamicNet's fit, validation, test or prediction refuses before it starts: other data than SineData
    where the steps need it, fewer points than coefficients, Trainer settings and callbacks that cannot mean in
    dynnet what they mean in Lightning, and numbers or memory the fit cannot hold."""
    data, model, stage = trainer.datamodule, module.model, trainer.state.fn
    if stage in (TrainerFn.FITTING, TrainerFn.PREDICTING) and not isinstance(data, SineData):
        raise ValueError("DynamicNet trains and predicts on SineData's batches: pass datamodule=SineData(...)")
    coefficients = model.min_degree + 2
    if isinstance(data, SineData) and data.n_points < coefficients:
        raise ValueError(
            f"data.n_points is {data.n_points}, fewer than the model's {coefficients} coefficients: the expected "
            "loss then has no single optimum to measure the fit against; use more points"
        )
    dtype = training_dtype(trainer.precision)
    if stage == TrainerFn.FITTING:
        refuse_unsupported(trainer)
        validation_steps(trainer, data.steps_per_epoch)  # refuses an interval that cannot be
        check_numbers(data.n_points, data.low, data.high, model.max_degree, model.min_degree, dtype)
        need = training_bytes(data.n_points, model.max_degree, dtype, trainer.world_size)
        check_memory(f"training {data.n_points} points in {dtype}", need, trainer.strategy.root_device)
    elif stage == TrainerFn.PREDICTING:
        need = prediction_bytes(data.n_points, model.min_degree, model.max_degree, dtype)
        check_memory(f"predicting {data.n_points} points", need, trainer.strategy.root_device)


def check_optimization(trainer: Trainer) -> None:
    """What a fit refuses of the optimizers and schedulers its module configured: more than one optimizer, a
    ReduceLROnPlateau that cannot work, a schedule that cannot last the fit."""
    if len(trainer.optimizers) != 1:
        raise ValueError(
            f"configure_optimizers gave {len(trainer.optimizers)} optimizers; DynamicNet trains its coefficients "
            "with one (give it parameter groups for different settings)"
        )
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if is_plateau(config):
            for group in scheduler.optimizer.param_groups:
                check_plateau(group["lr"], scheduler.factor, scheduler.eps, plateau_monitor(config))
        total = getattr(scheduler, "total_steps", None)  # OneCycleLR's: it refuses to step past it
        if total is not None and config.interval == "step" and total < trainer.max_steps:
            raise ValueError(
                f"{type(scheduler).__name__}(total_steps={total}) cannot step {trainer.max_steps} times; "
                f"give it total_steps={trainer.max_steps} (max_steps)"
            )


def refuse_unsupported(trainer: Trainer) -> None:
    """Refuse, in one line, Trainer settings and callbacks that cannot mean in dynnet what they mean in Lightning."""
    if trainer.limit_train_batches not in (None, 1, 1.0) and not trainer.fast_dev_run:  # its own limit: N steps
        raise ValueError(
            "limit_train_batches counts train batches, which hold many optimizer steps in dynnet: shorten "
            "training with max_steps (--trainer.max_steps) or SineData(steps_per_epoch) (--data.steps_per_epoch)"
        )
    if trainer.overfit_batches not in (None, 0, 0.0):
        raise ValueError("overfit_batches does not apply: every dynnet step trains on all the points")
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            "accumulate_grad_batches is not supported: every dynnet step already uses all the points; change the "
            "step size with the optimizer's lr (--optimizer.lr)"
        )
    if trainer.gradient_clip_val:
        raise ValueError(
            "Trainer(gradient_clip_val=...) clips only under Lightning's automatic optimization: give it to the "
            "module, DynamicNet(gradient_clip_val=..., gradient_clip_algorithm=...), which clips every step"
        )
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if isinstance(callback, (LearningRateFinder, BatchSizeFinder)):
            raise ValueError(
                f"{name} needs Lightning's automatic optimization, which dynnet's step loop does not use: search "
                "learning rates with dynnet-sweep"
            )
        if isinstance(callback, GradientAccumulationScheduler):
            raise ValueError(
                "GradientAccumulationScheduler is not supported: every dynnet step already uses all the points; "
                "change the step size with the optimizer's lr or a learning-rate schedule"
            )
        if isinstance(callback, ModelPruning):
            raise ValueError(
                "ModelPruning prunes the weights of layers such as nn.Linear; DynamicPolynomial has only its scalar "
                "coefficients, so there is nothing to prune: drop ModelPruning"
            )
        monitor = getattr(callback, "monitor", None)
        if isinstance(callback, (EarlyStopping, ModelCheckpoint)) and monitor not in (None, *MONITORABLE):
            raise ValueError(
                f"{name} monitors {monitor!r}, which dynnet does not log; use one of {', '.join(MONITORABLE)}"
            )
        if isinstance(callback, ModelCheckpoint) and checkpoint_saves_by_time(callback):
            raise ValueError(
                "ModelCheckpoint(train_time_interval=...) never fires under manual optimization in this Lightning; "
                "use every_n_train_steps"
            )


def is_plateau(config) -> bool:
    """Whether a scheduler config holds a ReduceLROnPlateau, which DynamicNet steps after every validation."""
    return isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def plateau_monitor(config) -> str:
    """What a ReduceLROnPlateau steps on. Lightning drops a scheduler's monitor under manual optimization;
    LightningCLI's ReduceLROnPlateau keeps its own, torch's monitors the expected loss."""
    return getattr(config.scheduler, "monitor", "val/expected_loss")


def check_numbers(n_points: int, low: float, high: float, max_degree: int, min_degree: int, dtype: torch.dtype) -> None:
    """Refuse a fit whose squared error the training dtype cannot hold."""
    largest = max(abs(low), abs(high))
    biggest = torch.finfo(dtype).max
    # The loss sums n squared residuals of size up to |x|^max_degree, and its gradient has the same scale.
    for degree in range(max(max_degree, 1) + 1):
        scale = n_points * largest ** (2 * degree)
        if not scale < biggest:
            remedies = ["trainer.precision 64-true" if dtype != torch.float64 else None]
            remedies.append(f"a model.max_degree below {degree}" if degree > min_degree else None)
            remedies += ["a narrower interval (data.low, data.high)", "fewer points (data.n_points)"]
            raise ValueError(
                f"{dtype} cannot hold this fit: the squared error of x**{degree} over {n_points} points with "
                f"|x| up to {largest:g} reaches {scale:.3g}, beyond {dtype}'s largest {biggest:.3g}; use "
                + ", ".join(r for r in remedies if r)
            )


def check_memory(what: str, need: int, device: torch.device) -> None:
    """Refuse work that needs more memory than the device has available."""
    have = available_memory(device)
    if have is not None and need > have:
        raise ValueError(
            f"{what} needs about {need / 2**30:.1f} GiB, but {have / 2**30:.1f} GiB is available: use fewer points "
            "(data.n_points)"
        )


def training_bytes(n_points: int, max_degree: int, dtype: torch.dtype, processes: int = 1) -> int:
    """Peak memory of a fit's tensors on one machine: the data, x**0 .. x**max_degree, and the forward and
    backward temporaries of a step (about six more vectors), each n_points long; evaluation adds a few MB."""
    size = torch.finfo(dtype).bits // 8
    per_process = math.ceil(n_points / processes)
    return (2 * n_points + (max_degree + 7) * per_process * processes) * size + (64 << 20)


def prediction_bytes(n_points: int, min_degree: int, max_degree: int, dtype: torch.dtype) -> int:
    """Peak memory of predicting n_points: the data, the powers of x and a column per degree and the expected value;
    then the CSV, built whole before it is written (a Python float per number, about 32 bytes, and its text)."""
    size = torch.finfo(dtype).bits // 8
    columns = (max_degree - min_degree + 1) + 3  # x, the target, each degree's prediction, the expected one
    return n_points * ((max_degree + 1 + columns) * size + columns * 72) + (64 << 20)


def available_memory(device: torch.device) -> int | None:
    """Bytes new work can use: the GPU's free memory, or the host's available memory (within a cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = [line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    if not found:  # a kernel older than 3.14, or a container that hides it: nothing to check against
        return None
    have = int(found[0]) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit, used = (Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current"))
        if limit != "max":
            have = min(have, int(limit) - int(used))
    return have


def check_plateau(lr: float, factor: float, eps: float, monitor: str) -> None:
    """Refuse a ReduceLROnPlateau that monitors what validation does not log, or that could never lower the lr:
    torch skips a reduction smaller than its eps (1e-8 by default), and at the tutorial's lr of 1e-8 every
    reduction is smaller."""
    if monitor not in VALIDATION_METRICS:
        raise ValueError(
            f"ReduceLROnPlateau monitors {monitor!r}, which validation does not log; use one of "
            f"{', '.join(VALIDATION_METRICS)}"
        )
    if 0 < lr * (1 - factor) <= eps:
        raise ValueError(
            f"ReduceLROnPlateau skips reductions smaller than its eps ({eps:g}), and at lr {lr:g} with factor "
            f"{factor:g} every reduction is: give it eps={lr * 1e-8:g} (--lr_scheduler.eps {lr * 1e-8:g}), the lr "
            "times torch's default 1e-8"
        )
