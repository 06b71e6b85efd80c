"""Every failure is one true line and a non-zero exit: bad flags and files, numbers a dtype cannot hold, divergence
told by its cause, writes that fail, and memory a fit would not have."""

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEFAULT, ROOT, TINY, error_of, last, run_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet.cli import main
from dynnet.runs.checkpoint import load_checkpoint

# The refusal of a GPU, which only a machine without one gives.
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a GPU on a machine without one")


def fit_error(tmp_path, capsys, *args: str) -> str:
    error = error_of(["fit", *args, "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert error.startswith("dynnet: error: ") and "\n" not in error, error
    return error[len("dynnet: error: ") :]


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(
            ["--trainer.accelerator", "gpu"], "--trainer.accelerator gpu: torch cannot use a GPU here", marks=NO_GPU
        ),
        pytest.param(  # a value from a config file names the file, not a flag the user never typed
            ["-c", str(ROOT / "configs" / "gpu.yaml")],
            f"trainer.accelerator: gpu (in {ROOT / 'configs' / 'gpu.yaml'}): torch cannot use a GPU here",
            marks=NO_GPU,
        ),
        (["--trainer.max_steps", "-5"], "--trainer.max_steps -5: give -1 (no limit) or a step count"),
        (["--trainer.check_val_every_n_epoch", "0"], "--trainer.check_val_every_n_epoch 0: give at least 1"),
        (["--optimizer.momentum", "5"], "--optimizer.momentum 5.0: give a momentum in [0, 1)"),
        (["--optimizer.momentum", "-0.5"], "--optimizer.momentum -0.5: give a momentum in [0, 1)"),
        (["--run", "a/b"], "--run must be a plain folder name, got 'a/b'"),
        (["--ckpt_path", "hpc"], "--ckpt_path hpc is not supported by dynnet: use last, best or a path"),
        (["--trainer.val_check_interval", "500"], "val_check_interval 500 is longer than an epoch"),
        (["--trainer.log_every_n_steps", "-1"], "--trainer.log_every_n_steps -1: give 0 (no logging) or more"),
        (["--predictions.path", "out/"], None),
    ],
)
def test_bad_settings_get_one_line(tmp_path, capsys, args, message):
    if message is None:  # a predict option: checked by predict
        error = error_of(["predict", *args, "--trainer.default_root_dir", str(tmp_path / "root")], capsys)
        assert error == "dynnet: error: output out/ is a directory; give a file name"
        return
    root = tmp_path / "new" / "root"
    error = error_of(["fit", *args, "--data.steps_per_epoch", "100", "--trainer.default_root_dir", str(root)], capsys)
    assert message in error and "\n" not in error
    assert not (tmp_path / "new").exists()  # nothing left behind, not even the folders it would have made


@pytest.mark.parametrize(
    "args",
    [
        ["--trainer.max_steps", "0"],
        ["--trainer.max_steps", "-1", "--trainer.max_epochs", "0"],
        ["--trainer.max_time", "00:00:00:00"],
    ],  # fmt: skip
    ids=["max_steps-0", "max_epochs-0", "max_time-0"],
)
def test_a_fit_with_nothing_to_train_ends_cleanly(tmp_path, capsys, args):
    main(["fit", *TINY, *args, "--trainer.default_root_dir", str(tmp_path)])
    assert "Trained 0 steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "config file {} is empty"),
        ("model: 5\n", "config file {}: model should map its settings to values"),
        ("trainer: [1, 2]\n", "config file {}: trainer should map its settings to values"),
        ("model: {max_degree: [\n", "config file {} is not valid YAML"),
    ],
    ids=["empty", "model-not-a-mapping", "trainer-not-a-mapping", "broken-yaml"],
)
def test_a_bad_config_file_is_named(tmp_path, capsys, content, message):
    config = tmp_path / "my.yaml"
    config.write_text(content)
    assert message.format(config) in fit_error(tmp_path, capsys, "-c", str(config))


