"""One trial: a real ``dynnet fit`` with the trial's settings into ``<root>/lightning_logs/trial_NNNN``, as the
objective of Optuna's study.optimize (which keeps the trial's heartbeat while it runs)."""

import contextlib
import io
import math
import os
import signal
import socket
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from optuna.exceptions import UpdateFinishedTrialError

from dynnet.cli.command import DynnetCLI
from dynnet.errors import USER_ERRORS, one_line
from dynnet.runs.folder import runs_dir
from dynnet.signals import SWEEP_SIGNALS, Stopped, stopped_fit
from dynnet.sweep.config import Sweep
from dynnet.sweep.errors import SweepError, write_file
from dynnet.sweep.fit import base_args, run_name
from dynnet.sweep.hparams import trial_row
from dynnet.sweep.space import brief, fit_flags, suggest
from dynnet.sweep.study import process_space


class TrialFailed(Exception):
    """A trial that failed: on its own (diverged, crashed; it has a reason and counts), or lost because its
    worker was stopped (it does not count). study.optimize marks it failed and the worker goes on or stops."""


class Discarded(BaseException):
    """The trial was marked failed by another process while this one ran it (its worker was paused past the grace
    period). A BaseException, so that study.optimize passes it on without telling the finished trial (which it
    would refuse with a ValueError)."""


@dataclass
class Outcome:
    """How a trial's fit ended: what to record, the line the sweep prints, and a stop signal that ended it."""

    line: str
    attrs: dict[str, Any]
    value: float | None = None  # the objective of a completed trial
    pruned: optuna.TrialPruned | None = None
    stop: int | None = None  # a stop signal that ended the fit or arrived as it ended: the worker stops after it


class Pruning(Callback):
    """Optuna's pruning, as its Lightning callback does it, but at optimizer steps: each validation reports the
    objective at the fit's step (the step a pruned trial's line names, and the x axis optuna-dashboard plots), and
    the trial stops where the pruner says so, except at the fit's last step: a trial that trained every step is
    complete, whatever the pruner says of it. Keeps the trial's trainer, whose step count is wanted also when the
    fit ends by an exception."""

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor
        self.trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer

    def on_validation_end(self, trainer, pl_module) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or score is None:
            return
        self.trial.report(score.item(), step=trainer.global_step)
        if not 0 <= trainer.max_steps <= trainer.global_step and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {trainer.global_step}")


class Objective:
    """A worker's objective for study.optimize: runs one trial and prints one line about it. Remembers a stop
    signal that ended a trial, after which the worker stops."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.stop: int | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        sweep = self.sweep
        run = runs_dir(sweep.root) / run_name(trial.number)
        try:
            attrs = {"pid": os.getpid(), "process_space": process_space(), "host": socket.gethostname()}
            for key, value in (attrs | {"command": sweep.command, "run": str(run)}).items():
                trial.set_user_attr(key, value)
            settings = suggest(trial, sweep.space)
            try:
                outcome = fit_trial(trial, sweep, settings, run)
            except Stopped as stop:  # before the fit took over the stop signals, or after it gave them back
                lost = f"stopped by {signal.Signals(stop.signum).name} outside its fit"
                outcome = Outcome(f"lost: {lost}", {"lost": lost, "steps": 0, "seconds": 0.0}, stop=stop.signum)
            for key, value in outcome.attrs.items():
                trial.set_user_attr(key, value)
        except UpdateFinishedTrialError:
            print(
                f"trial {trial.number} discarded: the study marked it failed while its worker was silent for more "
                f"than {sweep.grace_period} s (paused or cut off); its run stays in {run}",
                flush=True,
            )
            raise Discarded from None
        steps, seconds = outcome.attrs["steps"], outcome.attrs["seconds"]
        print(f"trial {trial.number} {outcome.line} ({brief(settings)}; {steps} steps, {seconds:.1f} s)", flush=True)
        self.stop = outcome.stop
        if outcome.pruned is not None:
            raise outcome.pruned
        if outcome.value is None:
            raise TrialFailed(outcome.line)
        return outcome.value


def fit_trial(trial: optuna.Trial, sweep: Sweep, settings: dict[str, Any], run: Path) -> Outcome:
    """The trial's fit, its output kept in its run folder's sweep.log rather than mixed into the sweep's."""
    watch = Pruning(trial, monitor=sweep.objective)
    output = io.StringIO()
    # A fit stops at a step boundary on SIGTERM and SIGINT; its handlers stay behind when it ends: put back the
    # worker's, which stop it between fits.
    handlers = {signum: signal.getsignal(signum) for signum in SWEEP_SIGNALS}
    stop = None
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), ExitStack() as cleanup:
            # The sweep's root holds the HPARAMS experiment of all trials; each trial writes only its row.
            cli = DynnetCLI(
                args=[*base_args(sweep, sweep.root, run.name), *fit_flags(settings)],
                cleanup=cleanup,
                callbacks=[watch],
                hparams_row=lambda run: trial_row(run, settings, sweep.space),
            )
            metrics = cli.model.evaluate(*next(iter(cli.datamodule.val_dataloader())))
        value = float(metrics[sweep.objective.partition("/")[2]])
        if not math.isfinite(value):
            raise TrialFailed(f"{sweep.objective} is {value}")
        stop = cli.model.stop_signal  # arrived after the last step: the trial is complete, the worker stops
        result = {"result": cli.model.model.formula()}
        outcome = Outcome(f"complete: {sweep.objective} {value:.6g}", result, value=value, stop=stop)
    except optuna.TrialPruned as pruned:
        reported = watch.trainer.callback_metrics.get(sweep.objective) if watch.trainer is not None else None
        line = f"pruned at step {_steps(watch)}" + (f": {sweep.objective} {float(reported):.6g}" if reported else "")
        outcome = Outcome(line, {}, pruned=pruned)
    except (Stopped, SIGTERMException) as interrupted:
        if isinstance(interrupted, Stopped) and not stopped_fit(interrupted):
            raise  # the worker's own stop, before the fit took over the signals: the objective reports it
        # Stopped from outside (Ctrl-C, SIGTERM, the sweep's end): the trial did not fail on its own, so it gets
        # no reason and does not count; the worker stops.
        stop = getattr(interrupted, "signum", signal.SIGTERM)
        lost = f"stopped by {signal.Signals(stop).name} at step {_steps(watch)}"
        outcome = Outcome(f"lost: {lost}", {"lost": lost}, stop=stop)
    except Exception as err:
        known = isinstance(err, (*USER_ERRORS, TrialFailed))
        reason = one_line(err) if known else f"{type(err).__name__}: {one_line(err)}"
        output.write(traceback.format_exc())
        outcome = Outcome(f"failed: {reason}", {"reason": reason})
    finally:
        for signum, handler in handlers.items():
            # Stopping, the worker tells the trial and ends: a second signal (Ctrl-C reaches every worker, and the
            # sweep passes it on too) must not cut that short.
            signal.signal(signum, handler if stop is None else signal.SIG_IGN)
        if run.is_dir():
            with contextlib.suppress(SweepError):  # the trial's outcome matters more than its log
                write_file(run / "sweep.log", output.getvalue().encode())
    outcome.attrs |= {"steps": _steps(watch), "seconds": round(time.perf_counter() - start, 3)}
    return outcome


def _steps(watch: Pruning) -> int:
    return watch.trainer.global_step if watch.trainer is not None else 0
