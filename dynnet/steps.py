"""Lightning's settings that count train batches, on dynnet's train batches of many optimizer steps.

A dynnet train batch carries up to ``steps_per_batch`` optimizer steps (Lightning's work around a batch costs more
than a step of this model). Lightning acts at batch ends, so a batch must end at every step where a setting acts:
a logging step, a ModelCheckpoint's ``every_n_train_steps``, a validation, ``min_steps``, an epoch's end. These
functions size the batches from the Trainer itself, so that a plain ``Trainer(...).fit(DynamicNet(), SineData())``
gets the same optimizer steps as ``dynnet fit``. What cannot mean in dynnet what it means in Lightning is refused
by dynnet.fit_checks.
"""

import math

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import (
    DeviceStatsMonitor,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    ThroughputMonitor,
    TQDMProgressBar,
)

from dynnet.lightning_internals import checkpoint_steps, validation_time

# Callbacks that count Lightning's train batches (a progress bar's position, a monitor's logging interval, a
# throughput): with one of them every batch is a single optimizer step, so that they count optimizer steps.
BATCH_COUNTED = (TQDMProgressBar, RichProgressBar, LearningRateMonitor, DeviceStatsMonitor, ThroughputMonitor)
# What dynnet logs: what EarlyStopping, ModelCheckpoint and ReduceLROnPlateau can monitor.
VALIDATION_METRICS = ("val/expected_loss", "val/optimality_gap", "val/log10_gap")  # what ReduceLROnPlateau can
MONITORABLE = (*VALIDATION_METRICS, "train/loss")


def batch_grid(trainer: Trainer, steps_per_batch: int, steps_per_epoch: int) -> tuple[int, ...]:
    """The intervals, in optimizer steps, at whose every multiple a train batch ends (as well as at an epoch's end
    and at max_steps): steps_per_batch, and every interval the fit acts on, so that a batch ends at each of those
    steps. One step when a setting or callback counts train batches.

    Batches may differ in length, except when Lightning counts a validation interval inside epochs in batches:
    then all are as long as the greatest common divisor of the intervals, a whole number of them per validation.
    """
    if trainer.fast_dev_run or counts_batches(trainer):
        return (1,)  # fast_dev_run=N means N batches of training, then validation: N steps
    intervals = [steps_per_batch, trainer.log_every_n_steps, trainer.min_steps]
    intervals += [checkpoint_steps(c) for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    intervals = sorted({i for i in intervals if i})
    validation = validation_steps(trainer, steps_per_epoch)
    if validation is not None:
        return (math.gcd(steps_per_epoch, validation, *intervals),)
    return tuple(intervals)


def one_step_reason(trainer: Trainer, grid: tuple[int, ...], steps_per_batch: int) -> str | None:
    """Why every train batch is one optimizer step (slower: Lightning's work around a batch is paid every step),
    when steps_per_batch asks for more; else None."""
    if 1 not in grid or steps_per_batch == 1:
        return None
    if counts_batches(trainer):
        bars = any(isinstance(c, (TQDMProgressBar, RichProgressBar)) for c in trainer.callbacks)
        fix = " (dynnet.StepProgressBar, or no progress bar, keeps batches of many steps)" if bars else ""
        return f"{', '.join(counts_batches(trainer))} counts train batches{fix}"
    if trainer.fast_dev_run:
        return "fast_dev_run counts train batches"
    if len(grid) > 1:
        return "the fit acts at every step (an interval of 1: log_every_n_steps, checkpoints or min_steps)"
    return (
        "val_check_interval is counted in train batches, and the intervals the fit acts on (log_every_n_steps, "
        "val_check_interval, checkpoints, min_steps, the epoch) have no common divisor above 1; intervals that "
        "divide each other keep batches long"
    )


def counts_batches(trainer: Trainer) -> list[str]:
    """The names of the trainer's callbacks that count train batches."""
    return [type(c).__name__ for c in trainer.callbacks if isinstance(c, BATCH_COUNTED)]


def validation_steps(trainer: Trainer, steps_per_epoch: int) -> int | None:
    """The validation interval in optimizer steps when val_check_interval asks for one inside epochs, else None
    (once an epoch, or a time interval)."""
    if validation_time(trainer) is not None:
        raise ValueError(
            "val_check_interval as a time is checked only between train batches, which hold many optimizer steps in "
            "dynnet: give it in optimizer steps (an int) or as a fraction of an epoch"
        )
    value = trainer.val_check_interval
    if isinstance(value, bool) or value is None or (isinstance(value, float) and value >= 1.0):
        return None
    if isinstance(value, float):
        steps = int(steps_per_epoch * value)
        if steps < 1:
            raise ValueError(f"val_check_interval {value} is less than one step of a {steps_per_epoch}-step epoch")
        return steps
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"val_check_interval must be at least 1 step, got {value}")
        if value > steps_per_epoch and trainer.check_val_every_n_epoch is not None:
            raise ValueError(
                f"val_check_interval {value} is longer than an epoch ({steps_per_epoch} steps): set "
                "check_val_every_n_epoch to None to count steps across epochs"
            )
        return value
    return None


def check_resumed_batches(trained: list[int] | None, grid: tuple[int, ...], validation_interval: int | None) -> None:
    """Refuse to resume a run cut into batches on another grid when Lightning counts its validation interval in
    batches: the restored count of batches would put every later validation at another step."""
    if validation_interval is not None and trained != list(grid):
        raise ValueError(
            f"cannot resume with train batches of {grid[0]} steps (the run's were "
            f"{trained[0] if trained and len(trained) == 1 else 'cut otherwise'}): val_check_interval "
            "counts train batches; keep the run's steps_per_batch, log_every_n_steps and checkpoint intervals"
        )
