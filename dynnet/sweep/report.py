"""What a sweep tells at the end: the study's counts, its best trial with its Result line and the command that
reproduces it, and trials.csv and sweep.png in the sweep's root."""

import csv
import io
import re
import shlex
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dynnet.cli.console import dynnet_command
from dynnet.runs.folder import RUNS, runs_dir
from dynnet.sweep.config import Sweep
from dynnet.sweep.errors import SweepError, printable, shown, write_file
from dynnet.sweep.fit import run_name
from dynnet.sweep.hparams import EXPERIMENT_FILE, write_experiment
from dynnet.sweep.picture import plot
from dynnet.sweep.space import brief, settings_of
from dynnet.sweep.study import counts, fail_lost_trials

# Where the rerun command puts its run, under the sweep's root: beside the trials, not among them.
RERUN = "rerun"
# A machine's name (RFC 1123, and the underscore some containers use).
HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
# A lost trial's reason when nothing says more: its worker died (killed, its machine lost) without telling it.
LOST = "its worker stopped before the fit ended (killed, or its heartbeat stopped)"


def state_of(trial: FrozenTrial) -> str:
    """complete, pruned, failed (on its own: it counts), lost (its worker stopped: it does not), or running."""
    if trial.state == TrialState.FAIL:
        return "failed" if counts(trial) else "lost"
    return {"COMPLETE": "complete", "PRUNED": "pruned"}.get(trial.state.name, "running")


def trial_rows(trials: list[FrozenTrial], objective: str, best: int | None) -> tuple[list[str], list[dict[str, Any]]]:
    """trials.csv: one row per trial with its state, whether it is the best, its objective (a pruned trial's: its
    last reported value, which Optuna records as its value) and settings, steps, seconds, run folder and, for a
    failed or lost trial, why."""
    names: list[str] = []
    rows = []
    for trial in trials:
        settings = settings_of(trial.params)
        names += [n for n in settings if n not in names]
        attrs = trial.user_attrs
        state = state_of(trial)
        reason = attrs.get("reason", "") if state != "lost" else f"lost: {attrs.get('lost', LOST)}"
        seconds = attrs.get("seconds")
        if seconds is None and trial.duration is not None:
            seconds = round(trial.duration.total_seconds(), 3)
        rows.append(
            {"trial": trial.number, "state": state, "best": "best" if trial.number == best else ""}
            | {objective: "" if trial.value is None else trial.value, **settings}
            | {"steps": attrs.get("steps", ""), "seconds": "" if seconds is None else seconds}
            | {"run": attrs.get("run", ""), "reason": reason}
        )
    return ["trial", "state", "best", objective, *names, "steps", "seconds", "run", "reason"], rows


def outputs(root: Path) -> tuple[Path, Path, Path]:
    """The files every command on a study writes for it: trials.csv, sweep.png and the HPARAMS experiment."""
    return root / "trials.csv", root / "sweep.png", runs_dir(root) / EXPERIMENT_FILE


def csv_bytes(columns: list[str], rows: list[dict[str, Any]]) -> bytes:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def rerun_command(run: Path) -> str:
    """The dynnet fit that reproduces a trial exactly, as a line to paste into a shell: its run's config (every
    setting, the seed included) into a new run folder of the same name under the sweep's root, in
    rerun/lightning_logs, run by this environment's dynnet."""
    rerun = run.parents[1] / RERUN
    return shlex.join(
        dynnet_command(
            "fit", "-c", str(run / "config.yaml"), "--trainer.default_root_dir", str(rerun), "--run", run.name
        )
    )


def where(trial: FrozenTrial, study: str) -> tuple[Path, str]:
    """A trial's run folder and the machine it ran on, as the study holds them: refused when they cannot be (a
    study's database can be shared, and what it holds is input)."""
    run, host = trial.user_attrs.get("run"), trial.user_attrs.get("host", socket.gethostname())
    name = run_name(trial.number)
    path = Path(run) if isinstance(run, str) and run.isprintable() else None
    if path is None or not path.is_absolute() or path.name != name or path.parent.name != RUNS:
        raise SweepError(
            f"study {study}: trial {trial.number}'s run {shown(run)} is not a run folder .../{RUNS}/{name}"
        )
    if not (isinstance(host, str) and HOST.fullmatch(host)):
        raise SweepError(f"study {study}: trial {trial.number}'s host {shown(host)} is not a machine's name")
    return path, host


def report(study: optuna.Study, sweep: Sweep) -> bool:
    """Print the study's counts and its best trial with its Result line and rerun command; write trials.csv,
    sweep.png and the TensorBoard HPARAMS experiment. Whether the study holds its total of finished trials."""
    fail_lost_trials(study)
    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if completed else None
    columns, rows = trial_rows(trials, sweep.objective, best.number if best else None)
    csv_path, png_path, _ = outputs(sweep.root)
    write_file(csv_path, csv_bytes(columns, rows))
    # Written at the start; again only if it has gone since (deleted, or taken by another command stopped as it began).
    write_experiment(sweep)
    write_file(png_path, plot(rows, sweep.objective, f"{sweep.study}: {sweep.objective} of each trial"))
    tallies = {state: sum(row["state"] == state for row in rows) for state in ("complete", "pruned", "failed", "lost")}
    running = sum(row["state"] == "running" for row in rows)
    finished = sum(counts(t) for t in trials)
    ran = sum(t.user_attrs.get("command") == sweep.command for t in trials)
    shown_states = [f"{n} {state}" for state, n in tallies.items()] + ([f"{running} running"] if running else [])
    counted = f"{finished} of {sweep.trials} trials finished ({', '.join(shown_states)})"
    print(f"Study {sweep.study}: {counted}; this command ran {ran}", flush=True)
    if best is not None:
        run, host = where(best, sweep.study)
        elsewhere = host != socket.gethostname()  # the trial ran on another machine, where its run folder is
        shown_run = f"{host}:{run}" if elsewhere else run
        settings = brief(settings_of(best.params))
        print(printable(f"Best trial {best.number}: {settings}, {sweep.objective} {best.value:.6g}, run {shown_run}"))
        print(printable(f"Result: {best.user_attrs.get('result', '?')}"))
        print(f"Rerun{f' on {host}' if elsewhere else ''}: {rerun_command(run)}")
    else:
        print("No trial completed yet: no best trial")
    print(f"Trials: {csv_path}; picture: {png_path}", flush=True)
    return finished >= sweep.trials
