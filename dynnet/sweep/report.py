"""What a sweep tells at the end: the study's counts, its best trial with its Result line and the command that
reproduces it, and trials.csv and sweep.png in the sweep's root."""

import csv
import shlex
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dynnet.sweep.config import Sweep
from dynnet.sweep.hparams import write_experiment
from dynnet.sweep.picture import plot
from dynnet.sweep.space import describe, settings_of
from dynnet.sweep.study import counts, fail_lost_trials

# Where the rerun command puts its run, under the sweep's root: beside the trials, not among them.
RERUN = "rerun"
# A lost trial's reason when nothing says more: its worker died (killed, its machine lost) without telling it.
LOST = "its worker stopped before the fit ended (killed, or its heartbeat stopped)"


def state_of(trial: FrozenTrial) -> str:
    """complete, pruned, failed (on its own: it counts), lost (its worker stopped: it does not), or running."""
    if trial.state == TrialState.FAIL:
        return "failed" if counts(trial) else "lost"
    return {"COMPLETE": "complete", "PRUNED": "pruned"}.get(trial.state.name, "running")


def trial_rows(trials: list[FrozenTrial], objective: str, best: int | None) -> tuple[list[str], list[dict[str, Any]]]:
    """trials.csv: one row per trial with its state, whether it is the best, its objective and settings, steps,
    seconds, run folder and, for a failed or lost trial, why."""
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
            | {objective: _value(trial), **settings}
            | {"steps": attrs.get("steps", ""), "seconds": "" if seconds is None else seconds}
            | {"run": attrs.get("run", ""), "reason": reason}
        )
    return ["trial", "state", "best", objective, *names, "steps", "seconds", "run", "reason"], rows


def _value(trial: FrozenTrial) -> float | str:
    """A completed trial's objective; a pruned trial's last reported value; nothing for a failed one."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return ""


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def rerun_command(run: Path) -> str:
    """The dynnet fit that reproduces a trial exactly: its run's config (every setting, the seed included) into a
    new run folder of the same name under the sweep's root, in rerun/lightning_logs."""
    config, rerun = shlex.quote(str(run / "config.yaml")), shlex.quote(str(run.parents[1] / RERUN))
    return f"dynnet fit -c {config} --trainer.default_root_dir {rerun} --run {run.name}"


def report(study: optuna.Study, sweep: Sweep) -> bool:
    """Print the study's counts and its best trial with its Result line and rerun command; write trials.csv,
    sweep.png and the TensorBoard HPARAMS experiment. Whether the study holds its total of finished trials."""
    fail_lost_trials(study)
    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if completed else None
    columns, rows = trial_rows(trials, sweep.objective, best.number if best else None)
    csv_path, png_path = sweep.root / "trials.csv", sweep.root / "sweep.png"
    write_csv(csv_path, columns, rows)
    # Written at the start; again only if it has gone since (deleted, or taken by another command stopped as it began).
    write_experiment(sweep)
    plot(png_path, rows, sweep.objective, f"{sweep.study}: {sweep.objective} of each trial")
    tallies = {state: sum(row["state"] == state for row in rows) for state in ("complete", "pruned", "failed", "lost")}
    running = sum(row["state"] == "running" for row in rows)
    finished = sum(counts(t) for t in trials)
    ran = sum(t.user_attrs.get("command") == sweep.command for t in trials)
    shown = [f"{n} {state}" for state, n in tallies.items()] + ([f"{running} running"] if running else [])
    counted = f"{finished} of {sweep.trials} trials finished ({', '.join(shown)})"
    print(f"Study {sweep.study}: {counted}; this command ran {ran}", flush=True)
    if best is not None:
        run = Path(best.user_attrs["run"])
        host = best.user_attrs.get("host", socket.gethostname())
        elsewhere = host != socket.gethostname()  # the trial ran on another machine, where its run folder is
        print(
            f"Best trial {best.number}: {describe(settings_of(best.params))}, {sweep.objective} {best.value:.6g}, "
            f"run {f'{host}:' if elsewhere else ''}{run}"
        )
        print(f"Result: {best.user_attrs.get('result', '?')}")
        print(f"Rerun{f' on {host}' if elsewhere else ''}: {rerun_command(run)}")
    else:
        print("No trial completed yet: no best trial")
    print(f"Trials: {csv_path}; picture: {png_path}", flush=True)
    return finished >= sweep.trials
