"""What ``--ckpt_path`` means: the file of last, best or a path, checked against the configured model before
LightningCLI reads it; and for a resumed fit, the changes of settings the run cannot take."""

from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from dynnet.cli.arguments import dotted, import_class
from dynnet.cli.checks import precision_name
from dynnet.data import SineData
from dynnet.runs.checkpoint import CheckpointError, load_checkpoint
from dynnet.runs.folder import RunError, find_run, last_checkpoint, run_of
from dynnet.runs.resume import DATA, check_latest, check_same_run, class_path, is_number, refuse_change
from dynnet.runs.yaml_files import load_yaml
from dynnet.steps import batch_grid, check_resumed_batches, validation_steps


def resolve_checkpoint(config, subcommand: str, config_files: dict[str, Any]) -> tuple[Path, dict | None]:
    """The checkpoint file ``config.ckpt_path`` means, checked against the configured model (and, for fit, the
    run); for fit also what the resume needs: ``{"path", "step", "data_state"}``."""
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
        note_other_config(run_of(path), config_files)
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
        return path, None
    check_resumable(path, checkpoint, config)
    check_latest(path, checkpoint["global_step"])
    data_state = checkpoint.get(SineData.__qualname__)
    return path, {
        "path": path,
        "step": checkpoint["global_step"],
        "data_state": data_state if isinstance(data_state, dict) else {},
    }


def check_resumed_grid(trainer, data: SineData, data_state: dict) -> None:
    """Refuse a resume whose train batches would lie on another grid than the run's, where Lightning counts its
    validation interval in batches (see dynnet.steps.check_resumed_batches)."""
    grid = batch_grid(trainer, data.steps_per_batch, data.steps_per_epoch)
    check_resumed_batches(data_state.get("batch_grid"), grid, validation_steps(trainer, data.steps_per_epoch))


def note_other_config(run: Path | None, config_files: dict[str, Any]) -> None:
    """Say so when the run that --ckpt_path last or best took was trained with settings other than those the
    command's config files give: the newest run may come from another config."""
    if run is None or not (run / "config.yaml").is_file():
        return
    trained = dotted(load_yaml(run / "config.yaml"))
    for path, content in config_files.items():
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


def check_resumable(path: Path, checkpoint: dict, config) -> None:
    """Refuse, in one line, a resume whose settings differ from the run's where the difference cannot apply: the
    command's check, from its config, before it enters the run (DynamicNet checks the same from its Trainer)."""
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
            refuse_change(path, f"optimizer.{name}", value, old)
    if scheduler is not None:
        run_state = checkpoint.get("callbacks", {}).get("Run")  # the run's callback keeps the schedule's arguments
        trained_args = run_state.get("lr_scheduler_args") if isinstance(run_state, dict) else None
        trained_args = trained_args if isinstance(trained_args, dict) else {}
        for name, value in vars(scheduler.get("init_args") or Namespace()).items():
            if name not in ("last_epoch", "verbose") and trained_args.get(name, value) != value:
                refuse_change(path, f"lr_scheduler.{name}", value, trained_args[name])


def last_step(config) -> int:
    """The step the run stops at, so that Lightning's estimated_stepping_batches counts optimizer steps."""
    trainer = config.trainer
    max_steps = trainer.max_steps if trainer.max_steps is not None else -1
    max_epochs = trainer.max_epochs
    if max_epochs is None and max_steps == -1 and trainer.max_time is None:
        max_epochs = 1000  # Lightning's default when nothing bounds a fit
    if max_epochs is not None and max_epochs >= 0:
        by_epochs = max_epochs * config.data.steps_per_epoch
        max_steps = by_epochs if max_steps == -1 else min(max_steps, by_epochs)
    return max_steps
