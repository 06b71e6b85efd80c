"""TensorBoard's HPARAMS tab on a sweep's root: one experiment at the root whose columns are the swept settings and
whose first metric is the objective, one row per trial with integers as text, read back from the event files and
from a real TensorBoard server."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import ROOT, SEARCH, free_port, load, sweep_file
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

from dynnet.sweep import main
from dynnet.sweep.command import parser
from dynnet.sweep.config import load_sweep
from dynnet.sweep.hparams import EXPERIMENT_FILE, LISTED, Column, columns, trial_row, write_experiment
from dynnet.sweep.space import parse_space

SWEPT = ["optimizer", "optimizer.lr", "optimizer.momentum", "seed_everything"]


def shipped(root):
    """The shipped sweep config, as the command loads it."""
    config = str(ROOT / "configs" / "sweep.yaml")
    return load_sweep(config, parser().parse_args([config, "--root", str(root)]))


def test_the_columns_are_the_settings_the_space_names(tmp_path):
    table = columns(shipped(tmp_path).space)
    assert table == {
        "seed_everything": Column("integer", [str(seed) for seed in range(10)], varies=True),
        "optimizer": Column("text", ["Adam", "RMSprop", "SGD"], varies=True),
        # Each optimizer's own lr range, together; momentum is SGD's only.
        "optimizer.lr": Column("number", [1.0e-9, 1.0], varies=True),
        "optimizer.momentum": Column("number", [0.0, 0.99], varies=True),
    }
    # A fixed value is a column that does not vary; an integer range too wide to list is text all the same.
    raw = {"lr": 0.1, "seed": {"int": [0, 2**31 - 1]}, "momentum": {"choice": [0, 0.5]}}
    space = parse_space(raw, "torch.optim.SGD")
    assert columns(space) == {
        "optimizer.lr": Column("number", [0.1, 0.1], varies=False),
        "seed_everything": Column("integer", None, varies=True),
        "optimizer.momentum": Column("number", [0.0, 0.5], varies=True),
    }
    narrow = parse_space({"seed": {"int": [5, 5 + LISTED - 1]}}, "torch.optim.SGD")
    assert len(columns(narrow)["seed_everything"].values) == LISTED


def test_a_trial_row_holds_each_column_in_its_type(tmp_path):
    space = shipped(tmp_path).space
    # What dynnet's HPARAMS entry of an RMSprop trial holds: its momentum is its default, the integer 0.
    run = {"seed_everything": 7, "optimizer": "RMSprop", "optimizer.lr": 0.01, "optimizer.momentum": 0,
           "trainer.max_steps": 3000, "data.low": -3.14}  # fmt: skip
    settings = {"seed": 7, "optimizer": "torch.optim.RMSprop", "lr": 0.01}
    row = trial_row(run, settings, space)
    # The seed as written, not 7.0000; the momentum a number like SGD's, so that the column sorts.
    assert row == run | {"seed_everything": "7", "optimizer.momentum": 0.0}
    assert isinstance(row["optimizer.momentum"], float) and row["trainer.max_steps"] == 3000


def experiment_of(logdir) -> api_pb2.Experiment:
    events = EventAccumulator(str(logdir)).Reload()
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.EXPERIMENT_TAG]
    return hparams_metadata.parse_experiment_plugin_data(content)


def test_the_root_holds_one_experiment_written_once(tmp_path):
    sweep = shipped(tmp_path / "root")
    path = write_experiment(sweep)
    assert path == tmp_path / "root" / "lightning_logs" / EXPERIMENT_FILE
    experiment = experiment_of(path.parent)
    infos = {info.name: info for info in experiment.hparam_infos}
    assert sorted(infos) == sorted(SWEPT) and all(info.differs for info in infos.values())  # ticked
    assert infos["seed_everything"].type == api_pb2.DATA_TYPE_STRING
    assert list(infos["seed_everything"].domain_discrete) == [str(seed) for seed in range(10)]
    assert infos["optimizer.lr"].type == api_pb2.DATA_TYPE_FLOAT64
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert metrics == ["val/optimality_gap", "val/expected_loss", "val/log10_gap"]  # the objective first
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    # Another command on the study finds its experiment there and leaves the file alone.
    before = path.stat()
    write_experiment(sweep)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # Another experiment (here, the expected loss for objective) replaces the file whole.
    sweep.objective = "val/expected_loss"
    write_experiment(sweep)
    assert [info.name.tag for info in experiment_of(path.parent).metric_infos][0] == "val/expected_loss"
    assert os.listdir(path.parent) == [EXPERIMENT_FILE]  # no temporary left beside it


@contextlib.contextmanager
def tensorboard(logdir, runs: int):
    """A TensorBoard server on logdir with its default loader, as a function that POSTs to its hparams API; once it
    has loaded the HPARAMS rows of ``runs`` runs."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/data/plugin/hparams/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    every = {"experimentName": "", "allowedStatuses": statuses, "colParams": [], "startIndex": 0, "sliceSize": 100}
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError):
                if len(post("session_groups", every).get("sessionGroups", [])) == runs:
                    break
            assert time.monotonic() < deadline, f"TensorBoard did not serve {runs} HPARAMS rows within 90 s"
            time.sleep(0.5)
        yield lambda path: post(path, every if path == "session_groups" else {"experimentName": ""})
    finally:
        os.kill(server.pid, signal.SIGTERM)  # the server this function started, by its own process id
        server.wait(timeout=30)


@pytest.mark.slow
def test_tensorboard_shows_the_swept_settings_and_the_objective_of_every_trial(tmp_path, capsys):
    root = tmp_path / "root"
    main([str(sweep_file(tmp_path / "search.yaml", SEARCH)), "--workers", "2", "--trials", "4", "--root", str(root)])
    capsys.readouterr()
    trials = load(root, "search").get_trials()
    # Two workers can both start the last trial the study needs: it then holds one more than asked for.
    assert 4 <= len(trials) <= 5 and all(t.state == TrialState.COMPLETE for t in trials)
    logs = root / "lightning_logs"
    for trial in trials:  # a trial writes its row, and no experiment of its own
        tags = EventAccumulator(str(logs / f"trial_{trial.number:04d}")).Reload().PluginTagToContent("hparams")
        assert hparams_metadata.EXPERIMENT_TAG not in tags and hparams_metadata.SESSION_START_INFO_TAG in tags

    with tensorboard(logs, runs=len(trials)) as post:
        experiment = post("experiment")
        groups = post("session_groups")["sessionGroups"]
    # The swept settings and nothing else, all marked: TensorBoard's dashboard ticks the first five it lists.
    assert [(info["name"], info["differs"]) for info in experiment["hparamInfos"]] == [(n, True) for n in SWEPT]
    assert experiment["metricInfos"][0]["name"]["tag"] == "val/optimality_gap"
    # One row per trial, in trial order, each with the values the study drew under the columns' names.
    assert [group["name"] for group in groups] == [f"trial_{t.number:04d}" for t in trials]
    for group, trial in zip(groups, trials):
        optimizer = trial.params["optimizer"].rpartition(".")[2]
        shown = group["hparams"]
        assert shown["optimizer"] == optimizer and shown["seed_everything"] == str(trial.params["seed"])
        assert shown["optimizer.lr"] == trial.params[f"{optimizer}.lr"]
        if optimizer == "SGD":
            assert shown["optimizer.momentum"] == trial.params["SGD.momentum"]
        else:
            assert "optimizer.momentum" not in shown  # Adam has none
        metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        # The final value, as the trial's last validation logged it: TensorBoard's scalars are float32.
        assert metrics["val/optimality_gap"] == float(np.float32(trial.value))
