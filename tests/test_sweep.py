"""dynnet-sweep: real sweeps of tiny fits in worker processes, on SQLite and on a PostgreSQL server of their own."""

import csv
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, free_port
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet.module import DynamicNet
from dynnet.sweep import check_fit, load_sweep, main, parser

# Tiny fits: 200 steps, a validation (a pruning point) every 50, no progress display: well under a second each.
TINY_FIT = {
    "trainer.max_steps": 200,
    "trainer.log_every_n_steps": 50,
    "data.steps_per_epoch": 50,
    "data.steps_per_batch": 50,
}
# The tutorial's SGD without momentum: lr 1e-3 diverges within a few steps; lr 1e-9 barely moves, so its gap after
# 50 steps (5e4 to 2e5 for seeds 0 and 1) is above the threshold pruner's limit; 1e-8 and 4e-8 are below it (2e4
# at most) and complete.
GRID = {
    "fit": str(ROOT / "configs" / "default.yaml"),
    "fit_args": TINY_FIT | {"optimizer.momentum": 0.0},
    "space": {"lr": {"choice": [1.0e-3, 1.0e-9, 1.0e-8, 4.0e-8]}, "seed": {"int": [0, 1]}},
    "sampler": "GridSampler",  # every point exactly once: which trials diverge and which are pruned is known
    "pruner": {"class": "ThresholdPruner", "upper": 3.0e4},
    "trials": 8,
    "heartbeat_interval": 1,
    "grace_period": 3,
}
# The shape of a real sweep: a choice of optimizers, each with its own learning-rate range, and seeds.
SEARCH = {
    "fit": str(ROOT / "configs" / "fast.yaml"),
    "fit_args": TINY_FIT | {"lr_scheduler.T_max": 200},
    "space": {
        "seed": {"int": [0, 3]},
        "optimizer": {
            "choice": {
                "torch.optim.SGD": {"lr": {"log": [1.0e-9, 1.0e-8]}, "momentum": {"uniform": [0.0, 0.9]}},
                "torch.optim.Adam": {"lr": {"log": [1.0e-2, 0.3]}},
            }
        },
    },
    "sampler": "RandomSampler",  # unseeded: two commands started together must not draw the same points
    "heartbeat_interval": 1,
    "grace_period": 3,
}


def sweep_file(path: Path, config: dict, **changes) -> Path:
    path.write_text(yaml.safe_dump(config | changes, sort_keys=False))
    return path


def load(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'study.db'}")


def rows(root: Path) -> list[dict]:
    with (root / "trials.csv").open() as file:
        return list(csv.DictReader(file))


def sweep_command(*args: str) -> list[str]:
    """The dynnet-sweep console script of this environment (the one pip installs from pyproject's scripts)."""
    return [str(Path(sys.executable).with_name("dynnet-sweep")), *args]


def best_lines(out: str) -> tuple[re.Match, str]:
    best = re.search(r"^Best trial (\d+): (.*), val/optimality_gap (\S+), run (\S+)$", out, re.M)
    assert best, out
    result = re.search(r"^Result: (y = .*)$", out, re.M)
    assert result, out
    return best, result.group(1)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "space, message",
    [
        ({"lrate": {"log": [1.0e-3, 1.0]}}, "unknown parameter 'lrate'"),
        ({"optimizer": {"choice": {"torch.optim.Adam": {"momentum": {"uniform": [0, 0.9]}}}}}, "'momentum'"),
        ({"lr": {"log": [1.0, 0.1]}}, "the range [1.0, 0.1] is empty"),
        ({"seed": {"int": [3, 0]}}, "the range [3, 0] is empty"),
        ({"optimizer": {"choice": {}}}, "the choice is empty"),
        ({"lr": {"log": [0, 1.0]}}, "log needs low > 0"),
    ],
)
def test_bad_space_is_one_line_before_anything(tmp_path, capsys, space, message):
    config = sweep_file(tmp_path / "bad.yaml", SEARCH, space=space)
    with pytest.raises(SystemExit) as stop:
        main([str(config), "--root", str(tmp_path / "root")])
    assert stop.value.code.startswith("dynnet-sweep: error: ") and message in stop.value.code
    assert "\n" not in stop.value.code
    assert not (tmp_path / "root").exists()


