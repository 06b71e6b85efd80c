"""What a user sees: a quiet console with one line per message, a correct --help, and evaluation that leaves no
empty log folders."""

import subprocess
import sys

import pytest
from conftest import ROOT, TINY, dynnet, last

# Each test starts `dynnet` (or Python) as a process, once or twice: seconds each.
pytestmark = pytest.mark.slow


def test_a_fit_prints_its_lines_and_nothing_else(tmp_path):
    run = dynnet("fit", "-c", str(ROOT / "configs" / "fast.yaml"), *TINY, "--trainer.enable_progress_bar", "true",
                 "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["Optimizer:", "Model:", "Trained", "Result:", "Expected", "Logs:"]
    assert lines[0] == "Optimizer: Adam(lr=0.1); lr_scheduler: CosineAnnealingLR(T_max=3000) every step"
    assert lines[1] == (
        "Model: DynamicPolynomial, 5 parameters a, b, c, d, e (e shared by x^4 and x^5), "
        "degree drawn from 3 to 5 at every step"
    )
    # stderr holds the progress display alone, its last state on a line of its own
    for noise in ("GPU available", "TPU", "Tip", "litlogger", "| Name", "Trainer.fit` stopped", "Seed set"):
        assert noise not in run.stdout + run.stderr, noise
    assert run.stderr.endswith("\n")
    assert "200/200" in run.stderr.rstrip("\n").split("\r")[-1]


def test_a_resume_says_where_it_started_on_its_own_line(tmp_path):
    dynnet("fit", *TINY, "--trainer.default_root_dir", str(tmp_path))
    run = dynnet("fit", *TINY, "--trainer.max_steps", "300", "--ckpt_path", "last", "--trainer.enable_progress_bar",
                 "true", "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert f"\nResumed from {last(tmp_path)} at step 200\n" in run.stdout
    assert "could not find the monitored key" not in run.stderr


def test_help_names_the_command_and_describes_the_defaults():
    help = dynnet("fit", "--help").stdout
    assert help.startswith("usage: dynnet [options] fit")
    assert "default: 30000, the tutorial's" in help
    assert "\nWhere `dynnet predict` writes:\n" in help and "\nLearning-rate schedule:\n" in help
    assert "Disabled by default (-1)" not in help
    top = dynnet("--help").stdout
    assert top.startswith("usage: dynnet") and "Lightning Trainer command line tool" not in top


def test_evaluation_prints_its_metrics_and_writes_no_log_folder(tmp_path):
    for subcommand in ("validate", "test"):
        run = dynnet(subcommand, "--trainer.default_root_dir", str(tmp_path))
        assert run.returncode == 0 and f"{'val' if subcommand == 'validate' else 'test'}/expected_loss" in run.stdout
    assert not (tmp_path / "lightning_logs").exists()


def test_the_package_exports_its_classes():
    code = "from dynnet import DynamicNet, DynamicPolynomial, SineData; print(DynamicNet().model.names())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['a', 'b', 'c', 'd', 'e']"
