"""What TensorBoardExtras writes into a run's event file: fit images, HPARAMS, the custom-scalars layout, the Result."""

import io
import math
import re
import signal
import zipfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import tensorboard
from conftest import RESULT, ROOT, TINY, run_dir
from lightning.pytorch import Callback
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as layout_metadata
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

from dynnet.cli.command import DynnetCLI
from dynnet.signals import Stopped
from dynnet.tensorboard.extras import LINKED_METRICS, LOG10_LOSS
from dynnet.tensorboard.fit_picture import WIDTH, FitPicture, round_scale
from dynnet.tensorboard.hparams import experiment_summary, session_start_summary

WITH_DEFAULT = ["-c", str(ROOT / "configs" / "default.yaml")]
COEFFICIENTS = [f"weights/{name}" for name in "abcde"]


def events(root) -> EventAccumulator:
    """Everything the run under root logged, images and tensors included."""
    return EventAccumulator(str(run_dir(root)), size_guidance={"images": 0, "tensors": 0}).Reload()


def image_steps(run: EventAccumulator) -> list[int]:
    return [image.step for image in run.Images("val/fit")]


def hparams(run: EventAccumulator) -> dict:
    """The HPARAMS entry's settings as Python values: text as str, numbers as float, booleans as bool."""
    content = run.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
    start = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}


def experiment(run: EventAccumulator) -> api_pb2.Experiment:
    content = run.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.EXPERIMENT_TAG]
    return hparams_metadata.parse_experiment_plugin_data(content)


def marked(run: EventAccumulator) -> set[str]:
    """The settings marked as differing: those TensorBoard lists first and ticks."""
    return {info.name for info in experiment(run).hparam_infos if info.differs}


