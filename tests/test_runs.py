"""A run is a unit: one folder, one writer, `last` is its final state, and nothing a command writes destroys
what it reads. Kills, signals and concurrent writers are real processes."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import (
    DEFAULT,
    TINY,
    copied_run,
    crafted_checkpoint,
    dynnet,
    error_of,
    fitted_cli,
    last,
    result,
    run_dir,
    stop_line,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet.cli import main
from dynnet.cli.predictions import export_main
from dynnet.module import DynamicNet
from dynnet.runs.checkpoint import MAX_CHECKPOINT_BYTES, load_checkpoint


def parameters(checkpoint: Path) -> list[float]:
    state = load_checkpoint(checkpoint)["state_dict"]
    return [state[k].item() for k in sorted(k for k in state if k.startswith("model.coefficients"))] + [
        state["model.shared"].item()
    ]


def val_steps(run: Path) -> list[int]:
    return [e.step for e in EventAccumulator(str(run)).Reload().Scalars("val/expected_loss")]


# ------------------------------------------------------------------------------------------------ one run, one folder


def test_every_fresh_fit_is_a_new_run_and_last_means_the_newest(tmp_path, capsys):
    fitted_cli(tmp_path, "--trainer.max_steps", "100")
    fitted_cli(tmp_path, "--seed_everything", "4")  # a second, different run in the same root
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    assert sorted(p.name for p in (run_dir(tmp_path, "version_1") / "checkpoints").iterdir()) == [
        "best-step=200.ckpt",
        "last.ckpt",
    ]
    capsys.readouterr()
    cli = fitted_cli(tmp_path, "--seed_everything", "4", "--trainer.max_steps", "300", "--ckpt_path", "last")
    assert f"Resumed from {last(tmp_path, 'version_1')} at step 200" in capsys.readouterr().out
    assert cli.trainer.global_step == 300
    assert load_checkpoint(last(tmp_path, "version_0"))["global_step"] == 100  # untouched


def test_a_named_run_is_never_started_twice_and_resumes_by_name(tmp_path, capsys):
    fitted_cli(tmp_path, "--run", "baseline")
    assert last(tmp_path, "baseline").is_file()
    error = error_of(["fit", "-c", DEFAULT, *TINY, "--run", "baseline", "--trainer.default_root_dir", str(tmp_path)],
                     capsys)  # fmt: skip
    assert f"run {run_dir(tmp_path, 'baseline')} already exists" in error
    fitted_cli(tmp_path, "--trainer.max_steps", "100")  # a newer run that `last` alone would pick
    cli = fitted_cli(tmp_path, "--run", "baseline", "--trainer.max_steps", "300", "--ckpt_path", "last")
    assert cli.trainer.global_step == 300
    assert load_checkpoint(last(tmp_path, "baseline"))["global_step"] == 300


def test_fast_dev_run_leaves_the_real_run_alone(tmp_path):
    fitted_cli(tmp_path)
    fitted_cli(tmp_path, "--trainer.fast_dev_run", "true")
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    cli = fitted_cli(tmp_path, "--trainer.max_steps", "300", "--ckpt_path", "last")
    assert cli.trainer.global_step == 300  # resumed from 200, not from the dev run's step 1


def test_a_resumed_fit_continues_its_folder_and_its_curves(tmp_path):
    fitted_cli(tmp_path)
    fitted_cli(tmp_path, "--trainer.max_steps", "400", "--ckpt_path", "last")
    run = run_dir(tmp_path)
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert (run / "config.yaml").is_file() and (run / "config-step200.yaml").is_file()
    events = EventAccumulator(str(run)).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(20, 401, 20))
    assert val_steps(run) == [100, 200, 300, 400]


# Lightning replays the restored epoch's end for a user's ModelCheckpoint before any validation of the resumed
# process, and warns that its monitored metric is not logged yet.
@pytest.mark.filterwarnings("ignore:.*could not find the monitored key")
@pytest.mark.parametrize("user_checkpoint", [False, True], ids=["dynnet-best", "user-top-k"])
def test_a_moved_run_resumes_from_its_own_state(tmp_path, user_checkpoint):
    spec = '{"class_path": "ModelCheckpoint", "init_args": {"monitor": "val/expected_loss", "save_top_k": 2}}'
    extra = ["--trainer.callbacks+", spec] if user_checkpoint else []
    fitted_cli(tmp_path / "before", *extra)
    shutil.move(tmp_path / "before", tmp_path / "after")
    cli = fitted_cli(tmp_path / "after", *extra, "--trainer.max_steps", "400", "--ckpt_path", "last")
    assert cli.trainer.global_step == 400
    files = sorted(p.name for p in (run_dir(tmp_path / "after") / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in files and load_checkpoint(last(tmp_path / "after"))["global_step"] == 400
    if user_checkpoint:
        kept = [f for f in files if f.startswith("epoch=")]
        assert len(kept) == 2  # still the top two of the whole run: the moved ones were tracked, not orphaned
    else:
        assert [f for f in files if f.startswith("best-")] == ["best-step=400.ckpt"]


# ------------------------------------------------------------------------------------------------ last is final


@pytest.mark.parametrize(
    "args, final",
    [
        (["--trainer.max_steps", "250"], 250),  # not a whole number of epochs
        (["--trainer.max_steps", "-1", "--trainer.max_epochs", "3"], 300),
        (["--trainer.check_val_every_n_epoch", "3", "--trainer.max_steps", "400"], 400),
        (
            [
                "--trainer.callbacks+",
                '{"class_path": "EarlyStopping", "init_args": {"monitor": "val/expected_loss", '
                '"patience": 0, "min_delta": 1e9}}',
                "--trainer.max_steps",
                "1000",
            ],
            200,
        ),
    ],
    ids=["max_steps", "max_epochs", "skipped-validation", "early-stopping"],
)
def test_last_is_the_printed_result_validated_at_the_final_step(tmp_path, capsys, args, final):
    main(["fit", "-c", DEFAULT, *TINY, *args, "--trainer.default_root_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert load_checkpoint(last(tmp_path))["global_step"] == final
    assert parameters(last(tmp_path)) == result(out)  # exact: float reprs round-trip
    assert val_steps(run_dir(tmp_path))[-1] == final


def test_the_best_checkpoint_is_the_lowest_expected_loss(tmp_path):
    fitted_cli(tmp_path, "--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.3", "--trainer.max_steps", "600")
    losses = dict(
        (e.step, e.value) for e in EventAccumulator(str(run_dir(tmp_path))).Reload().Scalars("val/expected_loss")
    )
    [best] = (run_dir(tmp_path) / "checkpoints").glob("best-*.ckpt")
    assert load_checkpoint(best)["global_step"] == min(losses, key=losses.get)


# ------------------------------------------------------------------------------------------------ one writer


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_trains(tmp_path):
    fitted_cli(tmp_path)
    args = ["fit", "-c", DEFAULT, *TINY, "--trainer.max_steps", "100000", "--ckpt_path", "last",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "dynnet", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = run_dir(tmp_path)
    try:
        while (run / "run.lock").read_text().split()[:1] != [str(first.pid)]:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        second = dynnet(*args)
        assert second.returncode != 0
        assert second.stderr.strip() == f"dynnet: error: run {run} is in use by process {first.pid}: wait for it to " \
            "finish, or start a new run"  # fmt: skip
        assert first.poll() is None  # the first goes on
        assert (run / "run.lock").read_text().split()[0] == str(first.pid)
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_refused_writer_changes_nothing(tmp_path):
    fitted_cli(tmp_path)
    run = run_dir(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from dynnet.runs.folder import RunLock; "
            "RunLock(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()",
            str(run),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip  (it holds the lock until the test closes its input, however slow the machine)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in run.rglob("*")}
        for args in (["--ckpt_path", "last"], ["--ckpt_path", str(last(tmp_path))]):
            refused = dynnet(
                "fit",
                "-c",
                DEFAULT,
                *TINY,
                "--trainer.max_steps",
                "300",
                *args,
                "--trainer.default_root_dir",
                str(tmp_path),
            )
            assert refused.returncode != 0 and f"is in use by process {holder.pid}" in refused.stderr
        after = {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in run.rglob("*")}
        assert after == before
        assert holder.poll() is None  # still holding: the refusals above met a held lock
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_resume_from_an_older_checkpoint_never_replaces_the_runs_newer_state(tmp_path, capsys):
    every_100 = '{"class_path": "ModelCheckpoint", "init_args": {"every_n_train_steps": 100, "save_top_k": -1}}'
    fitted_cli(tmp_path, f"--trainer.callbacks+={every_100}")
    older = run_dir(tmp_path) / "checkpoints" / "epoch=0-step=100.ckpt"
    before = last(tmp_path).read_bytes()
    error = error_of(["fit", "-c", DEFAULT, *TINY, "--trainer.max_steps", "400", "--ckpt_path", str(older),
                      "--trainer.default_root_dir", str(tmp_path)], capsys)  # fmt: skip
    assert error == f"dynnet: error: checkpoint {older} is at step 100, but its run has gone on to step 200 " \
        "(last.ckpt), which resuming from it would replace: resume with --ckpt_path last, or copy the checkpoint " \
        "out of the run to start a new run from it"  # fmt: skip
    assert last(tmp_path).read_bytes() == before


@pytest.mark.slow
def test_two_fresh_fits_at_once_get_two_runs(tmp_path):
    args = ["fit", "-c", DEFAULT, *TINY, "--trainer.default_root_dir", str(tmp_path)]
    processes = [subprocess.Popen([sys.executable, "-m", "dynnet", *args], stdout=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in processes]
    assert all(p.returncode == 0 for p in processes)
    logs = sorted(out.split("Logs: ")[1].split()[0] for out in outputs)
    assert logs == [str(run_dir(tmp_path, "version_0")), str(run_dir(tmp_path, "version_1"))]


def test_leftovers_of_a_kill_are_cleaned_and_symlinks_never_followed(tmp_path):
    fitted_cli(tmp_path)
    checkpoints = run_dir(tmp_path) / "checkpoints"
    outside = tmp_path / "outside.txt"
    outside.write_text("not a checkpoint")
    (checkpoints / ".last.ckpt.tmp").symlink_to(outside)  # where the old fixed temporary name lay
    (checkpoints / ".last.ckpt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    shutil.copy(last(tmp_path), checkpoints / "best-step=900.ckpt")  # a best file the run's state does not know
    fitted_cli(tmp_path, "--trainer.max_steps", "300", "--ckpt_path", "last")
    assert outside.read_text() == "not a checkpoint"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-step=300.ckpt", "last.ckpt"]


# ------------------------------------------------------------------------------------------------ preemption


# Batches of 500 steps (logging every 1000), so that a signal mostly lands in the middle of one.
LONG = ["fit", "-c", DEFAULT, "--seed_everything", "5", "--trainer.max_steps", "6000", "--trainer.log_every_n_steps",
        "1000", "--trainer.enable_progress_bar", "false", "--data.steps_per_epoch", "1000"]  # fmt: skip


def interrupt(root: Path, signum: int, *extra: str) -> tuple[subprocess.CompletedProcess, int]:
    """Start LONG in root, send signum after its first checkpoint; returns the process and its stderr's step."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dynnet", *LONG, *extra, "--trainer.default_root_dir", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while not last(root).exists() and process.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), load_checkpoint(last(root))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The LONG run, trained straight through once for every test that compares with it: its output and root."""
    root = tmp_path_factory.mktemp("whole")
    return dynnet(*LONG, "--trainer.default_root_dir", str(root), check=True), root


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_a_step_saves_it_and_resumes_exactly(tmp_path, uninterrupted, signum, code):
    whole, whole_root = uninterrupted
    stopped, checkpoint = interrupt(tmp_path / "stopped", signum)
    step = checkpoint["global_step"]
    assert stopped.returncode == code
    name = signal.Signals(signum).name
    command = stop_line(stopped.stderr, f"stopped by {name} at step {step}")
    assert command[-4:] == ["--ckpt_path", "last", "--run", "version_0"]
    assert 1000 <= step < 6000 and "Result:" not in stopped.stdout
    assert val_steps(run_dir(tmp_path / "stopped"))[-1] == step  # evaluated where it stopped
    resumed = subprocess.run(command, capture_output=True, text=True, check=True)  # the printed command, as printed
    assert f"at step {step}" in resumed.stdout
    assert result(resumed.stdout) == result(whole.stdout)  # bitwise: float reprs round-trip
    assert parameters(last(tmp_path / "stopped")) == parameters(last(whole_root))


