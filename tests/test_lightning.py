"""Lightning's callbacks, Trainer flags, loggers, optimizers and schedulers in dynnet: each does what Lightning's
documentation says, counted in optimizer steps, or is refused with one line saying what to use instead.

Every case is a tiny CPU fit: epochs of 100 steps, train batches of at most 50 steps, logging every 20 steps.
"""

import csv
import os
from contextlib import ExitStack

import pytest
import torch
from conftest import ROOT, error_of, last, run_dir
from lightning.pytorch import Callback, seed_everything
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet.cli.command import DynnetCLI
from dynnet.module import DynamicNet
from dynnet.runs.checkpoint import load_checkpoint

SMALL = [
    "-c", str(ROOT / "configs" / "default.yaml"), "--seed_everything", "3", "--trainer.max_steps", "200",
    "--trainer.log_every_n_steps", "20", "--trainer.enable_progress_bar", "false",
    "--data.steps_per_epoch", "100", "--data.steps_per_batch", "50",
]  # fmt: skip
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


def fit(tmp_path, *args: str, probe: Callback | None = None) -> DynnetCLI:
    """A tiny `dynnet fit` in this process, into tmp_path; returns the CLI (its trainer and model)."""
    with ExitStack() as cleanup:
        return DynnetCLI(
            ["fit", *SMALL, *args, "--trainer.default_root_dir", str(tmp_path)],
            cleanup=cleanup,
            callbacks=[probe] if probe else None,
        )


def refusal(tmp_path, capsys, *args: str) -> str:
    error = error_of(["fit", *SMALL, *args, "--trainer.default_root_dir", str(tmp_path)], capsys)
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
    cli = fit(tmp_path, probe=probe)
    assert cli.trainer.global_step == 200
    assert probe.calls == {"on_before_backward": 200, "on_after_backward": 200, "on_before_optimizer_step": 200}


def test_lbfgs_reevaluates_the_same_degree_through_its_closure(tmp_path):
    probe = Probe()
    args = ["--optimizer", "torch.optim.LBFGS", "--optimizer.lr", "0.1", "--optimizer.max_iter", "4"]
    cli = fit(tmp_path, *args, "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "1", probe=probe)
    assert cli.trainer.global_step == 20
    # As in Lightning's automatic optimization, the hooks around backward fire at every evaluation of the closure.
    evaluations = probe.calls["on_before_backward"]
    assert 20 < evaluations <= 20 * 5  # up to max_iter + 1 evaluations a step
    assert probe.calls["on_after_backward"] == probe.calls["on_before_optimizer_step"] == evaluations
    losses = [v for _, v in scalars(tmp_path, "train/loss")]
    assert losses[-1] < losses[0] / 10


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_bounds_every_update(tmp_path, algorithm):
    seed_everything(3)
    start = DynamicNet().model.flat().detach()  # the CLI seeds, then builds the model, the same way
    args = ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "1.0", "--trainer.max_steps", "1"]
    cli = fit(tmp_path, *args, "--trainer.gradient_clip_val", "0.001", "--trainer.gradient_clip_algorithm", algorithm)
    step = cli.model.model.flat().detach() - start  # plain SGD at lr 1: the update is minus the clipped gradient
    size = step.norm() if algorithm == "norm" else step.abs().max()
    assert size == pytest.approx(0.001, rel=1e-3)  # the raw gradient is about a million times larger


@pytest.mark.parametrize(
    "optimizer, shown",
    [
        ("torch.optim.Adam", "Optimizer: Adam(lr=0.001)"),
        ("torch.optim.AdamW", "Optimizer: AdamW(lr=0.001)"),
        ("torch.optim.RMSprop", "Optimizer: RMSprop(lr=0.01)"),
    ],
)
def test_an_optimizer_chosen_by_flag_gets_its_own_defaults(tmp_path, capsys, optimizer, shown):
    cli = fit(tmp_path, "--optimizer", optimizer)
    assert shown in capsys.readouterr().out
    defaults = cli.trainer.optimizers[0].defaults
    expected = {"torch.optim.AdamW": ("weight_decay", 0.01), "torch.optim.RMSprop": ("momentum", 0)}
    if optimizer in expected:
        name, value = expected[optimizer]
        assert defaults[name] == value  # not SGD's (the config's) value
    losses = [v for _, v in scalars(tmp_path, "val/expected_loss")]
    assert losses[-1] < losses[0]


