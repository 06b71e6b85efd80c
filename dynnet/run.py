"""A run: one folder holding a fit's config, logs, checkpoints and outputs, written by one process at a time.

Runs live in ``<default_root_dir>/lightning_logs/<name>``, where TensorBoard finds them: ``version_N`` by default,
or a name given with ``--run``. A fresh fit creates a new folder (never reuses one); a resumed fit continues in
the folder its checkpoint lies in. While a process trains into a run it holds an OS lock on the run folder itself,
which the kernel releases when the process dies, however it dies; ``run.lock`` records who holds it and when it
started, which makes the run the newest.
"""

import contextlib
import fcntl
import math
import os
import re
import reprlib
import signal
import stat
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint

from dynnet import command
from dynnet.checkpoint import CheckpointError, write_atomically
from dynnet.checkpoint_state import files_outside
from dynnet.errors import Interrupted

RUNS = "lightning_logs"  # Lightning's own folder name for runs, so `tensorboard --logdir <root>` finds them
LOCK = "run.lock"
LAST = "last.ckpt"


class RunError(ValueError):
    """A run that cannot be created, found or entered."""


def runs_dir(root: str | os.PathLike | None) -> Path:
    return Path(root or os.getcwd()).expanduser() / RUNS


def create_run(root: str | os.PathLike | None, name: str | None = None) -> Path:
    """Make a new run folder, ``name`` or the next ``version_N``; creating it is atomic, so two fits never share one."""
    parent = runs_dir(root)
    parent.mkdir(parents=True, exist_ok=True)
    if name is not None:
        path = parent / name
        try:
            path.mkdir()
        except FileExistsError:
            raise RunError(
                f"run {path} already exists: resume it with --ckpt_path last --run {name}, or choose another name"
            ) from None
        return path
    while True:
        versions = [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
        path = parent / f"version_{max(versions, default=-1) + 1}"
        with contextlib.suppress(FileExistsError):  # another process took this number first: take the next
            path.mkdir()
            return path


def find_run(root: str | os.PathLike | None, name: str | None = None) -> Path:
    """The named run, or the newest: the one a process most recently started training in."""
    parent = runs_dir(root)
    if name is not None:
        if not (parent / name).is_dir():
            raise RunError(f"there is no run {parent / name}")
        return parent / name
    runs = newest_first(parent)
    if not runs:
        raise RunError(f"there is no run under {parent} to take the last checkpoint from")
    return runs[0]


def newest_first(parent: Path) -> list[Path]:
    """The runs under parent, the one a process most recently started training in first. The start is what
    run.lock records, not its modification time, which anything can change."""
    folders = parent.iterdir() if parent.is_dir() else []
    runs = [p for p in folders if lock_record(p) or (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda p: (started(p), p.name), reverse=True)


def started(run: Path) -> int:
    """When a process last started training in run (nanoseconds since the epoch), as run.lock records; 0 when it
    records none."""
    with contextlib.suppress(ValueError, IndexError):
        return int(lock_record(run)[1])
    return 0


def lock_record(run: Path) -> list[str]:
    """What run.lock records, "pid start_ns", split; empty when it is missing or not a regular file. Opened without
    following a link or waiting on a FIFO, and checked to be a regular file before a byte is read."""
    try:
        descriptor = os.open(run / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return []
        return file.read(64).decode(errors="replace").split()


def last_checkpoint(run: Path, named: bool = True) -> Path:
    """A run's last checkpoint. When the run was taken as the newest (not named), a refusal names the newest run
    that has one, so that `last` never silently means an older run."""
    path = run / "checkpoints" / LAST
    if path.is_file():
        return path
    reason = f"run {run} has no checkpoint yet ({path} does not exist): it stopped before its first save"
    others = [r.name for r in newest_first(run.parent) if r != run and (r / "checkpoints" / LAST).is_file()]
    if not named and others:
        reason += f"; the newest run with one is {others[0]}: add --run {others[0]}"
    raise RunError(reason)


def run_of(checkpoint: Path) -> Path | None:
    """The run a checkpoint belongs to: the folder holding the ``checkpoints`` folder it lies in."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


class RunLock:
    """An exclusive lock on a run folder, held until ``release`` or the process's death; refused with a RunError
    naming the holder's process id when another process holds it. The lock is on the folder itself, so deleting a
    file cannot admit a second writer. Takes over from a killed holder: removes the temporary files a kill
    mid-write leaves behind."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.descriptor: int | None = os.open(run, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            record = lock_record(run)
            holder = f"process {record[0]}" if record else "another process"
            raise RunError(f"run {run} is in use by {holder}: wait for it to finish, or start a new run") from None
        # Who holds the run, and since when: the start makes this the newest run for --ckpt_path last.
        record = f"{os.getpid()} {time.time_ns()}\n".encode()
        write_atomically(run / LOCK, lambda file: file.write(record))
        for leftover in [*run.glob(".*.tmp"), *run.glob("checkpoints/.*.tmp")]:
            leftover.unlink()

    def release(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)  # closing the only descriptor releases the lock
            self.descriptor = None


class Run(Checkpoint):
    """Keeps a fit's run folder and tells its user what happened.

    - writes the run's config (config.yaml; config-step<N>.yaml for a resumed run);
    - saves ``last.ckpt``, the run's latest state, after every validation of the fit, at the end of training and
      where SIGTERM, SIGINT or SIGHUP stopped it; and, unless the user gives a ModelCheckpoint, ``best-step=<N>.ckpt``,
      the state with the lowest ``val/expected_loss`` so far;
    - stops training on SIGTERM, SIGINT or SIGHUP at the next step boundary;
    - logs the evaluation at the step where a signal stopped the fit;
    - moves a resumed run's checkpoint bookkeeping to where its folder is now, and removes files a kill left;
    - prints the resume point, the training speed, the tutorial's Result line and where the logs are.

    A Checkpoint, so Lightning runs it after every other callback (ModelCheckpoint included): the state it saves
    already holds their updates for the step.
    """

    def __init__(
        self,
        path: Path | None,
        config: str | None = None,
        save: bool = True,
        best: bool = True,
        lr_scheduler_args: dict | None = None,
    ) -> None:
        """
        Args:
            path: The run folder (on processes other than rank 0, replaced by rank 0's); None writes nothing.
            config: The run's config as YAML.
            save: Whether to save checkpoints at all (False for --trainer.enable_checkpointing false).
            best: Whether to keep the best checkpoint (False when the user gives a ModelCheckpoint).
            lr_scheduler_args: The schedule's arguments, kept in checkpoints so that a resume can tell a changed
                one (a scheduler's own state lacks some, such as OneCycleLR's max_lr).
        """
        self.path, self.config = path, config
        self.lr_scheduler_args = lr_scheduler_args or {}
        self.save_last, self.save_best = save and path is not None, save and best and path is not None
        self.best_name: str | None = None
        self.best_score: float | None = None
        self.resumed_at: int | None = None
        self.saved_step: int | None = None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def state_dict(self) -> dict:
        return {
            "path": str(self.path),
            "best": self.best_name,
            "best_score": self.best_score,
            "lr_scheduler_args": self.lr_scheduler_args,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_name, self.best_score = state_dict["best"], state_dict["best_score"]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        path = trainer.strategy.broadcast(str(self.path) if self.path else None)
        self.path = Path(path) if path else None
        self.other_checkpoints = any(isinstance(c, Checkpoint) and c is not self for c in trainer.callbacks)
        self.start_step, self.start_time, self.seconds = 0, time.perf_counter(), 0.0
        # From here a signal stops the fit at the next step boundary, or before the first; Lightning installs a
        # handler of its own before training (which calls this one too), and on_train_start takes over again.
        self._handle_signals(pl_module)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self.resumed_at = checkpoint["global_step"]
        # Callbacks keep absolute paths of their files. A run folder that was moved or copied continues with its
        # own files: rewrite the old folder's paths before the callbacks load their state.
        old = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("path")
        if old and self.path and old != str(self.path):
            checkpoint["callbacks"] = _rebase(checkpoint["callbacks"], old, str(self.path))
        _check_callback_files(trainer, checkpoint.get("callbacks", {}), self.path, self.state_key)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        print(f"Model: {pl_module.model.describe()}", flush=True)  # what Lightning's summary table would say
        if self.resumed_at is not None:
            print(f"Resumed from {trainer.ckpt_path} at step {self.resumed_at}", flush=True)

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._handle_signals(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._handle_signals(pl_module)
        self.start_step, self.start_time = trainer.global_step, time.perf_counter()
        if not trainer.is_global_zero or self.path is None:
            return
        if self.config is not None:
            name = "config.yaml" if self.resumed_at is None else f"config-step{self.resumed_at}.yaml"
            write_atomically(self.path / name, lambda file: file.write(self.config.encode()))
        if self.save_best:
            # A kill between writing a new best checkpoint and deleting the old one, or before the last checkpoint
            # recorded the new one, leaves a file the restored state does not know; the resumed run writes it
            # again when it gets there.
            for path in self.checkpoints.glob("best-*.ckpt"):
                if path.name != self.best_name:
                    path.unlink()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get("val/expected_loss")
        if self.save_best and score is not None and (self.best_score is None or float(score) < self.best_score):
            previous, self.best_name, self.best_score = (
                self.best_name,
                f"best-step={trainer.global_step}.ckpt",
                float(score),
            )
            self._save(trainer, self.checkpoints / self.best_name)
            if previous and previous != self.best_name and trainer.is_global_zero:
                (self.checkpoints / previous).unlink(missing_ok=True)
        self.save(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A ModelCheckpoint that validates once an epoch saves at the epoch's end, after the validation that wrote
        # last.ckpt: save it again, now that the epoch is complete, so that it records what they saved (saving
        # in on_train_epoch_end would have a resumed run replay the epoch's end for them).
        if self.other_checkpoints and self.saved_step == trainer.global_step:
            self.save(trainer, again=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save(trainer, again=True)  # callbacks may change the model at the end (StochasticWeightAveraging)
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start_time

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After every callback's on_train_end, so these lines follow the progress display's last one.
        log_dir = trainer.log_dir  # a collective under DDP: every process must ask
        if trainer.is_global_zero:
            steps, seconds = trainer.global_step - self.start_step, self.seconds
            rate = steps / max(seconds, 1e-9)
            print(f"Trained {steps} step{'' if steps == 1 else 's'} in {seconds:.3f} s ({rate:.0f} steps/s)")
            print(f"Result: {pl_module.model.formula()}")
            print(pl_module.quality(trainer.datamodule))
            logs = log_dir if trainer.loggers else self.path
            if logs:  # fast_dev_run writes none
                print(f"Logs: {logs}")
            sys.stdout.flush()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, Interrupted):
            pl_module.log_final_evaluation()
            self.save(trainer)
            if self.save_last and not trainer.fast_dev_run:  # the stop line offers a resume only from a save
                exception.saved_run = str(self.path)

    def save(self, trainer: Trainer, again: bool = False) -> None:
        """Save last.ckpt, unless it already holds this step and ``again`` is False."""
        if self.save_last and (again or self.saved_step != trainer.global_step):
            self._save(trainer, self.checkpoints / LAST)
            self.saved_step = trainer.global_step

    def _save(self, trainer: Trainer, path: Path) -> None:
        if not trainer.fast_dev_run:
            trainer.save_checkpoint(path, weights_only=False)  # every process calls it; rank 0 writes

    def _handle_signals(self, pl_module: LightningModule) -> None:
        for signum in command.STOP_SIGNALS:
            signal.signal(signum, lambda signum, frame: _request_stop(pl_module, signum))
        if command.received is not None:  # a stop before training that the code it interrupted swallowed
            _request_stop(pl_module, command.received)


def _request_stop(pl_module: LightningModule, signum: int) -> None:
    pl_module.stop_signal = signum


def _check_callback_files(trainer: Trainer, states: dict, run: Path | None, own: str) -> None:
    """Refuse callback states that name files a callback could later write or delete outside the run: a crafted
    checkpoint must not turn a new best checkpoint into the removal of an arbitrary file. The run's own state names
    its best file in the run's checkpoints folder, and the score that file reached."""
    mine = states.get(own) or {}
    best, score = mine.get("best"), mine.get("best_score")
    if best is not None and not re.fullmatch(r"best-step=\d+\.ckpt", str(best)):
        problem = f"its run state names {best!r} as its best file"
    elif score is not None and not (type(score) is float and math.isfinite(score)):
        problem = f"its run state's best_score is {reprlib.repr(score)}, not a finite number"
    else:
        problem = files_outside(states, trainer.callbacks, run, own)
    if problem:
        raise CheckpointError(f"checkpoint {trainer.ckpt_path} was refused: {problem}")


def _rebase(value, old: str, new: str):
    """value with every string that is a path under ``old`` moved under ``new``, in nested dicts and lists."""
    if isinstance(value, str):
        return new + value[len(old) :] if value == old or value.startswith(old + os.sep) else value
    if isinstance(value, dict):
        return {_rebase(k, old, new): _rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rebase(v, old, new) for v in value)
    return value


def discard_if_unused(run: Path, made: list[Path]) -> None:
    """Remove a run folder this command created when nothing but its lock was written into it, and the folders
    above it that the command created (the runs folder, default_root_dir) when they are left empty."""
    if [p.name for p in run.iterdir()] == ["run.lock"]:
        (run / "run.lock").unlink()
        run.rmdir()
        for folder in [run.parent, *made]:
            with contextlib.suppress(OSError):  # not empty: another run, or the user's files
                folder.rmdir()


def is_global_zero(trainer) -> bool:
    """Whether this process is the fit's global rank 0, as Lightning's cluster environment says for the configured
    devices, nodes and strategy: a rank variable left in a shell by another job means nothing to a fit of one
    process. Asked of a Trainer made for that question alone, before the run's own exists."""
    strategy = trainer.strategy if isinstance(trainer.strategy, str) else "auto"
    probe = Trainer(
        accelerator=trainer.accelerator if isinstance(trainer.accelerator, str) else "auto",
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return probe.is_global_zero