def test_a_negative_number_in_e_notation_is_a_value(tmp_path, capsys):
    main(["fit", *TINY, "--data.low", "-1e-3", "--trainer.default_root_dir", str(tmp_path)])
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text().count("low: -0.001") == 1


def test_a_checkpoint_folder_is_not_a_checkpoint(tmp_path, capsys):
    assert fit_error(tmp_path, capsys, "--ckpt_path", str(tmp_path)) == (
        f"checkpoint {tmp_path} is a directory; give the .ckpt file inside it"
    )


def test_best_means_the_runs_best_checkpoint(tmp_path, capsys):
    main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path)])
    capsys.readouterr()
    main(["validate", "--ckpt_path", "best", "--trainer.default_root_dir", str(tmp_path)])
    assert "val/expected_loss" in capsys.readouterr().out


def test_a_home_relative_root_is_one_place(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    main(["fit", *TINY, "--trainer.default_root_dir", "~/runs"])
    capsys.readouterr()
    main(["validate", "--ckpt_path", "last", "--trainer.default_root_dir", "~/runs"])
    assert "val/expected_loss" in capsys.readouterr().out
    assert last(tmp_path / "runs").is_file() and not Path("~").exists()


# ------------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.max_degree", "40"], "torch.float32 cannot hold this fit: the squared error of x**36"),
        (["--data.high", "1e20"], "torch.float32 cannot hold this fit: the squared error of x**1"),
        (["--trainer.precision", "16-true"], "torch.float16 cannot hold this fit: the squared error of x**2"),
        (["--model.max_degree", "40", "--optimizer.lr", "0"], "a model.max_degree below 36"),
    ],
    ids=["degree", "interval", "float16", "lr-0"],
)
def test_overflow_is_named_as_overflow_before_training(tmp_path, capsys, args, message):
    error = fit_error(tmp_path, capsys, *args)
    assert message in error and "trainer.precision 64-true" in error and "learning rate" not in error


def test_what_float64_can_hold_trains(tmp_path, capsys):
    # Adam's steps are bounded by its lr, whatever the curvature of a degree-40 polynomial.
    main(["fit", *TINY, "--model.max_degree", "40", "--trainer.precision", "64-true", "--optimizer",
          "torch.optim.Adam", "--optimizer.lr", "1e-4", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert "Result: y = " in capsys.readouterr().out


def test_overflow_during_training_is_not_blamed_on_the_learning_rate(tmp_path, capsys):
    # Six points on [-2.5, 2.5] pass the check before training in float16, but with seed 4 a gradient overflows:
    # at lr 0 no update can cause that, and the line must not suggest a smaller learning rate.
    narrow = ["--data.n_points", "6", "--data.low", "-2.5", "--data.high", "2.5"]
    error = fit_error(tmp_path, capsys, *TINY, "--seed_everything", "4", "--trainer.precision", "16-true", *narrow,
                      "--optimizer.lr", "0")  # fmt: skip
    assert error.startswith("training diverged at step ")
    assert "no update caused it (it happened with lr 0): torch.float16 overflows" in error
    assert "learning rate" not in error


def test_divergence_suggests_a_learning_rate_that_trains(tmp_path, capsys):
    error = fit_error(tmp_path / "diverged", capsys, "-c", DEFAULT, *TINY, "--optimizer.lr", "1e-3")
    assert error.startswith("training diverged at step ")
    suggested = error.split("--optimizer.lr ")[1]
    assert float(suggested) < 1e-3
    # 4e-8 still diverges within a thousand steps of the default run; the suggestion trains through 3000
    root = tmp_path / "suggested"
    main(["fit", "-c", DEFAULT, "--optimizer.lr", suggested, "--trainer.max_steps", "3000",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)])  # fmt: skip
    assert load_checkpoint(last(root))["global_step"] == 3000
    losses = [e.value for e in EventAccumulator(str(run_dir(root))).Reload().Scalars("val/expected_loss")]
    assert losses[-1] < losses[0] / 2


def test_a_schedule_that_overflows_the_update_is_a_divergence(tmp_path, capsys):
    # An lr tripling every step outgrows float32 within 100 steps, in the middle of a batch of 500.
    error = fit_error(tmp_path, capsys, "-c", DEFAULT, "--trainer.max_steps", "3000", "--lr_scheduler",
                      "torch.optim.lr_scheduler.ExponentialLR", "--lr_scheduler.gamma", "3")  # fmt: skip
    assert re.fullmatch(
        r"training diverged at step \d+: the loss became (inf|nan); try a smaller learning rate, "
        r"e\.g\. --optimizer\.lr 1e-09",
        error,
    ), error  # fmt: skip (the lr given, not the schedule's)


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # The learning rate grows 5% a step from the tutorial's 1e-8 until the run blows up, around step 200.
    error = fit_error(tmp_path, capsys, "-c", DEFAULT, *TINY, "--trainer.max_steps", "1000",
                      "--data.steps_per_epoch", "50", "--lr_scheduler", "torch.optim.lr_scheduler.ExponentialLR",
                      "--lr_scheduler.gamma", "1.05")  # fmt: skip
    step = int(error.split("diverged at step ")[1].split(":")[0])
    checkpoint = load_checkpoint(last(tmp_path))
    assert 0 < checkpoint["global_step"] < step
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint["state_dict"].values())