def test_arguments_after_the_class_flag_apply(tmp_path, capsys):
    fit(tmp_path, "--optimizer", "torch.optim.AdamW", "--optimizer.weight_decay", "0.5")
    assert "Optimizer: AdamW(lr=0.001, weight_decay=0.5)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ schedulers


def lrs(tmp_path) -> dict[int, float]:
    return dict(scalars(tmp_path, "train/lr"))


def test_step_lr_counts_optimizer_steps(tmp_path):
    schedule = ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "50"]
    fit(tmp_path, *ADAM, *schedule, "--lr_scheduler.gamma", "0.5")
    lr = lrs(tmp_path)
    assert lr[40] == pytest.approx(0.05) and lr[60] == pytest.approx(0.025) and lr[200] == pytest.approx(0.05 / 16)


def test_an_epoch_interval_steps_at_every_epoch_end(tmp_path):
    schedule = ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1"]
    fit(tmp_path, *ADAM, *schedule, "--lr_scheduler.gamma", "0.5", "--lr_interval", "epoch")
    lr = lrs(tmp_path)
    assert lr[100] == pytest.approx(0.05) and lr[120] == pytest.approx(0.025)


def test_one_cycle_over_the_runs_steps(tmp_path):
    schedule = ["--lr_scheduler", "torch.optim.lr_scheduler.OneCycleLR", "--lr_scheduler.max_lr", "0.05"]
    cli = fit(tmp_path, *ADAM, *schedule, "--lr_scheduler.total_steps", "200")
    assert cli.trainer.global_step == 200  # OneCycleLR raises if stepped more than total_steps times
    lr = lrs(tmp_path)
    assert max(lr.values()) == pytest.approx(0.05, rel=0.05) and lr[200] < 1e-5


def test_cosine_warm_restarts_restart_on_the_step(tmp_path):
    schedule = ["--lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts", "--lr_scheduler.T_0", "60"]
    fit(tmp_path, *ADAM, *schedule)
    lr = lrs(tmp_path)
    assert lr[60] == pytest.approx(0.05) and lr[40] < 0.05 / 2 and lr[120] == pytest.approx(0.05)


def test_reduce_on_plateau_steps_on_the_validation_loss(tmp_path):
    # Watching for a rise of a falling loss: every validation after the first is a plateau.
    schedule = ["--lr_scheduler", "ReduceLROnPlateau", "--lr_scheduler.monitor", "val/expected_loss"]
    args = ["--lr_scheduler.mode", "max", "--lr_scheduler.patience", "0", "--lr_scheduler.factor", "0.5"]
    fit(tmp_path, *ADAM, *schedule, *args, "--trainer.max_steps", "400")
    lr = lrs(tmp_path)
    # validations at 100, 200 and 300 before the last logged point: reductions after the 2nd and the 3rd
    assert lr[120] == pytest.approx(0.05) and lr[220] == pytest.approx(0.025) and lr[320] == pytest.approx(0.0125)


# ------------------------------------------------------------------------------------------------ Trainer flags


def test_max_epochs_counts_epochs_of_steps(tmp_path):
    probe = Probe()
    cli = fit(tmp_path, "--trainer.max_steps", "-1", "--trainer.max_epochs", "3", probe=probe)
    assert cli.trainer.global_step == 300
    assert probe.estimated_stepping_batches == 300
    assert load_checkpoint(last(tmp_path))["global_step"] == 300


def test_estimated_stepping_batches_is_the_number_of_steps(tmp_path):
    probe = Probe()
    fit(tmp_path, "--trainer.max_steps", "250", probe=probe)
    assert probe.estimated_stepping_batches == 250


@pytest.mark.parametrize(
    "flags, validated",
    [
        (["--trainer.val_check_interval", "30"], [30, 60, 90, 130, 160, 190, 200]),
        (["--trainer.val_check_interval", "0.5"], [50, 100, 150, 200]),
        (["--trainer.val_check_interval", "70", "--trainer.check_val_every_n_epoch", "null"], [70, 140, 200]),
        (["--trainer.check_val_every_n_epoch", "2", "--trainer.max_steps", "300"], [200, 300]),
    ],
    ids=["interval-in-steps", "fraction-of-epoch", "across-epochs", "every-2-epochs"],
)
def test_validation_happens_at_the_steps_asked_for(tmp_path, flags, validated):
    fit(tmp_path, *flags)
    # The last point is the final evaluation at the end of the run, wherever the last validation was.
    assert steps_of(tmp_path, "val/expected_loss") == validated


