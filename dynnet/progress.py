"""The progress display of `dynnet fit`: optimizer steps, the loss and steps per second."""

import sys
import time

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm


class StepProgressBar(ProgressBar):
    """Shows the optimizer step, the loss and steps per second, redrawn a few times a second."""

    def __init__(self, refresh_seconds: float = 0.25) -> None:
        super().__init__()
        self.refresh_seconds = refresh_seconds
        self.enabled = True
        self.bar: tqdm | None = None
        self.last_draw = 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self.bar = tqdm(
            total=total,
            initial=trainer.global_step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.enabled and trainer.is_global_zero),
            file=sys.stderr,
            mininterval=self.refresh_seconds,
        )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        now = time.monotonic()
        if self.bar.disable or pl_module.last_loss is None or now - self.last_draw < self.refresh_seconds:
            return
        self.last_draw = now
        self.bar.set_postfix(loss=f"{pl_module.last_loss.item():.4g}", refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.bar.update(trainer.global_step - self.bar.n)
        self.bar.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.bar is not None:
            self.bar.close()  # end the bar's line, so the error that follows gets one of its own
