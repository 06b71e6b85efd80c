"""The ``dynnet`` command: LightningCLI over DynamicNet and SineData, with the project's run defaults.

It parses, and keeps runs: it gives the optimizer the chosen class's own defaults, refuses what cannot work on
this machine or in a run folder, checks a checkpoint before resuming from it, creates or enters the run folder,
and gives the Trainer dynnet's defaults (progress display, best and last checkpoints, TensorBoard), each replaced
by the user's own. What a fit means in optimizer steps, and what it refuses, lives in DynamicNet and SineData.
"""

import argparse
import contextlib
import os
import re
import shlex
import signal
import sys
import threading
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.cli import ArgsType, LightningCLI, LRSchedulerTypeTuple
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim import Optimizer

from dynnet.arguments import (
    TUTORIAL_OPTIMIZER,
    arguments_after_class_flag,
    as_list,
    check_flag_values,
    class_defaults,
    config_files,
    describe,
    dotted,
    join_negative_numbers,
    with_default_optimizer,
    writable,
)
from dynnet.callbacks import StepProgressBar
from dynnet.checkpoint import CheckpointError, SafeCheckpointIO, load_checkpoint
from dynnet.checks import (
    check_optimizer,
    check_trainer_flags,
    refuse_run_callbacks,
)
from dynnet.command import LAUNCHER, STOP_SIGNALS
from dynnet.console import dynnet_command, ignore_warnings, lost_peer, quiet_write_errors
from dynnet.data import SineData
from dynnet.errors import USER_ERRORS, Interrupted, one_line
from dynnet.lightning_internals import parser_actions, subcommand_choices, subcommand_parser
from dynnet.module import DynamicNet, check_plateau
from dynnet.predictions import PredictionCSV, check_output_path
from dynnet.resume import check_latest, check_resumable, is_plain
from dynnet.run import (
    Run,
    RunError,
    RunLock,
    create_run,
    discard_if_unused,
    find_run,
    is_global_zero,
    last_checkpoint,
    run_of,
    runs_dir,
)
from dynnet.steps import batch_grid, check_resumed_batches, validation_steps
from dynnet.tensorboard import TensorBoardExtras
from dynnet.yaml_files import load_yaml

# How long the processes of a DDP run wait for each other: far more than a step or a checkpoint takes.
DDP_TIMEOUT = timedelta(seconds=60)


SUBCOMMANDS = {
    "fit": "Train the polynomial, or resume a run (--ckpt_path last).",
    "validate": "Evaluate a checkpoint's model on the points and print its expected loss.",
    "test": "Evaluate as validate does, reporting the metrics as test/*.",
    "predict": "Write a checkpoint's predictions at every point to a CSV file.",
}
# The flags people use most, at the end of `dynnet fit --help`, below Lightning's many.
FIT_EPILOG = """the flags people use most:
  -c configs/default.yaml        the tutorial's run (configs/fast.yaml: Adam, a tenth of the steps)
  --trainer.max_steps N          how many optimizer steps to train
  --optimizer CLASS              another optimizer (torch.optim.Adam), from its own defaults
  --optimizer.lr LR              the learning rate
  --lr_scheduler CLASS           a schedule (torch.optim.lr_scheduler.CosineAnnealingLR), stepped every step
  --seed_everything S            the seed of the initial coefficients and the degree draws
  --data.n_points N              how many points on [data.low, data.high]
  --trainer.precision 64-true    train in float64
  --trainer.devices N            N processes training as one (with --trainer.accelerator gpu, N GPUs)
  --ckpt_path last               resume the newest run (--run NAME: that run)"""
