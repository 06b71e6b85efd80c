"""The Trainer a `dynnet` command builds: dynnet's defaults, each replaced by the user's own. A progress display in
optimizer steps, the run's callback (its config, best and last checkpoints, signals, what a fit prints),
TensorBoard in the run folder with dynnet's extras, a DDP timeout, the checked checkpoint reader."""

import contextlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import DDPStrategy

from dynnet.cli.arguments import as_list
from dynnet.cli.checks import refuse_run_callbacks
from dynnet.progress import StepProgressBar
from dynnet.runs.checkpoint import SafeCheckpointIO
from dynnet.runs.resume import is_plain
from dynnet.runs.run import Run
from dynnet.tensorboard.extras import TensorBoardExtras

# How long the processes of a DDP run wait for each other: far more than a step or a checkpoint takes.
DDP_TIMEOUT = timedelta(seconds=60)


class QuietProfiler(PassThroughProfiler):
    """Lightning's default profiler (it records nothing), minus the cost of entering a context manager around each
    of the dozen hook calls of every optimizer step. ``--trainer.profiler`` replaces it."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._nothing


def log_into_run(trainer: Namespace, run: Path) -> None:
    """A logger given in the config without a version logs into the run's version, so that a resumed run continues
    its curves rather than opening a new version."""
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for spec in loggers:
        if isinstance(spec, Namespace) and "version" in (spec.get("init_args") or {}):
            if spec.init_args.version is None:
                spec.init_args.version = run.name


def trainer_arguments(
    subcommand: str,
    given: dict[str, Any],
    run: Path | None,
    config_yaml: str | None,
    lr_scheduler_args: dict[str, Any],
    extra_callbacks: list[Callback],
    hparams_row: Callable[[dict], dict] | None,
) -> dict[str, Any]:
    """The Trainer's arguments: ``given`` (the instantiated config's) with dynnet's defaults where the user gave
    none. ``run`` is the fit's run folder (None for evaluation and fast_dev_run), ``config_yaml`` the run's config."""
    arguments = dict(given)
    user_callbacks = as_list(arguments.pop("callbacks"))
    fit = subcommand == "fit"
    if fit:
        refuse_run_callbacks(user_callbacks)
    barebones = bool(arguments.get("barebones"))
    if barebones:  # Lightning's barebones refuses these; the shipped configs set them
        arguments["log_every_n_steps"] = arguments["num_sanity_val_steps"] = None
    callbacks = list(extra_callbacks)
    if not any(isinstance(c, ProgressBar) for c in user_callbacks):
        if arguments.get("enable_progress_bar") is not False and not barebones:
            callbacks.append(StepProgressBar())
    callbacks += user_callbacks
    if fit and not barebones:
        # The run's own callback is a Checkpoint, which Lightning refuses beside enable_checkpointing=False: it
        # honours that setting itself by saving nothing.
        save = arguments.get("enable_checkpointing") is not False and not arguments.get("fast_dev_run")
        arguments["enable_checkpointing"] = True
        best = not any(isinstance(c, ModelCheckpoint) for c in user_callbacks)
        plain = {k: v for k, v in lr_scheduler_args.items() if is_plain(v)}
        callbacks.append(Run(run, config_yaml, save, best, lr_scheduler_args=plain))

    logger = arguments.get("logger")
    if not fit:
        # Evaluation prints its metrics; it does not open a log version of its own.
        arguments["logger"] = logger if isinstance(logger, Logger) or isinstance(logger, list) else False
    elif logger in (None, True) and not barebones and run is not None:
        # Lightning's default logger, writing into the run folder, minus its placeholder hp_metric:
        # TensorBoardExtras links the hyper-parameters to the final metrics instead.
        arguments["logger"] = TensorBoardLogger(
            run.parent.parent, name=run.parent.name, version=run.name, default_hp_metric=False
        )
    if fit and arguments.get("logger") not in (None, False):
        callbacks.append(TensorBoardExtras(row=hparams_row))
    arguments["callbacks"] = callbacks
    if arguments.get("strategy") == "ddp":
        # A process that dies or is stopped while the others wait for it (at start-up, in a step's all-reduce)
        # ends the run within this time, rather than torch's 30 minutes.
        arguments["strategy"] = DDPStrategy(timeout=DDP_TIMEOUT)
    arguments["plugins"] = [*as_list(arguments.get("plugins")), SafeCheckpointIO()]
    if arguments.get("profiler") is None and not barebones:
        arguments["profiler"] = QuietProfiler()
    return arguments