def test_unreachable_storage_and_bad_fit_flag(tmp_path):
    config = sweep_file(tmp_path / "s.yaml", SEARCH)
    url = f"postgresql+psycopg://someone:secret@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(SystemExit) as stop:
        main([str(config), "--root", str(tmp_path / "root"), "--storage", url])
    assert stop.value.code.startswith("dynnet-sweep: error: storage postgresql+psycopg://someone:***@127.0.0.1:")
    assert "secret" not in stop.value.code and "\n" not in stop.value.code
    assert not (tmp_path / "root").exists()
    config = sweep_file(tmp_path / "s.yaml", SEARCH, fit_args={"trainer.max_stepz": 10})
    with pytest.raises(SystemExit) as stop:
        main([str(config), "--root", str(tmp_path / "root")])
    assert "trainer.max_stepz" in stop.value.code and "\n" not in stop.value.code


# ------------------------------------------------------------------------------------------------ sweeps


@pytest.mark.slow
def test_sweep_with_two_workers_prunes_fails_and_reports(tmp_path, capfd):
    root = tmp_path / "root"
    main([str(sweep_file(tmp_path / "grid.yaml", GRID)), "--workers", "2", "--root", str(root)])
    out = capfd.readouterr().out
    study = load(root, "grid")
    trials = study.get_trials()
    by_lr = {lr: [t for t in trials if t.params["lr"] == lr] for lr in GRID["space"]["lr"]["choice"]}
    assert len(trials) == 8 and all(len(group) == 2 for group in by_lr.values())
    assert {t.state for t in by_lr[1.0e-3]} == {TrialState.FAIL}
    assert all(t.user_attrs["reason"].startswith("training diverged at step ") for t in by_lr[1.0e-3])
    assert {t.state for t in by_lr[1.0e-9]} == {TrialState.PRUNED}
    assert {t.state for t in by_lr[1.0e-8] + by_lr[4.0e-8]} == {TrialState.COMPLETE}
    # Both workers ran trials, each in its own process.
    assert len({t.user_attrs["pid"] for t in trials}) == 2

    table = rows(root)
    assert [int(r["trial"]) for r in table] == [t.number for t in trials]
    states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    for row, trial in zip(table, trials):
        assert row["state"] == states[trial.state]
        assert float(row["lr"]) == trial.params["lr"] and int(row["seed"]) == trial.params["seed"]
        assert Path(row["run"]) == root / "lightning_logs" / f"trial_{trial.number}"
        assert (Path(row["run"]) / "sweep.log").is_file()  # the fit's own output
        if trial.state == TrialState.COMPLETE:
            assert float(row["val/optimality_gap"]) == trial.value and int(row["steps"]) == 200
        elif trial.state == TrialState.PRUNED:
            assert int(row["steps"]) == 50 and float(row["val/optimality_gap"]) > GRID["pruner"]["upper"]
        else:
            assert row["val/optimality_gap"] == "" and row["reason"] == trial.user_attrs["reason"]
    # Every trial is a sibling run under the sweep's one TensorBoard logdir.
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == sorted(f"trial_{t.number}" for t in trials)
    for trial in trials:  # each with its settings in the HPARAMS tab, so that trials compare there
        events = EventAccumulator(str(root / "lightning_logs" / f"trial_{trial.number}"))
        assert "_hparams_/session_start_info" in events.Reload().PluginTagToContent("hparams")
    assert (root / "sweep.png").read_bytes().startswith(b"\x89PNG")

    best, formula = best_lines(out)
    assert int(best.group(1)) == study.best_trial.number
    assert f"{study.best_trial.value:.6g}" == best.group(3)
    assert best.group(2) == f"lr={study.best_trial.params['lr']:.4g} seed={study.best_trial.params['seed']}"
    checkpoint = Path(best.group(4)) / "checkpoints" / "last.ckpt"
    assert formula == DynamicNet.load_from_checkpoint(checkpoint).model.formula()
    assert "8 of 8 trials finished (4 complete, 2 pruned, 2 failed, 0 lost); this command ran 8" in out
    assert out.count("failed: training diverged") == 2