def test_limit_val_batches_zero_turns_validation_off(tmp_path):
    fit(tmp_path, "--trainer.limit_val_batches", "0")
    events = EventAccumulator(str(run_dir(tmp_path))).Reload()
    assert "val/expected_loss" not in events.Tags()["scalars"]
    assert load_checkpoint(last(tmp_path))["global_step"] == 200


def test_fast_dev_run_trains_one_step_and_writes_nothing(tmp_path, capsys):
    cli = fit(tmp_path, "--trainer.fast_dev_run", "true")
    assert cli.trainer.global_step == 1
    assert "Trained 1 step in " in capsys.readouterr().out
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize("min_steps", [300, 250])
def test_min_steps_outlasts_early_stopping(tmp_path, min_steps):
    stop = callback('{"class_path": "EarlyStopping", "init_args": {"monitor": "val/expected_loss", "patience": 0, '
                    '"min_delta": 1e9}}')  # fmt: skip
    cli = fit(tmp_path, *stop, "--trainer.max_steps", "500", "--trainer.min_steps", str(min_steps))
    assert cli.trainer.global_step == min_steps  # a batch ends there, whatever steps_per_batch
    assert load_checkpoint(last(tmp_path))["global_step"] == min_steps


def test_early_stopping_stops_after_patience_validations(tmp_path):
    stop = callback('{"class_path": "EarlyStopping", "init_args": {"monitor": "val/expected_loss", "patience": 2, '
                    '"min_delta": 1e9}}')  # fmt: skip
    cli = fit(tmp_path, *stop, "--trainer.max_steps", "1000")
    assert cli.trainer.global_step == 300  # after the first, no validation improves by 1e9: stop two later
    checkpoint = load_checkpoint(last(tmp_path))
    assert checkpoint["global_step"] == 300
    assert steps_of(tmp_path, "val/expected_loss")[-1] == 300


def test_max_time_stops_and_keeps_the_final_state(tmp_path):
    cli = fit(tmp_path, "--trainer.max_time", "00:00:00:01", "--trainer.max_steps", "-1", "--trainer.max_epochs", "-1")
    step = cli.trainer.global_step
    assert 0 < step
    assert load_checkpoint(last(tmp_path))["global_step"] == step
    assert steps_of(tmp_path, "val/expected_loss")[-1] == step


def test_deterministic_and_detect_anomaly_change_nothing(tmp_path):
    plain = fit(tmp_path / "plain").model.model.flat()
    checked = fit(tmp_path / "checked", "--trainer.deterministic", "true", "--trainer.detect_anomaly", "true")
    assert torch.equal(checked.model.model.flat(), plain)


def test_float64_and_bf16_mixed_train(tmp_path):
    double = fit(tmp_path / "double", "--trainer.precision", "64-true")
    assert double.model.model.shared.dtype == torch.float64
    mixed = fit(tmp_path / "mixed", "--trainer.precision", "bf16-mixed")
    assert mixed.trainer.global_step == 200


def test_barebones_trains_and_reports(tmp_path, capsys):
    cli = fit(tmp_path, "--trainer.barebones", "true")
    assert cli.trainer.global_step == 200
    assert "Result: y = " in capsys.readouterr().out


def test_a_profiler_replaces_the_default(tmp_path):
    spec = f'{{"class_path": "SimpleProfiler", "init_args": {{"dirpath": "{tmp_path}", "filename": "perf"}}}}'
    fit(tmp_path, "--trainer.profiler", spec)
    report = (tmp_path / "fit-perf.txt").read_text()
    assert "run_training_epoch" in report and "[Strategy]SingleDeviceStrategy.training_step" in report


def test_checkpointing_off_writes_no_checkpoint(tmp_path):
    fit(tmp_path, "--trainer.enable_checkpointing", "false")
    assert not (run_dir(tmp_path) / "checkpoints").exists()
    assert list(run_dir(tmp_path).glob("events.out.tfevents.*"))


