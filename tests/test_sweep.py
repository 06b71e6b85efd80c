"""dynnet-sweep's refusals: bad input is one line before any trial starts, leaves nothing behind, and never shows
a password; a study holds one experiment."""

import os
import re
import signal
import tracemalloc
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import GRID, ROOT, SEARCH, TINY_FIT, free_port, sweep_file

from dynnet.sweep import main
from dynnet.sweep.command import parser
from dynnet.sweep.config import WORKER_MEMORY_MB, load_sweep
from dynnet.sweep.fit import check_fit, run_name
from dynnet.sweep.hparams import EXPERIMENT_FILE
from dynnet.sweep.storage import scrub
from dynnet.sweep.study import EXPERIMENT, experiment, open_study


def refusal(args: list[str]) -> str:
    """The one line dynnet-sweep exits with for args."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("dynnet-sweep: error: ") and "\n" not in message
    return message


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
def test_bad_space_is_one_line_before_anything(tmp_path, space, message):
    config = sweep_file(tmp_path / "bad.yaml", SEARCH, space=space)
    assert message in refusal([str(config), "--root", str(tmp_path / "root")])
    assert not (tmp_path / "root").exists()


def test_an_unknown_sweep_config_key_is_refused_naming_the_known_ones(tmp_path):
    config = sweep_file(tmp_path / "bad.yaml", SEARCH, trails=3)
    known = "direction, fit, fit_args, grace_period, heartbeat_interval, objective, pruner, root, sampler, space, " \
        "storage, study, trials, workers"  # fmt: skip
    assert f"unknown key 'trails' (known: {known})" in refusal([str(config), "--root", str(tmp_path / "root")])
    assert not (tmp_path / "root").exists()


def test_the_space_takes_the_arguments_of_the_optimizer_fit_args_choose(tmp_path):
    # As a list of flags too: Adam's amsgrad, which the fit config's SGD lacks.
    space = {"amsgrad": {"choice": [False, True]}}
    config = sweep_file(tmp_path / "adam.yaml", SEARCH, fit_args=["--optimizer=torch.optim.Adam"], space=space)
    sweep = load_sweep(str(config), parser().parse_args([str(config), "--root", str(tmp_path / "root")]))
    assert list(sweep.space) == ["amsgrad"]


PASSWORD = "Zq7/xW9@pK"  # with the characters that must be percent-encoded in a URL
ENCODED = PASSWORD.replace("/", "%2F").replace("@", "%40")


@pytest.mark.parametrize(
    "url, message",
    [
        ("u:{raw}@h:port", "not a database URL"),  # no scheme
        ("postgresql+psycopg://u:{raw}@127.0.0.1/db", "not a database URL"),  # '/' unencoded: the rest is a port
        ("postgresql+psycopg://u:Zq7xW9@pK@127.0.0.1/db", "not a database URL"),  # '@' unencoded: the rest a host
        # Every form of URL SQLAlchemy takes a password in: as the password, in a query key, in a connection string
        # in a query value (ODBC's odbc_connect) or as the database (a libpq conninfo, or a URL in it).
        ("postgresql+psycopg://u:{encoded}@127.0.0.1:{port}/db", "postgresql+psycopg://u:***@127.0.0.1:"),
        ("postgresql+psycopg://u@127.0.0.1:{port}/db?password={encoded}", "/db?password=***"),
        ("postgresql+psycopg://u@127.0.0.1:{port}/db?sslpassword={encoded}&application_name=x", "sslpassword=***"),
        ("mysql+pymysql://u@127.0.0.1:{port}/db?passwd={encoded}", "/db?passwd=***"),
        ("mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BODBC%7D%3BUID%3Du%3BPWD%3D%7B{encoded}%7D%3BX%3Dy", "PWD%3D***%3B"),
        ("mssql+pyodbc:///?odbc_connect=SERVER%3Dh%3BPwd%3D{encoded}", "SERVER%3Dh%3BPwd%3D***"),
        ("postgresql+psycopg:///dbname=db password={raw} host=127.0.0.1 port={port}", "db password=*** host="),
        ("postgresql+psycopg:///dbname=db password='{raw}' host=127.0.0.1 port={port}", "db password=*** host"),
        ("postgresql+psycopg:///postgresql://u:{encoded}@127.0.0.1:{port}/db", "///postgresql://u:***@127.0.0.1:"),
    ],
)
def test_storage_urls_never_show_a_password(tmp_path, capsys, url, message):
    url = url.format(raw=PASSWORD, encoded=ENCODED, port=free_port())  # nothing listens: cannot be opened
    config = sweep_file(tmp_path / "s.yaml", SEARCH)
    line = refusal([str(config), "--root", str(tmp_path / "root"), "--storage", url])
    assert message in line
    # What a driver's message may quote of the URL, the password as typed or as read: scrubbed.
    scrubbed = "" if "not a database URL" in message else scrub(f"{url} {PASSWORD} {ENCODED}", url)
    shown = line + scrubbed + "".join(capsys.readouterr())
    # Every three characters of the password, as typed or encoded (the encoding itself, %2F, is no secret).
    pieces = {secret[i : i + 3] for secret in (PASSWORD, ENCODED) for i in range(len(secret) - 2)}
    pieces = {piece for piece in pieces if "%" not in piece}
    assert not [piece for piece in pieces if piece in shown], shown
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize(
    "fit_args, message",
    [
        (["--print_config"], "exit without training"),
        (["--print_conf=skip_null"], "exit without training"),  # argparse's abbreviation of --print_config
        (["-c", str(ROOT / "configs" / "fast.yaml")], "-c is refused: name the fit config with"),
        (["--run=mine"], "--run is refused: the sweep names each trial's run folder"),
        (["--run=trial_check"], "--run is refused: the sweep names each trial's run folder"),  # the check's own
        (["--ckpt_path=last"], "--ckpt_path is refused: every trial is a fresh fit"),
        (["--trainer.default_root_dir=/elsewhere"], "fit_args set trainer.default_root_dir"),
        (['--trainer={"default_root_dir": "/elsewhere"}'], "fit_args set trainer.default_root_dir"),
        (["--trainer.fast_dev_run=true"], "fit_args set trainer.fast_dev_run"),
        (["--optimizer.lr=0.1"], "--optimizer.lr is a setting the space sweeps"),
        (["--seed_everything=3"], "--seed_everything is a setting the space sweeps"),
    ],
)
def test_fit_args_that_would_redirect_or_replace_a_trial_are_refused(tmp_path, fit_args, message):
    config = sweep_file(tmp_path / "s.yaml", SEARCH, fit_args=list(fit_args))
    assert message in refusal([str(config), "--root", str(tmp_path / "root")])
    assert not (tmp_path / "root").exists()


def test_unknown_fit_flag_is_one_line(tmp_path):
    config = sweep_file(tmp_path / "s.yaml", SEARCH, fit_args={"trainer.max_stepz": 10})
    assert "trainer.max_stepz" in refusal([str(config), "--root", str(tmp_path / "root")])
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"fit_args": TINY_FIT | {"data.n_points": 3}}, "data.n_points is 3, fewer than the model's 5 coefficients"),
        ({"fit_args": TINY_FIT | {"model.min_degree": 6}}, "min_degree must not exceed max_degree"),
        ({"fit_args": TINY_FIT | {"trainer.precision": "16-true"}}, "torch.float16 cannot hold this fit"),
        ({"fit_args": TINY_FIT | {"trainer.devices": 2}}, "a trial trains in one process, but trainer.devices"),
        # Both ends of every range are checked: the high one here.
        ({"space": {"momentum": {"uniform": [0.0, 1.5]}}}, "(momentum=1.5): --optimizer.momentum 1.5: give a momentum"),
        ({"space": {"seed": {"int": [0, 10**12]}}}, "(seed=1000000000000): 1000000000000 is not in bounds"),
    ],
)
def test_fit_values_dynnet_refuses_stop_the_sweep_before_its_study(tmp_path, changes, message):
    config = sweep_file(tmp_path / "s.yaml", GRID | {"sampler": "RandomSampler", "fit_args": TINY_FIT}, **changes)
    line = refusal([str(config), "--root", str(tmp_path / "root")])
    assert line.startswith("dynnet-sweep: error: the trials' fit (") and message in line, line
    assert not (tmp_path / "root").exists()  # no study, no folder: the same sweep with the value fixed starts anew


def test_a_stop_during_the_fit_check_stops_the_sweep(tmp_path):
    # SIGTERM as the check's fit starts, when the fit's own handler keeps it for the next step.
    signal_at = {"trainer.callbacks+": "conftest.SignalAt", "trainer.callbacks.hook": "on_fit_start"}
    config = sweep_file(tmp_path / "s.yaml", GRID, fit_args=TINY_FIT | signal_at)
    with pytest.raises(SystemExit) as stop:
        main([str(config), "--root", str(tmp_path / "root")])
    assert stop.value.code == 128 + signal.SIGTERM and not (tmp_path / "root").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where torch sees no GPU")
def test_a_gpu_fit_is_refused_where_there_is_none(tmp_path):
    config = sweep_file(tmp_path / "s.yaml", GRID, fit_args=TINY_FIT | {"trainer.accelerator": "gpu"})
    assert "--trainer.accelerator gpu: torch cannot use a GPU here" in refusal([str(config), "--root", str(tmp_path)])
    assert os.listdir(tmp_path) == ["s.yaml"]


@pytest.mark.parametrize("high", [10**8, 10**12])
def test_a_grid_larger_than_the_trials_is_refused_with_its_size_before_it_is_listed(tmp_path, high):
    config = sweep_file(tmp_path / "s.yaml", GRID, space={"seed": {"int": [0, high]}})
    tracemalloc.start()
    try:
        line = refusal([str(config), "--root", str(tmp_path / "root")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"GridSampler's grid holds {high + 1} points, more than the sweep's 8 trials" in line
    assert peak < 20 * 2**20  # listing 10**8 seeds would take gigabytes
    assert not (tmp_path / "root").exists()


def test_an_int_range_a_study_cannot_record_is_refused(tmp_path):
    config = sweep_file(tmp_path / "s.yaml", SEARCH, space={"seed": {"int": [0, 2**53 + 1]}})
    assert "goes beyond ±2**53, the integers a study records exactly" in refusal([str(config)])


def test_a_root_that_is_not_a_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("mine")
    config = sweep_file(tmp_path / "s.yaml", SEARCH)
    assert refusal([str(config), "--root", str(tmp_path / "file")]).endswith(
        f"root {tmp_path / 'file'} is not a folder"
    )
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("name", ["trials.csv", "sweep.png", f"lightning_logs/{EXPERIMENT_FILE}"])
def test_an_output_that_is_not_a_regular_file_is_refused_and_left_alone(tmp_path, name):
    root, target = tmp_path / "root", tmp_path / "target"
    target.write_text("mine")
    (root / name).parent.mkdir(parents=True)
    (root / name).symlink_to(target)
    line = refusal([str(sweep_file(tmp_path / "s.yaml", SEARCH)), "--root", str(root)])
    assert line.endswith(
        f"{root / name} is a symbolic link, not a regular file: dynnet-sweep writes its own file there; move it away"
    )
    assert target.read_text() == "mine" and not (root / "study.db").exists()


def test_workers_are_capped_by_cores_and_memory(tmp_path):
    config = sweep_file(tmp_path / "s.yaml", SEARCH)
    line = refusal([str(config), "--root", str(tmp_path / "root"), "--workers", "100000"])
    found = re.search(r"--workers 100000: this machine runs at most (\d+) workers \((\d+) cores; (\d+) MB", line)
    assert found, line
    cap, cores, memory = (int(g) for g in found.groups())
    assert cores == len(os.sched_getaffinity(0)) and cap == min(cores, memory // WORKER_MEMORY_MB)
    assert "workers must be a whole number" in refusal([str(sweep_file(tmp_path / "s.yaml", SEARCH, workers=0))])
    assert not (tmp_path / "root").exists()


def test_run_names_sort_in_trial_order():
    names = [run_name(n) for n in range(10000)]
    assert sorted(names) == names and names[7] == "trial_0007"


# ------------------------------------------------------------------------------------------------ one experiment


def _create(config: Path, root: Path) -> optuna.Study:
    """The study a first sweep of config creates, before its workers start."""
    sweep = load_sweep(str(config), parser().parse_args([str(config), "--root", str(root)]))
    root.mkdir(exist_ok=True)
    return open_study(sweep, experiment(sweep, check_fit(sweep)))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"fit_args": GRID["fit_args"] | {"data.n_points": 500}}, "data.n_points is 500 here but 2000 in the study;"),
        ({"fit_args": GRID["fit_args"] | {"trainer.max_steps": 400}}, "trainer.max_steps is 400 here but 200"),
        ({"space": GRID["space"] | {"seed": {"int": [1, 2]}}}, 'space.seed is {"int": [1, 2]} here but {"int": '),
        ({"objective": "val/expected_loss"}, 'objective is "val/expected_loss" here but "val/optimality_gap"'),
        ({"direction": "maximize"}, 'direction is "maximize" here but "minimize"'),
        ({"fit": "other.yaml"}, "model.max_degree is 4 here but 5 in the study (and 1 more: data.n_points);"),
    ],
)
def test_a_study_holds_one_experiment(tmp_path, changes, message):
    root = tmp_path / "root"
    other = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    other["model"]["max_degree"], other["data"]["n_points"] = 4, 1000
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))  # another fit config: two settings differ
    study = _create(sweep_file(tmp_path / "grid.yaml", GRID), root)
    assert study.metric_names == ["val/optimality_gap"]  # what optuna-dashboard and Optuna's plots call it
    # The record is kept off optuna-dashboard's page, which shows a study's user attributes.
    recorded = study._storage.get_study_system_attrs(study._study_id)[EXPERIMENT]
    assert study.user_attrs == {} and recorded["fit"]["data.n_points"] == 2000
    before = sorted(root.iterdir())
    line = refusal([str(sweep_file(tmp_path / "grid.yaml", GRID, **changes)), "--root", str(root)])
    assert "study grid holds another experiment: " in line and message in line, line
    assert line.endswith("; use a new --study name")
    assert sorted(root.iterdir()) == before  # nothing written
    # The same sweep under a new name is a new study.
    changed = sweep_file(tmp_path / "grid-2.yaml", GRID, **changes)
    assert _create(changed, root).study_name == "grid-2"


def test_a_study_without_its_experiment_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    study = optuna.create_study(study_name="grid", storage=f"sqlite:///{root / 'study.db'}")
    study.tell(study.ask(), 1.0)  # a trial of something else, recorded without an experiment
    line = refusal([str(sweep_file(tmp_path / "grid.yaml", GRID)), "--root", str(root)])
    assert "study grid holds trials but no record of the experiment they ran" in line


@pytest.mark.parametrize("record", ["garbage", {"fit": "ab"}, {"fit": {}, "space": []}, {}])
def test_a_study_with_a_malformed_record_is_refused(tmp_path, record):
    root = tmp_path / "root"
    study = _create(sweep_file(tmp_path / "grid.yaml", GRID), root)
    study._storage.set_study_system_attr(study._study_id, EXPERIMENT, record)  # what a shared database may hold
    line = refusal([str(tmp_path / "grid.yaml"), "--root", str(root)])
    assert line.endswith("study grid holds a malformed experiment record: use a new --study name")


def test_a_read_only_study_is_refused_before_its_trials(tmp_path):
    root = tmp_path / "root"
    _create(sweep_file(tmp_path / "grid.yaml", GRID), root)
    read_only = f"sqlite:///file:{root / 'study.db'}?mode=ro&uri=true"
    line = refusal([str(tmp_path / "grid.yaml"), "--root", str(root), "--storage", read_only])
    assert line.endswith(f"storage {read_only} failed: attempt to write a readonly database")
    assert sorted(p.name for p in root.iterdir()) == ["study.db"]


def test_the_shipped_sweep_config_loads_and_its_fits_parse(tmp_path):
    flags = parser().parse_args([str(ROOT / "configs" / "sweep.yaml"), "--root", str(tmp_path)])
    sweep = load_sweep(flags.config, flags)
    assert sweep.objective == "val/optimality_gap" and sweep.trials == 30 and sweep.sampler["seed"] == 0
    assert set(sweep.space["optimizer"].options) == {"torch.optim.SGD", "torch.optim.Adam", "torch.optim.RMSprop"}
    fit = check_fit(sweep)  # every optimizer branch's fit is parsed by dynnet's command line, and accepted
    assert fit["trainer.max_steps"] == 3000 and "seed_everything" not in fit and "run" not in fit