@pytest.mark.slow
def test_rerun_continues_the_study_and_fails_a_dead_trial(tmp_path, capfd):
    root = tmp_path / "root"
    config = sweep_file(tmp_path / "search.yaml", SEARCH)
    main([str(config), "--workers", "1", "--trials", "3", "--root", str(root)])
    first = load(root, "search").get_trials()
    assert len(first) == 3 and all(t.state.is_finished() for t in first)

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
    assert rows(root)[3]["reason"].startswith("lost: ")

    # Run again with the same total: nothing left to do.
    main([str(config), "--workers", "1", "--trials", "5", "--root", str(root)])
    out = capfd.readouterr().out
    assert "Workers:" not in out and "this command ran 0" in out
    assert len(load(root, "search").get_trials()) == 6


@pytest.mark.slow
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
        if not (root / "study.db").exists():
            continue
        try:
            running = load(root, "search").get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            continue
        victim = next((t for t in running if "pid" in t.user_attrs), None)
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
    assert rows(root)[victim.number]["state"] == "failed"


# ------------------------------------------------------------------------------------------------ PostgreSQL


def _server_binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on the PATH, or where Debian's postgresql package puts them."""
    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


@pytest.fixture
def postgres():
    """A PostgreSQL server of the test's own on 127.0.0.1, trusting local connections; stopped and removed after."""
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) found; .ci/run installs them")
    # pytest's tmp_path lies in a folder only root can enter; the server runs as the postgres user.
    data = Path(tempfile.mkdtemp(prefix="dynnet-pg-"))
    as_server = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_server = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    pg_ctl = [*as_server, str(binaries / "pg_ctl"), "-D", str(data / "db")]
    try:
        subprocess.run(
            [*as_server, str(binaries / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust"]
            + ["--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        # -F: no fsync, a throwaway server; -k: its socket in its own folder rather than /var/run/postgresql.
        options = f"-h 127.0.0.1 -p {port} -k {data} -F"
        subprocess.run([*pg_ctl, "-l", str(data / "log"), "-w", "-t", "60", "-o", options, "start"], check=True)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_commands_share_one_study_on_postgres(tmp_path, postgres):
    config = sweep_file(tmp_path / "search.yaml", SEARCH)
    # Two "machines": the same command with its own root, started together.
    commands = [
        subprocess.Popen(
            sweep_command(str(config), "--workers", "1", "--trials", "8", "--storage", postgres, "--root", str(root)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for root in (tmp_path / "a", tmp_path / "b")
    ]
    outputs = [command.communicate(timeout=300) for command in commands]
    assert [command.returncode for command in commands] == [0, 0], outputs
    ran = [int(re.search(r"this command ran (\d+)", out).group(1)) for out, _ in outputs]
    trials = optuna.load_study(study_name="search", storage=postgres).get_trials()
    # Both worked on the study, their trials add up to it, and it reached its total (one more only if both
    # started a last trial at the same moment).
    assert all(n > 0 for n in ran) and sum(ran) == len(trials) and 8 <= len(trials) <= 9
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    for (out, _), root in zip(outputs, ("a", "b")):
        mine = [t for t in trials if t.user_attrs["run"].startswith(str(tmp_path / root))]
        assert len(mine) == int(re.search(r"this command ran (\d+)", out).group(1))
        assert all(Path(t.user_attrs["run"]).is_dir() for t in mine)
        best, _ = best_lines(out)
        assert f"{trials[int(best.group(1))].value:.6g}" == best.group(3)


def test_the_shipped_sweep_config_loads_and_its_fits_parse(tmp_path):
    flags = parser().parse_args([str(ROOT / "configs" / "sweep.yaml"), "--root", str(tmp_path)])
    sweep = load_sweep(flags.config, flags)
    assert sweep.objective == "val/optimality_gap" and sweep.trials == 30
    assert set(sweep.space["optimizer"].options) == {"torch.optim.SGD", "torch.optim.Adam", "torch.optim.RMSprop"}
    check_fit(sweep)  # every optimizer branch's fit is parsed by dynnet's command line, and accepted
