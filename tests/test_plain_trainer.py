"""DynamicNet and SineData driven from plain Python, with a Lightning user's own Trainer: what only Python can
ask for (its own modules, hooks, logs and Trainers) is counted in optimizer steps, or refused in one line when the
fit starts. What `dynnet fit` can ask for too is checked both ways, in test_parity.py.

Every case is a tiny CPU fit into tmp_path: epochs of 100 steps, train batches of at most 50 steps.
"""

import lightning as L
import pytest
import torch
from conftest import QUIET, Plateau, fitted_trainer, plain_loop
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet import DynamicNet, SineData, StepProgressBar
from dynnet.runs.checkpoint import load_checkpoint


def scalar_steps(folder, tag: str) -> list[int]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return [e.step for e in events.Scalars(tag)]


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
    trainer = fitted_trainer(tmp_path, seed=0, max_steps=300, enable_progress_bar=True)
    assert trainer.global_step == 300
    assert type(trainer.optimizers[0]) is torch.optim.SGD and trainer.optimizers[0].defaults["lr"] == 1e-8
    assert trainer.lightning_module.model.flat().tolist() == plain_loop("--seed", "0", "--steps", "300")


# ------------------------------------------------------------------------------------------------ step-counted


class OwnLogs(DynamicNet):
    """A user's own metrics, logged in the hooks Lightning users log in."""

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        self.log("own/step", float(self.global_step))

    def on_validation_epoch_end(self) -> None:
        self.log("own/validated", float(self.global_step))


@pytest.mark.parametrize("every", [20, 7], ids=["dividing", "not-dividing"])
def test_a_users_own_logs_land_at_the_optimizer_steps(tmp_path, every):
    trainer = fitted_trainer(tmp_path, OwnLogs, max_steps=300, log_every_n_steps=every)
    run = tmp_path / "lightning_logs" / "version_0"
    assert scalar_steps(run, "own/step") == list(range(every, 301, every))  # every log_every_n_steps steps
    assert scalar_steps(run, "train/loss") == list(range(every, 301, every))  # beside dynnet's own
    # At each validation (epoch ends), at the step dynnet's own evaluation is logged at.
    assert scalar_steps(run, "own/validated") == scalar_steps(run, "val/expected_loss") == [100, 200, 300]
    assert trainer.logged_metrics["own/validated"] == 300 and "val/expected_loss" in trainer.logged_metrics
    assert 1 not in trainer.datamodule.grid  # batches stay long where the intervals do not divide each other


def test_settings_that_force_one_step_batches_say_so(tmp_path, capsys):
    trainer = fitted_trainer(tmp_path, max_steps=100, log_every_n_steps=7, val_check_interval=30)
    assert trainer.datamodule.grid == (1,)  # Lightning counts the validation interval in batches: gcd 1
    assert "Train batches of one optimizer step, which is slower: val_check_interval is counted in train batches" \
        in capsys.readouterr().out  # fmt: skip


def test_quality_speaks_of_the_data_it_was_fitted_on_or_given(tmp_path):
    trainer = fitted_trainer(tmp_path, max_steps=100)
    module = trainer.lightning_module
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
    trainer = fitted_trainer(tmp_path, Linear, max_epochs=2, log_every_n_steps=every)
    assert trainer.global_step == 2 * 100 and trainer.current_epoch == 2
    assert trainer.lightning_module.batches == [2000] * 200


def test_estimated_stepping_batches_counts_the_steps_max_epochs_allows(tmp_path):
    class Estimate(DynamicNet):
        def configure_optimizers(self):
            self.estimated = self.trainer.estimated_stepping_batches
            return super().configure_optimizers()

    trainer = fitted_trainer(tmp_path, Estimate, max_steps=300, max_epochs=1)
    assert trainer.lightning_module.estimated == trainer.global_step == 100
    assert trainer.max_steps == 300  # the user's Trainer, as given


