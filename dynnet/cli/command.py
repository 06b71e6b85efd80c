"""``DynnetCLI``, LightningCLI over DynamicNet and SineData with the run's defaults, and ``run``, which reports how
a command ended in one line.

The command parses and keeps runs: the optimizer's own defaults (dynnet.cli.arguments), what it refuses from its
config (dynnet.cli.checks), what ``--ckpt_path`` means (dynnet.cli.checkpoints), the run folder (dynnet.runs.folder)
and the Trainer's defaults (dynnet.cli.trainer). What a fit means in optimizer steps, and what any fit refuses,
lives in DynamicNet and SineData.
"""

import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim import Optimizer

from dynnet import signals
from dynnet.cli import arguments, checks, help
from dynnet.cli.checkpoints import check_resumed_grid, resolve_checkpoint
from dynnet.cli.console import dynnet_command, ignore_warnings, optimizer_line, quiet_write_errors
from dynnet.cli.predictions import prediction_path
from dynnet.cli.trainer import log_into_run, trainer_arguments
from dynnet.data import SineData
from dynnet.errors import USER_ERRORS, lost_peer, one_line
from dynnet.lightning_internals import subcommand_parser
from dynnet.module import DynamicNet
from dynnet.runs.folder import RunLock, enter_run, keep_metrics_history


