"""What the `dynnet` command refuses before it builds anything: flags that cannot work on this machine or with
the CLI's optimizer, and callbacks that would fight the run folder it keeps. What any fit refuses, however it is
started, is in dynnet.steps and dynnet.fit_checks; changes a resumed run cannot take, in dynnet.runs.resume."""

import os
from collections.abc import Callable
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from dynnet.fit_checks import check_plateau


def check_config(config, subcommand: str, named: Callable[[str], str]) -> None:
    """Refuse, before anything is built, what the command's config asks for and cannot work. ``named(key)`` says
    where a setting came from: its flag, or the config file that set it."""
    check_trainer_flags(config.trainer, named)
    check_optimizer(config.optimizer, named)
    schedule = config.get("lr_scheduler")
    if schedule is not None and schedule.class_path.endswith("ReduceLROnPlateau"):
        # DynamicNet refuses it when the fit starts; here, before the command creates a run folder for it.
        plateau = schedule.init_args
        monitor = plateau.get("monitor", "val/expected_loss")  # torch's own class monitors the expected loss
        check_plateau(config.optimizer.init_args.lr, plateau.get("factor", 0.1), plateau.get("eps", 1e-8), monitor)
    if config.get("weights_only") is False:
        raise ValueError("--weights_only false: dynnet reads checkpoints weights-only, and never runs code from them")
    if config.trainer.fast_dev_run and config.ckpt_path and subcommand == "fit":
        raise ValueError("--trainer.fast_dev_run checks a fresh run in a few steps; drop --ckpt_path")


def check_trainer_flags(trainer, named: Callable[[str], str]) -> None:
    """Refuse, before anything starts, Trainer flags that cannot work on this machine or with the CLI.
    ``named(key)`` says where a setting came from: its flag, or the config file that set it."""
    if str(trainer.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "it sees no CUDA device"
        raise ValueError(
            f"{named('trainer.accelerator')}: torch cannot use a GPU here ({why}); "
            "use --trainer.accelerator cpu (or auto)"
        )
    gpu = uses_gpu(trainer.accelerator)
    have = torch.cuda.device_count() if gpu else len(os.sched_getaffinity(0))
    devices = str(trainer.devices)
    count = int(devices) if devices.lstrip("-").isdigit() else None
    # Each device is a process: more processes than cores (or GPUs) only wait for each other, and enough of them
    # exhaust the machine's memory before the first step. On a CPU, Lightning takes only a count (-1, "all", is
    # a GPU's).
    if (count is not None and count > have) or (not gpu and devices != "auto" and not (count and count > 0)):
        kind = f"{'GPU' if gpu else 'CPU core'}{'s' * (have != 1)}"
        raise ValueError(
            f"{named('trainer.devices')}: this machine has {have} {kind} for this process; give 1 to {have}"
        )
    if trainer.max_steps is not None and trainer.max_steps < -1:
        raise ValueError(f"{named('trainer.max_steps')}: give -1 (no limit) or a step count")
    every = trainer.check_val_every_n_epoch
    if every is not None and every < 1:
        raise ValueError(f"{named('trainer.check_val_every_n_epoch')}: give at least 1 (or null)")
    if trainer.log_every_n_steps is not None and trainer.log_every_n_steps < 0:
        raise ValueError(f"{named('trainer.log_every_n_steps')}: give 0 (no logging) or more")
    if str(trainer.strategy).startswith("ddp_spawn"):
        raise ValueError(
            f"{named('trainer.strategy')}: ddp_spawn is not supported (the CLI's optimizer does not survive the "
            "spawn): use ddp, which launches the processes itself, or torchrun"
        )
    if trainer.gradient_clip_algorithm not in (None, "norm", "value"):
        raise ValueError(f"{named('trainer.gradient_clip_algorithm')}: give norm or value")


def check_optimizer(spec, named: Callable[[str], str]) -> None:
    momentum = (spec.get("init_args") or Namespace()).get("momentum")
    if momentum is not None and not 0 <= momentum < 1:
        raise ValueError(f"{named('optimizer.momentum')}: give a momentum in [0, 1); at 1 or above every step grows")


def refuse_run_callbacks(callbacks: list[Callback]) -> None:
    """Refuse callbacks that would fight the run folder: dynnet keeps a run's last checkpoint itself."""
    for callback in callbacks:
        if isinstance(callback, OnExceptionCheckpoint):
            raise ValueError(
                "OnExceptionCheckpoint would make every later fit resume from its file: dynnet saves last.ckpt "
                "when a signal stops a fit, and resumes it with --ckpt_path last; drop OnExceptionCheckpoint"
            )
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            raise ValueError(
                "ModelCheckpoint(save_last=...): dynnet keeps <run>/checkpoints/last.ckpt itself, the run's latest "
                "state (after every validation, at the end, and when a signal stops it); drop save_last"
            )


def precision_name(value: Any, accelerator: Any = "cpu") -> str:
    """Lightning's precision setting in its canonical form, as trainer.precision reports it."""
    value = "32-true" if value is None else str(value)
    value = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(value, value)
    return "bf16-mixed" if value == "16-mixed" and not uses_gpu(accelerator) else value  # Lightning's on a CPU


def uses_gpu(accelerator: Any) -> bool:
    """Whether Lightning's accelerator setting trains on a GPU here."""
    return str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and torch.cuda.is_available())
