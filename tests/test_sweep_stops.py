"""How a dynnet-sweep stops: SIGTERM and SIGINT stop every trial at a step boundary and exit 143 and 130; workers
stop by themselves when the sweep's main process is killed; a worker paused past the grace period has its late
result discarded with one line."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from conftest import PRUNE_AT_THE_END, SEARCH, TINY_FIT, load, rows, running, sweep_command, sweep_file
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

# Trials of several seconds, so that a signal lands inside their fits.
LONG_FIT = TINY_FIT | {"trainer.max_steps": 20000, "data.steps_per_epoch": 5000, "lr_scheduler.T_max": 20000}


def start(config: Path, root: Path, *flags: str) -> subprocess.Popen:
    """The sweep in a process group of its own, as a terminal runs it."""
    command = sweep_command(str(config), "--root", str(root), *flags)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def training(root: Path, count: int, sweep: subprocess.Popen) -> list[optuna.trial.FrozenTrial]:
    """Wait until count trials are inside their fits (their run's config.yaml is written as training starts)."""
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline and sweep.poll() is None
        found = [t for t in running(root, "search") if "run" in t.user_attrs]
        found = [t for t in found if (Path(t.user_attrs["run"]) / "config.yaml").is_file()]
        if len(found) >= count:
            return found
        time.sleep(0.2)


def gone(pid: int) -> bool:
    """Whether a process has ended (an orphan that nothing reaps stays a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize(
    "signum, send, workers",
    [
        (signal.SIGTERM, os.kill, 1),  # to the sweep's process alone, as a job scheduler stops a job
        (signal.SIGINT, os.killpg, 2),  # to the sweep and its workers, as Ctrl-C in a terminal does
    ],
)
def test_a_stopped_sweep_stops_its_trials_at_a_step_and_exits_with_the_signal(tmp_path, signum, send, workers):
    root = tmp_path / "root"
    config = sweep_file(tmp_path / "search.yaml", SEARCH, fit_args=LONG_FIT)
    sweep = start(config, root, "--workers", str(workers), "--trials", "4")
    stopped = training(root, workers, sweep)
    send(sweep.pid, signum)
    out, err = sweep.communicate(timeout=180)
    assert sweep.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"dynnet-sweep: stopped by {name}; run the same command again to continue the study" in err
    assert "Traceback" not in err, err
    assert all(gone(t.user_attrs["pid"]) for t in stopped)
    trials = load(root, "search").get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    table = {int(row["trial"]): row for row in rows(root)}  # the report was written after the workers stopped
    for trial in (trials[t.number] for t in stopped):
        found = re.fullmatch(rf"stopped by {name} at step (\d+)", trial.user_attrs["lost"])
        assert trial.state == TrialState.FAIL and found, trial.user_attrs
        step = int(found.group(1))
        assert 0 < step < 20000 and f"trial {trial.number} lost: stopped by {name} at step {step}" in out
        # The fit saved its state where it stopped.
        checkpoint = Path(trial.user_attrs["run"]) / "checkpoints" / "last.ckpt"
        assert torch.load(checkpoint, weights_only=False)["global_step"] == step
        assert table[trial.number]["state"] == "lost"
        assert table[trial.number]["reason"] == f"lost: stopped by {name} at step {step}"
    assert f"0 of 4 trials finished (0 complete, 0 pruned, 0 failed, {workers} lost)" in out


def test_workers_stop_by_themselves_when_the_sweep_is_killed(tmp_path):
    root = tmp_path / "root"
    # A grace period longer than the test: the trials must be marked by their own workers, not as stale.
    config = sweep_file(tmp_path / "search.yaml", SEARCH, fit_args=LONG_FIT, grace_period=600)
    sweep = start(config, root, "--workers", "2", "--trials", "4")
    stopped = training(root, 2, sweep)
    sweep.kill()
    # The workers share the sweep's output: it ends when the last of them has exited.
    out, err = sweep.communicate(timeout=120)
    assert all(gone(t.user_attrs["pid"]) for t in stopped)
    assert err.count("the sweep's main process is gone") == 2 and "Traceback" not in err, err
    for trial in (load(root, "search").trials[t.number] for t in stopped):
        assert trial.state == TrialState.FAIL and "reason" not in trial.user_attrs
        assert re.fullmatch(r"stopped by SIGTERM at step \d+", trial.user_attrs["lost"])


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # the heartbeat, used on purpose
def test_a_late_result_is_discarded_with_one_line(tmp_path):
    root = tmp_path / "root"
    # Trials of a few seconds, validated four times; the pruner would stop a trial at its last validation only.
    fit = LONG_FIT | {"trainer.max_steps": 4000, "data.steps_per_epoch": 1000, "lr_scheduler.T_max": 4000}
    pruner = PRUNE_AT_THE_END | {"n_warmup_steps": 4000}
    config = sweep_file(tmp_path / "search.yaml", SEARCH, fit_args=fit, pruner=pruner)
    sweep = start(config, root, "--workers", "1", "--trials", "1")
    (trial,) = training(root, 1, sweep)
    pid = trial.user_attrs["pid"]
    # The worker is paused past the grace period, and another process marks its trial failed.
    url, wait = f"sqlite:///{root / 'study.db'}", {"connect_args": {"timeout": 1}}
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=3, engine_kwargs=wait)
    study = optuna.load_study(study_name="search", storage=storage)
    while study.trials[trial.number].state == TrialState.RUNNING:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(4)
        try:
            optuna.storages.fail_stale_trials(study)
        except sqlalchemy.exc.OperationalError:  # paused while it held the database's lock: try again
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.2)
    os.kill(pid, signal.SIGCONT)
    out, err = sweep.communicate(timeout=180)
    assert sweep.returncode == 0 and "Traceback" not in err, err
    discarded = [line for line in out.splitlines() if line.startswith(f"trial {trial.number} discarded: ")]
    assert discarded == [
        f"trial {trial.number} discarded: the study marked it failed while its worker was silent for more than 3 s "
        f"(paused or cut off); its run stays in {trial.user_attrs['run']}"
    ], out
    trials = load(root, "search").get_trials()
    assert trials[trial.number].state == TrialState.FAIL and "reason" not in trials[trial.number].user_attrs
    # The next trial took its place; trained to its last step, it is complete even where the pruner would stop it.
    assert [(t.state, t.user_attrs["steps"]) for t in trials[trial.number + 1 :]] == [(TrialState.COMPLETE, 4000)]