class DynnetCLI(LightningCLI):
    def __init__(
        self,
        args: ArgsType = None,
        cleanup: ExitStack | None = None,
        callbacks: list[Callback] | None = None,
        hparams_row: Callable[[dict], dict] | None = None,
    ) -> None:
        """
        Args:
            args: Command-line arguments; ``sys.argv[1:]`` when None.
            cleanup: Receives what must be undone when the command ends, however it ends (the run's lock).
            callbacks: Extra callbacks for the trainer, for programs that drive dynnet (the sweep's pruning).
            hparams_row: For a program that writes TensorBoard's HPARAMS experiment (its columns) for many runs
                (the sweep): the run's HPARAMS values as that experiment shows them. The run then writes no
                experiment of its own.
        """
        self.hparams_row = hparams_row
        self.cleanup = cleanup if cleanup is not None else ExitStack()
        signals.keep_handlers(self.cleanup)  # a fit stops at a step boundary on its own handlers
        self.extra_callbacks = list(callbacks or [])
        self.args = list(sys.argv[1:] if args is None else args)
        self.run_path: Path | None = None
        self.run_lock: RunLock | None = None  # held by the process that writes the run
        self.resume: dict | None = None  # the checkpoint a fit resumes: its path, step and data state
        ignore_warnings(fit=True)
        super().__init__(
            DynamicNet,
            SineData,
            args=args,
            # Without a config, `dynnet fit` is the tutorial's run rather than Lightning's 1000 epochs; a 5-parameter
            # model needs no summary table (the run prints one line about its model instead).
            trainer_defaults={"max_steps": 30000, "enable_model_summary": False},
            # Reproducible by default: a run without a seed is the same every time (Lightning's default is to warn
            # and use 0 anyway).
            seed_everything_default=0,
            # The run folder keeps the config (see dynnet.runs.run.Run), including when a run is resumed.
            save_config_callback=None,
            # DynamicNet.load_from_checkpoint builds the model itself and never calls what a checkpoint names, so
            # Lightning's `_instantiator` hyper-parameter would only clutter the checkpoint and TensorBoard.
            load_from_checkpoint_support=False,
            # Parse errors raise instead of printing usage, so run() can report them on one line.
            parser_kwargs={"exit_on_error": False, **help.PARSER_KWARGS},
        )

    def add_arguments_to_parser(self, parser) -> None:
        arguments.add_arguments(parser)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        help.reword(self)

    def configure_optimizers(
        self, lightning_module: LightningModule, optimizer: Optimizer, lr_scheduler: Any = None
    ) -> Any:
        trainer = lightning_module.trainer
        interval = self.config[self.subcommand].lr_interval
        if trainer.is_global_zero and trainer.state.fn == "fit":
            print(optimizer_line(optimizer, lr_scheduler, interval), flush=True)
        if lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": interval}}

    def parse_arguments(self, parser, args: ArgsType) -> None:
        arguments.check_flag_values(self.args)
        self.config_files = arguments.config_files(self.args)
        args = arguments.with_default_optimizer(arguments.join_negative_numbers(self.args), self.config_files)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        arguments.settle_classes(config, self.args)
        root = Path(config.trainer.default_root_dir or os.getcwd()).expanduser()
        config.trainer.default_root_dir = str(root.absolute())  # so that every path a run prints is absolute
        # Resolved and checked here, before LightningCLI reads the checkpoint's hyper-parameters into the config.
        if config.ckpt_path:
            path, self.resume = resolve_checkpoint(config, subcommand, self.config_files)
            config.ckpt_path = str(path)
        elif subcommand != "fit":
            print("Checkpoint: none (--ckpt_path not given): the model as configured, untrained", flush=True)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        named = partial(arguments.named, config=config, args=self.args, files=self.config_files)
        checks.check_config(config, self.subcommand, named)
        arguments.clip_in_module(config)
        if self.subcommand == "fit" and not config.trainer.fast_dev_run:
            resumed = (self.resume or {}).get("path")
            self.run_path, self.run_lock = enter_run(config.trainer, config.run, self.cleanup, resumed)
            if self.run_lock is not None:  # rank 0, which writes the run
                log_into_run(config.trainer, self.run_path)
        ignore_warnings(fit=self.subcommand == "fit")
        if self.subcommand == "predict":
            config.predictions.path = prediction_path(config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        subcommand = self.subcommand
        config = self.config[subcommand]
        schedule = config.get("lr_scheduler")
        given = trainer_arguments(
            subcommand,
            dict(self.config_init[subcommand].trainer),
            self.run_path,
            self._config_yaml(),
            vars(schedule.init_args) if schedule else {},
            self.extra_callbacks,
            self.hparams_row,
        )
        if subcommand == "predict":
            given["callbacks"].append(self.config_init[subcommand].predictions)
        return self.trainer_class(**(given | kwargs))

    def fit(self, **kwargs: Any) -> None:
        try:
            self.trainer.fit(**kwargs)
        except OSError as err:
            if err.filename is not None or self.run_path is None:
                raise
            # TensorBoard's writer fails without saying where (a full disk): name the run it writes into.
            raise OSError(err.errno, err.strerror, str(self.run_path)) from None

    def before_fit(self) -> None:
        if self.resume is not None:  # before Lightning opens the run's logs, rather than when SineData restores it
            check_resumed_grid(self.trainer, self.datamodule, self.resume["data_state"])
            if self.run_lock is not None:
                keep_metrics_history(self.run_path, self.resume["step"])

    def after_fit(self) -> None:
        if self.trainer.barebones and self.trainer.is_global_zero:  # Run, which prints them otherwise, is off
            print(f"Result: {self.model.model.formula()}\n{self.model.quality(self.datamodule)}", flush=True)

    def after_validate(self) -> None:
        if self.trainer.is_global_zero:  # below Lightning's table of the metrics, in the fit's words
            print(self.model.quality(self.datamodule), flush=True)

    after_test = after_validate

    def _config_yaml(self) -> str | None:
        if self.run_path is None:
            return None
        config = arguments.writable(self.config[self.subcommand].clone())
        return subcommand_parser(self, self.subcommand).dump(config, skip_unset=False)


def run(args: ArgsType = None) -> None:
    """Run the command line, and end a failure or a stop with its one line."""
    # TensorBoard writes its events in a thread of its own, which prints a traceback when a write fails (a full
    # disk); the same error reaches the fit at its next write, and the line below.
    threading.excepthook = quiet_write_errors
    with ExitStack() as cleanup:
        # Lightning leaves a DDP process group open; torch's gloo threads can abort the interpreter's exit
        # ("terminate called without an active exception") unless it is destroyed first.
        cleanup.callback(_end_process_group)
        try:
            DynnetCLI(args=args, cleanup=cleanup)
        except signals.Stopped as stop:
            print(f"{stop}; {_resume_advice(stop, args)}", file=sys.stderr, flush=True)
            cleanup.close()
            sys.exit(128 + stop.signum)
        except SIGTERMException:  # Lightning's own handler, during the few moments before dynnet's takes over
            print("stopped by SIGTERM before training started", file=sys.stderr, flush=True)
            cleanup.close()
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:  # before training started, or after it ended
            cleanup.close()
            sys.exit(128 + signal.SIGINT)
        except USER_ERRORS as err:
            if os.environ.get("DYNNET_DEBUG"):
                raise
            cleanup.close()
            sys.exit(f"dynnet: error: {one_line(err)}")
        except RuntimeError as err:
            if os.environ.get("DYNNET_DEBUG") or not lost_peer(err):
                raise
            cleanup.close()
            reason = re.sub(r"^\[[^]]*\] *", "", one_line(err))  # gloo's source location
            sys.exit(f"dynnet: error: a process of this distributed run stopped or cannot be reached: {reason}")


def _resume_advice(stop: signals.Stopped, args: ArgsType) -> str:
    """The whole command that resumes a stopped fit, ready to paste: the same config files and flags, the run by
    name and its last checkpoint; or why there is none."""
    if stop.saved_run is None:
        return "nothing was saved (checkpointing is off), so there is no checkpoint to resume from"
    given, kept = list(sys.argv[1:] if args is None else args), []
    skip = False
    for token in given:  # the command's own flags, less the checkpoint and run it named (the resume names them)
        if skip or token.partition("=")[0] in ("--ckpt_path", "--run"):
            skip = not skip and "=" not in token
            continue
        kept.append(token)
    run = Path(stop.saved_run).name
    return f"resume with: {shlex.join(dynnet_command(*kept, '--ckpt_path', 'last', '--run', run))}"


def _end_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
