"""One table of settings, each given both ways: to `dynnet fit` (flags after configs/default.yaml and TINY) and to a
user's own `lightning.Trainer(...).fit(DynamicNet(), SineData())` in plain Python. Both ways must end in the same
one-line refusal, or in the same outcome and the same answer.

Every run is tiny: epochs of 100 steps, train batches of at most 50, 200 steps and a log every 20 unless a case
says otherwise.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import DEFAULT, TINY, TINY_TRAINER, Plateau, copied_run, error_of, fitted_cli, fitted_trainer, run_dir
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    GradientAccumulationScheduler,
    LearningRateFinder,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelPruning,
    RichProgressBar,
    TQDMProgressBar,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet import DynamicNet
from dynnet.runs.checkpoint import load_checkpoint


@dataclass
class Both:
    """One setting spelled both ways. flags: for `dynnet fit`; trainer, callbacks, module and data: for a
    lightning.Trainer (beside TINY_TRAINER), its callbacks, the module and SineData, built anew for each run. probe:
    callbacks that check a run from inside, given to both ways as Python objects."""

    flags: list[str]
    trainer: dict = field(default_factory=dict)
    callbacks: Callable[[], list[Callback]] = list
    module: Callable[[], L.LightningModule] = DynamicNet
    data: dict = field(default_factory=dict)
    probe: Callable[[], list[Callback]] = list


def command_trainer(root: Path, case: Both) -> L.Trainer:
    """The trainer of the case's `dynnet fit`, run in this process into root."""
    return fitted_cli(root, *case.flags, callbacks=case.probe()).trainer


def python_trainer(root: Path, case: Both, **trainer_args) -> L.Trainer:
    """The trainer of the case's plain Python fit into root."""
    settings = TINY_TRAINER | case.trainer | trainer_args
    callbacks = [*case.callbacks(), *case.probe()]
    return fitted_trainer(root, case.module, data=case.data, callbacks=callbacks, **settings)


