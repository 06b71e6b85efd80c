"""What `dynnet fit` refuses before anything starts, and why: settings that cannot work here, features whose
meaning Lightning counts in train batches, numbers the training dtype or the memory cannot hold, and changes a
resumed run cannot take. Each refusal is one line that says what to use instead."""

import contextlib
import importlib
import math
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    DeviceStatsMonitor,
    EarlyStopping,
    GradientAccumulationScheduler,
    LearningRateFinder,
    LearningRateMonitor,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    ThroughputMonitor,
)

from dynnet.data import training_dtype
from dynnet.module import class_path, is_number

# What a batch-counted Lightning feature needs instead, in dynnet.
REFUSED_CALLBACKS = {
    LearningRateMonitor: "dynnet logs the learning rate as train/lr every log_every_n_steps optimizer steps",
    DeviceStatsMonitor: "it logs against Lightning's batch count",
    ThroughputMonitor: "the progress display and the `Trained ... steps/s` line give the speed in steps",
}
# What dynnet's validation logs: what EarlyStopping, ModelCheckpoint and ReduceLROnPlateau can monitor.
MONITORABLE = ("val/expected_loss", "val/optimality_gap", "val/log10_gap", "train/loss")


def check_trainer_flags(trainer) -> None:
    """Refuse, before anything starts, Trainer flags that cannot work here, or whose batch-counted meaning dynnet
    cannot give in steps."""
    if str(trainer.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "it sees no CUDA device"
        raise ValueError(
            f"--trainer.accelerator {trainer.accelerator}: torch cannot use a GPU here ({why}); "
            "use --trainer.accelerator cpu (or auto)"
        )
    if trainer.max_steps is not None and trainer.max_steps < -1:
        raise ValueError(f"--trainer.max_steps must be -1 (no limit) or a step count, got {trainer.max_steps}")
    every = trainer.check_val_every_n_epoch
    if every is not None and every < 1:
        raise ValueError(f"--trainer.check_val_every_n_epoch must be at least 1 (or null), got {every}")
    if trainer.limit_train_batches not in (None, 1, 1.0):
        raise ValueError(
            "--trainer.limit_train_batches counts train batches, which hold many optimizer steps in dynnet: "
            "shorten training with --trainer.max_steps or --data.steps_per_epoch"
        )
    if trainer.accumulate_grad_batches not in (None, 1):
        raise ValueError(
            "--trainer.accumulate_grad_batches is not supported: every dynnet step already uses all the points; "
            "change the step size with --optimizer.lr"
        )
    if trainer.overfit_batches not in (None, 0, 0.0):
        raise ValueError("--trainer.overfit_batches does not apply: every dynnet step trains on all the points")
    if trainer.log_every_n_steps is not None and trainer.log_every_n_steps < 0:
        raise ValueError(f"--trainer.log_every_n_steps must be 0 (no logging) or more, got {trainer.log_every_n_steps}")
    if str(trainer.strategy).startswith("ddp_spawn"):
        raise ValueError(
            "--trainer.strategy ddp_spawn is not supported (the CLI's optimizer does not survive the spawn): use "
            "ddp, which launches the processes itself, or torchrun"
        )
    if trainer.gradient_clip_algorithm not in (None, "norm", "value"):
        algorithm = trainer.gradient_clip_algorithm
        raise ValueError(f"--trainer.gradient_clip_algorithm must be norm or value, got {algorithm}")


def check_optimizer(spec) -> None:
    momentum = (spec.get("init_args") or Namespace()).get("momentum")
    if momentum is not None and not 0 <= momentum < 1:
        raise ValueError(f"--optimizer.momentum must be in [0, 1), got {momentum}: at 1 or above every step grows")


def refuse_callbacks(callbacks: list[Callback], item_steps: int | None) -> None:
    for callback in callbacks:
        for kind, instead in REFUSED_CALLBACKS.items():
            if isinstance(callback, kind) and item_steps != 1:
                raise ValueError(
                    f"{kind.__name__} counts Lightning's train batches, which hold up to {item_steps} optimizer "
                    f"steps in this run; {instead} (or use --data.steps_per_batch 1, one step per batch)"
                )
        if isinstance(callback, (LearningRateFinder, BatchSizeFinder)):
            raise ValueError(
                f"{type(callback).__name__} needs Lightning's automatic optimization, which dynnet's step loop "
                "does not use: search learning rates with dynnet-sweep"
            )
        if isinstance(callback, GradientAccumulationScheduler):
            raise ValueError(
                "GradientAccumulationScheduler is not supported: every dynnet step already uses all the points; "
                "change the step size with --optimizer.lr or a --lr_scheduler"
            )
        if isinstance(callback, OnExceptionCheckpoint):
            raise ValueError(
                "OnExceptionCheckpoint would make every later fit resume from its file: dynnet saves last.ckpt "
                "when SIGTERM or SIGINT stop a fit, and resumes it with --ckpt_path last; drop OnExceptionCheckpoint"
            )
        monitor = getattr(callback, "monitor", None)
        if isinstance(callback, (EarlyStopping, ModelCheckpoint)) and monitor not in (None, *MONITORABLE):
            raise ValueError(
                f"{type(callback).__name__} monitors {monitor!r}, which dynnet does not log; "
                f"use one of {', '.join(MONITORABLE)}"
            )
        if isinstance(callback, ModelCheckpoint):
            if callback.save_last:
                raise ValueError(
                    "ModelCheckpoint(save_last=...): dynnet keeps <run>/checkpoints/last.ckpt itself, the run's "
                    "latest state (after every validation, at the end, and on SIGTERM/SIGINT); drop save_last"
                )
            if callback._train_time_interval is not None:
                raise ValueError(
                    "ModelCheckpoint(train_time_interval=...) never fires under manual optimization in Lightning "
                    f"{_lightning_version()}; use every_n_train_steps"
                )


def check_numbers(config) -> None:
    """Refuse a fit whose numbers the training dtype cannot hold, or whose tensors memory cannot, before it starts."""
    data, model, trainer = config.data, config.model, config.trainer
    dtype = training_dtype(precision_name(trainer.precision))
    largest = max(abs(data.low), abs(data.high))
    biggest = torch.finfo(dtype).max
    # The loss sums n squared residuals of size up to |x|^max_degree, and its gradient has the same scale.
    for degree in range(max(model.max_degree, 1) + 1):
        scale = data.n_points * largest ** (2 * degree)
        if not scale < biggest:
            remedies = ["--trainer.precision 64-true" if dtype != torch.float64 else None]
            remedies.append(f"a --model.max_degree below {degree}" if degree > model.min_degree else None)
            remedies += ["a narrower interval (--data.low/--data.high)", "fewer points (--data.n_points)"]
            raise ValueError(
                f"{dtype} cannot hold this fit: the squared error of x**{degree} over {data.n_points} points with "
                f"|x| up to {largest:g} reaches {scale:.3g}, beyond {dtype}'s largest {biggest:.3g}; use "
                + ", ".join(r for r in remedies if r)
            )
    processes = max(1, (trainer.devices if isinstance(trainer.devices, int) else 1) * (trainer.num_nodes or 1))
    need = training_bytes(data.n_points, model.max_degree, dtype, processes)
    have = available_memory(str(trainer.accelerator))
    if have is not None and need > have:
        raise ValueError(
            f"training {data.n_points} points in {dtype} needs about {need / 2**30:.1f} GiB, but "
            f"{have / 2**30:.1f} GiB is available: use fewer points (--data.n_points)"
        )


def training_bytes(n_points: int, max_degree: int, dtype: torch.dtype, processes: int = 1) -> int:
    """Peak memory of a fit's tensors on one machine: the data, x**0 .. x**max_degree, and the forward and
    backward temporaries of a step (about six more vectors), each n_points long; evaluation adds a few MB."""
    size = torch.finfo(dtype).bits // 8
    per_process = math.ceil(n_points / processes)
    return (2 * n_points + (max_degree + 7) * per_process * processes) * size + (64 << 20)


def available_memory(accelerator: str) -> int | None:
    """Bytes a new fit can use: the GPU's free memory, or the host's available memory (within a cgroup limit)."""
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    have = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit, used = (Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current"))
        if limit != "max":
            have = min(have, int(limit) - int(used))
    return have


def check_resumable(path: Path, checkpoint: dict, config) -> None:
    """Refuse, in one line, a resume whose settings differ from the run's where the difference cannot apply."""
    settings = checkpoint["run_settings"]
    step = checkpoint["global_step"]
    max_steps = last_step(config)
    if 0 <= max_steps <= step:
        raise ValueError(
            f"checkpoint {path} is at step {step}, and --trainer.max_steps is {max_steps}: nothing to train; "
            "raise max_steps to continue the run"
        )
    differences = []
    seed = config.seed_everything
    if isinstance(seed, int) and not isinstance(seed, bool) and settings.get("seed") not in (None, seed):
        differences.append(("seed_everything", seed, settings["seed"]))
    precision = precision_name(config.trainer.precision, config.trainer.accelerator)
    if settings.get("precision") not in (None, precision):
        differences.append(("trainer.precision", precision, settings["precision"]))
    optimizer = class_path(import_class(config.optimizer.class_path))
    if settings.get("optimizer") not in (None, optimizer):
        differences.append(("optimizer", optimizer, settings["optimizer"]))
    trained_args = settings.get("optimizer_args", {})
    for name, value in vars(config.optimizer.get("init_args") or Namespace()).items():
        old = trained_args.get(name, value)
        if old != value and not (is_number(old) and is_number(value)):  # numbers apply from the resumed step
            differences.append((f"optimizer.{name}", value, old))
    scheduler = class_path(import_class(config.lr_scheduler.class_path)) if config.get("lr_scheduler") else None
    if settings.get("lr_scheduler") != scheduler:
        differences.append(("lr_scheduler", scheduler, settings.get("lr_scheduler")))
    elif scheduler is not None:
        trained_args = settings.get("lr_scheduler_args", {})
        for name, value in vars(config.lr_scheduler.get("init_args") or Namespace()).items():
            if name not in ("last_epoch", "verbose") and trained_args.get(name, value) != value:
                differences.append((f"lr_scheduler.{name}", value, trained_args[name]))
    if settings.get("lr_interval") not in (None, config.lr_interval):
        differences.append(("lr_interval", config.lr_interval, settings["lr_interval"]))
    for name in ("n_points", "low", "high", "steps_per_epoch"):
        trained = settings.get("data", {}).get(name)
        if trained is not None and trained != config.data[name]:
            differences.append((f"data.{name}", config.data[name], trained))
    if differences:
        name, new, old = differences[0]
        raise ValueError(
            f"cannot resume from {path} with a changed {name}: it is {new}, the run was trained with {old}; "
            "resume with the run's value, or start a new run without --ckpt_path"
        )


def validation_steps(config) -> int | None:
    """The validation interval in optimizer steps when val_check_interval asks for one inside epochs, else None."""
    value = config.trainer.val_check_interval
    if isinstance(value, bool) or value is None or (isinstance(value, float) and value >= 1.0):
        return None
    spe = config.data.steps_per_epoch
    if isinstance(value, float):
        steps = int(spe * value)
        if steps < 1:
            raise ValueError(f"--trainer.val_check_interval {value} is less than one step of a {spe}-step epoch")
        return steps
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"--trainer.val_check_interval must be at least 1 step, got {value}")
        if value > spe and config.trainer.check_val_every_n_epoch is not None:
            raise ValueError(
                f"--trainer.val_check_interval {value} is longer than an epoch ({spe} steps): set "
                "--trainer.check_val_every_n_epoch null to count steps across epochs"
            )
        return value
    return None  # a time interval: checked at every batch end


def last_step(config) -> int:
    """The step the run stops at, so that Lightning's estimated_stepping_batches counts optimizer steps."""
    trainer = config.trainer
    max_steps = trainer.max_steps if trainer.max_steps is not None else -1
    max_epochs = trainer.max_epochs
    if max_epochs is None and max_steps == -1 and trainer.max_time is None:
        max_epochs = 1000  # Lightning's default when nothing bounds a fit
    if max_epochs is not None and max_epochs >= 0:
        by_epochs = max_epochs * config.data.steps_per_epoch
        max_steps = by_epochs if max_steps == -1 else min(max_steps, by_epochs)
    return max_steps


def precision_name(value: Any, accelerator: Any = "cpu") -> str:
    """Lightning's precision setting in its canonical form, as trainer.precision reports it."""
    value = "32-true" if value is None else str(value)
    value = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(value, value)
    gpu = str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if value == "16-mixed" and not gpu else value  # Lightning's substitute on a CPU


def import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _lightning_version() -> str:
    import lightning

    return lightning.__version__
