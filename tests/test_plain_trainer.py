"""DynamicNet and SineData driven from plain Python, with a Lightning user's own Trainer: they get what `dynnet fit`
gets, counted in optimizer steps, or the same one-line refusal when the fit starts.

Every case is a tiny CPU fit into tmp_path: epochs of 100 steps, train batches of at most 50 steps.
"""

from contextlib import ExitStack
from datetime import timedelta

import lightning as L
import pytest
import torch
import yaml
from conftest import ROOT, error_of, plain_loop, result
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelPruning,
    RichProgressBar,
    TQDMProgressBar,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet import DynamicNet, SineData, StepProgressBar
from dynnet.cli.command import DynnetCLI
from dynnet.runs.checkpoint import load_checkpoint

QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def data() -> SineData:
    return SineData(steps_per_epoch=100, steps_per_batch=50)


def train(tmp_path, module: DynamicNet | None = None, seed: int = 3, **trainer_args) -> tuple[L.Trainer, DynamicNet]:
    """A plain Lightning fit of a DynamicNet (seeded first, as seed_everything in a config does) on SineData."""
    L.seed_everything(seed)
    module = module or DynamicNet()
    trainer = L.Trainer(default_root_dir=tmp_path, **(QUIET | trainer_args))
    trainer.fit(module, data())
    return trainer, module


def refused(tmp_path, **trainer_args) -> str:
    with pytest.raises(ValueError) as error:
        train(tmp_path, **trainer_args)
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("events.*")), "a refusal writes nothing"
    return str(error.value)


def scalar_steps(folder, tag: str) -> list[int]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return [e.step for e in events.Scalars(tag)]


class StepAdam(DynamicNet):
    """What a Python user writes to train with another optimizer and a schedule."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class BatchEnds(Callback):
    """Records, at every train batch end, the step, train/loss in callback_metrics and the batch's last loss."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metric = trainer.callback_metrics["train/loss"]
        self.seen.append((trainer.global_step, float(metric), float(pl_module.last_loss)))


# ------------------------------------------------------------------------------------------------ the tutorial


def test_a_plain_trainer_trains_the_tutorials_run(tmp_path):
    # Lightning's defaults: its progress bar, TensorBoard logger and checkpoint; the tutorial's SGD by default.
    trainer, module = train(tmp_path, seed=0, max_steps=300, enable_progress_bar=True)
    assert trainer.global_step == 300
    assert type(trainer.optimizers[0]) is torch.optim.SGD and trainer.optimizers[0].defaults["lr"] == 1e-8
    assert module.model.flat().tolist() == plain_loop("--seed", "0", "--steps", "300")


def test_identical_settings_give_identical_runs_both_ways(tmp_path):
    """log_every_n_steps, val_check_interval in steps, a step-counted ModelCheckpoint and min_steps with an early
    stop: the same logged steps, checkpoint steps and Result from plain Python as from `dynnet fit`."""
    every_30 = {"every_n_train_steps": 30, "filename": "{step}", "save_top_k": -1}
    stop = {"monitor": "val/expected_loss", "patience": 0, "min_delta": 1e9}
    settings = {"max_steps": 400, "min_steps": 250, "log_every_n_steps": 20, "val_check_interval": 70}
    trainer, module = train(
        tmp_path / "plain",
        callbacks=[ModelCheckpoint(**every_30), EarlyStopping(**stop)],
        check_val_every_n_epoch=None,
        **settings,
    )
    flags = [f"--trainer.{k}={v}" for k, v in settings.items()] + ["--trainer.check_val_every_n_epoch=null"]
    callbacks = [
        {"class_path": "ModelCheckpoint", "init_args": every_30},
        {"class_path": "EarlyStopping", "init_args": stop},
    ]
    with ExitStack() as cleanup:
        cli = DynnetCLI(
            ["fit", "-c", str(ROOT / "configs" / "default.yaml"), "--seed_everything=3", *flags,
             f"--trainer.callbacks={yaml.safe_dump(callbacks)}", "--trainer.enable_progress_bar=false",
             "--data.steps_per_epoch=100", "--data.steps_per_batch=50",
             f"--trainer.default_root_dir={tmp_path / 'cli'}"],
            cleanup=cleanup,
        )  # fmt: skip
    plain_run = tmp_path / "plain" / "lightning_logs" / "version_0"
    cli_run = tmp_path / "cli" / "lightning_logs" / "version_0"
    assert trainer.global_step == cli.trainer.global_step == 250  # stopped early, at min_steps
    for tag in ("train/loss", "weights/e", "val/expected_loss"):
        assert scalar_steps(plain_run, tag) == scalar_steps(cli_run, tag), tag
    assert scalar_steps(plain_run, "train/loss") == list(range(20, 251, 20))
    assert scalar_steps(plain_run, "val/expected_loss") == [70, 140, 210, 250]
    plain_saves = sorted(p.name for p in plain_run.glob("checkpoints/step=*.ckpt"))
    assert plain_saves == sorted(p.name for p in cli_run.glob("checkpoints/step=*.ckpt"))
    assert sorted(int(n[5:-5]) for n in plain_saves) == [30, 60, 90, 120, 150, 180, 210, 240]
    assert module.model.formula() == cli.model.model.formula()