def scalars(run: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def callback(spec: dict | str) -> list[str]:
    return ["--trainer.callbacks+", spec if isinstance(spec, str) else yaml.safe_dump(spec)]


# ------------------------------------------------------------------------------------------------ the modules


# Plateau's schedule in the command (Plateau: conftest).
PLATEAU = ["--lr_scheduler", "ReduceLROnPlateau", "--lr_scheduler.mode", "max", "--lr_scheduler.patience", "0"]


ONE_CYCLE_OF_100 = ["--lr_scheduler", "OneCycleLR", "--lr_scheduler.max_lr", "1e-8",
                    "--lr_scheduler.total_steps", "100"]  # fmt: skip


class OneCycle(DynamicNet):
    """The config's SGD under a OneCycleLR of 100 steps, stepped every optimizer step."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1e-8, momentum=0.9)
        cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-8, total_steps=100)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cycle, "interval": "step"}}


class HalvedAdam(DynamicNet):
    """Adam at lr 0.05, halved by a StepLR every 50 optimizer steps."""

    step_size, interval = 50, "step"

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.step_size, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


class EpochHalvedAdam(HalvedAdam):
    """Adam at lr 0.05, halved at every epoch's end."""

    step_size, interval = 1, "epoch"


HALVED_ADAM = ["--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.05", "--lr_scheduler", "StepLR",
               "--lr_scheduler.gamma", "0.5"]  # fmt: skip


class SteppedSGD(DynamicNet):
    """Plain SGD at lr 1 (no momentum): one update is minus the (clipped) gradient."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class AdamInstead(DynamicNet):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


class StepLRAdded(DynamicNet):
    """The config's SGD with a StepLR the run was not trained with."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1e-8, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class BatchesAreSteps(Callback):
    """Checks at every train batch end that the batch's index counts the epoch's optimizer steps: what Lightning's
    progress bars show (batch_idx + 1) is then the step within the epoch of 100."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert batch_idx + 1 == trainer.global_step - 100 * trainer.current_epoch


# ------------------------------------------------------------------------------------------------ refusals


REFUSALS = {
    "accumulate": (
        Both(["--trainer.accumulate_grad_batches", "2"], trainer={"accumulate_grad_batches": 2}),
        "accumulate_grad_batches is not supported",
    ),
    "limit_train_batches": (
        Both(["--trainer.limit_train_batches", "3"], trainer={"limit_train_batches": 3}),
        "limit_train_batches counts train batches",
    ),
    "overfit": (
        Both(["--trainer.overfit_batches", "1"], trainer={"overfit_batches": 1}),
        "overfit_batches does not apply",
    ),
    "pruning": (
        Both(
            callback({"class_path": "ModelPruning", "init_args": {"pruning_fn": "l1_unstructured"}}),
            callbacks=lambda: [ModelPruning("l1_unstructured")],
        ),
        "there is nothing to prune: drop ModelPruning",
    ),
    "unknown-monitor": (
        Both(
            callback({"class_path": "EarlyStopping", "init_args": {"monitor": "val_loss"}}),
            callbacks=lambda: [EarlyStopping(monitor="val_loss")],
        ),
        "EarlyStopping monitors 'val_loss', which dynnet does not log",
    ),
    "lr-finder": (
        Both(callback("LearningRateFinder"), callbacks=lambda: [LearningRateFinder()]),
        "LearningRateFinder needs Lightning's automatic optimization",
    ),
    "train_time_interval": (
        Both(
            callback({"class_path": "ModelCheckpoint", "init_args": {"train_time_interval": "0:00:01"}}),
            callbacks=lambda: [ModelCheckpoint(train_time_interval=timedelta(seconds=1))],
        ),
        "use every_n_train_steps",
    ),
    "accumulation-scheduler": (
        Both(
            callback({"class_path": "GradientAccumulationScheduler", "init_args": {"scheduling": {0: 2}}}),
            callbacks=lambda: [GradientAccumulationScheduler({0: 2})],
        ),
        "GradientAccumulationScheduler is not supported",
    ),
    **{
        f"validation-interval-as-a-time-{form}": (
            Both(["--trainer.val_check_interval", flag], trainer={"val_check_interval": value}),
            "val_check_interval as a time is checked only between train batches, which hold many optimizer steps in "
            "dynnet: give it in optimizer steps (an int) or as a fraction of an epoch",
        )
        for form, flag, value in [
            ("str", "00:00:00:01", "00:00:00:01"),
            ("timedelta", "00:00:00:01", timedelta(seconds=1)),
            ("dict", "{seconds: 1}", {"seconds": 1}),
        ]
    },
    "plateau-that-could-never-act": (
        Both([*PLATEAU, "--lr_scheduler.monitor", "val/expected_loss"], module=Plateau),
        "give it eps=1e-16",
    ),
    "plateau-monitor-typo": (
        Both(
            [*PLATEAU, "--lr_scheduler.eps", "1e-16", "--lr_scheduler.monitor", "val/los"],
            module=lambda: Plateau(eps=1e-16, monitor="val/los"),
        ),
        "ReduceLROnPlateau monitors 'val/los', which validation does not log",
    ),
    "one-cycle-shorter-than-the-fit": (
        Both(ONE_CYCLE_OF_100 + ["--trainer.max_steps", "300"], trainer={"max_steps": 300}, module=OneCycle),
        "OneCycleLR(total_steps=100) cannot step 300 times; give it total_steps=300",
    ),
}


# Refused once the module's optimizers and schedulers exist (on_fit_start): in Python after Lightning's logger has
# begun its event file, and by the command after it has made its run folder where its config cannot tell. Nothing
# is trained or saved; the rest are refused before anything is written.
PYTHON_AT_FIT_START = {"plateau-that-could-never-act", "plateau-monitor-typo", "one-cycle-shorter-than-the-fit"}
COMMAND_AT_FIT_START = {"one-cycle-shorter-than-the-fit"}


@pytest.mark.parametrize("name", REFUSALS)
def test_a_refusal_is_the_same_line_from_the_command_and_from_python(tmp_path, capsys, name):
    case, line = REFUSALS[name]
    command = tmp_path / "command"
    error = error_of(["fit", "-c", DEFAULT, *TINY, *case.flags, "--trainer.default_root_dir", str(command)], capsys)
    if name not in COMMAND_AT_FIT_START:
        assert not command.exists(), "a refused command leaves nothing behind"
    with pytest.raises(ValueError) as refusal:
        python_trainer(tmp_path / "python", case)
    assert not list(tmp_path.rglob("*.ckpt")), "a refusal saves nothing"
    if name not in PYTHON_AT_FIT_START:
        assert not list(tmp_path.rglob("events.*")), "refused before anything is written"
    assert line in str(refusal.value) and "\n" not in str(refusal.value)
    assert error == f"dynnet: error: {refusal.value}"


# ------------------------------------------------------------------------------------------------ outcomes


def validated(trainer: L.Trainer, run: Path) -> list[int]:
    """The steps of the logged evaluations: Lightning's validations, and the final one at the last step."""
    return sorted(scalars(run, "val/expected_loss"))


def lr_monitored(trainer: L.Trainer, run: Path) -> list[int]:
    return sorted(scalars(run, "lr-SGD"))


def bar_and_batches(trainer: L.Trainer, run: Path) -> tuple[str, tuple[int, ...], int]:
    """The progress bar's class, the train batches' lengths in steps, and the steps trained."""
    return type(trainer.progress_bar_callback).__name__, trainer.datamodule.grid, trainer.global_step


def update_size(algorithm: str) -> Callable[[L.Trainer, Path], float]:
    """The size of the fit's one update (its norm, or its largest entry), from the model a seed of 3 starts with."""

    def size(trainer: L.Trainer, run: Path) -> float:
        L.seed_everything(3)
        step = trainer.lightning_module.model.flat().detach() - DynamicNet().model.flat().detach()
        return float(step.norm() if algorithm == "norm" else step.abs().max())

    return size


def lrs_at(*steps: int) -> Callable[[L.Trainer, Path], list[float]]:
    """The logged train/lr at steps, then the optimizer's lr at the end."""

    def lrs(trainer: L.Trainer, run: Path) -> list[float]:
        logged = scalars(run, "train/lr")
        return [logged[step] for step in steps] + [trainer.optimizers[0].param_groups[0]["lr"]]

    return lrs


def steps_and_saves(trainer: L.Trainer, run: Path) -> tuple:
    """The steps trained, logged (train/loss, weights/e, val/expected_loss) and saved by a step-counted checkpoint."""
    saved = sorted(int(p.name[5:-5]) for p in run.glob("checkpoints/step=*.ckpt"))
    logged = [sorted(scalars(run, tag)) for tag in ("train/loss", "weights/e", "val/expected_loss")]
    return trainer.global_step, *logged, saved


EVERY_30 = {"every_n_train_steps": 30, "filename": "{step}", "save_top_k": -1}
STOP_AT_ONCE = {"monitor": "val/expected_loss", "patience": 0, "min_delta": 1e9}  # no validation improves by 1e9
SAVE_AND_STOP = yaml.safe_dump(
    [
        {"class_path": "ModelCheckpoint", "init_args": EVERY_30},
        {"class_path": "EarlyStopping", "init_args": STOP_AT_ONCE},
    ]
)
NO_RICH = pytest.mark.skipif(importlib.util.find_spec("rich") is None, reason="RichProgressBar needs rich")

OUTCOMES = [
    # Validation at the steps asked for; the last point is the evaluation logged at the final step, wherever
    # Lightning's last validation was.
    pytest.param(
        Both(["--trainer.val_check_interval", "30"], trainer={"val_check_interval": 30}),
        validated, [30, 60, 90, 130, 160, 190, 200], id="validation-interval-in-steps",
    ),
    pytest.param(
        Both(["--trainer.val_check_interval", "0.5"], trainer={"val_check_interval": 0.5}),
        validated, [50, 100, 150, 200], id="validation-fraction-of-an-epoch",
    ),
    pytest.param(
        Both(["--trainer.val_check_interval", "70", "--trainer.check_val_every_n_epoch", "null"],
             trainer={"val_check_interval": 70, "check_val_every_n_epoch": None}),
        validated, [70, 140, 200], id="validation-across-epochs",
    ),
    pytest.param(
        Both(["--trainer.check_val_every_n_epoch", "2", "--trainer.max_steps", "300"],
             trainer={"check_val_every_n_epoch": 2, "max_steps": 300}),
        validated, [200, 300], id="validation-every-2-epochs",
    ),
    # Lightning's textbook LearningRateMonitor, each batch being one step: at the start, then before each batch
    # that completes a logging interval.
    pytest.param(
        Both([*callback("LearningRateMonitor"), "--trainer.max_steps", "60"], trainer={"max_steps": 60},
             callbacks=lambda: [LearningRateMonitor()]),
        lr_monitored, [0, 19, 39, 59], id="lr-monitor",
    ),
    pytest.param(
        Both([*callback("LearningRateMonitor"), "--trainer.max_steps", "60", "--data.steps_per_batch", "1"],
             trainer={"max_steps": 60}, callbacks=lambda: [LearningRateMonitor()], data={"steps_per_batch": 1}),
        lr_monitored, [0, 19, 39, 59], id="lr-monitor-steps_per_batch-1",
    ),
    # Lightning's progress bars replace dynnet's and count batches: each one optimizer step.
    pytest.param(
        Both([*callback("TQDMProgressBar"), "--trainer.enable_progress_bar", "true", "--trainer.max_steps", "150"],
             trainer={"enable_progress_bar": True, "max_steps": 150}, callbacks=lambda: [TQDMProgressBar()],
             probe=lambda: [BatchesAreSteps()]),
        bar_and_batches, ("TQDMProgressBar", (1,), 150), id="tqdm-progress-bar",
    ),
    pytest.param(
        Both([*callback("RichProgressBar"), "--trainer.enable_progress_bar", "true", "--trainer.max_steps", "150"],
             trainer={"enable_progress_bar": True, "max_steps": 150}, callbacks=lambda: [RichProgressBar()],
             probe=lambda: [BatchesAreSteps()]),
        bar_and_batches, ("RichProgressBar", (1,), 150), id="rich-progress-bar", marks=NO_RICH,
    ),
    # Clipping bounds the update: the raw gradient is about a million times larger. The Trainer's flag in the
    # command, the module's argument in Python (where the Trainer's is refused: test_plain_trainer).
    *[
        pytest.param(
            Both(["--optimizer", "torch.optim.SGD", "--optimizer.lr", "1.0", "--trainer.max_steps", "1",
                  "--trainer.gradient_clip_val", "0.001", "--trainer.gradient_clip_algorithm", algorithm],
                 trainer={"max_steps": 1},
                 module=lambda algorithm=algorithm: SteppedSGD(gradient_clip_val=0.001,
                                                               gradient_clip_algorithm=algorithm)),
            update_size(algorithm), pytest.approx(0.001, rel=1e-3), id=f"gradient-clipping-by-{algorithm}",
        )
        for algorithm in ("norm", "value")
    ],
    # Schedules count optimizer steps: halved at 50, 100, 150 and 200; or at each epoch's end (100 and 200), not
    # at 250.
    pytest.param(
        Both([*HALVED_ADAM, "--lr_scheduler.step_size", "50"], module=HalvedAdam),
        lrs_at(40, 60, 200), pytest.approx([0.05, 0.025, 0.05 / 16, 0.05 / 16]), id="step-schedule",
    ),
    pytest.param(
        Both([*HALVED_ADAM, "--lr_scheduler.step_size", "1", "--lr_interval", "epoch", "--trainer.max_steps", "250"],
             trainer={"max_steps": 250}, module=EpochHalvedAdam),
        lrs_at(100, 120), pytest.approx([0.05, 0.025, 0.05 / 4]), id="epoch-schedule",
    ),
    # Watching for a rise of a falling loss, every validation after the first is a plateau: reduced at 200 and 300.
    pytest.param(
        Both([*PLATEAU, "--lr_scheduler.monitor", "val/expected_loss", "--lr_scheduler.eps", "1e-16",
              "--trainer.max_steps", "300"], trainer={"max_steps": 300}, module=lambda: Plateau(eps=1e-16)),
        lrs_at(), pytest.approx([1e-10]), id="reduce-on-plateau-with-a-small-eps",
    ),
    # log_every_n_steps, val_check_interval in steps, a step-counted ModelCheckpoint and min_steps with an early
    # stop: stopped at min_steps, the same logged and saved steps.
    pytest.param(
        Both(["--trainer.max_steps=400", "--trainer.min_steps=250", "--trainer.val_check_interval=70",
              "--trainer.check_val_every_n_epoch=null", f"--trainer.callbacks={SAVE_AND_STOP}"],
             trainer={"max_steps": 400, "min_steps": 250, "val_check_interval": 70, "check_val_every_n_epoch": None},
             callbacks=lambda: [ModelCheckpoint(**EVERY_30), EarlyStopping(**STOP_AT_ONCE)]),
        steps_and_saves,
        (250, list(range(20, 251, 20)), list(range(20, 251, 20)), [70, 140, 210, 250], list(range(30, 241, 30))),
        id="min_steps-early-stopping-and-step-checkpoints",
    ),
]  # fmt: skip


@pytest.mark.parametrize("case, observe, expected", OUTCOMES)
def test_a_setting_does_the_same_from_the_command_and_from_python(tmp_path, case, observe, expected):
    command = command_trainer(tmp_path / "command", case)
    python = python_trainer(tmp_path / "python", case)
    assert observe(command, run_dir(tmp_path / "command")) == observe(python, run_dir(tmp_path / "python"))
    assert observe(python, run_dir(tmp_path / "python")) == expected
    assert command.lightning_module.model.formula() == python.lightning_module.model.formula()  # the same answer
    # The user's Trainer keeps the settings it was given.
    assert python.val_check_interval == case.trainer.get("val_check_interval", 1.0)
    assert python.max_steps == (TINY_TRAINER | case.trainer)["max_steps"]


# ------------------------------------------------------------------------------------------------ resumes


RESUME_CHANGES = {
    "optimizer": (
        Both(["--optimizer", "torch.optim.Adam"], module=AdamInstead),
        "changed optimizer: it is torch.optim.adam.Adam, the run was trained with torch.optim.sgd.SGD",
    ),
    "scheduler": (
        Both(
            ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "10"], module=StepLRAdded
        ),
        "changed lr_scheduler: it is torch.optim.lr_scheduler.StepLR, the run was trained with None",
    ),
    "data": (
        Both(["--data.n_points", "1000"], data={"n_points": 1000}),
        "changed data.n_points: it is 1000, the run was trained with 2000",
    ),
    "precision": (
        Both(["--trainer.precision", "64-true"], trainer={"precision": "64-true"}),
        "changed trainer.precision: it is 64-true, the run was trained with 32-true",
    ),
}


@pytest.mark.parametrize("case, line", RESUME_CHANGES.values(), ids=RESUME_CHANGES.keys())
def test_a_resume_with_a_change_that_cannot_apply_is_the_same_refusal_both_ways(
    tmp_path, capsys, trained_checkpoint, case, line
):
    root = tmp_path / "run"
    checkpoint = copied_run(trained_checkpoint, root)
    error = error_of(["fit", "-c", DEFAULT, *TINY, "--trainer.max_steps", "400", *case.flags, "--ckpt_path", "last",
                      "--trainer.default_root_dir", str(root)], capsys)  # fmt: skip
    with pytest.raises(ValueError) as refusal:
        python_trainer(tmp_path / "python", case, max_steps=400, ckpt_path=checkpoint)
    assert str(refusal.value).startswith(f"cannot resume from {checkpoint} with a {line}")
    assert error == f"dynnet: error: {refusal.value}"
    assert load_checkpoint(checkpoint)["global_step"] == 200
    assert not list((tmp_path / "python").rglob("*.ckpt"))  # refused before training: nothing saved