# ------------------------------------------------------------------------------------------------ resuming, changed


def test_runs_with_early_stopping_resume_where_an_uninterrupted_run_goes(tmp_path, capsys):
    stop = '{"class_path": "EarlyStopping", "init_args": {"monitor": "val/expected_loss", "min_delta": 1e9}}'
    stopped = fitted_cli(tmp_path / "stopped", f"--trainer.callbacks+={stop}", "--trainer.max_steps", "1000")
    assert stopped.trainer.global_step == 400  # no validation improves by 1e9: the fourth (patience 3) stops
    again = fitted_cli(tmp_path / "stopped", f"--trainer.callbacks+={stop}", "--trainer.max_steps", "1000",
                       "--ckpt_path", "last")  # fmt: skip
    assert again.trainer.global_step == 400  # its restored state stops it where it stopped, at the epoch's end
    # Ended by max_steps at an epoch's end, where Lightning replays the epoch end that EarlyStopping checks.
    patient = '{"class_path": "EarlyStopping", "init_args": {"monitor": "val/expected_loss", "patience": 50}}'
    fitted_cli(tmp_path / "resumed", f"--trainer.callbacks+={patient}", "--trainer.max_steps", "300")
    resumed = fitted_cli(tmp_path / "resumed", f"--trainer.callbacks+={patient}", "--trainer.max_steps", "600",
                  "--ckpt_path", "last")  # fmt: skip
    straight = fitted_cli(tmp_path / "straight", f"--trainer.callbacks+={patient}", "--trainer.max_steps", "600")
    assert resumed.model.model.formula() == straight.model.model.formula()
    assert f"Resumed from {last(tmp_path / 'resumed')} at step 300" in capsys.readouterr().out


