"""Lightning's callbacks, Trainer flags, loggers, optimizers and schedulers in dynnet: each does what Lightning's
documentation says, counted in optimizer steps, or is refused with one line saying what to use instead.

Every case is a tiny CPU fit: epochs of 100 steps, train batches of at most 50 steps, logging every 20 steps.
"""

import csv
import os

import pytest
import torch
import yaml
from conftest import DEFAULT, TINY, error_of, fitted_cli, last, result, run_dir
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet.runs.checkpoint import load_checkpoint

ADAM = ["--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.05"]


class Probe(Callback):
    """Counts Lightning's per-step hooks and records what the trainer reports at the start of training."""

    def __init__(self) -> None:
        self.calls = {"on_before_backward": 0, "on_after_backward": 0, "on_before_optimizer_step": 0}
        self.grad_norms: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.estimated_stepping_batches = trainer.estimated_stepping_batches

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.calls["on_before_backward"] += 1

    def on_after_backward(self, trainer, pl_module) -> None:
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.calls["on_before_optimizer_step"] += 1


def refusal(tmp_path, capsys, *args: str) -> str:
    error = error_of(["fit", "-c", DEFAULT, *TINY, *args, "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert "\n" not in error
    assert not (tmp_path / "lightning_logs").exists(), "a refused fit must leave nothing behind"
    return error


def scalars(tmp_path, tag: str, run: str = "version_0") -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir(tmp_path, run)), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def steps_of(tmp_path, tag: str) -> list[int]:
    return [step for step, _ in scalars(tmp_path, tag)]


def callback(spec: str) -> list[str]:
    return ["--trainer.callbacks+", spec]


# ------------------------------------------------------------------------------------------------ optimization


def test_every_per_step_hook_fires_once_per_optimizer_step(tmp_path):
    probe = Probe()
    cli = fitted_cli(tmp_path, callbacks=[probe])
    assert cli.trainer.global_step == 200
    assert probe.calls == {"on_before_backward": 200, "on_after_backward": 200, "on_before_optimizer_step": 200}


def test_lbfgs_reevaluates_the_same_degree_through_its_closure(tmp_path):
    probe = Probe()
    args = ["--optimizer", "torch.optim.LBFGS", "--optimizer.lr", "0.1", "--optimizer.max_iter", "4"]
    cli = fitted_cli(
        tmp_path, *args, "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "1", callbacks=[probe]
    )
    assert cli.trainer.global_step == 20
    # As in Lightning's automatic optimization, the hooks around backward fire at every evaluation of the closure.
    evaluations = probe.calls["on_before_backward"]
    assert 20 < evaluations <= 20 * 5  # up to max_iter + 1 evaluations a step
    assert probe.calls["on_after_backward"] == probe.calls["on_before_optimizer_step"] == evaluations
    losses = [v for _, v in scalars(tmp_path, "train/loss")]
    assert losses[-1] < losses[0] / 10


@pytest.mark.parametrize(
    "optimizer, shown",
    [
        ("torch.optim.Adam", "Optimizer: Adam(lr=0.001)"),
        ("torch.optim.AdamW", "Optimizer: AdamW(lr=0.001)"),
        ("torch.optim.RMSprop", "Optimizer: RMSprop(lr=0.01)"),
    ],
)
def test_an_optimizer_chosen_by_flag_gets_its_own_defaults(tmp_path, capsys, optimizer, shown):
    cli = fitted_cli(tmp_path, "--optimizer", optimizer)
    assert shown in capsys.readouterr().out
    defaults = cli.trainer.optimizers[0].defaults
    expected = {"torch.optim.AdamW": ("weight_decay", 0.01), "torch.optim.RMSprop": ("momentum", 0)}
    if optimizer in expected:
        name, value = expected[optimizer]
        assert defaults[name] == value  # not SGD's (the config's) value
    losses = [v for _, v in scalars(tmp_path, "val/expected_loss")]
    assert losses[-1] < losses[0]


def test_arguments_after_the_class_flag_apply(tmp_path, capsys):
    fitted_cli(tmp_path, "--optimizer", "torch.optim.AdamW", "--optimizer.weight_decay", "0.5")
    assert "Optimizer: AdamW(lr=0.001, weight_decay=0.5)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ schedulers


def lrs(tmp_path) -> dict[int, float]:
    return dict(scalars(tmp_path, "train/lr"))


def test_one_cycle_over_the_runs_steps(tmp_path):
    schedule = ["--lr_scheduler", "torch.optim.lr_scheduler.OneCycleLR", "--lr_scheduler.max_lr", "0.05"]
    cli = fitted_cli(tmp_path, *ADAM, *schedule, "--lr_scheduler.total_steps", "200")
    assert cli.trainer.global_step == 200  # OneCycleLR raises if stepped more than total_steps times
    lr = lrs(tmp_path)
    assert max(lr.values()) == pytest.approx(0.05, rel=0.05) and lr[200] < 1e-5


def test_cosine_warm_restarts_restart_on_the_step(tmp_path):
    schedule = ["--lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts", "--lr_scheduler.T_0", "60"]
    fitted_cli(tmp_path, *ADAM, *schedule)
    lr = lrs(tmp_path)
    assert lr[60] == pytest.approx(0.05) and lr[40] < 0.05 / 2 and lr[120] == pytest.approx(0.05)


def test_reduce_on_plateau_steps_on_the_validation_loss(tmp_path):
    # Watching for a rise of a falling loss: every validation after the first is a plateau.
    schedule = ["--lr_scheduler", "ReduceLROnPlateau", "--lr_scheduler.monitor", "val/expected_loss"]
    args = ["--lr_scheduler.mode", "max", "--lr_scheduler.patience", "0", "--lr_scheduler.factor", "0.5"]
    fitted_cli(tmp_path, *ADAM, *schedule, *args, "--trainer.max_steps", "400")
    lr = lrs(tmp_path)
    # validations at 100, 200 and 300 before the last logged point: reductions after the 2nd and the 3rd
    assert lr[120] == pytest.approx(0.05) and lr[220] == pytest.approx(0.025) and lr[320] == pytest.approx(0.0125)


# ------------------------------------------------------------------------------------------------ Trainer flags


def test_max_epochs_counts_epochs_of_steps(tmp_path):
    probe = Probe()
    cli = fitted_cli(tmp_path, "--trainer.max_steps", "-1", "--trainer.max_epochs", "3", callbacks=[probe])
    assert cli.trainer.global_step == 300
    assert probe.estimated_stepping_batches == 300
    assert load_checkpoint(last(tmp_path))["global_step"] == 300


def test_estimated_stepping_batches_is_the_number_of_steps(tmp_path):
    probe = Probe()
    fitted_cli(tmp_path, "--trainer.max_steps", "250", callbacks=[probe])
    assert probe.estimated_stepping_batches == 250


def test_limit_val_batches_zero_turns_validation_off(tmp_path):
    fitted_cli(tmp_path, "--trainer.limit_val_batches", "0")
    events = EventAccumulator(str(run_dir(tmp_path))).Reload()
    assert "val/expected_loss" not in events.Tags()["scalars"]
    assert load_checkpoint(last(tmp_path))["global_step"] == 200


def test_fast_dev_run_trains_one_step_and_writes_nothing(tmp_path, capsys):
    cli = fitted_cli(tmp_path, "--trainer.fast_dev_run", "true")
    assert cli.trainer.global_step == 1
    assert "Trained 1 step in " in capsys.readouterr().out
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize("min_steps", [300, 250])
def test_min_steps_outlasts_early_stopping(tmp_path, min_steps):
    stop = callback('{"class_path": "EarlyStopping", "init_args": {"monitor": "val/expected_loss", "patience": 0, '
                    '"min_delta": 1e9}}')  # fmt: skip
    cli = fitted_cli(tmp_path, *stop, "--trainer.max_steps", "500", "--trainer.min_steps", str(min_steps))
    assert cli.trainer.global_step == min_steps  # a batch ends there, whatever steps_per_batch
    assert load_checkpoint(last(tmp_path))["global_step"] == min_steps


def test_early_stopping_stops_after_patience_validations(tmp_path):
    stop = callback('{"class_path": "EarlyStopping", "init_args": {"monitor": "val/expected_loss", "patience": 2, '
                    '"min_delta": 1e9}}')  # fmt: skip
    cli = fitted_cli(tmp_path, *stop, "--trainer.max_steps", "1000")
    assert cli.trainer.global_step == 300  # after the first, no validation improves by 1e9: stop two later
    checkpoint = load_checkpoint(last(tmp_path))
    assert checkpoint["global_step"] == 300
    assert steps_of(tmp_path, "val/expected_loss")[-1] == 300


def test_max_time_stops_and_keeps_the_final_state(tmp_path):
    cli = fitted_cli(
        tmp_path, "--trainer.max_time", "00:00:00:01", "--trainer.max_steps", "-1", "--trainer.max_epochs", "-1"
    )
    step = cli.trainer.global_step
    assert 0 < step
    assert load_checkpoint(last(tmp_path))["global_step"] == step
    assert steps_of(tmp_path, "val/expected_loss")[-1] == step


def test_deterministic_and_detect_anomaly_change_nothing(tmp_path):
    plain = fitted_cli(tmp_path / "plain").model.model.flat()
    checked = fitted_cli(tmp_path / "checked", "--trainer.deterministic", "true", "--trainer.detect_anomaly", "true")
    assert torch.equal(checked.model.model.flat(), plain)


def test_float64_and_bf16_mixed_train(tmp_path, capsys):
    double = fitted_cli(tmp_path / "double", "--trainer.precision", "64-true")
    assert double.model.model.shared.dtype == torch.float64
    mixed = fitted_cli(tmp_path / "mixed", "--trainer.precision", "bf16-mixed")
    assert mixed.trainer.global_step == 200
    assert len(result(capsys.readouterr().out)) == 5  # bf16-mixed on a CPU reports its Result


def test_barebones_trains_and_reports(tmp_path, capsys):
    cli = fitted_cli(tmp_path, "--trainer.barebones", "true")
    assert cli.trainer.global_step == 200
    assert "Result: y = " in capsys.readouterr().out


def test_a_profiler_replaces_the_default(tmp_path):
    spec = f'{{"class_path": "SimpleProfiler", "init_args": {{"dirpath": "{tmp_path}", "filename": "perf"}}}}'
    fitted_cli(tmp_path, "--trainer.profiler", spec)
    report = (tmp_path / "fit-perf.txt").read_text()
    assert "run_training_epoch" in report and "[Strategy]SingleDeviceStrategy.training_step" in report


def test_checkpointing_off_writes_no_checkpoint(tmp_path):
    fitted_cli(tmp_path, "--trainer.enable_checkpointing", "false")
    assert not (run_dir(tmp_path) / "checkpoints").exists()
    assert list(run_dir(tmp_path).glob("events.out.tfevents.*"))


def test_logger_off_writes_no_events(tmp_path):
    fitted_cli(tmp_path, "--trainer.logger", "false")
    assert not list(run_dir(tmp_path).glob("events.out.tfevents.*"))
    assert load_checkpoint(last(tmp_path))["global_step"] == 200


# What the command alone refuses: callbacks that fight its run folder, and processes this machine or the CLI's
# optimizer cannot take. What any fit refuses is checked from the command and from Python alike in test_parity.py.
@pytest.mark.parametrize(
    "flags, refused",
    [
        (callback('{"class_path": "ModelCheckpoint", "init_args": {"save_last": true}}'), "drop save_last"),
        (
            callback('{"class_path": "OnExceptionCheckpoint", "init_args": {"dirpath": "."}}'),
            "drop OnExceptionCheckpoint",
        ),
        (["--trainer.strategy", "ddp_spawn", "--trainer.devices", "2"], "ddp_spawn is not supported"),
        (["--trainer.devices", str(len(os.sched_getaffinity(0)) + 1)], "CPU cores for this process; give 1 to"),
        (["--trainer.devices", "-1"], "CPU cores for this process; give 1 to"),  # Lightning's "all" is a GPU's
    ],
    ids=["save_last", "on-exception", "ddp_spawn", "more-devices-than-cores", "all-devices-on-a-cpu"],
)
def test_the_command_refuses_what_its_run_folder_or_this_machine_cannot_take_in_one_line(
    tmp_path, capsys, flags, refused
):
    assert refused in refusal(tmp_path, capsys, *flags)


def test_throughput_monitor_counts_optimizer_steps(tmp_path):
    throughput = '{"class_path": "ThroughputMonitor", "init_args": {"batch_size_fn": "builtins.len"}}'
    cli = fitted_cli(tmp_path, *callback(throughput))
    assert cli.datamodule.grid == (1,)
    # Lightning's count of batches, 200 of one step each, logged at the optimizer step as every metric.
    assert scalars(tmp_path, "train/batches")[-1] == (200, 200.0)


# ------------------------------------------------------------------------------------------------ callbacks


def test_model_checkpoint_every_n_steps_holds_its_step(tmp_path):
    spec = '{"class_path": "ModelCheckpoint", "init_args": {"every_n_train_steps": 30, "filename": "{step}", ' \
           '"save_top_k": -1}}'  # fmt: skip
    fitted_cli(tmp_path, *callback(spec))
    files = sorted(run_dir(tmp_path).glob("checkpoints/step=*.ckpt"), key=lambda p: int(p.stem[5:]))
    assert [int(p.stem[5:]) for p in files] == [30, 60, 90, 120, 150, 180]
    assert all(load_checkpoint(p)["global_step"] == int(p.stem[5:]) for p in files)


def test_a_users_top_k_checkpoint_replaces_dynnets_best(tmp_path):
    spec = '{"class_path": "ModelCheckpoint", "init_args": {"monitor": "val/expected_loss", "save_top_k": 2}}'
    fitted_cli(tmp_path, *callback(spec), "--trainer.max_steps", "400")
    names = sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").iterdir())
    assert len([n for n in names if n.startswith("epoch=")]) == 2
    assert not [n for n in names if n.startswith("best-")]  # dynnet's default stepped aside
    assert load_checkpoint(last(tmp_path))["global_step"] == 400


def test_a_checkpoint_filename_with_a_slash_resumes(tmp_path, fit_output):
    spec = {"class_path": "ModelCheckpoint", "init_args": {"filename": "{step}-{val/expected_loss:.4f}"}}
    args = ["-c", DEFAULT, "--trainer.max_steps", "200", "--data.steps_per_epoch", "100",
            "--trainer.enable_progress_bar", "false", f"--trainer.callbacks={yaml.safe_dump([spec])}"]  # fmt: skip
    fit_output(*args)
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/step=*-val/expected_loss=*.ckpt"))
    out, _ = fit_output(*args, "--trainer.max_steps", "300", "--ckpt_path", "last")
    assert "Resumed from" in out and result(out)
    assert load_checkpoint(last(tmp_path))["global_step"] == 300


def test_every_n_epochs_checkpoints_save_at_those_epochs_ends(tmp_path):
    spec = '{"class_path": "ModelCheckpoint", "init_args": {"every_n_epochs": 2, "save_top_k": -1}}'
    fitted_cli(tmp_path, *callback(spec), "--trainer.max_steps", "400")
    steps = sorted(load_checkpoint(p)["global_step"] for p in run_dir(tmp_path).glob("checkpoints/epoch=*.ckpt"))
    assert steps == [200, 400]


def test_stochastic_weight_averaging_trains_every_step_asked_for(tmp_path):
    spec = '{"class_path": "StochasticWeightAveraging", "init_args": {"swa_lrs": 1e-9, "swa_epoch_start": 1}}'
    cli = fitted_cli(tmp_path, *callback(spec), "--trainer.max_steps", "-1", "--trainer.max_epochs", "3")
    assert cli.trainer.global_step == 300


def test_a_timer_stops_training_and_last_holds_its_step(tmp_path):
    spec = '{"class_path": "Timer", "init_args": {"duration": "00:00:00:01"}}'
    cli = fitted_cli(tmp_path, *callback(spec), "--trainer.max_steps", "100000", "--data.steps_per_epoch", "100000")
    assert 0 < cli.trainer.global_step < 100000
    assert load_checkpoint(last(tmp_path))["global_step"] == cli.trainer.global_step


# ------------------------------------------------------------------------------------------------ loggers


def test_csv_logger_logs_optimizer_steps(tmp_path):
    fitted_cli(tmp_path, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path))
    rows = list(csv.DictReader((run_dir(tmp_path) / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(20, 201, 20))
    assert [int(r["step"]) for r in rows if r.get("val/expected_loss")] == [100, 200]


def test_two_loggers_write_into_the_run(tmp_path):
    loggers = (
        f'[{{"class_path": "TensorBoardLogger", "init_args": {{"save_dir": "{tmp_path}"}}}}, '
        f'{{"class_path": "CSVLogger", "init_args": {{"save_dir": "{tmp_path}"}}}}]'
    )
    fitted_cli(tmp_path, "--trainer.logger", loggers)
    assert (run_dir(tmp_path) / "metrics.csv").is_file()
    assert steps_of(tmp_path, "train/loss") == list(range(20, 201, 20))


def test_a_resumed_csv_log_keeps_its_history(tmp_path):
    csv_logger = ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    fitted_cli(tmp_path, *csv_logger)
    fitted_cli(tmp_path, *csv_logger, "--trainer.max_steps", "300", "--ckpt_path", "last")
    earlier = list(csv.DictReader((run_dir(tmp_path) / "metrics-until-step200.csv").open()))
    later = list(csv.DictReader((run_dir(tmp_path) / "metrics.csv").open()))
    assert [int(r["step"]) for r in earlier if r.get("train/loss")] == list(range(20, 201, 20))
    assert [int(r["step"]) for r in later if r.get("train/loss")] == list(range(220, 301, 20))


def test_a_single_callback_and_plugin_in_a_config(tmp_path):
    config = tmp_path / "one.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    class_path: ModelCheckpoint\n    init_args: {every_n_train_steps: 50, "
        "save_top_k: -1, filename: '{step}'}\n  plugins: lightning.pytorch.plugins.environments.LightningEnvironment\n"
    )
    fitted_cli(tmp_path, "-c", str(config))
    assert sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").glob("step=*")) == [
        "step=100.ckpt", "step=150.ckpt", "step=200.ckpt", "step=50.ckpt"
    ]  # fmt: skip