# ------------------------------------------------------------------------------------------------ writes


def test_a_root_that_is_a_file_is_named(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    error = error_of(["fit", *TINY, "--trainer.default_root_dir", str(blocker)], capsys)
    assert error == f"dynnet: error: {blocker / 'lightning_logs'}: Not a directory"


def test_a_full_disk_keeps_the_last_good_checkpoint_and_says_where(tmp_path, capsys, monkeypatch):
    main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path)])
    good = last(tmp_path).read_bytes()

    def full(obj, file):
        file.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    error = error_of(["fit", *TINY, "--trainer.max_steps", "400", "--ckpt_path", "last",
                      "--trainer.default_root_dir", str(tmp_path)], capsys)  # fmt: skip
    monkeypatch.undo()
    assert error.endswith(": No space left on device") and "checkpoints" in error
    assert last(tmp_path).read_bytes() == good
    assert not list(run_dir(tmp_path).glob("checkpoints/.*.tmp"))


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "dynnet", "fit", "--data.n_points", "1"], capture_output=True,
                         text=True, env=os.environ | {"DYNNET_DEBUG": "1"}, cwd=tmp_path)  # fmt: skip
    assert "Traceback" in run.stderr


# ------------------------------------------------------------------------------------------------ memory


def test_a_fit_too_big_for_memory_is_refused_with_the_estimate(tmp_path, capsys):
    error = fit_error(tmp_path, capsys, "--data.n_points", str(10**12))
    assert re.fullmatch(
        r"training 1000000000000 points in torch.float32 needs about 5\d{4}\.\d GiB, but \d+\.\d GiB is "
        r"available: use fewer points \(data.n_points\)",
        error,
    ), error


@pytest.mark.slow
def test_a_hundred_million_points_train_in_bounded_memory(tmp_path):
    # Memory only: how long it takes depends on the machine's load (scripts/benchmark.py times it).
    code = (
        "import resource, sys\n"
        "from dynnet.cli import main\n"
        "main(['fit', '--data.n_points', '100000000', '--trainer.max_steps', '2', '--trainer.enable_progress_bar',"
        " 'false', '--trainer.default_root_dir', sys.argv[1]])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    peak_gib = float(out.stdout.strip().splitlines()[-1])
    assert peak_gib < 12, peak_gib
    assert load_checkpoint(last(tmp_path))["global_step"] == 2
