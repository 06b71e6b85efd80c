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
    """Refuse, in one line, a resume whose settings differ from the run's where the difference cannot apply:
    `dynnet fit --ckpt_path`'s check, from its config, before it enters the run."""
    step = checkpoint["global_step"]
    max_steps = last_step(config)
    if 0 <= max_steps <= step:
        raise ValueError(
            f"checkpoint {path} is at step {step}, and --trainer.max_steps is {max_steps}: nothing to train; "
            "raise max_steps to continue the run"
        )
    scheduler = config.get("lr_scheduler")
    seed = config.seed_everything  # true or false chooses no seed: nothing to compare
    now = {
        "seed_everything": seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        "trainer.precision": precision_name(config.trainer.precision, config.trainer.accelerator),
        "optimizer": class_path(import_class(config.optimizer.class_path)),
        "lr_scheduler": class_path(import_class(scheduler.class_path)) if scheduler else None,
        "lr_interval": config.lr_interval if scheduler else None,
    } | {f"data.{name}": config.data[name] for name in DATA}
    check_same_run(path, checkpoint, now)
    trained_args = checkpoint["run_settings"].get("optimizer_args", {})
    for name, value in vars(config.optimizer.get("init_args") or Namespace()).items():
        old = trained_args.get(name, value)
        if value is None:  # the class's default, which the optimizer resolved (LBFGS's max_eval) as the run's did
            continue
        if old != value and not (is_number(old) and is_number(value)):  # numbers apply from the resumed step
            _refuse(path, f"optimizer.{name}", value, old)
    if scheduler is not None:
        run_state = checkpoint.get("callbacks", {}).get("Run")  # the run's callback keeps the schedule's arguments
        trained_args = run_state.get("lr_scheduler_args") if isinstance(run_state, dict) else None
        trained_args = trained_args if isinstance(trained_args, dict) else {}
        for name, value in vars(scheduler.get("init_args") or Namespace()).items():
            if name not in ("last_epoch", "verbose") and trained_args.get(name, value) != value:
                _refuse(path, f"lr_scheduler.{name}", value, trained_args[name])


# The data settings a run is trained on, which a resume keeps: the points, and the steps an epoch holds.
DATA = ("n_points", "low", "high", "steps_per_epoch")


def check_same_run(path: Path | str | None, checkpoint: dict, now: dict[str, Any]) -> None:
    """Refuse a resume whose settings ``now`` (named as dynnet's options) differ from those the checkpoint's run
    was trained with; a setting the checkpoint does not record, or ``now`` leaves out, is not compared. The
    `dynnet fit` command checks from its config, and DynamicNet from its Trainer, so plain Python gets the same
    line."""
    settings = checkpoint["run_settings"]
    trained = {
        "seed_everything": settings.get("seed"),
        "trainer.precision": settings.get("precision"),
        "optimizer": settings.get("optimizer"),
        "lr_scheduler": settings.get("lr_scheduler", None),
        "lr_interval": settings.get("lr_interval"),
    } | {f"data.{name}": settings.get("data", {}).get(name) for name in DATA}
    trained |= {f"model.{name}": checkpoint["hyper_parameters"].get(name) for name in ("min_degree", "max_degree")}
    for name, value in now.items():
        old = trained.get(name)
        known = name == "lr_scheduler" or (old is not None and value is not None)  # no scheduler is a setting
        if known and old != value:
            _refuse(path, name, value, old)


def _refuse(path, name: str, new: Any, old: Any) -> None:
    raise ValueError(
        f"cannot resume from {path} with a changed {name}: it is {new}, the run was trained with {old}; "
        "resume with the run's value, or start a new run (without ckpt_path)"
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
