"""Runs under hostile conditions: odd environments, a deleted or touched lock, early and late signals, config
bombs, dying DDP peers, a full disk. Each with real processes and real files."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEFAULT, TINY, dynnet, error_of, fitted_cli, last, run_dir, stop_line
from lightning.pytorch import Callback

from dynnet import signals
from dynnet.cli import main
from dynnet.cli.command import run
from dynnet.runs.checkpoint import load_checkpoint
from dynnet.runs.yaml_files import MAX_VALUES

# Long enough to be stopped, killed or locked while it trains: epochs of 100 steps, never finished.
ENDLESS = ["-c", DEFAULT, *TINY, "--trainer.max_steps", "1000000"]


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dynnet", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def handles(pid: int, signum: int) -> bool:
    """Whether the process has a handler for the signal: the bit (signum - 1) of SigCgt in /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signum - 1) & 1)


def wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ environment


@pytest.mark.slow
def test_leftover_rank_variables_change_nothing(tmp_path):
    # One fit per variable a cluster job leaves behind, into one root: each gets its own run folder, lock,
    # checkpoints and logs, as without the variable.
    variables = ["LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"]
    for variable in variables:
        env = os.environ | {variable: "1"}
        done = dynnet("fit", "-c", DEFAULT, *TINY, "--trainer.default_root_dir", str(tmp_path), env=env)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (variable, done.stderr[-2000:])
    for version in range(len(variables)):
        assert load_checkpoint(last(tmp_path, f"version_{version}"))["global_step"] == 200
        assert list(run_dir(tmp_path, f"version_{version}").glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------------------ the lock


@pytest.mark.slow
def test_deleting_the_lock_file_does_not_admit_a_second_writer(tmp_path, fit_output):
    fit_output("-c", DEFAULT, *TINY)
    run = run_dir(tmp_path)
    args = ["fit", *ENDLESS, "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path)]
    first = start(*args)
    try:
        wait_for(lambda: (run / "run.lock").read_text().split()[:1] == [str(first.pid)], first)
        (run / "run.lock").unlink()
        for resume in ("last", str(last(tmp_path))):
            second = dynnet(*args, "--ckpt_path", resume)
            assert second.returncode == 1
            assert second.stderr.strip() == f"dynnet: error: run {run} is in use by another process: wait for it " \
                "to finish, or start a new run"  # fmt: skip
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def test_last_is_the_run_started_last_whatever_the_files_times(tmp_path, fit_output, capsys):
    fit_output("-c", DEFAULT, *TINY, "--run", "older")
    fit_output("-c", DEFAULT, *TINY, "--run", "newer")
    future = time.time_ns() + 10**12
    os.utime(run_dir(tmp_path, "older") / "run.lock", ns=(future, future))  # touched "in the future"
    main(["validate", "-c", DEFAULT, "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path)])
    assert f"Checkpoint: {last(tmp_path, 'newer')} at step 200" in capsys.readouterr().out


def test_last_never_silently_means_a_run_without_a_checkpoint(tmp_path, fit_output, capsys):
    fit_output("-c", DEFAULT, *TINY)  # version_0, with its checkpoints
    # A run that diverged before its first checkpoint: it has a config, logs and a lock, no checkpoint.
    error = error_of(["fit", "-c", DEFAULT, *TINY, "--optimizer.lr", "1", "--trainer.default_root_dir",
                      str(tmp_path)], capsys)  # fmt: skip
    assert "training diverged" in error
    assert not (run_dir(tmp_path, "version_1") / "checkpoints" / "last.ckpt").exists()
    error = error_of(["fit", "-c", DEFAULT, *TINY, "--ckpt_path", "last", "--trainer.default_root_dir",
                      str(tmp_path)], capsys)  # fmt: skip
    assert error.endswith("it stopped before its first save; the newest run with one is version_0: add --run version_0")


# ------------------------------------------------------------------------------------------------ signals


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's signal handlers from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_before_training_prints_its_line_and_leaves_nothing(tmp_path, signum):
    # The first moment: the kernel reports the handler installed (before it, the interpreter itself is starting
    # and no program can answer). Then while Python imports torch and Lightning, and while the fit sets up.
    for delay in (0.0, 1.0):
        process = start("fit", *ENDLESS, "--trainer.default_root_dir", str(tmp_path))
        wait_for(lambda pid=process.pid: handles(pid, signum), process)
        time.sleep(delay)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 128 + signum
        assert err.strip().splitlines()[-1] == f"stopped by {signal.Signals(signum).name} before training started"
    assert not (tmp_path / "lightning_logs").exists() or not list((tmp_path / "lightning_logs").iterdir())


def test_a_stop_that_library_code_swallows_still_ends_the_command(monkeypatch, capsys):
    # Code the signal interrupts may catch the exit it raises (or turn it into another error) and go on.
    def swallowing(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        except BaseException:
            pass

    monkeypatch.setattr("dynnet.cli.command.run", swallowing)
    monkeypatch.setattr(signals, "_received", None)  # put back after the test: the stop it records stays
    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 143
    assert capsys.readouterr().err.strip() == "stopped by SIGTERM before training started"


def swallowed_stop_error(args: list[str], monkeypatch, capsys) -> str:
    """The error of the command after a SIGTERM before training that the code it interrupted swallowed."""
    monkeypatch.setattr(signals, "_received", signal.SIGTERM)
    return error_of(args, capsys, command=run)


def test_a_swallowed_stop_stops_training_before_its_first_step(tmp_path, monkeypatch, capsys):
    error = swallowed_stop_error(
        ["fit", "-c", DEFAULT, *TINY, "--trainer.default_root_dir", str(tmp_path)], monkeypatch, capsys
    )
    assert stop_line(error, "stopped by SIGTERM at step 0")[-4:] == ["--ckpt_path", "last", "--run", "version_0"]
    assert load_checkpoint(last(tmp_path, "version_0"))["global_step"] == 0


def test_a_stop_with_checkpointing_off_promises_no_resume(tmp_path, monkeypatch, capsys):
    args = ["fit", "-c", DEFAULT, *TINY, "--trainer.enable_checkpointing", "false"]
    error = swallowed_stop_error([*args, "--trainer.default_root_dir", str(tmp_path)], monkeypatch, capsys)
    assert error.splitlines()[-1] == "stopped by SIGTERM at step 0; nothing was saved (checkpointing is off), so " \
        "there is no checkpoint to resume from"  # fmt: skip
    assert not last(tmp_path).exists()


@pytest.mark.slow
class SweepStop(Callback):
    """The sweep's own stop, which has no step, raised inside a fit before the fit's handlers take over."""

    def on_fit_start(self, trainer, pl_module) -> None:
        raise signals.Stopped(signal.SIGTERM)


def test_a_stop_from_outside_the_fit_is_passed_on_and_saves_nothing(tmp_path):
    with pytest.raises(signals.Stopped) as stop:
        fitted_cli(tmp_path, callbacks=[SweepStop()])
    assert stop.value.step is None and stop.value.saved_run is None
    assert not list(tmp_path.glob("lightning_logs/*/checkpoints/last.ckpt"))


def test_a_lock_record_that_is_a_fifo_never_hangs_a_command(tmp_path, fit_output):
    fit_output("-c", DEFAULT, *TINY)
    record = run_dir(tmp_path) / "run.lock"
    record.unlink()
    os.mkfifo(record)  # reading it would wait for a writer that never comes
    root = ["--trainer.default_root_dir", str(tmp_path)]
    evaluated = dynnet("validate", "-c", DEFAULT, "--ckpt_path", "last", *root, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    resumed = dynnet("fit", "-c", DEFAULT, *TINY, "--trainer.max_steps", "300", "--ckpt_path", "last", *root,
                     timeout=120)  # fmt: skip
    assert resumed.stderr.strip() == f"dynnet: error: refusing to replace {record}: it is a FIFO (named pipe), not " \
        "a regular file"  # fmt: skip


@pytest.mark.slow
def test_sigterm_the_moment_the_run_is_locked(tmp_path):
    process = start("fit", *ENDLESS, "--trainer.default_root_dir", str(tmp_path))
    wait_for(lambda: list(tmp_path.glob("lightning_logs/*/run.lock")), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and err.strip().splitlines()[-1].startswith("stopped by SIGTERM")
    runs = (tmp_path / "lightning_logs").iterdir() if (tmp_path / "lightning_logs").exists() else []
    assert [run for run in runs if not (run / "checkpoints").exists()] == []  # no run that `last` could take


@pytest.mark.slow
def test_sighup_stops_at_a_step_and_saves_it_as_sigterm_does(tmp_path):
    # A closed terminal: the same stop, save and line as SIGTERM's (whose exact resume tests/test_runs.py checks).
    process = start("fit", *ENDLESS, "--trainer.default_root_dir", str(tmp_path))
    wait_for(lambda: last(tmp_path).exists(), process)
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=120)
    step = load_checkpoint(last(tmp_path))["global_step"]
    assert process.returncode == 129
    assert stop_line(err, f"stopped by SIGHUP at step {step}")[-4:] == ["--ckpt_path", "last", "--run", "version_0"]


# ------------------------------------------------------------------------------------------------ bounds


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "spelling, named",
    [(["-c", "{}"], "config file"), (["--config={}"], "config file"), (["--trainer", "{}"], "--trainer file"),
     (["--trainer={}"], "--trainer file"), (["--model", "{}"], "--model file")],
    ids=["-c", "--config=", "--trainer", "--trainer=", "--model"],
)  # fmt: skip
def test_a_yaml_bomb_file_is_refused_in_one_line_however_it_is_given(tmp_path, capsys, spelling, named):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    args = [token.format(bomb) for token in spelling]
    error = error_of(["fit", *args, "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert error == f"dynnet: error: {named} {bomb} was refused: with its aliases expanded it holds more than " \
        f"{MAX_VALUES} values (a YAML bomb, or not a config)"  # fmt: skip
    big = tmp_path / "big.yaml"
    big.write_text("a: 1\n" * 300_000)  # valid YAML, larger than any config
    error = error_of(["fit", *[token.format(big) for token in spelling]], capsys)
    assert error == f"dynnet: error: {named} {big} is {big.stat().st_size} bytes, more than a config's {1 << 20}"
    assert not (tmp_path / "lightning_logs").exists()


def test_a_yaml_bomb_value_is_refused_in_one_line(tmp_path, capsys):
    flow = "{" + billion_laughs().replace("\n", ", ").rstrip(", ") + "}"
    error = error_of(["fit", f"--trainer.callbacks={flow}", "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert error.endswith("was refused: its YAML aliases expand without end")
    assert not (tmp_path / "lightning_logs").exists()


def test_an_enormous_value_gives_a_short_line(tmp_path, capsys):
    huge = "x" * (45 << 20)
    error = error_of(["fit", f"--trainer.callbacks={huge}", "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert len(error) < 500 and "more than a config's" in error


def test_a_short_line_for_a_long_parser_error(tmp_path, capsys):
    value = "[" + ", ".join(f'"callback_{i}"' for i in range(5000)) + "]"
    error = error_of(["fit", f"--trainer.callbacks={value}", "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert len(error) < 500 and "\n" not in error


def test_predict_refuses_more_points_than_memory_holds(tmp_path, capsys):
    error = error_of(["predict", "--data.n_points", str(10**12), "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert error.startswith("dynnet: error: predicting 1000000000000 points needs about ")
    assert error.endswith("GiB is available: use fewer points (data.n_points)")


# ------------------------------------------------------------------------------------------------ one true line


def test_too_few_points_for_the_model(tmp_path, capsys):
    error = error_of(["fit", "--data.n_points", "2", "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert error == "dynnet: error: data.n_points is 2, fewer than the model's 5 coefficients: the expected loss " \
        "then has no single optimum to measure the fit against; use more points"  # fmt: skip
    assert not tmp_path.joinpath("lightning_logs").exists()


def test_resuming_an_lr_0_run_with_another_lr(tmp_path, fit_output):
    fit_output("-c", DEFAULT, *TINY, "--optimizer.lr", "0")
    out, _ = fit_output(
        "-c", DEFAULT, *TINY, "--optimizer.lr", "1e-8", "--trainer.max_steps", "300", "--ckpt_path", "last"
    )
    assert "Resumed with optimizer lr=1e-08 (the run had 0.0)" in out
    assert load_checkpoint(last(tmp_path))["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-8


@pytest.mark.slow
def test_a_full_disk_names_the_run_in_one_line(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs a small file system of its own (mount -t tmpfs, as root)")
    try:
        (disk / "filler").write_bytes(bytes(200_000))  # room for the run's start, not for its logs
        out = dynnet("fit", "-c", DEFAULT, "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir",
                     str(disk))  # fmt: skip
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1].endswith(": No space left on device")
        assert "Traceback" not in out.stderr and str(disk / "lightning_logs") in out.stderr.splitlines()[-1]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ------------------------------------------------------------------------------------------------ what was used


def test_evaluation_says_which_checkpoint_it_used(tmp_path, fit_output, capsys):
    fit_output("-c", DEFAULT, *TINY)
    [best] = (run_dir(tmp_path) / "checkpoints").glob("best-*.ckpt")
    for command in ("validate", "test", "predict"):
        main([command, "-c", DEFAULT, "--ckpt_path", "best", "--trainer.default_root_dir", str(tmp_path)])
        assert f"Checkpoint: {best} at step {load_checkpoint(best)['global_step']}" in capsys.readouterr().out
    main(["validate", "-c", DEFAULT, "--trainer.default_root_dir", str(tmp_path)])
    assert "Checkpoint: none (--ckpt_path not given): the model as configured, untrained" in capsys.readouterr().out


def test_the_logs_line_is_absolute_for_a_relative_root(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", DEFAULT, *TINY, "--trainer.default_root_dir", "relative"])
    assert f"Logs: {tmp_path / 'relative' / 'lightning_logs' / 'version_0'}\n" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ DDP peers


DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def children(process: subprocess.Popen) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "zombie" not in open(f"/proc/{pid}/status").read()  # noqa: SIM115 - a one-off read


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_a_peer_killed_mid_training_ends_rank_0_with_one_line(tmp_path):
    rank0 = start("fit", *ENDLESS, *DDP, "--trainer.default_root_dir", str(tmp_path))
    wait_for(lambda: list(tmp_path.glob("lightning_logs/*/checkpoints/last.ckpt")), rank0)
    os.kill(children(rank0)[0], signal.SIGKILL)
    _, err = rank0.communicate(timeout=90)
    assert rank0.returncode == 1
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "dynnet: error: a process of this distributed run stopped or cannot be reached"
    )


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_rank_0_stopped_during_start_up_leaves_no_orphan(tmp_path):
    rank0 = start("fit", *ENDLESS, *DDP, "--trainer.default_root_dir", str(tmp_path))
    wait_for(lambda: children(rank0), rank0)
    peers = children(rank0)
    rank0.send_signal(signal.SIGTERM)
    _, err = rank0.communicate(timeout=90)
    assert rank0.returncode == 143 and "Traceback" not in err
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in peers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in peers)
