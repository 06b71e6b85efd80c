"""The tutorial's data, x = linspace(low, high, n_points) and sin(x), served whole at every step."""

import math
from collections.abc import Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor


class StepBatches:
    """The train loader: ``steps_per_epoch`` optimizer steps on the same full batch, cut into items of
    ``steps_per_batch`` steps. Each item is ``(x, y, steps)``; Lightning's per-batch work (hooks, progress)
    is paid once per item rather than once per step."""

    def __init__(self, x: Tensor, y: Tensor, steps_per_epoch: int, steps_per_batch: int) -> None:
        self.x, self.y = x, y
        self.steps_per_epoch, self.steps_per_batch = steps_per_epoch, steps_per_batch

    def __len__(self) -> int:
        return math.ceil(self.steps_per_epoch / self.steps_per_batch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        for start in range(0, self.steps_per_epoch, self.steps_per_batch):
            yield self.x, self.y, min(self.steps_per_batch, self.steps_per_epoch - start)


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
            steps_per_batch: Optimizer steps taken on each item of the train loader. Lightning's per-batch
                overhead is paid once per item, so larger is faster; the progress display moves once per item.
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

    def setup(self, stage: str) -> None:
        # Built once, straight on the device training runs on, so no step copies it.
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        self.x = torch.linspace(self.low, self.high, self.n_points, device=device)
        self.y = torch.sin(self.x)
        # Under data parallelism each process trains on its own contiguous slice: no point is seen twice and
        # the slices' summed gradients are the full-batch gradient.
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.train_x = self.x.tensor_split(world)[rank]
        self.train_y = self.y.tensor_split(world)[rank]

    def train_dataloader(self) -> StepBatches:
        return StepBatches(self.train_x, self.train_y, self.steps_per_epoch, self.steps_per_batch)

    def val_dataloader(self) -> FullBatch:
        # Every process evaluates all points: it is cheap and gives every rank the same metric.
        return FullBatch(self.x, self.y)

    def test_dataloader(self) -> FullBatch:
        return FullBatch(self.x, self.y)

    def predict_dataloader(self) -> FullBatch:
        return FullBatch(self.x, self.y)