def test_logger_off_writes_no_events(tmp_path):
    fit(tmp_path, "--trainer.logger", "false")
    assert not list(run_dir(tmp_path).glob("events.out.tfevents.*"))
    assert load_checkpoint(last(tmp_path))["global_step"] == 200


@pytest.mark.parametrize(
    "flags, refused",
    [
        (["--trainer.limit_train_batches", "2"], "limit_train_batches counts train batches"),
        (["--trainer.accumulate_grad_batches", "2"], "accumulate_grad_batches is not supported"),
        (["--trainer.overfit_batches", "1"], "overfit_batches does not apply"),
        (callback("LearningRateFinder"), "LearningRateFinder needs Lightning's automatic optimization"),
        (callback('{"class_path": "ModelCheckpoint", "init_args": {"save_last": true}}'), "drop save_last"),
        (
            callback('{"class_path": "ModelCheckpoint", "init_args": {"train_time_interval": "0:00:01"}}'),
            "use every_n_train_steps",
        ),
        (
            callback('{"class_path": "ModelPruning", "init_args": {"pruning_fn": "l1_unstructured"}}'),
            "drop ModelPruning",
        ),
        (
            callback('{"class_path": "OnExceptionCheckpoint", "init_args": {"dirpath": "."}}'),
            "drop OnExceptionCheckpoint",
        ),
        (
            callback('{"class_path": "GradientAccumulationScheduler", "init_args": {"scheduling": {"0": 2}}}'),
            "GradientAccumulationScheduler is not supported",
        ),
        (callback('{"class_path": "EarlyStopping", "init_args": {"monitor": "nope"}}'), "monitors 'nope'"),
        (["--trainer.strategy", "ddp_spawn", "--trainer.devices", "2"], "ddp_spawn is not supported"),
        (
            ["--lr_scheduler", "ReduceLROnPlateau", "--lr_scheduler.eps", "1e-16", "--lr_scheduler.monitor", "val/los"],
            "ReduceLROnPlateau monitors 'val/los', which validation does not log",
        ),
        (["--trainer.devices", str(len(os.sched_getaffinity(0)) + 1)], "CPU cores for this process; give 1 to"),
        (["--trainer.devices", "-1"], "CPU cores for this process; give 1 to"),  # Lightning's "all" is a GPU's
    ],
    ids=[
        "limit_train_batches",
        "accumulate",
        "overfit",
        "lr-finder",
        "save_last",
        "train_time_interval",
        "pruning",
        "on-exception",
        "accumulation-scheduler",
        "monitor-typo",
        "ddp_spawn",
        "plateau-monitor-typo",
        "more-devices-than-cores",
        "all-devices-on-a-cpu",
    ],
)
def test_refused_with_one_line(tmp_path, capsys, flags, refused):
    assert refused in refusal(tmp_path, capsys, *flags)


@pytest.mark.parametrize("flags", [[], ["--data.steps_per_batch", "1"]], ids=["by-itself", "steps_per_batch-1"])
def test_lr_monitor_counts_optimizer_steps(tmp_path, flags):
    fit(tmp_path, *callback("LearningRateMonitor"), *flags, "--trainer.max_steps", "60")
    # Lightning's textbook behaviour, each batch being one step: at the start, then before each batch that
    # completes a logging interval.
    assert steps_of(tmp_path, "lr-SGD") == [0, 19, 39, 59]


def test_throughput_monitor_counts_optimizer_steps(tmp_path):
    throughput = '{"class_path": "ThroughputMonitor", "init_args": {"batch_size_fn": "builtins.len"}}'
    cli = fit(tmp_path, *callback(throughput))
    assert cli.datamodule.grid == (1,)
    # Lightning's count of batches, 200 of one step each, logged at the optimizer step as every metric.
    assert scalars(tmp_path, "train/batches")[-1] == (200, 200.0)


# ------------------------------------------------------------------------------------------------ callbacks


def test_model_checkpoint_every_n_steps_holds_its_step(tmp_path):
    spec = '{"class_path": "ModelCheckpoint", "init_args": {"every_n_train_steps": 30, "filename": "{step}", ' \
           '"save_top_k": -1}}'  # fmt: skip
    fit(tmp_path, *callback(spec))
    files = sorted(run_dir(tmp_path).glob("checkpoints/step=*.ckpt"), key=lambda p: int(p.stem[5:]))
    assert [int(p.stem[5:]) for p in files] == [30, 60, 90, 120, 150, 180]
    assert all(load_checkpoint(p)["global_step"] == int(p.stem[5:]) for p in files)