# Options whose Lightning text would mislead: what they mean in dynnet, or that dynnet refuses them.
REFUSED = "Refused by dynnet: "
OPTION_HELP = {
    "trainer.max_steps": "Stop after this many optimizer steps; -1 for no limit (default: 30000, the tutorial's).",
    "trainer.limit_train_batches": REFUSED + "a train batch holds many optimizer steps; shorten training with "
    "--trainer.max_steps or --data.steps_per_epoch.",
    "trainer.overfit_batches": REFUSED + "every step trains on all the points.",
    "trainer.accumulate_grad_batches": REFUSED + "every step already uses all the points; change the step size "
    "with --optimizer.lr.",
    "trainer.gradient_clip_val": "Clip the gradient before every optimizer step to this norm (or value, with "
    "--trainer.gradient_clip_algorithm value); dynnet gives it to DynamicNet, which clips its own steps.",
    "trainer.val_check_interval": "Validate every this many optimizer steps (an int), or this fraction of an epoch "
    "(a float); a time between validations is refused by dynnet (batches hold many steps). Default: once an epoch.",
    "trainer.strategy": "Lightning's strategy: auto, or ddp for several processes (ddp_spawn is refused by dynnet: "
    "use ddp).",
    "ckpt_path": "The checkpoint to start from: last (the newest run's last.ckpt, or --run NAME's), best (its best "
    "checkpoint) or a file. hpc and registry are refused by dynnet.",
    "weights_only": "Checkpoints are always read weights-only, never running code: false is refused by dynnet.",
}


