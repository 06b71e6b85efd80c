"""The ``dynnet`` command: LightningCLI over DynamicNet and SineData, with the project's run defaults."""

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI, LRSchedulerTypeTuple, ReduceLROnPlateau
from lightning.pytorch.loggers import TensorBoardLogger
from torch.optim import Optimizer

from dynnet.callbacks import RunReport, StepProgressBar
from dynnet.checkpoint import CheckpointError, SafeCheckpointIO, load_checkpoint
from dynnet.data import SineData
from dynnet.module import DivergenceError, DynamicNet
from dynnet.predictions import PredictionCSV
from dynnet.tensorboard import TensorBoardExtras

# Lightning measures log_every_n_steps against train batches, which hold many steps here; dynnet logs by
# optimizer step itself, so the warning that an epoch has fewer batches than the interval does not apply.
warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging interval")

# Lightning's own use of a deprecated torch API; nothing a dynnet user can act on.
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")

# The seed is in the run's config.yaml; its "Seed set to" line would precede every one-line error.
logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)

# Errors that a user's input or a run's numbers cause: shown as one line unless DYNNET_DEBUG is set.
USER_ERRORS = (ValueError, ArgumentError, FileNotFoundError, DivergenceError)


class DynnetCLI(LightningCLI):
    def __init__(self, args: ArgsType = None) -> None:
        super().__init__(
            DynamicNet,
            SineData,
            args=args,
            # Without a config, `dynnet fit` is the tutorial's run rather than Lightning's 1000 epochs.
            trainer_defaults={"max_steps": 30000},
            # Reproducible by default: a run without a seed is the same every time (Lightning's default is to warn
            # and use 0 anyway).
            seed_everything_default=0,
            # Parse errors raise instead of printing usage, so main() can report them on one line.
            parser_kwargs={"exit_on_error": False},
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(PredictionCSV, "predictions")
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
        # With no optimizer given, train as the tutorial does: plain SGD is too slow on this model without momentum.
        parser.set_defaults(
            {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1e-8, "momentum": 0.9}}}
        )

    @staticmethod
    def configure_optimizers(lightning_module: LightningModule, optimizer: Optimizer, lr_scheduler: Any = None) -> Any:
        # Schedulers count optimizer steps (Lightning's default unit is the epoch): T_max: 3000 means 3000 steps.
        if lr_scheduler is None:
            return optimizer
        if isinstance(lr_scheduler, ReduceLROnPlateau):
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": lr_scheduler, "monitor": lr_scheduler.monitor},
            }
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    def parse_arguments(self, parser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            self._check_ckpt_path(self.config[subcommand])

    def _check_ckpt_path(self, config) -> None:
        """Resolve ``last`` to this run's file and refuse, before anything starts, a checkpoint that cannot be used."""
        if config.ckpt_path == "last":
            last = _checkpoint_dir(config.trainer.default_root_dir) / "last.ckpt"
            if not last.is_file():
                raise CheckpointError(f"--ckpt_path last: there is no checkpoint to resume at {last}")
            config.ckpt_path = str(last)
        if config.ckpt_path in ("best", "hpc", "registry"):
            return
        trained = load_checkpoint(config.ckpt_path)["hyper_parameters"]
        for key in ("min_degree", "max_degree"):
            if trained.get(key) != config.model[key]:
                raise CheckpointError(
                    f"checkpoint {config.ckpt_path} holds a model with {key}={trained.get(key)}, "
                    f"but the configured model has {key}={config.model[key]}"
                )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False:
            callbacks.append(StepProgressBar())  # before RunReport, so the bar closes before the report prints
        callbacks += [RunReport(), TensorBoardExtras()]
        if config.get("enable_checkpointing") is not False:
            # One fixed folder per default_root_dir, so a new process (a new log version) finds `last.ckpt`.
            callbacks.append(
                ModelCheckpoint(
                    dirpath=_checkpoint_dir(config.get("default_root_dir")),
                    filename="best-{step}",
                    monitor="val/expected_loss",
                    save_last=True,
                )
            )
        plugins = list(config.get("plugins") or []) + [SafeCheckpointIO()]
        if config.get("logger") in (None, True):
            # Lightning's default logger, minus its placeholder hp_metric: TensorBoardExtras links the
            # hyper-parameters to the final expected loss instead.
            kwargs["logger"] = TensorBoardLogger(config.get("default_root_dir") or os.getcwd(), default_hp_metric=False)
        return super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)


def _checkpoint_dir(default_root_dir: str | None) -> Path:
    return Path(default_root_dir or os.getcwd()) / "checkpoints"


def main(args: ArgsType = None) -> None:
    """Run the command line; ``args`` stands in for ``sys.argv[1:]`` so tests can call it directly."""
    try:
        DynnetCLI(args=args)
    except USER_ERRORS as err:
        if os.environ.get("DYNNET_DEBUG"):
            raise
        message = " ".join(str(err).split())  # one line, whatever the source formatted
        sys.exit(f"dynnet: error: {message}")


if __name__ == "__main__":
    main()