def test_a_users_top_k_checkpoint_replaces_dynnets_best(tmp_path):
    spec = '{"class_path": "ModelCheckpoint", "init_args": {"monitor": "val/expected_loss", "save_top_k": 2}}'
    fit(tmp_path, *callback(spec), "--trainer.max_steps", "400")
    names = sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").iterdir())
    assert len([n for n in names if n.startswith("epoch=")]) == 2
    assert not [n for n in names if n.startswith("best-")]  # dynnet's default stepped aside
    assert load_checkpoint(last(tmp_path))["global_step"] == 400


def test_every_n_epochs_checkpoints(tmp_path):
    spec = '{"class_path": "ModelCheckpoint", "init_args": {"every_n_epochs": 2, "save_top_k": -1}}'
    fit(tmp_path, *callback(spec), "--trainer.max_steps", "400")
    steps = sorted(load_checkpoint(p)["global_step"] for p in run_dir(tmp_path).glob("checkpoints/epoch=*.ckpt"))
    assert steps == [200, 400]


@pytest.mark.parametrize("bar", ["TQDMProgressBar", "RichProgressBar"])
def test_lightnings_progress_bars_replace_dynnets_and_count_steps(tmp_path, capsys, bar):
    if bar == "RichProgressBar":
        pytest.importorskip("rich")
    with ExitStack() as cleanup:
        cli = DynnetCLI(
            ["fit", *SMALL, *callback(bar), "--trainer.enable_progress_bar", "true",
             "--trainer.default_root_dir", str(tmp_path)],
            cleanup=cleanup,
        )  # fmt: skip
    assert type(cli.trainer.progress_bar_callback).__name__ == bar
    assert cli.datamodule.grid == (1,)  # the bar counts batches: each one an optimizer step
    assert cli.trainer.global_step == 200


def test_stochastic_weight_averaging(tmp_path):
    spec = '{"class_path": "StochasticWeightAveraging", "init_args": {"swa_lrs": 1e-9, "swa_epoch_start": 1}}'
    cli = fit(tmp_path, *callback(spec), "--trainer.max_steps", "-1", "--trainer.max_epochs", "3")
    assert cli.trainer.global_step == 300


def test_a_timer_stops_training(tmp_path):
    spec = '{"class_path": "Timer", "init_args": {"duration": "00:00:00:01"}}'
    cli = fit(tmp_path, *callback(spec), "--trainer.max_steps", "100000", "--data.steps_per_epoch", "100000")
    assert 0 < cli.trainer.global_step < 100000
    assert load_checkpoint(last(tmp_path))["global_step"] == cli.trainer.global_step


# ------------------------------------------------------------------------------------------------ loggers


def test_csv_logger_logs_optimizer_steps(tmp_path):
    fit(tmp_path, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path))
    rows = list(csv.DictReader((run_dir(tmp_path) / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(20, 201, 20))
    assert [int(r["step"]) for r in rows if r.get("val/expected_loss")] == [100, 200]


def test_two_loggers_write_into_the_run(tmp_path):
    loggers = (
        f'[{{"class_path": "TensorBoardLogger", "init_args": {{"save_dir": "{tmp_path}"}}}}, '
        f'{{"class_path": "CSVLogger", "init_args": {{"save_dir": "{tmp_path}"}}}}]'
    )
    fit(tmp_path, "--trainer.logger", loggers)
    assert (run_dir(tmp_path) / "metrics.csv").is_file()
    assert steps_of(tmp_path, "train/loss") == list(range(20, 201, 20))


def test_a_resumed_csv_log_keeps_its_history(tmp_path):
    csv_logger = ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    fit(tmp_path, *csv_logger)
    fit(tmp_path, *csv_logger, "--trainer.max_steps", "300", "--ckpt_path", "last")
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
    fit(tmp_path, "-c", str(config))
    assert sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").glob("step=*")) == [
        "step=100.ckpt", "step=150.ckpt", "step=200.ckpt", "step=50.ckpt"
    ]  # fmt: skip
