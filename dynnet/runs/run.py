"""``Run``, the callback that keeps a fit's run folder: its config, last and best checkpoints, the stop signals, and
what a fit prints."""

import math
import os
import re
import reprlib
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint

from dynnet import signals
from dynnet.runs.checkpoint import CheckpointError
from dynnet.runs.checkpoint_state import files_outside
from dynnet.runs.files import write_atomically
from dynnet.runs.folder import LAST


class Run(Checkpoint):
    """Keeps a fit's run folder and tells its user what happened.

    - writes the run's config (config.yaml; config-step<N>.yaml for a resumed run);
    - saves ``last.ckpt``, the run's latest state, after every validation of the fit, at the end of training and
      where SIGTERM, SIGINT or SIGHUP stopped it; and, unless the user gives a ModelCheckpoint, ``best-step=<N>.ckpt``,
      the state with the lowest ``val/expected_loss`` so far;
    - stops training on SIGTERM, SIGINT or SIGHUP at the next step boundary;
    - logs the evaluation at the step where a signal stopped the fit;
    - moves a resumed run's checkpoint bookkeeping to where its folder is now, and removes files a kill left;
    - prints the resume point, the training speed, the tutorial's Result line and where the logs are.

    A Checkpoint, so Lightning runs it after every other callback (ModelCheckpoint included): the state it saves
    already holds their updates for the step.
    """

    def __init__(
        self,
        path: Path | None,
        config: str | None = None,
        save: bool = True,
        best: bool = True,
        lr_scheduler_args: dict | None = None,
    ) -> None:
        """
        Args:
            path: The run folder (on processes other than rank 0, replaced by rank 0's); None writes nothing.
            config: The run's config as YAML.
            save: Whether to save checkpoints at all (False for --trainer.enable_checkpointing false).
            best: Whether to keep the best checkpoint (False when the user gives a ModelCheckpoint).
            lr_scheduler_args: The schedule's arguments, kept in checkpoints so that a resume can tell a changed
                one (a scheduler's own state lacks some, such as OneCycleLR's max_lr).
        """
        self.path, self.config = path, config
        self.lr_scheduler_args = lr_scheduler_args or {}
        self.save_last, self.save_best = save and path is not None, save and best and path is not None
        self.best_name: str | None = None
        self.best_score: float | None = None
        self.resumed_at: int | None = None
        self.saved_step: int | None = None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def state_dict(self) -> dict:
        return {
            "path": str(self.path),
            "best": self.best_name,
            "best_score": self.best_score,
            "lr_scheduler_args": self.lr_scheduler_args,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_name, self.best_score = state_dict["best"], state_dict["best_score"]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        path = trainer.strategy.broadcast(str(self.path) if self.path else None)
        self.path = Path(path) if path else None
        self.other_checkpoints = any(isinstance(c, Checkpoint) and c is not self for c in trainer.callbacks)
        self.start_step, self.start_time, self.seconds = 0, time.perf_counter(), 0.0
        # From here a signal stops the fit at the next step boundary, or before the first; Lightning installs a
        # handler of its own before training (which calls this one too), and on_train_start takes over again.
        self._handle_signals(pl_module)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self.resumed_at = checkpoint["global_step"]
        # Callbacks keep absolute paths of their files. A run folder that was moved or copied continues with its
        # own files: rewrite the old folder's paths before the callbacks load their state.
        old = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("path")
        if old and self.path and old != str(self.path):
            checkpoint["callbacks"] = _rebase(checkpoint["callbacks"], old, str(self.path))
        _check_callback_files(trainer, checkpoint.get("callbacks", {}), self.path, self.state_key)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        print(f"Model: {pl_module.model.describe()}", flush=True)  # what Lightning's summary table would say
        if self.resumed_at is not None:
            print(f"Resumed from {trainer.ckpt_path} at step {self.resumed_at}", flush=True)

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._handle_signals(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._handle_signals(pl_module)
        self.start_step, self.start_time = trainer.global_step, time.perf_counter()
        if not trainer.is_global_zero or self.path is None:
            return
        if self.config is not None:
            name = "config.yaml" if self.resumed_at is None else f"config-step{self.resumed_at}.yaml"
            write_atomically(self.path / name, lambda file: file.write(self.config.encode()))
        if self.save_best:
            # A kill between writing a new best checkpoint and deleting the old one, or before the last checkpoint
            # recorded the new one, leaves a file the restored state does not know; the resumed run writes it
            # again when it gets there.
            for path in self.checkpoints.glob("best-*.ckpt"):
                if path.name != self.best_name:
                    path.unlink()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get("val/expected_loss")
        if self.save_best and score is not None and (self.best_score is None or float(score) < self.best_score):
            previous, self.best_name, self.best_score = (
                self.best_name,
                f"best-step={trainer.global_step}.ckpt",
                float(score),
            )
            self._save(trainer, self.checkpoints / self.best_name)
            if previous and previous != self.best_name and trainer.is_global_zero:
                (self.checkpoints / previous).unlink(missing_ok=True)
        self.save(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A ModelCheckpoint that validates once an epoch saves at the epoch's end, after the validation that wrote
        # last.ckpt: save it again, now that the epoch is complete, so that it records what they saved (saving
        # in on_train_epoch_end would have a resumed run replay the epoch's end for them).
        if self.other_checkpoints and self.saved_step == trainer.global_step:
            self.save(trainer, again=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save(trainer, again=True)  # callbacks may change the model at the end (StochasticWeightAveraging)
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start_time

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After every callback's on_train_end, so these lines follow the progress display's last one.
        log_dir = trainer.log_dir  # a collective under DDP: every process must ask
        if trainer.is_global_zero:
            steps, seconds = trainer.global_step - self.start_step, self.seconds
            rate = steps / max(seconds, 1e-9)
            print(f"Trained {steps} step{'' if steps == 1 else 's'} in {seconds:.3f} s ({rate:.0f} steps/s)")
            print(f"Result: {pl_module.model.formula()}")
            print(pl_module.quality(trainer.datamodule))
            logs = log_dir if trainer.loggers else self.path
            if logs:  # fast_dev_run writes none
                print(f"Logs: {logs}")
            sys.stdout.flush()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if signals.stopped_fit(exception):
            pl_module.log_final_evaluation()
            self.save(trainer)
            if self.save_last and not trainer.fast_dev_run:  # the stop line offers a resume only from a save
                exception.saved_run = str(self.path)

    def save(self, trainer: Trainer, again: bool = False) -> None:
        """Save last.ckpt, unless it already holds this step and ``again`` is False."""
        if self.save_last and (again or self.saved_step != trainer.global_step):
            self._save(trainer, self.checkpoints / LAST)
            self.saved_step = trainer.global_step

    def _save(self, trainer: Trainer, path: Path) -> None:
        if not trainer.fast_dev_run:
            trainer.save_checkpoint(path, weights_only=False)  # every process calls it; rank 0 writes

    def _handle_signals(self, pl_module: LightningModule) -> None:
        signals.stop_fit_on(lambda signum: setattr(pl_module, "stop_signal", signum))


def _check_callback_files(trainer: Trainer, states: dict, run: Path | None, own: str) -> None:
    """Refuse callback states that name files a callback could later write or delete outside the run: a crafted
    checkpoint must not turn a new best checkpoint into the removal of an arbitrary file. The run's own state names
    its best file in the run's checkpoints folder, and the score that file reached."""
    mine = states.get(own) or {}
    best, score = mine.get("best"), mine.get("best_score")
    if best is not None and not re.fullmatch(r"best-step=\d+\.ckpt", str(best)):
        problem = f"its run state names {best!r} as its best file"
    elif score is not None and not (type(score) is float and math.isfinite(score)):
        problem = f"its run state's best_score is {reprlib.repr(score)}, not a finite number"
    else:
        problem = files_outside(states, trainer.callbacks, run, own)
    if problem:
        raise CheckpointError(f"checkpoint {trainer.ckpt_path} was refused: {problem}")


def _rebase(value, old: str, new: str):
    """value with every string that is a path under ``old`` moved under ``new``, in nested dicts and lists."""
    if isinstance(value, str):
        return new + value[len(old) :] if value == old or value.startswith(old + os.sep) else value
    if isinstance(value, dict):
        return {_rebase(k, old, new): _rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rebase(v, old, new) for v in value)
    return value
