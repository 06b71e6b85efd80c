"""What a checkpoint records of how its run trains, and what a resumed fit may change: numbers apply from the
resumed step; anything else that cannot take effect mid-run is refused (`dynnet fit` checks before it starts)."""

import numbers
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer

from dynnet.checkpoint import load_checkpoint
from dynnet.checks import import_class, last_step, precision_name


def run_settings(trainer: Trainer, seed: int | None) -> dict:
    """What the run trains with, so that a resume can tell a changed setting from an unchanged one."""
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    schedulers = trainer.lr_scheduler_configs
    return {
        "seed": seed,
        "precision": str(trainer.precision),
        "optimizer": class_path(type(optimizer)) if optimizer else None,
        "optimizer_args": {k: v for k, v in optimizer.defaults.items() if is_plain(v)} if optimizer else {},
        "lr_scheduler": class_path(type(schedulers[0].scheduler)) if schedulers else None,
        "lr_interval": schedulers[0].interval if schedulers else None,
        "data": dict(trainer.datamodule.hparams) if trainer.datamodule is not None else {},
    }


def apply_changed_optimizer_arguments(module: LightningModule, trained: dict) -> None:
    """Apply the configured optimizer arguments that differ from the ones the checkpoint was trained with.

    The learning rate is rescaled, so a schedule keeps its shape from the resumed step on.
    """
    optimizer = module.optimizers().optimizer
    schedulers = [c.scheduler for c in module.trainer.lr_scheduler_configs]
    for name, new in optimizer.defaults.items():
        old = trained.get(name, new)
        if old == new:
            continue
        if not is_number(new) or not is_number(old):
            raise ValueError(
                f"--optimizer.{name} is {new}, but the checkpoint was trained with {old}; this argument cannot "
                "change in the middle of a run: start a new run, or resume with the same value"
            )
        for i, group in enumerate(optimizer.param_groups):
            if name == "lr":
                # Rescaled, so a schedule keeps its shape; from an lr of 0 there is no shape to keep.
                group["lr"] = group["lr"] * new / old if old else new
                if "initial_lr" in group:
                    group["initial_lr"] = new
                for scheduler in schedulers:
                    if hasattr(scheduler, "base_lrs"):
                        scheduler.base_lrs[i] = new
            else:
                group[name] = new
        if module.trainer.is_global_zero:
            print(f"Resumed with optimizer {name}={new} (the run had {old})", flush=True)


def check_resumable(path: Path, checkpoint: dict, config) -> None:
    """Refuse, in one line, a resume whose settings differ from the run's where the difference cannot apply."""
    settings = checkpoint["run_settings"]
    step = checkpoint["global_step"]
    max_steps = last_step(config)
    if 0 <= max_steps <= step:
        raise ValueError(
            f"checkpoint {path} is at step {step}, and --trainer.max_steps is {max_steps}: nothing to train; "
            "raise max_steps to continue the run"
        )
    differences = []
    seed = config.seed_everything
    if isinstance(seed, int) and not isinstance(seed, bool) and settings.get("seed") not in (None, seed):
        differences.append(("seed_everything", seed, settings["seed"]))
    precision = precision_name(config.trainer.precision, config.trainer.accelerator)
    if settings.get("precision") not in (None, precision):
        differences.append(("trainer.precision", precision, settings["precision"]))
    optimizer = class_path(import_class(config.optimizer.class_path))
    if settings.get("optimizer") not in (None, optimizer):
        differences.append(("optimizer", optimizer, settings["optimizer"]))
    trained_args = settings.get("optimizer_args", {})
    for name, value in vars(config.optimizer.get("init_args") or Namespace()).items():
        old = trained_args.get(name, value)
        if old != value and not (is_number(old) and is_number(value)):  # numbers apply from the resumed step
            differences.append((f"optimizer.{name}", value, old))
    scheduler = class_path(import_class(config.lr_scheduler.class_path)) if config.get("lr_scheduler") else None
    if settings.get("lr_scheduler") != scheduler:
        differences.append(("lr_scheduler", scheduler, settings.get("lr_scheduler")))
    elif scheduler is not None:
        run_state = checkpoint.get("callbacks", {}).get("Run")  # the run's callback keeps the schedule's arguments
        trained_args = run_state.get("lr_scheduler_args") if isinstance(run_state, dict) else None
        trained_args = trained_args if isinstance(trained_args, dict) else {}
        for name, value in vars(config.lr_scheduler.get("init_args") or Namespace()).items():
            if name not in ("last_epoch", "verbose") and trained_args.get(name, value) != value:
                differences.append((f"lr_scheduler.{name}", value, trained_args[name]))
    if settings.get("lr_interval") not in (None, config.lr_interval):
        differences.append(("lr_interval", config.lr_interval, settings["lr_interval"]))
    for name in ("n_points", "low", "high", "steps_per_epoch"):
        trained = settings.get("data", {}).get(name)
        if trained is not None and trained != config.data[name]:
            differences.append((f"data.{name}", config.data[name], trained))
    if differences:
        name, new, old = differences[0]
        raise ValueError(
            f"cannot resume from {path} with a changed {name}: it is {new}, the run was trained with {old}; "
            "resume with the run's value, or start a new run without --ckpt_path"
        )


def check_latest(path: Path, step: int) -> None:
    """Refuse to resume a run from one of its checkpoints that is older than its last.ckpt: the resumed fit saves
    last.ckpt, and would replace the run's newer state with a branch of an older one."""
    last = path.parent / "last.ckpt"
    if path.parent.name != "checkpoints" or not last.is_file() or last.samefile(path):
        return
    newer = load_checkpoint(last)["global_step"]
    if newer > step:
        raise ValueError(
            f"checkpoint {path} is at step {step}, but its run has gone on to step {newer} (last.ckpt), which "
            "resuming from it would replace: resume with --ckpt_path last, or copy the checkpoint out of the run to "
            "start a new run from it"
        )


def class_path(cls: type) -> str:
    """Where a class is defined (torch.optim.sgd.SGD), as checkpoints record it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def is_number(value: Any) -> bool:
    """A number, or a tuple or list of numbers (Adam's betas): an optimizer argument a resume can change."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
        isinstance(value, tuple | list) and all(is_number(v) for v in value)
    )


def is_plain(value: Any) -> bool:
    """A value that reads as itself (no tensors, functions or objects): data a weights-only checkpoint holds."""
    return (
        value is None
        or isinstance(value, (bool, int, float, str))
        or (isinstance(value, tuple) and all(is_plain(v) for v in value))
    )