def test_a_changed_learning_rate_applies_from_the_resumed_step(tmp_path, capsys):
    fitted_cli(tmp_path)
    capsys.readouterr()
    fitted_cli(tmp_path, "--trainer.max_steps", "400", "--optimizer.lr", "2e-8", "--ckpt_path", "last")
    assert "Resumed with optimizer lr=2e-08 (the run had 1e-08)" in capsys.readouterr().out
    lrs = {e.step: e.value for e in EventAccumulator(str(run_dir(tmp_path))).Reload().Scalars("train/lr")}
    assert lrs[200] == pytest.approx(1e-8) and lrs[220] == pytest.approx(2e-8)


# What the command alone records and refuses; the changes a resume from Python is refused too are checked both ways
# in test_parity.py.
@pytest.mark.parametrize(
    "args, refused",
    [
        (["--seed_everything", "9"], "a changed seed_everything: it is 9, the run was trained with 3"),
        (["--trainer.max_steps", "200"], "is at step 200, and --trainer.max_steps is 200: nothing to train"),
    ],
    ids=["seed", "max_steps"],
)
def test_a_resume_with_another_seed_or_no_steps_left_is_refused(tmp_path, capsys, trained_checkpoint, args, refused):
    checkpoint = copied_run(trained_checkpoint, tmp_path)
    error = error_of(["fit", "-c", DEFAULT, *TINY, "--trainer.max_steps", "400", *args, "--ckpt_path", "last",
                      "--trainer.default_root_dir", str(tmp_path)], capsys)  # fmt: skip
    assert refused in error
    assert load_checkpoint(checkpoint)["global_step"] == 200


