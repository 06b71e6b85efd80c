"""What a run shows its user: a step-based progress display and the closing Result line."""

import sys
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
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


class RunReport(Callback):
    """Says where a resumed run picked up; at the end prints the training speed, the tutorial's Result line and
    the log folder."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start_step, self.start_time = trainer.global_step, time.perf_counter()
        if trainer.ckpt_path and trainer.is_global_zero:
            print(f"Resumed from {trainer.ckpt_path} at step {trainer.global_step}", flush=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start_time
        steps = trainer.global_step - self.start_step
        if trainer.is_global_zero:
            print(f"Trained {steps} steps in {seconds:.3f} s ({steps / seconds:.0f} steps/s)", flush=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every process must ask
        if trainer.is_global_zero:
            print(f"Result: {pl_module.model.formula()}")
            print(f"Logs: {log_dir}", flush=True)