def test_a_fit_writes_images_hparams_layout_and_result(fit_output, tmp_path):
    fit_output(*WITH_DEFAULT, *TINY)  # validated at steps 100 and 200, its last step
    run = events(tmp_path)

    # One picture per validation, none for the sanity check at step 0, none more at the validated last step.
    assert image_steps(run) == [100, 200]
    for image in run.Images("val/fit"):
        png = Image.open(io.BytesIO(image.encoded_image_string))
        assert png.size == (image.width, image.height) == (WIDTH, 480)
    # Beside each picture, the expected loss's log10, at the steps and from the values the module logged.
    losses = {s.step: s.value for s in run.Scalars("val/expected_loss")}
    logs = {s.step: s.value for s in run.Scalars(LOG10_LOSS)}
    assert sorted(logs) == sorted(losses) == [100, 200]
    assert all(logs[step] == pytest.approx(math.log10(losses[step]), rel=1e-6) for step in logs)

    settings = hparams(run)
    assert not [name for name in settings if name.startswith("_") or "._" in name]
    # Whole numbers are numbers, TensorBoard's one numeric type, so that runs sort and filter by them.
    ints = {
        "seed_everything": 3,
        "trainer.max_steps": 200,
        "model.min_degree": 3,
        "model.max_degree": 5,
        "data.n_points": 2000,
        "data.steps_per_epoch": 100,
        "data.steps_per_batch": 50,
    }
    assert {name: settings.get(name) for name in ints} == ints
    types = {info.name: info.type for info in experiment(run).hparam_infos}
    assert {types[name] for name in ints} == {api_pb2.DATA_TYPE_FLOAT64}
    assert types.keys() == settings.keys()
    assert settings["data.low"] == pytest.approx(-np.pi) and settings["data.high"] == pytest.approx(np.pi)
    assert settings["trainer.precision"] == "32-true"
    assert (settings["optimizer"], settings["optimizer.lr"], settings["optimizer.momentum"]) == ("SGD", 1e-8, 0.9)
    # Flags left at their defaults are not settings anyone chose; the optimizer's numbers all are.
    for flag in ("nesterov", "maximize", "foreach", "differentiable", "fused"):
        assert f"optimizer.{flag}" not in settings
    assert (settings["optimizer.dampening"], settings["optimizer.weight_decay"]) == (0, 0)
    assert "model.gradient_clip_val" not in settings and "model.gradient_clip_algorithm" not in settings
    assert settings["lr_scheduler"] == "none" and "lr_interval" not in settings
    assert marked(run) == {"optimizer", "optimizer.lr", "optimizer.momentum", "seed_everything", "trainer.max_steps"}
    # Linked by tag to the run's own validation scalars, so the HPARAMS tab shows their last values.
    assert [info.name.tag for info in experiment(run).metric_infos] == list(LINKED_METRICS)
    assert [s.step for s in run.Scalars("val/expected_loss")][-1] == 200
    assert hparams_metadata.SESSION_END_INFO_TAG in run.PluginTagToContent(hparams_metadata.PLUGIN_NAME)

    layout = layout_pb2.Layout.FromString(run.Tensors(layout_metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    scalars = run.Tags()["scalars"]
    shown = {
        (category.title, chart.title): sorted({tag for regex in chart.multiline.tag for tag in scalars
                                               if re.match(regex, tag)})
        for category in layout.category for chart in category.chart
    }  # fmt: skip
    logs = "loss and gap, on log scales"
    assert shown == {
        (logs, f"{LOG10_LOSS} (the expected loss, log10)"): [LOG10_LOSS],
        (logs, "val/log10_gap (the optimality gap, log10)"): ["val/log10_gap"],
        # One chart each: TensorBoard draws every line of a run in one colour.
        **{("coefficients", f"{tag} (x^{power})"): [tag] for power, tag in enumerate(COEFFICIENTS[:4])},
        ("coefficients", "weights/e (x^4, x^5)"): ["weights/e"],
    }

    text = run.Tensors("result/text_summary")[-1]
    assert text.step == 200
    assert RESULT.match(text.tensor_proto.string_val[0].decode())


def test_last_step_gets_a_picture_when_no_validation_ran_there(fit_output, tmp_path):
    # Validation every second epoch: at step 200; the run ends at 300, the end of the third epoch.
    fit_output(*WITH_DEFAULT, *TINY, "--trainer.max_steps", "300", "--trainer.check_val_every_n_epoch", "2")
    run = events(tmp_path)
    assert image_steps(run) == [200, 300]


def test_scheduler_and_optimizer_arguments_are_in_hparams(fit_output, tmp_path):
    fit_output(*WITH_DEFAULT, *TINY, "--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.1", "--optimizer.amsgrad",
        "true", "--lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR", "--lr_scheduler.T_max", "3000",
        "--lr_interval", "epoch")  # fmt: skip
    run = events(tmp_path)
    settings = hparams(run)
    assert (settings["optimizer"], settings["optimizer.lr"]) == ("Adam", 0.1)
    assert settings["optimizer.betas"] == "(0.9, 0.999)"  # numbers, so listed though they are Adam's defaults
    assert settings["optimizer.amsgrad"] is True  # a flag set away from its default
    assert "optimizer.maximize" not in settings
    assert (settings["lr_scheduler"], settings["lr_scheduler.T_max"]) == ("CosineAnnealingLR", 3000)
    assert settings["lr_scheduler.eta_min"] == 0.0
    assert settings["lr_interval"] == "epoch"
    # Adam has no momentum: the fifth column TensorBoard ticks is the next setting people tune.
    assert marked(run) == {"optimizer", "optimizer.lr", "seed_everything", "trainer.max_steps", "model.min_degree"}
    types = {info.name: info.type for info in experiment(run).hparam_infos}
    assert types["optimizer.amsgrad"] == api_pb2.DATA_TYPE_BOOL and types["optimizer"] == api_pb2.DATA_TYPE_STRING


def test_a_plateau_schedule_is_listed_with_its_arguments(fit_output, tmp_path):
    # LightningCLI's ReduceLROnPlateau takes torch's arguments as **kwargs.
    fit_output(*WITH_DEFAULT, *TINY, "--lr_scheduler", "ReduceLROnPlateau", "--lr_scheduler.monitor",
        "val/expected_loss", "--lr_scheduler.eps", "1e-16")  # fmt: skip
    settings = hparams(events(tmp_path))
    assert (settings["lr_scheduler"], settings["lr_interval"]) == ("ReduceLROnPlateau", "validation")
    assert settings["lr_scheduler.monitor"] == "val/expected_loss"
    assert (settings["lr_scheduler.factor"], settings["lr_scheduler.patience"]) == (0.1, 10)
    assert settings["lr_scheduler.eps"] == 1e-16
    assert "lr_scheduler.mode" not in settings  # a choice left at its default


def test_an_experiment_summary_spans_the_values_of_several_runs():
    # What a sweep's root would write: the columns for all trials, the swept settings marked.
    columns = {"optimizer": ["SGD", "Adam", "SGD"], "optimizer.lr": [1e-8, 0.1, 2e-8], "seed_everything": [0, 9, 4],
               "nesterov": [True, False, True], "data.seed": None}  # fmt: skip
    summary = experiment_summary(columns, ["optimizer", "optimizer.lr"], ["val/optimality_gap"])
    value = summary.value[0]
    assert value.tag == hparams_metadata.EXPERIMENT_TAG
    infos = {i.name: i for i in hparams_metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
             .hparam_infos}  # fmt: skip
    assert (infos["optimizer"].type, list(infos["optimizer"].domain_discrete)) == (
        api_pb2.DATA_TYPE_STRING,
        ["Adam", "SGD"],
    )
    lr = infos["optimizer.lr"].domain_interval
    assert infos["optimizer.lr"].type == api_pb2.DATA_TYPE_FLOAT64 and (lr.min_value, lr.max_value) == (1e-8, 0.1)
    seeds = infos["seed_everything"].domain_interval
    assert (seeds.min_value, seeds.max_value) == (0, 9)
    assert list(infos["nesterov"].domain_discrete) == [False, True]
    # Values too many to list: text, with no domain (TensorBoard offers no filter for it).
    assert infos["data.seed"].type == api_pb2.DATA_TYPE_STRING and infos["data.seed"].WhichOneof("domain") is None
    assert {name for name, info in infos.items() if info.differs} == {"optimizer", "optimizer.lr"}
    start = session_start_summary({"optimizer": "SGD", "seed_everything": 4, "nesterov": True}).value[0]
    values = hparams_metadata.parse_session_start_info_plugin_data(start.metadata.plugin_data.content).hparams
    assert (values["optimizer"].string_value, values["seed_everything"].number_value) == ("SGD", 4)
    assert values["nesterov"].bool_value is True


def test_the_picture_is_as_wide_as_the_images_tab_shows_it():
    # The installed TensorBoard's Images tab draws each picture in a card of fixed width, scaled pixel by pixel:
    # a picture of exactly that width is shown as it is.
    with zipfile.ZipFile(Path(tensorboard.__file__).parent / "webfiles.zip") as web:
        script = web.read("index.js").decode()
    card = re.search(
        r":host \{\s*display: block;\s*width: (\d+)px;[^}]*\}\s*/\*\* When actual size shown is on", script
    )
    assert card, "the Images tab's card style was not found"
    assert int(card.group(1)) == WIDTH


class StopAt(Callback):
    """Stops training at ``step`` as SIGTERM does: the module raises Stopped once the batch is done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            pl_module.stop_signal = signal.SIGTERM


def test_interrupted_fit_gets_a_picture_at_the_step_it_stopped(tmp_path):
    args = ["fit", *WITH_DEFAULT, *TINY, "--trainer.default_root_dir", str(tmp_path)]
    with ExitStack() as cleanup, pytest.raises(Stopped):
        DynnetCLI(args=args, cleanup=cleanup, callbacks=[StopAt(150)])
    assert image_steps(events(tmp_path)) == [100, 150]


def test_other_loggers_get_nothing(fit_output, tmp_path):
    fit_output(*WITH_DEFAULT, *TINY, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(tmp_path / "csv"))  # fmt: skip
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert list((tmp_path / "csv").rglob("metrics.csv"))


def test_scaled_panels_follow_the_size_of_their_curves():
    # Three degrees that differ by a thousandth draw the same curves, in the lower panels, as three that differ by
    # one: only the tick labels change.
    x = np.linspace(-np.pi, np.pi, 200)
    y = np.sin(x)
    shape = {3: np.zeros_like(x), 4: 0.9 * x / np.pi, 5: -0.9 * (x / np.pi) ** 2}  # clear of a scale's edge
    picture = FitPicture(x, y, list(shape))
    large = picture.draw({k: y + d for k, d in shape.items()})
    small = picture.draw({k: y + d / 1000 for k, d in shape.items()})
    height = large.shape[0]
    for panel in (picture.residual, picture.spread):
        box = panel.axes.get_window_extent()
        rows, columns = slice(int(height - box.y1) + 1, int(height - box.y0) - 1), slice(int(box.x0) + 1, int(box.x1))
        assert (large[rows, columns] == small[rows, columns]).all()
        assert (large[rows, columns] != 255).any()  # curves were drawn there
    labels = slice(0, int(picture.spread.axes.get_window_extent().x0))
    assert (large[:, labels] != small[:, labels]).any()
    # Each degree has its own colour and its own line style.
    styles = [(line.get_color(), line.get_linestyle()) for line in picture.spread.lines.values()]
    assert len({color for color, _ in styles}) == len({style for _, style in styles}) == 3


@pytest.mark.parametrize(
    "peak, scale", [(0.3, 0.5), (0.1, 0.1), (0.11, 0.2), (1.5, 2.0), (420.0, 500.0), (2.4e-5, 5e-5), (0.0, 1.0)]
)
def test_round_scale_rounds_a_peak_up_to_one_two_or_five(peak, scale):
    assert round_scale(peak) == pytest.approx(scale)
    assert round_scale(float("nan")) == 1.0
