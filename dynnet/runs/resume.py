"""What a checkpoint records of how its run trains, and what a resumed fit may change: numbers apply from the
resumed step; anything else that cannot take effect mid-run is refused. DynamicNet checks from its Trainer, and the
`dynnet fit` command from its config before it starts (dynnet.cli.checkpoints), with the same lines."""

import numbers
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer

from dynnet.runs.checkpoint import load_checkpoint


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
            refuse_change(path, name, value, old)


def refuse_change(path, name: str, new: Any, old: Any) -> None:
    """Refuse a resume that changes a setting the run cannot take mid-run."""
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
    """A number, or a non-empty tuple or list of numbers (Adam's betas): an optimizer argument a resume can change,
    and a setting TensorBoard's HPARAMS lists whatever its value."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
        isinstance(value, tuple | list) and bool(value) and all(is_number(v) for v in value)
    )


def is_plain(value: Any) -> bool:
    """A value that reads as itself (no tensors, functions or objects): data a weights-only checkpoint holds."""
    return (
        value is None
        or isinstance(value, (bool, int, float, str))
        or (isinstance(value, tuple) and all(is_plain(v) for v in value))
    )
