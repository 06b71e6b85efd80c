"""Every part of Lightning (and of the parser under LightningCLI) that dynnet uses and their documentation does not
promise, in one place.

A dynnet train batch holds many optimizer steps, and Lightning counts a few things in train batches through its
loops' own attributes; a few more are settings Lightning keeps only in private form. Each function below touches
one of them; tests/test_lightning_internals.py checks each against the installed Lightning and fails naming the
function when a release changes what it relies on.
"""

import re
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

# The attribute Lightning sets on a LightningModule around every hook call, a dozen times an optimizer step here
# (see DynamicNet.__setattr__).
HOOK_NAME = "_current_fx_name"


def batch_ended_at_step(trainer: Trainer) -> None:
    """Tell Lightning's loop that the train batch now ending held the optimizer steps up to ``trainer.global_step``.

    Lightning counts the batches that stepped (``_batches_that_stepped``), adds the current one when the batch's
    metrics are logged (so that logging comes every ``log_every_n_steps`` of them) and counts it after; as if each
    of this batch's steps had been a batch of its own, the count before the last one is the step before it.
    """
    trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step - 1


def log_at_optimizer_steps(trainer: Trainer) -> None:
    """Make the metrics Lightning logs for ``self.log`` land at the optimizer step, as dynnet's own do.

    Lightning logs them at its count of batches that stepped (``LoggerConnector.log_metrics`` reads
    ``_batches_that_stepped``), which in a batch of many steps is not a step. Done once per Trainer.
    """
    connector = trainer._logger_connector
    if getattr(connector.log_metrics, "at_optimizer_steps", False):
        return
    lightning_log_metrics = connector.log_metrics
    loop = trainer.fit_loop.epoch_loop

    def log_metrics(metrics: dict, step: int | None = None) -> None:
        counted, loop._batches_that_stepped = loop._batches_that_stepped, trainer.global_step
        try:
            lightning_log_metrics(metrics, step)
        finally:
            loop._batches_that_stepped = counted

    log_metrics.at_optimizer_steps = True
    connector.log_metrics = log_metrics


def log_metrics(trainer: Trainer, metrics: dict[str, Any], step: int) -> None:
    """Send metrics to the loggers at ``step`` the way ``self.log`` reaches them, so that they are in
    ``trainer.logged_metrics`` too."""
    trainer._logger_connector.log_metrics(metrics, step)


def set_max_steps(trainer: Trainer, max_steps: int) -> None:
    """Set the step a fit stops at (``Trainer.max_steps`` is read-only; its loop holds it)."""
    trainer.fit_loop.epoch_loop.max_steps = max_steps


def set_validation_batches(trainer: Trainer, interval: int | float) -> None:
    """Set the validation interval Lightning counts in train batches: the fit loop reads
    ``trainer.val_check_interval`` when it sets up the train data, after the datamodule's setup."""
    trainer.val_check_interval = interval


def attached_trainer(module) -> Trainer | None:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when there is none)."""
    return module._trainer


def set_rank(trainer: Trainer) -> None:
    """Make Lightning's rank_zero_only guards (the loggers' writes among them) use the Trainer's rank. They take a
    rank from the environment when imported, and only distributed strategies correct it: a RANK or LOCAL_RANK left
    in a shell by another job would silence a fit of one process."""
    rank_zero_only.rank = trainer.global_rank


def checkpoint_steps(callback: ModelCheckpoint) -> int:
    """A ModelCheckpoint's every_n_train_steps (0 when it saves by epochs or time). Its only public form is the
    callback's state key, ``ModelCheckpoint{'monitor': ..., 'every_n_train_steps': N, ...}``."""
    found = re.search(r"'every_n_train_steps': (\d+)", callback.state_key)
    return int(found.group(1)) if found else 0


def checkpoint_saves_by_time(callback: ModelCheckpoint) -> bool:
    """Whether a ModelCheckpoint has a train_time_interval, read from its state key as checkpoint_steps."""
    return "'train_time_interval': None" not in callback.state_key


def parser_actions(parser) -> list:
    """The options of a LightningCLI parser (argparse keeps them in ``_actions``), to reword their help."""
    return parser._actions


def subcommand_choices(cli: LightningCLI) -> list:
    """The entries ``dynnet --help`` lists for the subcommands, each with ``dest`` and ``help``."""
    return cli.parser._subcommands_action._choices_actions


def subcommand_parser(cli: LightningCLI, subcommand: str):
    """The parser of one subcommand, to write a run's config as the command read it."""
    return cli._parser(subcommand)


def validation_time(trainer: Trainer) -> float | None:
    """The seconds between validations of a time-based ``val_check_interval`` (Lightning 2.6 then sets no
    ``trainer.val_check_interval``), else None."""
    return getattr(trainer, "_val_check_time_interval", None)