def test_max_steps_ends_inside_a_batch_and_an_epoch_as_in_lightning(tmp_path):
    class Validations(Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.steps.append(trainer.global_step)

    validations = Validations()
    trainer = fitted_trainer(tmp_path, max_steps=137, callbacks=[validations])
    assert trainer.global_step == 137
    # Lightning validates at epoch ends: 100, not 137, where max_steps cut the second epoch short (the final
    # evaluation is logged there, without a validation loop).
    assert validations.steps == [100]
    assert scalar_steps(tmp_path / "lightning_logs" / "version_0", "val/expected_loss") == [100, 137]


def test_train_loss_is_in_callback_metrics_at_every_batch_end(tmp_path):
    ends = BatchEnds()
    fitted_trainer(tmp_path, max_steps=200, callbacks=[ends])
    assert [step for step, _, _ in ends.seen] == list(range(50, 201, 50))
    assert all(metric == last for _, metric, last in ends.seen)


def test_early_stopping_on_train_loss_without_a_progress_bar(tmp_path):
    stop = EarlyStopping(monitor="train/loss", patience=0, min_delta=1e9, check_on_train_epoch_end=True)
    trainer = fitted_trainer(tmp_path, max_steps=1000, callbacks=[stop])
    assert trainer.global_step == 200  # no epoch improves by 1e9: the second epoch's end stops


def test_a_second_fit_continues_the_draws(tmp_path):
    class Plain(DynamicNet):  # momentum 0: nothing but the parameters and the draws carries over between fits
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-8)

    def data() -> SineData:
        return SineData(steps_per_epoch=100, steps_per_batch=50)

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
    trainer = fitted_trainer(tmp_path, fast_dev_run=5, callbacks=[events])
    assert trainer.global_step == 5
    assert events.events == [("validation", 5), ("epoch end", 5)]


def test_dynnets_progress_display_keeps_batches_of_many_steps(tmp_path):
    trainer = fitted_trainer(tmp_path, max_steps=150, callbacks=[StepProgressBar()], enable_progress_bar=True)
    assert trainer.datamodule.grid == (50,)


# ------------------------------------------------------------------------------------------------ schedules


def test_step_checkpoints_hold_the_state_after_the_step_without_a_warning_to_the_contrary(tmp_path, recwarn):
    every_50 = ModelCheckpoint(every_n_train_steps=50, save_top_k=-1, filename="{step}")
    fitted_trainer(tmp_path, max_steps=100, callbacks=[every_50])
    saved = load_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "step=50.ckpt")
    assert saved["global_step"] == 50 and sum(saved["degree_counts"]) == 50  # after step 50's update
    assert not [w for w in recwarn if "pre-optimization state" in str(w.message)]


def test_a_scheduler_dicts_monitor_is_the_one_reduce_on_plateau_steps_on(tmp_path, recwarn):
    trainer = fitted_trainer(tmp_path, lambda: Plateau(eps=1e-16, monitor="val/optimality_gap"), max_steps=300)
    assert trainer.lr_scheduler_configs[0].scheduler.monitor == "val/optimality_gap"
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-10)
    assert not [w for w in recwarn if "lr_scheduler.step()` manually" in str(w.message)]  # dynnet steps it


# ------------------------------------------------------------------------------------------------ refusals


def test_the_trainers_gradient_clipping_is_refused_for_the_modules_in_one_line(tmp_path):
    # The command takes --trainer.gradient_clip_val and gives it to the module (test_parity's clipping cases).
    with pytest.raises(ValueError) as refusal:
        fitted_trainer(tmp_path, gradient_clip_val=0.5)
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("events.*")), "a refusal writes nothing"
    message = str(refusal.value)
    assert "DynamicNet(gradient_clip_val=..., gradient_clip_algorithm=...)" in message and "\n" not in message


def test_two_optimizers_are_refused(tmp_path):
    class Two(DynamicNet):
        def configure_optimizers(self):
            parameters = list(self.parameters())
            return [torch.optim.SGD(parameters[:2], lr=1e-8), torch.optim.SGD(parameters[2:], lr=1e-8)]

    with pytest.raises(ValueError, match=r"^configure_optimizers gave 2 optimizers; DynamicNet trains"):
        fitted_trainer(tmp_path, Two, max_steps=10)


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
    trainer = fitted_trainer(tmp_path, max_steps=100)
    return tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=100.ckpt", trainer.lightning_module


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
    resumed = fitted_trainer(tmp_path / "resumed", max_steps=200, ckpt_path=path).lightning_module
    straight = fitted_trainer(tmp_path / "straight", max_steps=200).lightning_module
    assert torch.equal(resumed.model.flat(), straight.model.flat())
