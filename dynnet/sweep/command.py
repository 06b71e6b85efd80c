"""The ``dynnet-sweep`` command: check everything, open or create the study, run the workers, report."""

import argparse
import contextlib
import sys
from pathlib import Path
from typing import NoReturn

import optuna
from sqlalchemy.engine import make_url

from dynnet.runs.folder import runs_dir
from dynnet.signals import Stopped, raising_stopped
from dynnet.sweep.config import DEFAULT_TRIALS, Sweep, load_sweep
from dynnet.sweep.errors import PROG, SweepError, check_replaceable, printable
from dynnet.sweep.fit import check_fit
from dynnet.sweep.hparams import EXPERIMENT_FILE, write_experiment
from dynnet.sweep.report import outputs, report
from dynnet.sweep.storage import safe_url, storage_errors
from dynnet.sweep.study import experiment, open_study, tally
from dynnet.sweep.workers import run_workers


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        sys.exit(f"{self.prog}: error: {message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Search learning rates, optimizers and seeds for dynnet fits with Optuna. Every trial is a "
        "dynnet fit in its own run folder, ROOT/lightning_logs/trial_NNNN. Rerunning the same command continues "
        "the study; several machines given one --storage URL work on one study; a study holds one experiment, and "
        "a sweep that would run another in it is refused. At the end it prints the best trial, its Result line and "
        "the command that reproduces it, and writes ROOT/trials.csv and ROOT/sweep.png. SIGTERM or Ctrl-C stops "
        "every trial at its next step and exits with 143 or 130.",
        epilog="Flags override the config's keys of the same name. See the README's section Sweeps.",
    )
    parser.add_argument(
        "config",
        metavar="CONFIG",
        help="the sweep config (YAML): the fit config to start from (fit), flags for every fit (fit_args), the "
        "search space (space), the objective and its direction, the sampler and the pruner",
    )
    parser.add_argument(
        "--trials",
        type=int,
        metavar="N",
        help=f"finish when the study holds N finished trials (complete, pruned or failed), counting earlier runs "
        f"of the study; a trial whose worker died does not count (default: the config's trials, else {DEFAULT_TRIALS})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="W",
        help="trials run in W processes at once on this machine, at most one per core and as many as the "
        "available memory holds (default: the config's workers, else that most)",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="the study's database, any SQLAlchemy URL Optuna supports, e.g. "
        "postgresql+psycopg://user:password@host/db (default: the config's storage, else sqlite:///ROOT/study.db)",
    )
    parser.add_argument(
        "--study",
        metavar="NAME",
        help="the study's name in the storage (default: the config's study, else the config file's name)",
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="where the runs (DIR/lightning_logs), trials.csv and sweep.png go (default: the config's root, "
        "else runs/STUDY)",
    )
    return parser


def main(args: list[str] | None = None) -> None:
    flags = parser().parse_args(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created": the sweep's first line says so
    try:
        with raising_stopped():  # SIGTERM and Ctrl-C stop the sweep the same way, with their own exit status
            _sweep(flags)
    except Stopped as stop:
        print(f"{PROG}: {stop}; run the same command again to continue the study", file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)


def _sweep(flags: argparse.Namespace) -> None:
    made: list[Path] = []
    try:
        sweep = load_sweep(flags.config, flags)
        for path in outputs(sweep.root):
            check_replaceable(path)
        record = experiment(sweep, check_fit(sweep))
        made = _new_paths(sweep.root, sweep.storage)
        _make_folder(runs_dir(sweep.root))  # before the study: the default SQLite file lives in the root
        study = open_study(sweep, record)
        with storage_errors(sweep.storage, "failed"):
            finished, _ = tally(study)
        write_experiment(sweep)
    except (SweepError, Stopped) as err:
        _remove(made)  # a refused start leaves nothing behind
        if isinstance(err, Stopped):
            raise
        _fail(err)
    print(
        f"Study {sweep.study} in {safe_url(sweep.storage)}: {finished} of {sweep.trials} trials finished; "
        f"runs under {runs_dir(sweep.root)}",
        flush=True,
    )
    problems: list[str] = []
    if finished < sweep.trials:
        try:
            problems = run_workers(sweep)
        except Stopped:
            _report(study, sweep)  # the workers have stopped and told their trials
            raise
    if not _report(study, sweep):
        reason = "; ".join(problems) or "the workers stopped"
        _fail(f"the study is not finished ({reason}); run the same command again to continue it")


def _report(study: optuna.Study, sweep: Sweep) -> bool:
    """report, a refusal in it (a study value that cannot be shown, a file that cannot be written) as one line."""
    try:
        with storage_errors(sweep.storage, "failed"):
            return report(study, sweep)
    except SweepError as err:
        _fail(err)


def _fail(reason: object) -> NoReturn:
    """End the command with its one-line error (a value from the study in it shows its line breaks as escapes)."""
    sys.exit(printable(f"{PROG}: error: {reason}"))


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepError(f"cannot create {path}: {err.strerror}") from None


def _new_paths(root: Path, storage: str) -> list[Path]:
    """What opening the sweep will create: the SQLite file, when the storage is one that does not exist yet, then
    the HPARAMS experiment's events file, and the folders that do not exist yet, deepest first."""
    url = make_url(storage)  # checked by load_sweep
    database = Path(url.database).expanduser() if url.get_backend_name() == "sqlite" and url.database else None
    made = [database] if database is not None and not database.exists() else []
    runs = runs_dir(root)
    return made + [p for p in (runs / EXPERIMENT_FILE, runs, root, *root.parents) if not p.exists()]


def _remove(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):  # a folder another process has written into meanwhile stays
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
                Path(f"{path}-journal").unlink(missing_ok=True)