# ------------------------------------------------------------------------------------------------ step-counted


@pytest.mark.parametrize(
    "settings, validated",
    [
        ({"val_check_interval": 30}, [30, 60, 90, 130, 160, 190, 200]),
        ({"val_check_interval": 0.5}, [50, 100, 150, 200]),
        ({"val_check_interval": 70, "check_val_every_n_epoch": None}, [70, 140, 200]),
        ({"check_val_every_n_epoch": 2, "max_steps": 300}, [200, 300]),
    ],
    ids=["int", "fraction", "across-epochs", "every-2-epochs"],
)
def test_validation_comes_at_the_steps_asked_for(tmp_path, settings, validated):
    trainer, _ = train(tmp_path, **({"max_steps": 200} | settings))
    # The last point is the evaluation logged at the final step, wherever Lightning's last validation was.
    assert scalar_steps(tmp_path / "lightning_logs" / "version_0", "val/expected_loss") == validated
    assert trainer.val_check_interval == settings.get("val_check_interval", 1.0)  # the user's Trainer, unchanged


class OwnLogs(DynamicNet):
    """A user's own metrics, logged in the hooks Lightning users log in."""

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        self.log("own/step", float(self.global_step))

    def on_validation_epoch_end(self) -> None:
        self.log("own/validated", float(self.global_step))


@pytest.mark.parametrize("every", [20, 7], ids=["dividing", "not-dividing"])
def test_a_users_own_logs_land_at_the_optimizer_steps(tmp_path, every):
    trainer, _ = train(tmp_path, module=OwnLogs(), max_steps=300, log_every_n_steps=every)
    run = tmp_path / "lightning_logs" / "version_0"
    assert scalar_steps(run, "own/step") == list(range(every, 301, every))  # every log_every_n_steps steps
    assert scalar_steps(run, "train/loss") == list(range(every, 301, every))  # beside dynnet's own
    # At each validation (epoch ends), at the step dynnet's own evaluation is logged at.
    assert scalar_steps(run, "own/validated") == scalar_steps(run, "val/expected_loss") == [100, 200, 300]
    assert trainer.logged_metrics["own/validated"] == 300 and "val/expected_loss" in trainer.logged_metrics
    assert 1 not in trainer.datamodule.grid  # batches stay long where the intervals do not divide each other


def test_settings_that_force_one_step_batches_say_so(tmp_path, capsys):
    trainer, _ = train(tmp_path, max_steps=100, log_every_n_steps=7, val_check_interval=30)
    assert trainer.datamodule.grid == (1,)  # Lightning counts the validation interval in batches: gcd 1
    assert "Train batches of one optimizer step, which is slower: val_check_interval is counted in train batches" \
        in capsys.readouterr().out  # fmt: skip


def test_quality_speaks_of_the_data_it_was_fitted_on_or_given(tmp_path):
    trainer, module = train(tmp_path, max_steps=100)
    fitted = module.quality()
    assert fitted == module.quality(trainer.datamodule) and fitted.startswith("Expected loss: ")
    narrow = module.quality(SineData(low=-1, high=1))
    assert narrow != fitted and module.quality() == fitted  # each asks anew, whatever was asked before