class EpilogAsWritten(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, keeping the lines of dynnet's list of flags as written."""


class QuietProfiler(PassThroughProfiler):
    """Lightning's default profiler (it records nothing), minus the cost of entering a context manager around each
    of the dozen hook calls of every optimizer step. ``--trainer.profiler`` replaces it."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._nothing


class DynnetCLI(LightningCLI):
    def __init__(
        self,
        args: ArgsType = None,
        cleanup: ExitStack | None = None,
        callbacks: list[Callback] | None = None,
        hparams_experiment: bool = True,
    ) -> None:
        """
        Args:
            args: Command-line arguments; ``sys.argv[1:]`` when None.
            cleanup: Receives what must be undone when the command ends, however it ends (the run's lock).
            callbacks: Extra callbacks for the trainer, for programs that drive dynnet (the sweep's pruning).
            hparams_experiment: Whether the run writes TensorBoard's HPARAMS experiment (its columns); a program
                that writes one for many runs (the sweep) turns it off.
        """
        self.hparams_experiment = hparams_experiment
        self.cleanup = cleanup if cleanup is not None else ExitStack()
        for signum in STOP_SIGNALS:  # the fit's own handlers stop it at a step boundary; put back what was there
            self.cleanup.callback(signal.signal, signum, signal.getsignal(signum))
        self.extra_callbacks = list(callbacks or [])
        self.args = list(sys.argv[1:] if args is None else args)
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
            # The run folder keeps the config (see Run), including when a run is resumed.
            save_config_callback=None,
            # DynamicNet.load_from_checkpoint builds the model itself and never calls what a checkpoint names, so
            # Lightning's `_instantiator` hyper-parameter would only clutter the checkpoint and TensorBoard.
            load_from_checkpoint_support=False,
            # Parse errors raise instead of printing usage, so main() can report them on one line.
            parser_kwargs={
                "exit_on_error": False,
                "prog": "dynnet",
                "description": "Train, evaluate and use the tutorial's random-depth polynomial with Lightning.",
                "formatter_class": EpilogAsWritten,  # which jsonargparse gives the subcommands too
                "fit": {"epilog": FIT_EPILOG},
            },
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(PredictionCSV, "predictions")
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
        parser.add_argument(
            "--run",
            type=str | None,
            default=None,
            help="Name of the run folder under <default_root_dir>/lightning_logs (default: the next version_N for "
            "a new fit; the newest run for --ckpt_path last).",
        )
        parser.add_argument(
            "--lr_interval",
            type=Literal["step", "epoch"],
            default="step",
            help="When lr_scheduler steps: after every optimizer step, or at every epoch end. ReduceLROnPlateau "
            "steps after every validation.",
        )
        titles = {"predictions": "Where `dynnet predict` writes", "lr_scheduler": "Learning-rate schedule"}
        for key, title in titles.items():
            if key in parser.groups:
                parser.groups[key].title = title

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # LightningCLI lists each subcommand with the first line of the Trainer method's docstring, which can stop
        # mid-sentence; dynnet's own sentences instead.
        for choice in subcommand_choices(self):
            choice.help = SUBCOMMANDS[choice.dest]
        for subcommand in SUBCOMMANDS:  # Lightning's own text describes its defaults and batches, not dynnet's
            for action in parser_actions(subcommand_parser(self, subcommand)):
                action.help = OPTION_HELP.get(action.dest, action.help)

    def configure_optimizers(
        self, lightning_module: LightningModule, optimizer: Optimizer, lr_scheduler: Any = None
    ) -> Any:
        trainer = lightning_module.trainer
        interval = self.config[self.subcommand].lr_interval
        if trainer.is_global_zero and trainer.state.fn == "fit":
            schedule = f"{describe(lr_scheduler)} every {interval}" if lr_scheduler is not None else "none"
            if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                schedule = f"{describe(lr_scheduler)} after every validation"
            print(f"Optimizer: {describe(optimizer)}; lr_scheduler: {schedule}", flush=True)
        if lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": interval}}

    # ---------------------------------------------------------------------------------------------- parsing

    def parse_arguments(self, parser, args: ArgsType) -> None:
        check_flag_values(self.args)
        self.config_files = config_files(self.args)
        args = with_default_optimizer(join_negative_numbers(self.args), self.config_files)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.get("optimizer") is None:
            config.optimizer = Namespace(class_path=TUTORIAL_OPTIMIZER["class_path"])
            config.optimizer.init_args = Namespace(class_defaults("torch.optim.SGD") | TUTORIAL_OPTIMIZER["init_args"])
        # jsonargparse keeps a previous class's arguments when a flag names a new class (`-c default.yaml
        # --optimizer torch.optim.Adam` would train Adam at SGD's lr 1e-8). A class chosen by flag starts instead
        # from its own defaults, plus the arguments given after it.
        for key in ("optimizer", "lr_scheduler"):
            explicit = arguments_after_class_flag(self.args, key)
            if explicit is not None and config.get(key) is not None:
                spec = config[key]
                given = {k: v for k, v in vars(spec.get("init_args") or Namespace()).items() if k in explicit}
                spec.init_args = Namespace(class_defaults(spec.class_path) | given)
        root = Path(config.trainer.default_root_dir or os.getcwd()).expanduser()
        config.trainer.default_root_dir = str(root.absolute())  # so that every path a run prints is absolute
        # Resolved and checked here, before LightningCLI reads the checkpoint's hyper-parameters into the config.
        self.resume: dict | None = None
        if config.ckpt_path:
            config.ckpt_path = self._resolve_checkpoint(config, subcommand)
        elif subcommand != "fit":
            print("Checkpoint: none (--ckpt_path not given): the model as configured, untrained", flush=True)

    def before_instantiate_classes(self) -> None:
        self.run_path: Path | None = None
        self.run_lock: RunLock | None = None  # held by the process that writes the run
        config = self.config[self.subcommand]
        trainer = config.trainer
        check_trainer_flags(trainer, self._named)
        check_optimizer(config.optimizer, self._named)
        schedule = config.get("lr_scheduler")
        if schedule is not None and schedule.class_path.endswith("ReduceLROnPlateau"):
            # DynamicNet refuses it when the fit starts; here, before the command creates a run folder for it.
            plateau = schedule.init_args
            monitor = plateau.get("monitor", "val/expected_loss")  # torch's own class monitors the expected loss
            check_plateau(config.optimizer.init_args.lr, plateau.get("factor", 0.1), plateau.get("eps", 1e-8), monitor)
        if config.get("weights_only") is False:
            raise ValueError(
                "--weights_only false: dynnet reads checkpoints weights-only, and never runs code from them"
            )
        if trainer.gradient_clip_val is not None:
            # Lightning's Trainer clips only under automatic optimization; DynamicNet clips in its step loop.
            config.model.gradient_clip_val = trainer.gradient_clip_val
            config.model.gradient_clip_algorithm = trainer.gradient_clip_algorithm or "norm"
            trainer.gradient_clip_val = trainer.gradient_clip_algorithm = None
        if trainer.fast_dev_run and config.ckpt_path and self.subcommand == "fit":
            raise ValueError("--trainer.fast_dev_run checks a fresh run in a few steps; drop --ckpt_path")
        if self.subcommand == "fit" and not trainer.fast_dev_run:
            self._enter_run(config)
        ignore_warnings(fit=self.subcommand == "fit")
        if self.subcommand == "predict":
            run = run_of(Path(config.ckpt_path)) if config.ckpt_path else None
            given = config.predictions.path or str((run or Path(trainer.default_root_dir)) / "predictions.csv")
            check_output_path(given, inputs=[config.ckpt_path, *(str(c) for c in config.get("config") or [])])
            config.predictions.path = str(Path(given).expanduser())

    def _named(self, key: str) -> str:
        """A setting as the user gave it: ``--key value``, or ``key: value (in FILE)`` when a config file set it."""
        value = self.config[self.subcommand]
        for part in key.split("."):
            if isinstance(value, Namespace) and part not in value and "init_args" in value:
                value = value.init_args  # a class's argument
            value = value.get(part) if isinstance(value, Namespace) else None
        value = getattr(value, "class_path", value)  # a class given as a Namespace: its name
        if not any(t == f"--{key}" or t.startswith(f"--{key}=") for t in self.args):
            for path, content in reversed(self.config_files.items()):
                node = content
                for part in key.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                    node = node.get("init_args", node) if isinstance(node, dict) and "class_path" in node else node
                if node is not None:
                    return f"{key}: {value} (in {path})"
        return f"--{key} {value}"

    def _resolve_checkpoint(self, config, subcommand: str) -> str:
        """The checkpoint file --ckpt_path means, checked against the configured model (and, for fit, the run)."""
        root, name = config.trainer.default_root_dir, config.run
        if config.ckpt_path == "last":
            path = last_checkpoint(find_run(root, name), named=name is not None)
        elif config.ckpt_path == "best":
            run = find_run(root, name)
            best = sorted((run / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
            if not best:
                raise RunError(f"--ckpt_path best: run {run} has no best-*.ckpt checkpoint")
            path = best[-1]  # a new best is written only when it improves on the previous one
        elif config.ckpt_path in ("hpc", "registry"):
            raise ValueError(f"--ckpt_path {config.ckpt_path} is not supported by dynnet: use last, best or a path")
        else:
            path = Path(config.ckpt_path).expanduser()
        checkpoint = load_checkpoint(path)
        if config.ckpt_path in ("last", "best"):
            self._note_other_config(run_of(path))
        trained = checkpoint["hyper_parameters"]
        for key in ("min_degree", "max_degree"):
            if trained[key] != config.model[key]:
                raise CheckpointError(
                    f"checkpoint {path} holds a model with {key}={trained[key]}, "
                    f"but the configured model has {key}={config.model[key]}"
                )
        if subcommand != "fit":
            print(f"Checkpoint: {path} at step {checkpoint['global_step']}", flush=True)
            data = {k: v for k, v in checkpoint["run_settings"]["data"].items() if k in ("n_points", "low", "high")}
            other = [f"data.{k} {config.data[k]} (the run's: {v})" for k, v in data.items() if v != config.data[k]]
            if other:
                print(f"Note: evaluating on other points than the run trained on: {', '.join(other)}", flush=True)
        if subcommand == "fit":
            check_resumable(path, checkpoint, config)
            check_latest(path, checkpoint["global_step"])
            data_state = checkpoint.get(SineData.__qualname__)
            self.resume = {
                "path": path,
                "step": checkpoint["global_step"],
                "data_state": data_state if isinstance(data_state, dict) else {},
            }
        return str(path)

    def _note_other_config(self, run: Path | None) -> None:
        """Say so when the run that --ckpt_path last or best took was trained with settings other than those the
        command's config files give: the newest run may come from another config."""
        if run is None or not (run / "config.yaml").is_file():
            return
        trained = dotted(load_yaml(run / "config.yaml"))
        for path, content in self.config_files.items():
            other = [
                f"{key} is {trained.get(key)}, not {value}"
                for key, value in dotted(content).items()
                if key != "trainer.default_root_dir" and trained.get(key) != value
            ]
            if other:
                print(
                    f"Note: run {run.name} was trained with another config than {path} ({run / 'config.yaml'}): "
                    + "; ".join(other),
                    flush=True,
                )

    def _enter_run(self, config) -> None:
        """Create the run folder for a fresh fit, or take the resumed checkpoint's, and lock it (rank 0 only)."""
        if config.run is not None and (config.run in ("", ".", "..") or "/" in config.run or os.sep in config.run):
            raise ValueError(f"--run must be a plain folder name, got {config.run!r}")
        if not is_global_zero(config.trainer):
            # Processes Lightning launches for DDP run this command again: they work in rank 0's folder, which
            # rank 0 also broadcasts once the processes are connected. Only rank 0 writes into it.
            self.run_path = Path(os.environ.get("DYNNET_RUN") or runs_dir(config.trainer.default_root_dir))
            return
        if self.resume is not None:
            run = run_of(self.resume["path"])
            if run is not None and config.run is not None and run.name != config.run:
                raise RunError(
                    f"the checkpoint belongs to run {run}, not {config.run}: resuming continues that run; drop --run"
                )
            fresh = run is None  # a checkpoint outside any run starts a new run from its state
        else:
            fresh = True
        if fresh:
            root = Path(config.trainer.default_root_dir)
            made = [p for p in (root, *root.parents) if not p.exists()]  # folders this run would be the first in
            run = create_run(root, config.run)
            self.cleanup.callback(discard_if_unused, run, made)
        lock = self.run_lock = RunLock(run)
        self.cleanup.callback(lock.release)
        self.run_path = run
        if config.trainer.devices not in (1, "1") or config.trainer.num_nodes != 1:
            # For the processes Lightning launches for DDP, which run this command again: rank 0's run and
            # process (see dynnet.command). Kept for this command only.
            for key, value in (("DYNNET_RUN", str(run)), (LAUNCHER, str(os.getpid()))):
                os.environ[key] = value
                self.cleanup.callback(os.environ.pop, key, None)
        # A logger given in the config without a version logs into this run's version, so that a resumed run
        # continues its curves rather than opening a new version.
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        for spec in loggers:
            if isinstance(spec, Namespace) and "version" in (spec.get("init_args") or {}):
                if spec.init_args.version is None:
                    spec.init_args.version = run.name

    # ---------------------------------------------------------------------------------------------- the trainer

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config[self.subcommand]
        trainer_config = dict(self.config_init[self.subcommand].trainer)
        user_callbacks = as_list(trainer_config.pop("callbacks"))
        fit = self.subcommand == "fit"
        run = self.run_path
        fast_dev_run = bool(trainer_config.get("fast_dev_run"))
        if fit:
            refuse_run_callbacks(user_callbacks)

        # Defaults the user replaces by giving their own: a progress display, a best checkpoint, TensorBoard.
        barebones = bool(trainer_config.get("barebones"))
        if barebones:  # Lightning's barebones refuses these; the shipped configs set them
            trainer_config["log_every_n_steps"] = trainer_config["num_sanity_val_steps"] = None
        callbacks = [*self.extra_callbacks]
        if not any(isinstance(c, ProgressBar) for c in user_callbacks):
            if trainer_config.get("enable_progress_bar") is not False and not barebones:
                callbacks.append(StepProgressBar())
        callbacks += user_callbacks
        if self.subcommand == "predict":
            callbacks.append(self.config_init[self.subcommand].predictions)
        if fit and not barebones:
            # The run's own callback is a Checkpoint, which Lightning refuses beside enable_checkpointing=False:
            # it honours that setting itself by saving nothing.
            save = trainer_config.get("enable_checkpointing") is not False and not fast_dev_run
            trainer_config["enable_checkpointing"] = True
            schedule = vars(config.lr_scheduler.init_args) if config.get("lr_scheduler") else {}
            best = not any(isinstance(c, ModelCheckpoint) for c in user_callbacks)
            plain = {k: v for k, v in schedule.items() if is_plain(v)}
            callbacks.append(Run(run, self._config_yaml(), save, best, lr_scheduler_args=plain))

        logger = trainer_config.get("logger")
        if not fit:
            # Evaluation prints its metrics; it does not open a log version of its own.
            trainer_config["logger"] = logger if isinstance(logger, Logger) or isinstance(logger, list) else False
        elif logger in (None, True) and not barebones and run is not None:
            # Lightning's default logger, writing into the run folder, minus its placeholder hp_metric:
            # TensorBoardExtras links the hyper-parameters to the final metrics instead.
            trainer_config["logger"] = TensorBoardLogger(
                run.parent.parent, name=run.parent.name, version=run.name, default_hp_metric=False
            )
        if fit and trainer_config.get("logger") not in (None, False):
            callbacks.append(TensorBoardExtras(experiment=self.hparams_experiment))
        trainer_config["callbacks"] = callbacks
        if trainer_config.get("strategy") == "ddp":
            # A process that dies or is stopped while the others wait for it (at start-up, in a step's all-reduce)
            # ends the run within this time, rather than torch's 30 minutes.
            trainer_config["strategy"] = DDPStrategy(timeout=DDP_TIMEOUT)
        trainer_config["plugins"] = [*as_list(trainer_config.get("plugins")), SafeCheckpointIO()]
        earlier = run / "metrics.csv" if run is not None and self.resume is not None and self.run_lock else None
        if earlier is not None and earlier.is_file():
            # Lightning's CSVLogger deletes the metrics.csv it finds in its folder; keep the run's history.
            earlier.rename(run / f"metrics-until-step{self.resume['step']}.csv")
        if trainer_config.get("profiler") is None and not barebones:
            trainer_config["profiler"] = QuietProfiler()
        return self.trainer_class(**(trainer_config | kwargs))

    def fit(self, **kwargs: Any) -> None:
        try:
            self.trainer.fit(**kwargs)
        except OSError as err:
            if err.filename is not None or self.run_path is None:
                raise
            # TensorBoard's writer fails without saying where (a full disk): name the run it writes into.
            raise OSError(err.errno, err.strerror, str(self.run_path)) from None

    def before_fit(self) -> None:
        if self.resume is not None:
            # Refused here, before Lightning opens the run's logs, rather than when the checkpoint is restored.
            data, trainer = self.datamodule, self.trainer
            grid = batch_grid(trainer, data.steps_per_batch, data.steps_per_epoch)
            trained = self.resume["data_state"].get("batch_grid")
            check_resumed_batches(trained, grid, validation_steps(trainer, data.steps_per_epoch))

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
        config = writable(self.config[self.subcommand].clone())
        return subcommand_parser(self, self.subcommand).dump(config, skip_unset=False)


def main(args: ArgsType = None) -> None:
    """Run the command line; ``args`` stands in for ``sys.argv[1:]`` so tests and scripts can call it directly."""
    # TensorBoard writes its events in a thread of its own, which prints a traceback when a write fails (a full
    # disk); the same error reaches the fit at its next write, and the line below.
    threading.excepthook = quiet_write_errors
    with ExitStack() as cleanup:
        # Lightning leaves a DDP process group open; torch's gloo threads can abort the interpreter's exit
        # ("terminate called without an active exception") unless it is destroyed first.
        cleanup.callback(_end_process_group)
        try:
            DynnetCLI(args=args, cleanup=cleanup)
        except Interrupted as stop:
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


def _resume_advice(stop: Interrupted, args: ArgsType) -> str:
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
