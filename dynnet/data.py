"""The tutorial's data, x = linspace(low, high, n_points) and sin(x), served whole at every step."""

import math
from collections.abc import Iterator

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from dynnet.steps import batch_steps, check_resumed_batches, counts_batches, validation_steps

# The dtype each true-precision setting trains in; every other setting keeps float32 parameters and data.
TRAINING_DTYPES = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}


def training_dtype(precision: str | None) -> torch.dtype:
    return TRAINING_DTYPES.get(str(precision), torch.float32)


class TrainItems:
    """The train loader: the run's optimizer steps on the full batch, in items ``(x, y, first_step, steps)``.

    Items lie on a fixed grid of optimizer steps: one ends at every multiple of ``steps_per_batch`` and at every
    multiple of ``steps_per_epoch`` (where the epoch ends), and one at ``max_steps`` (where Lightning stops). Each
    iteration starts at the trainer's current step, so a run resumed in the middle of an item first finishes that item
    and then follows the same grid as a run that was never interrupted. It has no length: the epoch ends where
    the items end, whatever step the run resumed at.
    """

    def __init__(self, x: Tensor, y: Tensor, trainer, steps_per_epoch: int, steps_per_batch: int) -> None:
        self.x, self.y, self.trainer = x, y, trainer
        self.steps_per_epoch, self.steps_per_batch = steps_per_epoch, steps_per_batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int, int]]:
        step = self.trainer.global_step  # read at the first item, after Lightning has restored a checkpoint
        end = (step // self.steps_per_epoch + 1) * self.steps_per_epoch
        max_steps = self.trainer.max_steps
        while step < end:
            stop = min((step // self.steps_per_batch + 1) * self.steps_per_batch, end)
            if step < max_steps < stop:
                # An item ends where Lightning stops; the epoch does not, so that, as with any loader, the last
                # batch of a fit cut short by max_steps is not taken for the epoch's last (and validated).
                stop = max_steps
            yield self.x, self.y, step, stop - step
            step = stop


class FullBatch:
    """An evaluation loader: all points as a single batch ``(x, y)``."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield self.x, self.y


class SineData(LightningDataModule):
    """Points x evenly spaced on [low, high] and targets sin(x), used whole (as one batch) at every step."""

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
            steps_per_batch: Optimizer steps in each train batch, at most. Lightning's per-batch work is paid
                once per batch, so larger is faster; a fit shortens batches so that one ends at every step it acts
                on (logging, validation, checkpoints), and makes them one step long when a callback counts batches
                (Lightning's progress bars and monitors) or under fast_dev_run.
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
        self.batch_steps = steps_per_batch  # the steps of a train batch in this fit: see setup
        self.validation_interval: int | None = None  # in optimizer steps, when validation comes inside epochs
        self._given_val_check_interval: int | float | None = None

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if stage == "fit" and trainer is not None:
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
        """Size the train batches for this fit (see dynnet.steps), and give Lightning a validation interval in
        optimizer steps as the number of train batches it counts."""
        self.batch_steps = batch_steps(trainer, self.steps_per_batch, self.steps_per_epoch)
        if self.batch_steps == 1 and counts_batches(trainer) and self.steps_per_batch > 1:
            rank_zero_info(
                f"{', '.join(counts_batches(trainer))} counts train batches: each batch is one optimizer step "
                "(dynnet.StepProgressBar, or no progress bar, keeps batches of many steps, which run faster)"
            )
        self.validation_interval = validation_steps(trainer, self.steps_per_epoch)
        if self.validation_interval is not None:
            # Lightning counts an int val_check_interval in train batches and refuses a fraction of an epoch for
            # a loader without a length. Restored when the fit ends, so the Trainer is the user's again.
            self._given_val_check_interval = trainer.val_check_interval
            trainer.val_check_interval = self.validation_interval // self.batch_steps

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._restore_val_check_interval()

    def on_exception(self, exception: BaseException) -> None:
        self._restore_val_check_interval()

    def _restore_val_check_interval(self) -> None:
        if self._given_val_check_interval is not None:
            self.trainer.val_check_interval = self._given_val_check_interval
            self._given_val_check_interval = None

    def state_dict(self) -> dict:
        # The batches a run was cut into: Lightning counts a validation interval inside epochs in batches.
        return {"batch_steps": self.batch_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        check_resumed_batches(state_dict.get("batch_steps"), self.batch_steps, self.validation_interval)

    def train_dataloader(self) -> TrainItems:
        return TrainItems(self.train_x, self.train_y, self.trainer, self.steps_per_epoch, self.batch_steps)

    def val_dataloader(self) -> FullBatch:
        # Every process evaluates all points: it is cheap and gives every rank the same metric.
        return FullBatch(self.x, self.y)

    def test_dataloader(self) -> FullBatch:
        return FullBatch(self.x, self.y)

    def predict_dataloader(self) -> FullBatch:
        return FullBatch(self.x, self.y)
