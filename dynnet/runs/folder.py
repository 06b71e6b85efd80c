"""A run: one folder holding a fit's config, logs, checkpoints and outputs, written by one process at a time.

Runs live in ``<default_root_dir>/lightning_logs/<name>``, where TensorBoard finds them: ``version_N`` by default,
or a name given with ``--run``. A fresh fit creates a new folder (never reuses one); a resumed fit continues in
the folder its checkpoint lies in. While a process trains into a run it holds an OS lock on the run folder itself,
which the kernel releases when the process dies, however it dies; ``run.lock`` records who holds it and when it
started, which makes the run the newest.
"""

import contextlib
import fcntl
import os
import re
import stat
import time
from contextlib import ExitStack
from pathlib import Path

from lightning.pytorch import Trainer

from dynnet.runs.files import write_atomically
from dynnet.signals import LAUNCHER

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


def enter_run(
    trainer, name: str | None, cleanup: ExitStack, checkpoint: Path | None = None
) -> tuple[Path, RunLock | None]:
    """The run folder a fit writes into, and its lock (held by rank 0 only, released by ``cleanup``): the run of
    the checkpoint it resumes, else a new folder under the Trainer's ``default_root_dir``, which
    ``cleanup`` removes again when nothing was written into it. ``trainer`` is the Trainer's configuration."""
    if name is not None and (name in ("", ".", "..") or "/" in name or os.sep in name):
        raise ValueError(f"--run must be a plain folder name, got {name!r}")
    if not is_global_zero(trainer):
        # Processes Lightning launches for DDP run the command again: they work in rank 0's folder, which rank 0
        # also broadcasts once the processes are connected. Only rank 0 writes into it.
        return Path(os.environ.get("DYNNET_RUN") or runs_dir(trainer.default_root_dir)), None
    run = run_of(checkpoint) if checkpoint is not None else None
    if run is not None and name is not None and run.name != name:
        raise RunError(f"the checkpoint belongs to run {run}, not {name}: resuming continues that run; drop --run")
    if run is None:  # a fresh fit, or a checkpoint outside any run, which starts a new run from its state
        root = Path(trainer.default_root_dir)
        made = [p for p in (root, *root.parents) if not p.exists()]  # folders this run would be the first in
        run = create_run(root, name)
        cleanup.callback(discard_if_unused, run, made)
    lock = RunLock(run)
    cleanup.callback(lock.release)
    if trainer.devices not in (1, "1") or trainer.num_nodes != 1:
        # For the processes Lightning launches for DDP, which run this command again: rank 0's run and process
        # (see dynnet.signals.die_with_launcher). Kept for this command only.
        for key, value in (("DYNNET_RUN", str(run)), (LAUNCHER, str(os.getpid()))):
            os.environ[key] = value
            cleanup.callback(os.environ.pop, key, None)
    return run, lock


def keep_metrics_history(run: Path, step: int) -> None:
    """Keep a resumed run's metrics.csv as metrics-until-step<step>.csv: Lightning's CSVLogger deletes the
    metrics.csv it finds in its folder when the fit sets up its loggers."""
    metrics = run / "metrics.csv"
    if metrics.is_file():
        metrics.rename(run / f"metrics-until-step{step}.csv")


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