# ------------------------------------------------------------------------------------------------ outputs and inputs


def test_outputs_never_overwrite_inputs(tmp_path, capsys):
    fitted_cli(tmp_path)
    checkpoint = last(tmp_path)
    original = checkpoint.read_bytes()
    config = run_dir(tmp_path) / "config.yaml"
    for output in (checkpoint, config, tmp_path):
        error = error_of(["predict", "-c", str(config), "--ckpt_path", str(checkpoint),
                          "--predictions.path", str(output)], capsys)  # fmt: skip
        assert "dynnet: error: output" in error
    with pytest.raises(SystemExit, match="which this command reads"):
        export_main([str(checkpoint), "-o", str(checkpoint)])
    assert checkpoint.read_bytes() == original
    export_main([str(checkpoint), "-o", str(tmp_path / "new" / "folder" / "polynomial.json")])
    assert (tmp_path / "new" / "folder" / "polynomial.json").is_file()


# ------------------------------------------------------------------------------------------------ bounded loading


def deflated_bomb(path: Path) -> Path:
    """A small zip that declares 100 MB: one entry of zeros, deflate-compressed."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (100 << 20))
    assert path.stat().st_size < MAX_CHECKPOINT_BYTES
    return path


CRAFTED = {
    # None: a small zip that unpacks to 100 MB (deflated_bomb); else a change to the trained checkpoint's contents.
    "deflate-bomb": (None, "unpacks to 104857600 bytes"),
    "huge-degree": (lambda c: c["hyper_parameters"].update(max_degree=10**10), "declares degrees 3 to 10000000000"),
    "no-degree-counts": (lambda c: c.pop("degree_counts"), "is not a dynnet checkpoint"),
    "wrong-shape": (
        lambda c: c["state_dict"].update({"model.shared": torch.zeros(3)}),
        "parameter model.shared should be one floating-point number",
    ),
    "no-hparams": (
        lambda c: c.update(hyper_parameters=None),
        "its hyper_parameters lack the integer min_degree and max_degree",
    ),
    "no-step": (lambda c: c.pop("global_step"), "it has no step count"),
    "bad-data": (lambda c: c["run_settings"].update(data=[1]), "run_settings should map"),
    "bad-generator": (
        lambda c: c.update(degree_generator=(3, 4)),
        "degree_generator is not a random generator's state",
    ),
}


@pytest.mark.parametrize("change, reason", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_checkpoints_are_refused_everywhere(tmp_path, capsys, trained_checkpoint, change, reason):
    path = tmp_path / "crafted.ckpt"
    if change is None:
        deflated_bomb(path)
    else:
        crafted_checkpoint(trained_checkpoint, change, path)
    for subcommand in ("fit", "validate", "test", "predict"):
        error = error_of([subcommand, "--ckpt_path", str(path), "--trainer.default_root_dir", str(tmp_path)], capsys)
        assert error.startswith(f"dynnet: error: checkpoint {path} ") and reason in error, subcommand
    with pytest.raises(SystemExit, match=reason):
        export_main([str(path), "-o", str(tmp_path / "out.json")])
    with pytest.raises(ValueError, match=reason):
        DynamicNet.load_from_checkpoint(path)


@pytest.mark.slow
def test_a_deflated_checkpoint_is_refused_before_it_is_unpacked(tmp_path):
    bomb = deflated_bomb(tmp_path / "bomb.ckpt")
    code = (
        "import resource, sys\n"
        "from dynnet.runs.checkpoint import load_checkpoint\n"
        "try:\n    load_checkpoint(sys.argv[1])\nexcept ValueError as err:\n    print(err)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, check=True).stdout
    refusal, peak_mib = out.strip().splitlines()
    assert "was refused: it unpacks to" in refusal
    assert int(peak_mib) < 1000  # torch and Lightning's imports; unpacking alone would add 100 MB and more


def test_written_checkpoints_are_readable_by_plain_torch(trained_checkpoint):
    assert torch.load(io.BytesIO(trained_checkpoint.read_bytes()), weights_only=True)["global_step"] == 200
    assert os.stat(trained_checkpoint).st_mode & 0o044  # readable like any file the user creates, not owner-only


# ------------------------------------------------------------------------------------------------ found in review


def signal_at(hook: str, step: int, signum: int = signal.SIGTERM) -> list[str]:
    return ["--trainer.callbacks+=conftest.SignalAt", f"--trainer.callbacks.hook={hook}",
            f"--trainer.callbacks.step={step}", f"--trainer.callbacks.signum={int(signum)}"]  # fmt: skip


@pytest.mark.parametrize("hook, signum", [("on_fit_start", signal.SIGTERM), ("on_sanity_check_start", signal.SIGINT)])
def test_a_signal_before_training_stops_and_says_so(tmp_path, capsys, hook, signum):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", DEFAULT, *TINY, *signal_at(hook, 0, signum), "--trainer.default_root_dir", str(tmp_path)])
    assert stop.value.code == 128 + signum
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"stopped by {signum.name}")
    assert load_checkpoint(last(tmp_path))["global_step"] == 0


def test_a_signal_at_an_epochs_last_step_resumes_exactly(tmp_path, capsys):
    # An epoch-interval schedule steps at the epoch's end, which the interrupted run must not skip.
    schedule = ["--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.05", "--lr_scheduler", "StepLR",
                "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5", "--lr_interval", "epoch",
                "--trainer.max_steps", "400"]  # fmt: skip
    main(["fit", "-c", DEFAULT, *TINY, *schedule, "--trainer.default_root_dir", str(tmp_path / "whole")])
    whole = result(capsys.readouterr().out)
    stopped = ["fit", "-c", DEFAULT, *TINY, *schedule, "--trainer.default_root_dir", str(tmp_path / "stopped")]
    with pytest.raises(SystemExit):
        main([*stopped, *signal_at("on_before_optimizer_step", 199)])
    assert load_checkpoint(last(tmp_path / "stopped"))["global_step"] == 200  # the step, then the epoch's end
    capsys.readouterr()
    main([*stopped, "--ckpt_path", "last"])
    assert result(capsys.readouterr().out) == whole


@pytest.mark.parametrize(
    "trained, resumed, refused",
    [
        (
            ["--lr_scheduler", "CosineAnnealingLR", "--lr_scheduler.T_max", "400"],
            ["--lr_interval", "epoch"],
            "a changed lr_interval: it is epoch",
        ),  # fmt: skip
        (
            ["--lr_scheduler", "OneCycleLR", "--lr_scheduler.total_steps", "400", "--lr_scheduler.max_lr", "1e-8"],
            ["--lr_scheduler.max_lr", "5e-8"],
            "a changed lr_scheduler.max_lr: it is 5e-08",
        ),  # fmt: skip
        ([], ["--optimizer.nesterov", "true"], "a changed optimizer.nesterov: it is True"),
        (
            ["--trainer.val_check_interval", "30"],
            ["--trainer.val_check_interval", "30", "--data.steps_per_batch", "5"],
            "cannot resume with train batches of 5 steps (the run's were 10)",
        ),  # fmt: skip
    ],
    ids=["lr_interval", "scheduler-argument", "non-numeric-optimizer-argument", "batches-under-val_check_interval"],
)
def test_more_changes_that_cannot_apply_are_refused_before_anything_is_written(tmp_path, capsys, trained, resumed,
                                                                               refused):  # fmt: skip
    fitted_cli(tmp_path, *trained)
    before = sorted(p.name for p in run_dir(tmp_path).rglob("*"))
    args = ["fit", "-c", DEFAULT, *TINY, *trained, *resumed, "--trainer.max_steps", "400", "--ckpt_path", "last"]
    assert refused in error_of([*args, "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert sorted(p.name for p in run_dir(tmp_path).rglob("*")) == before


def test_a_crafted_best_file_cannot_delete_outside_the_run(tmp_path, capsys):
    fitted_cli(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    crafted_checkpoint(last(tmp_path), lambda c: c["callbacks"]["Run"].update(best=str(victim)))
    error = error_of(["fit", "-c", DEFAULT, *TINY, "--trainer.max_steps", "400", "--ckpt_path", "last",
                      "--trainer.default_root_dir", str(tmp_path)], capsys)  # fmt: skip
    assert f"its run state names '{victim}' as its best file" in error
    assert victim.read_text() == "keep me"


def test_last_holds_what_a_callback_changes_at_the_end(tmp_path, capsys):
    spec = '{"class_path": "StochasticWeightAveraging", "init_args": {"swa_lrs": 1e-9, "swa_epoch_start": 1}}'
    main(["fit", "-c", DEFAULT, *TINY, "--trainer.callbacks+", spec, "--trainer.default_root_dir", str(tmp_path)])
    assert parameters(last(tmp_path)) == result(capsys.readouterr().out)


def test_a_float64_run_exports_float64(tmp_path, capsys):
    main(["fit", "-c", DEFAULT, *TINY, "--trainer.precision", "64-true", "--trainer.default_root_dir", str(tmp_path)])
    printed = result(capsys.readouterr().out)
    export_main([str(last(tmp_path)), "-o", str(tmp_path / "p.json")])
    assert list(json.loads((tmp_path / "p.json").read_text())["coefficients"].values()) == printed


def test_a_cpu_16_mixed_run_resumes_with_its_own_command(tmp_path):
    fitted_cli(tmp_path, "--trainer.precision", "16-mixed")
    assert fitted_cli(tmp_path, "--trainer.precision", "16-mixed", "--trainer.max_steps", "300", "--ckpt_path",
               "last").trainer.global_step == 300  # fmt: skip