class Linear(L.LightningModule):
    """Any module, under automatic optimization: SineData serves it (x, y) once per optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.batches = torch.nn.Linear(1, 1), []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append(len(x))
        return torch.nn.functional.mse_loss(self.layer(x.unsqueeze(-1)).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("every", [1, 7, 50])
def test_sinedata_serves_any_module_the_full_batch_once_a_step(tmp_path, every):
    module = Linear()
    trainer = L.Trainer(max_epochs=2, log_every_n_steps=every, default_root_dir=tmp_path, **QUIET)
    trainer.fit(module, data())
    assert trainer.global_step == 2 * 100 and trainer.current_epoch == 2
    assert module.batches == [2000] * 200


@pytest.mark.parametrize(
    "interval", ["00:00:00:01", timedelta(seconds=1), {"seconds": 1}], ids=["str", "timedelta", "dict"]
)
def test_a_time_based_validation_interval_is_refused_in_one_line(tmp_path, interval):
    assert refused(tmp_path, max_steps=100, val_check_interval=interval) == (
        "val_check_interval as a time is checked only between train batches, which hold many optimizer steps in "
        "dynnet: give it in optimizer steps (an int) or as a fraction of an epoch"
    )


def test_estimated_stepping_batches_counts_the_steps_max_epochs_allows(tmp_path):
    class Estimate(DynamicNet):
        def configure_optimizers(self):
            self.estimated = self.trainer.estimated_stepping_batches
            return super().configure_optimizers()

    trainer, module = train(tmp_path, module=Estimate(), max_steps=300, max_epochs=1)
    assert module.estimated == trainer.global_step == 100
    assert trainer.max_steps == 300  # the user's Trainer, as given


def test_max_steps_ends_inside_a_batch_and_an_epoch_as_in_lightning(tmp_path):
    class Validations(Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.steps.append(trainer.global_step)

    validations = Validations()
    trainer, _ = train(tmp_path, max_steps=137, callbacks=[validations])
    assert trainer.global_step == 137
    # Lightning validates at epoch ends: 100, not 137, where max_steps cut the second epoch short (the final
    # evaluation is logged there, without a validation loop).
    assert validations.steps == [100]
    assert scalar_steps(tmp_path / "lightning_logs" / "version_0", "val/expected_loss") == [100, 137]


def test_epoch_schedules_step_after_whole_epochs_only(tmp_path):
    class Halving(DynamicNet):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=1e-8)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    trainer, _ = train(tmp_path, module=Halving(), max_steps=250)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-8 / 4)  # after 100 and 200, not 250


def test_a_schedule_steps_every_optimizer_step(tmp_path):
    trainer, _ = train(tmp_path, module=StepAdam(), max_steps=120)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 / 4)  # halved at 50 and 100


def test_train_loss_is_in_callback_metrics_at_every_batch_end(tmp_path):
    ends = BatchEnds()
    train(tmp_path, max_steps=200, callbacks=[ends])
    assert [step for step, _, _ in ends.seen] == list(range(50, 201, 50))
    assert all(metric == last for _, metric, last in ends.seen)


def test_early_stopping_on_train_loss_without_a_progress_bar(tmp_path):
    stop = EarlyStopping(monitor="train/loss", patience=0, min_delta=1e9, check_on_train_epoch_end=True)
    trainer, _ = train(tmp_path, max_steps=1000, callbacks=[stop])
    assert trainer.global_step == 200  # no epoch improves by 1e9: the second epoch's end stops


def test_a_second_fit_continues_the_draws(tmp_path):
    class Plain(DynamicNet):  # momentum 0: nothing but the parameters and the draws carries over between fits
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-8)

    L.seed_everything(3)
    twice = Plain()
    for _ in range(2):
        L.Trainer(max_steps=100, logger=False, enable_checkpointing=False, **QUIET).fit(twice, data())
    L.seed_everything(3)
    straight = Plain()
    L.Trainer(max_steps=200, logger=False, enable_checkpointing=False, **QUIET).fit(straight, data())
    assert twice.degree_counts == straight.degree_counts
    assert torch.equal(twice.model.flat(), straight.model.flat())


def test_fast_dev_run_trains_validates_and_ends_its_epoch(tmp_path):
    class Events(Callback):
        def __init__(self) -> None:
            self.events: list[tuple[str, int]] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            self.events.append(("validation", trainer.global_step))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.events.append(("epoch end", trainer.global_step))

    events = Events()
    trainer, _ = train(tmp_path, fast_dev_run=5, callbacks=[events])
    assert trainer.global_step == 5
    assert events.events == [("validation", 5), ("epoch end", 5)]


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar])
def test_lightnings_progress_bars_count_optimizer_steps(tmp_path, bar):
    class Counted(bar):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            # Both bars show batch_idx + 1 within the epoch: with batches of one step, the epoch's optimizer steps.
            assert batch_idx + 1 == trainer.global_step - 100 * trainer.current_epoch

    trainer, _ = train(tmp_path, max_steps=150, callbacks=[Counted()], enable_progress_bar=True)
    assert trainer.datamodule.grid == (1,)
    assert trainer.global_step == 150


def test_dynnets_progress_display_keeps_batches_of_many_steps(tmp_path):
    trainer, _ = train(tmp_path, max_steps=150, callbacks=[StepProgressBar()], enable_progress_bar=True)
    assert trainer.datamodule.grid == (50,)


def test_the_lr_monitor_logs_at_optimizer_steps(tmp_path):
    trainer, _ = train(tmp_path, max_steps=60, callbacks=[LearningRateMonitor()], log_every_n_steps=20)
    assert scalar_steps(tmp_path / "lightning_logs" / "version_0", "lr-SGD") == [0, 19, 39, 59]


def test_gradient_clipping_bounds_every_update(tmp_path):
    class FastSGD(DynamicNet):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    L.seed_everything(3)
    module = FastSGD(gradient_clip_val=0.001)
    start = module.model.flat().detach().clone()
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, **QUIET).fit(module, data())
    assert (module.model.flat().detach() - start).norm() == pytest.approx(0.001, rel=1e-3)


# ------------------------------------------------------------------------------------------------ schedules


class Plateau(DynamicNet):
    def __init__(self, eps: float | None = None, monitor: str | None = None) -> None:
        super().__init__()
        self.eps, self.monitor = eps, monitor

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1e-8, momentum=0.9)
        kwargs = {"eps": self.eps} if self.eps is not None else {}
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=0, **kwargs)
        schedule = {"scheduler": plateau} | ({"monitor": self.monitor} if self.monitor else {})
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def test_reduce_on_plateau_that_could_never_act_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"give it eps=1e-16"):
        train(tmp_path, module=Plateau(), max_steps=300)


def test_reduce_on_plateau_lowers_a_small_lr_given_a_small_eps(tmp_path):
    # Watching for a rise of a falling loss: every validation after the first is a plateau.
    trainer, _ = train(tmp_path, module=Plateau(eps=1e-16), max_steps=300)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-10)  # reduced at steps 200 and 300


def test_step_checkpoints_hold_the_state_after_the_step_without_a_warning_to_the_contrary(tmp_path, recwarn):
    every_50 = ModelCheckpoint(every_n_train_steps=50, save_top_k=-1, filename="{step}")
    train(tmp_path, max_steps=100, callbacks=[every_50])
    saved = load_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "step=50.ckpt")
    assert saved["global_step"] == 50 and sum(saved["degree_counts"]) == 50  # after step 50's update
    assert not [w for w in recwarn if "pre-optimization state" in str(w.message)]


def test_a_scheduler_dicts_monitor_is_the_one_reduce_on_plateau_steps_on(tmp_path, recwarn):
    trainer, _ = train(tmp_path, module=Plateau(eps=1e-16, monitor="val/optimality_gap"), max_steps=300)
    assert trainer.lr_scheduler_configs[0].scheduler.monitor == "val/optimality_gap"
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-10)
    assert not [w for w in recwarn if "lr_scheduler.step()` manually" in str(w.message)]  # dynnet steps it
    with pytest.raises(ValueError, match="ReduceLROnPlateau monitors 'val/los', which validation does not log"):
        train(tmp_path / "typo", module=Plateau(eps=1e-16, monitor="val/los"), max_steps=300)  # before training


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "settings, line",
    [
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches is not supported"),
        ({"limit_train_batches": 3}, "limit_train_batches counts train batches"),
        ({"overfit_batches": 1}, "overfit_batches does not apply"),
        ({"gradient_clip_val": 0.5}, "DynamicNet(gradient_clip_val=..., gradient_clip_algorithm=...)"),
        ({"callbacks": [ModelPruning("l1_unstructured")]}, "there is nothing to prune: drop ModelPruning"),
        ({"callbacks": [EarlyStopping(monitor="val_loss")]}, "EarlyStopping monitors 'val_loss'"),
    ],
    ids=["accumulate", "limit_train_batches", "overfit", "trainer-clipping", "pruning", "unknown-monitor"],
)
def test_refusals_are_dynnets_one_line_when_the_fit_starts(tmp_path, settings, line):
    message = refused(tmp_path, **settings)
    assert line in message and "\n" not in message


def test_two_optimizers_are_refused(tmp_path):
    class Two(DynamicNet):
        def configure_optimizers(self):
            parameters = list(self.parameters())
            return [torch.optim.SGD(parameters[:2], lr=1e-8), torch.optim.SGD(parameters[2:], lr=1e-8)]

    with pytest.raises(ValueError, match=r"^configure_optimizers gave 2 optimizers; DynamicNet trains"):
        train(tmp_path, module=Two(), max_steps=10)


def test_one_cycle_shorter_than_the_fit_is_refused(tmp_path):
    class OneCycle(DynamicNet):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=1e-8)
            cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-8, total_steps=100)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cycle, "interval": "step"}}

    with pytest.raises(
        ValueError, match=r"OneCycleLR\(total_steps=100\) cannot step 300 times; give it total_steps=300"
    ):
        train(tmp_path, module=OneCycle(), max_steps=300)


def test_the_cli_refuses_with_the_same_line(tmp_path, capsys):
    error = error_of(
        ["fit", "--trainer.accumulate_grad_batches", "2", "--trainer.default_root_dir", str(tmp_path)], capsys
    )
    with pytest.raises(ValueError) as plain:
        train(tmp_path / "plain", accumulate_grad_batches=2)
    assert error == f"dynnet: error: {plain.value}"


# ------------------------------------------------------------------------------------------------ the model


def test_forward_is_the_expected_prediction():
    module = DynamicNet()
    x = torch.linspace(-3, 3, 11)
    expected = torch.stack([module.model(x, degree=k) for k in (3, 4, 5)]).mean(0)
    assert torch.allclose(module(x), expected)


def test_to_torchscript_reproduces_forward(tmp_path):
    module = DynamicNet()
    x = torch.linspace(-3, 3, 11)
    scripted = module.to_torchscript(method="trace")
    torch.jit.save(scripted, tmp_path / "model.pt")
    assert torch.equal(torch.jit.load(tmp_path / "model.pt")(x), module(x))
    with pytest.raises(ValueError, match=r"^DynamicNet cannot be scripted \(its degree generator is Python's\)"):
        module.to_torchscript()  # Lightning's default method, script


def test_to_onnx_reproduces_forward(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    module = DynamicNet()
    module.to_onnx(tmp_path / "model.onnx")
    onnx.checker.check_model(tmp_path / "model.onnx")
    x = module.example_input_array
    (output,) = ReferenceEvaluator(str(tmp_path / "model.onnx")).run(None, {"x": x.numpy()})
    assert torch.allclose(torch.from_numpy(output), module(x))


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture
def checkpoint(tmp_path):
    trainer, module = train(tmp_path, max_steps=100)
    return tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=100.ckpt", module


def test_load_from_checkpoint_takes_lightnings_arguments(tmp_path, checkpoint):
    path, trained = checkpoint
    loaded = DynamicNet.load_from_checkpoint(path, map_location="cpu", strict=True, weights_only=True)
    assert torch.equal(loaded.model.flat(), trained.model.flat())
    hparams = tmp_path / "hparams.yaml"
    hparams.write_text("max_degree: 6\ngradient_clip_val: 0.25\n")
    from_file = DynamicNet.load_from_checkpoint(path, hparams_file=hparams)
    assert (from_file.model.max_degree, from_file.gradient_clip_val) == (6, 0.25)
    assert DynamicNet.load_from_checkpoint(path, hparams_file=hparams, max_degree=4).model.max_degree == 4
    # strict=False: a model with another min_degree takes the coefficients the two share.
    partial = DynamicNet.load_from_checkpoint(path, min_degree=4, strict=False)
    assert torch.equal(partial.model.coefficients[3], trained.model.coefficients[3])
    with pytest.raises(RuntimeError, match="Missing key"):
        DynamicNet.load_from_checkpoint(path, min_degree=4)
    with pytest.raises(ValueError, match="weights_only=False"):
        DynamicNet.load_from_checkpoint(path, weights_only=False)
    with path.open("rb") as file:  # an open file, as Lightning takes too
        assert torch.equal(DynamicNet.load_from_checkpoint(file).model.flat(), trained.model.flat())
    hparams.write_text("max_degre: 6\n")
    with pytest.raises(ValueError, match=r"sets max_degre, which DynamicNet does not take"):
        DynamicNet.load_from_checkpoint(path, hparams_file=hparams)
    # The run's own hparams.yaml, which holds the data's settings beside the model's.
    own = DynamicNet.load_from_checkpoint(path, hparams_file=path.parents[1] / "hparams.yaml")
    assert torch.equal(own.model.flat(), trained.model.flat())


def test_a_plain_resume_ends_where_one_fit_ends(tmp_path, checkpoint):
    path, _ = checkpoint
    resumed = DynamicNet()
    L.Trainer(max_steps=200, default_root_dir=tmp_path / "resumed", **QUIET).fit(resumed, data(), ckpt_path=path)
    _, straight = train(tmp_path / "straight", max_steps=200)
    assert torch.equal(resumed.model.flat(), straight.model.flat())


class AdamInstead(DynamicNet):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


@pytest.mark.parametrize(
    "module, data_args, trainer_args, line",
    [
        (DynamicNet, {"n_points": 500}, {}, "changed data.n_points: it is 500, the run was trained with 2000"),
        (DynamicNet, {}, {"precision": "64-true"}, "changed trainer.precision: it is 64-true, the run was trained"),
        (AdamInstead, {}, {}, "changed optimizer: it is torch.optim.adam.Adam, the run was trained with "),
    ],
    ids=["data", "precision", "optimizer"],
)
def test_a_plain_resume_gets_the_commands_refusals(tmp_path, checkpoint, module, data_args, trainer_args, line):
    path, _ = checkpoint
    trainer = L.Trainer(max_steps=200, default_root_dir=tmp_path / "resumed", **(QUIET | trainer_args))
    data_module = SineData(**({"steps_per_epoch": 100, "steps_per_batch": 50} | data_args))
    with pytest.raises(ValueError, match=f"cannot resume from {path} with a {line}"):
        trainer.fit(module(), data_module, ckpt_path=path)
    assert not list((tmp_path / "resumed").rglob("*.ckpt"))  # refused before training: nothing saved


def test_a_checkpoint_filename_with_a_slash_resumes(tmp_path, fit):
    spec = {"class_path": "ModelCheckpoint", "init_args": {"filename": "{step}-{val/expected_loss:.4f}"}}
    args = ["-c", str(ROOT / "configs" / "default.yaml"), "--trainer.max_steps", "200", "--data.steps_per_epoch",
            "100", "--trainer.enable_progress_bar", "false",
            f"--trainer.callbacks={yaml.safe_dump([spec])}"]  # fmt: skip
    fit(*args)
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/step=*-val/expected_loss=*.ckpt"))
    out, _ = fit(*args, "--trainer.max_steps", "300", "--ckpt_path", "last")
    assert "Resumed from" in out and result(out)
    assert (
        load_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == 300
    )
