"""The tutorial's data, x = linspace(low, high, n_points) and sin(x), served whole at every step."""

import math
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor

from dynnet.lightning_internals import set_max_steps, set_validation_batches
from dynnet.steps import batch_grid, check_resumed_batches, one_step_reason, validation_steps

# The dtype each true-precision setting trains in; every other setting keeps float32 parameters and data.
TRAINING_DTYPES = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}


def training_dtype(precision: str | None) -> torch.dtype:
    return TRAINING_DTYPES.get(str(precision), torch.float32)


def runs_of_steps(module) -> bool:
    """Whether a LightningModule trains many optimizer steps in one train batch (DynamicNet does)."""
    return getattr(module, "runs_of_steps", False)


class TrainItems:
    """A DynamicNet's train loader: the run's optimizer steps on the full batch, in items ``(x, y, first_step,
    steps)``.

    Items lie on a fixed grid of optimizer steps: one ends at every multiple of each interval of ``grid`` (see
    dynnet.steps.batch_grid), at every multiple of ``steps_per_epoch`` (where the epoch ends), and one at
    ``max_steps`` (where Lightning stops). Each iteration starts at the trainer's current step, so a run resumed in
    the middle of an item first finishes that item and then follows the same grid as a run that was never
    interrupted. It has no length: the epoch ends where the items end, whatever step the run resumed at.
    """

    def __init__(self, x: Tensor, y: Tensor, trainer, steps_per_epoch: int, grid: tuple[int, ...]) -> None:
        self.x, self.y, self.trainer = x, y, trainer
        self.steps_per_epoch, self.grid = steps_per_epoch, grid

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int, int]]:
        step = self.trainer.global_step  # read at the first item, after Lightning has restored a checkpoint
        end = (step // self.steps_per_epoch + 1) * self.steps_per_epoch
        max_steps = self.trainer.max_steps
        while step < end:
            stop = min(end, *((step // interval + 1) * interval for interval in self.grid))
            if step < max_steps < stop:
                # An item ends where Lightning stops; the epoch does not, so that, as with any loader, the last
                # batch of a fit cut short by max_steps is not taken for the epoch's last (and validated).
                stop = max_steps
            yield self.x, self.y, step, stop - step
            step = stop


class StepBatches:
    """The train loader for any other LightningModule: the full batch ``(x, y)`` once per optimizer step,
    ``steps_per_epoch`` of them an epoch."""

    def __init__(self, x: Tensor, y: Tensor, steps_per_epoch: int) -> None:
        self.x, self.y, self.steps_per_epoch = x, y, steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(self.steps_per_epoch):
            yield self.x, self.y


class FullBatch:
    """An evaluation loader: all points as a single batch ``(x, y)``."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield self.x, self.y


class SineData(LightningDataModule):
    """Points x evenly spaced on [low, high] and targets sin(x), used whole (as one batch) at every step.

    Any LightningModule gets the full batch ``(x, y)`` once per optimizer step, ``steps_per_epoch`` batches an
    epoch. A module that trains many steps in one batch, as DynamicNet does (it sets ``runs_of_steps = True``),
    gets the steps in runs instead: items ``(x, y, first_step, steps)``, cut where the fit acts (see dynnet.steps).
    """

    def __init__(
        self,
        n_points: int = 2000,
        low: float = -math.pi,
        high: float = math.pi,
        steps_per_epoch: int = 2000,
        steps_per_batch: int = 500,
    ) -> None:
        """
        Args:
            n_points: How many points on [low, high]; the tutorial uses 2000.
            low: Left end of the interval (included).
            high: Right end of the interval (included).
            steps_per_epoch: Optimizer steps in one epoch; validation and checkpoints come once per epoch.
                2000 matches the tutorial's report interval.
            steps_per_batch: Optimizer steps in each train batch, at most, for a module that trains runs of steps
                (DynamicNet). Lightning's per-batch work is paid once per batch, so larger is faster; a fit ends
                batches at every step it acts on (logging, validation, checkpoints), and makes them one step long
                when a callback counts batches (Lightning's progress bars and monitors) or under fast_dev_run.
        """
        super().__init__()
        if n_points < 2:
            raise ValueError(f"n_points must be at least 2, got {n_points}")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"low must be below high and both finite, got low={low} and high={high}")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        if steps_per_batch < 1:
            raise ValueError(f"steps_per_batch must be at least 1, got {steps_per_batch}")
        self.save_hyperparameters()
        self.n_points, self.low, self.high = n_points, low, high
        self.steps_per_epoch, self.steps_per_batch = steps_per_epoch, steps_per_batch
        self.grid: tuple[int, ...] | None = None  # where this fit's runs of steps end: see setup
        self.validation_interval: int | None = None  # in optimizer steps, when validation comes inside epochs
        self._given: dict[str, Any] = {}  # the Trainer's settings this fit changed, put back when it ends

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if stage == "fit":
            self.grid = None  # one step a batch, unless the module trains runs of steps
            if trainer is not None and runs_of_steps(trainer.lightning_module):
                self._fit_on_steps(trainer)
        # Built once, straight on the device and in the dtype training runs in, so no step copies or converts it.
        # linspace runs in float32 as in the tutorial, so every precision sees the tutorial's points.
        device = trainer.strategy.root_device if trainer else torch.device("cpu")
        dtype = training_dtype(trainer.precision if trainer else None)
        x = torch.linspace(self.low, self.high, self.n_points, device=device)
        self.x, self.y = x.to(dtype), torch.sin(x).to(dtype)
        # Under data parallelism each process trains on its own contiguous slice: no point is seen twice and
        # the slices' summed gradients are the full-batch gradient.
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        self.train_x = self.x.tensor_split(world)[rank]
        self.train_y = self.y.tensor_split(world)[rank]

    def _fit_on_steps(self, trainer) -> None:
        """Cut this fit's steps into train batches (see dynnet.steps), and give Lightning what it counts in batches
        in optimizer steps: the validation interval inside epochs, and the step max_epochs ends the fit at (its
        estimated_stepping_batches). Both are put back when the fit ends, so the Trainer is the user's again."""
        self.grid = batch_grid(trainer, self.steps_per_batch, self.steps_per_epoch)
        reason = one_step_reason(trainer, self.grid, self.steps_per_batch)
        if reason and trainer.is_global_zero:
            print(f"Train batches of one optimizer step, which is slower: {reason}", flush=True)
        self.validation_interval = validation_steps(trainer, self.steps_per_epoch)
        if self.validation_interval is not None:
            # Lightning counts an int val_check_interval in train batches and refuses a fraction of an epoch for
            # a loader without a length.
            self._given["val_check_interval"] = trainer.val_check_interval
            set_validation_batches(trainer, self.validation_interval // self.grid[0])
        epochs, max_steps = trainer.max_epochs, trainer.max_steps
        if epochs is not None and epochs >= 0 and (max_steps < 0 or epochs * self.steps_per_epoch < max_steps):
            # Lightning estimates a loader without a length to train max_steps; max_epochs ends this fit first.
            self._given["max_steps"] = max_steps
            set_max_steps(trainer, epochs * self.steps_per_epoch)

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._restore_trainer()

    def on_exception(self, exception: BaseException) -> None:
        self._restore_trainer()

    def _restore_trainer(self) -> None:
        if "val_check_interval" in self._given:
            set_validation_batches(self.trainer, self._given["val_check_interval"])
        if "max_steps" in self._given:
            set_max_steps(self.trainer, self._given["max_steps"])
        self._given = {}

    def state_dict(self) -> dict:
        # The grid a run was cut on: Lightning counts a validation interval inside epochs in batches.
        return {"batch_grid": list(self.grid) if self.grid else None}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.grid is not None:
            check_resumed_batches(state_dict.get("batch_grid"), self.grid, self.validation_interval)

    def train_dataloader(self) -> TrainItems | StepBatches:
        if self.grid is None:
            return StepBatches(self.train_x, self.train_y, self.steps_per_epoch)
        return TrainItems(self.train_x, self.train_y, self.trainer, self.steps_per_epoch, self.grid)

    def val_dataloader(self) -> FullBatch:
        # Every process evaluates all points: it is cheap and gives every rank the same metric.
        return FullBatch(self.x, self.y)

    def test_dataloader(self) -> FullBatch:
        return FullBatch(self.x, self.y)

    def predict_dataloader(self) -> FullBatch:
        return FullBatch(self.x, self.y)
