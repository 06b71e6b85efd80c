"""Resume, checkpoint integrity, divergence, safe loading and bad input: issue-level guarantees."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEFAULT, TINY, crafted_checkpoint, dynnet, error_of, last, result

from dynnet.module import DynamicNet
from dynnet.runs.checkpoint import CheckpointError, SafeCheckpointIO, load_checkpoint

# 1500 steps in epochs of 100: fifteen checkpoints to be killed between.
RESUMABLE = [
    "-c",
    DEFAULT,
    "--seed_everything",
    "5",
    "--trainer.max_steps",
    "1500",
    "--trainer.enable_progress_bar",
    "false",
    "--data.steps_per_epoch",
    "100",
    "--data.steps_per_batch",
    "50",
]


@pytest.mark.slow
def test_killed_fit_resumes_to_the_uninterrupted_result(tmp_path):
    whole = dynnet("fit", *RESUMABLE, "--trainer.default_root_dir", str(tmp_path / "whole"), check=True)

    root = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "dynnet", "fit", *RESUMABLE, "--trainer.default_root_dir", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    path = last(root)
    while not path.exists() and process.poll() is None:
        time.sleep(0.01)
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    killed_at = load_checkpoint(path)["global_step"]
    assert killed_at < 1500, "the run finished before it could be killed"

    resumed = dynnet("fit", *RESUMABLE, "--trainer.default_root_dir", str(root), "--ckpt_path", "last", check=True)
    assert f"Resumed from {path} at step {killed_at}" in resumed.stdout
    # Float reprs are exact, so equal Result lines mean bitwise-equal parameters.
    assert result(resumed.stdout) == result(whole.stdout)
    final = load_checkpoint(path)["state_dict"]
    for name, tensor in load_checkpoint(last(tmp_path / "whole"))["state_dict"].items():
        assert torch.equal(final[name], tensor), name


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    error = error_of(["fit", "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path)], capsys)
    runs = tmp_path / "lightning_logs"
    assert error == f"dynnet: error: there is no run under {runs} to take the last checkpoint from"


def test_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def dies_halfway(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # stands in for the process being killed mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    io.save_checkpoint({"state_dict": {"w": torch.full((3,), 2.0)}}, path)  # the next save takes the leftover's place
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_non_finite_parameters_are_never_saved(tmp_path):
    path = tmp_path / "last.ckpt"
    with pytest.raises(CheckpointError, match="parameter model.shared is not finite"):
        SafeCheckpointIO().save_checkpoint({"state_dict": {"model.shared": torch.tensor(float("nan"))}}, path)
    assert not path.exists()


def test_divergence_stops_with_one_line(tmp_path, capsys):
    args = ["fit", "-c", DEFAULT, *TINY, "--optimizer.lr", "1e-3", "--trainer.default_root_dir", str(tmp_path)]
    error = error_of(args, capsys)
    assert error.startswith("dynnet: error: training diverged at step ")
    assert "try a smaller learning rate, e.g. --optimizer.lr 2e-08" in error


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_in_a_checkpoint_never_runs(tmp_path, capsys):
    marker, path = tmp_path / "ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "degree_generator": Payload(marker)}, path)
    error = error_of(["validate", "--ckpt_path", str(path), "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert error == f"dynnet: error: checkpoint {path} was refused: it holds objects other than tensors and plain data"
    assert not marker.exists()


def record_call(*args):
    record_call.called = True


def test_load_from_checkpoint_ignores_a_named_instantiator(trained_checkpoint, tmp_path):
    named = {"_instantiator": "test_reliability.record_call"}
    path = crafted_checkpoint(
        trained_checkpoint, lambda c: c["hyper_parameters"].update(named), tmp_path / "named.ckpt"
    )
    checkpoint = torch.load(path, weights_only=True)
    module = DynamicNet.load_from_checkpoint(path)
    assert not getattr(record_call, "called", False)
    assert torch.equal(
        module.model.flat(),
        torch.stack(
            [
                checkpoint["state_dict"][f"model.{n}"]
                for n in ("coefficients.0", "coefficients.1", "coefficients.2", "coefficients.3", "shared")
            ]
        ),
    )
    assert module.model.rng.getstate() == checkpoint["degree_generator"]


def _truncated(trained: Path, path: Path) -> None:
    path.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])


@pytest.mark.parametrize(
    "make, reason",
    [
        (None, "does not exist"),
        (_truncated, "is unreadable (truncated or not a checkpoint)"),
        (lambda trained, path: path.write_bytes(os.urandom(4096)), "is unreadable (truncated or not a checkpoint)"),
        (lambda trained, path: torch.save({"weights": torch.ones(2)}, path), "is not a dynnet checkpoint"),
    ],
    ids=["missing", "truncated", "random-bytes", "foreign"],
)
def test_unusable_checkpoints_get_one_line(trained_checkpoint, tmp_path, capsys, make, reason):
    path = tmp_path / "bad.ckpt"
    if make:
        make(trained_checkpoint, path)
    error = error_of(["fit", "--ckpt_path", str(path), "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert error == f"dynnet: error: checkpoint {path} {reason}"


def test_checkpoint_of_another_model_is_refused(trained_checkpoint, tmp_path, capsys):
    error = error_of(["validate", "--model.max_degree", "6", "--ckpt_path", str(trained_checkpoint)], capsys)
    assert error == (
        f"dynnet: error: checkpoint {trained_checkpoint} holds a model with max_degree=5, "
        "but the configured model has max_degree=6"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model.min_degree", "three"],
            "Parser key \"model.min_degree\": Expected a <class 'int'>. Got value: three",
        ),
        (["--model.bogus", "3"], "unrecognized arguments: --model.bogus 3"),
        (["-c", "/nonexistent.yaml"], "File does not exist: '/nonexistent.yaml'"),
        (["--data.n_points", "1"], "n_points must be at least 2, got 1"),
    ],
)
def test_bad_flags_get_one_line_and_no_traceback(tmp_path, args, message):
    run = dynnet("fit", *args, "--trainer.default_root_dir", str(tmp_path))
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == run.stderr.strip(), run.stderr  # exactly one line
    assert message in run.stderr


def test_unknown_yaml_key_gets_one_line(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  min_degre: 3\n")
    run = dynnet("fit", "-c", str(config), "--trainer.default_root_dir", str(tmp_path))
    assert run.returncode != 0
    assert run.stderr.strip() == "dynnet: error: Subcommand 'fit' does not accept option 'model.min_degre'"
