"""What TensorBoardExtras writes into a run's event file: fit images, HPARAMS, the custom-scalars layout, the Result."""

import io
import re
import signal
from contextlib import ExitStack

import numpy as np
import pytest
from conftest import RESULT, ROOT, TINY, run_dir
from lightning.pytorch import Callback
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as layout_metadata
from tensorboard.plugins.hparams import metadata as hparams_metadata

from dynnet.cli import DynnetCLI
from dynnet.errors import Interrupted
from dynnet.tensorboard import LINKED_METRICS, FitPicture, round_scale

DEFAULT = ["-c", str(ROOT / "configs" / "default.yaml")]
COEFFICIENTS = [f"coef/{name}" for name in "abcde"]


def events(root) -> EventAccumulator:
    """Everything the run under root logged, images and tensors included."""
    return EventAccumulator(str(run_dir(root)), size_guidance={"images": 0, "tensors": 0}).Reload()


def image_steps(run: EventAccumulator) -> list[int]:
    return [image.step for image in run.Images("val/fit")]


def hparams(run: EventAccumulator) -> dict:
    """The HPARAMS entry's settings as Python values: text as str, numbers as float."""
    content = run.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
    start = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}


def linked_metrics(run: EventAccumulator) -> list[str]:
    content = run.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.EXPERIMENT_TAG]
    return [info.name.tag for info in hparams_metadata.parse_experiment_plugin_data(content).metric_infos]


def test_a_fit_writes_images_hparams_layout_and_result(fit, tmp_path):
    fit(*DEFAULT, *TINY)  # validated at steps 100 and 200, its last step
    run = events(tmp_path)

    # One picture per validation, none for the sanity check at step 0, none more at the validated last step.
    assert image_steps(run) == [100, 200]
    for image in run.Images("val/fit"):
        png = Image.open(io.BytesIO(image.encoded_image_string))
        assert png.size == (image.width, image.height)
        assert png.size[0] >= 640

    settings = hparams(run)
    assert not [name for name in settings if name.startswith("_") or "._" in name]
    # Whole numbers are text, which TensorBoard shows as written; it shows a float number as 2000.0.
    ints = {
        "seed_everything": "3",
        "trainer.max_steps": "200",
        "model.min_degree": "3",
        "model.max_degree": "5",
        "data.n_points": "2000",
        "data.steps_per_epoch": "100",
        "data.steps_per_batch": "50",
    }
    assert {name: settings.get(name) for name in ints} == ints
    assert settings["data.low"] == pytest.approx(-np.pi) and settings["data.high"] == pytest.approx(np.pi)
    assert settings["trainer.precision"] == "32-true"
    assert (settings["optimizer"], settings["optimizer.lr"], settings["optimizer.momentum"]) == ("SGD", 1e-8, 0.9)
    assert settings["optimizer.nesterov"] == "False"
    assert (settings["lr_scheduler"], settings["lr_interval"]) == ("none", "none")
    # Linked by tag to the run's own validation scalars, so the HPARAMS tab shows their last values.
    assert linked_metrics(run) == list(LINKED_METRICS)
    assert [s.step for s in run.Scalars("val/expected_loss")][-1] == 200
    assert hparams_metadata.SESSION_END_INFO_TAG in run.PluginTagToContent(hparams_metadata.PLUGIN_NAME)

    layout = layout_pb2.Layout.FromString(run.Tensors(layout_metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    scalars = run.Tags()["scalars"]
    shown = {
        category.title: sorted({tag for chart in category.chart for regex in chart.multiline.tag
                                for tag in scalars if re.match(regex, tag)})
        for category in layout.category
    }  # fmt: skip
    assert shown == {
        "loss": ["train/loss", "val/expected_loss"],
        "optimality gap": ["val/log10_gap", "val/optimality_gap"],
        "coefficients": COEFFICIENTS,
    }

    text = run.Tensors("result/text_summary")[-1]
    assert text.step == 200
    assert RESULT.match(text.tensor_proto.string_val[0].decode())


def test_last_step_gets_a_picture_when_no_validation_ran_there(fit, tmp_path):
    # Validation every second epoch: at step 200; the run ends at 300, the end of the third epoch.
    fit(*DEFAULT, *TINY, "--trainer.max_steps", "300", "--trainer.check_val_every_n_epoch", "2")
    run = events(tmp_path)
    assert image_steps(run) == [200, 300]


def test_scheduler_and_optimizer_arguments_are_in_hparams(fit, tmp_path):
    fit(*DEFAULT, *TINY, "--optimizer", "torch.optim.Adam", "--optimizer.lr", "0.1",
        "--lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR", "--lr_scheduler.T_max", "3000",
        "--lr_interval", "epoch")  # fmt: skip
    settings = hparams(events(tmp_path))
    assert (settings["optimizer"], settings["optimizer.lr"]) == ("Adam", 0.1)
    assert settings["optimizer.betas"] == "(0.9, 0.999)"
    assert (settings["lr_scheduler"], settings["lr_scheduler.T_max"]) == ("CosineAnnealingLR", "3000")
    assert settings["lr_scheduler.eta_min"] == 0.0  # a float argument stays a number
    assert settings["lr_interval"] == "epoch"


class StopAt(Callback):
    """Stops training at ``step`` as SIGTERM does: the module raises Interrupted once the batch is done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            pl_module.stop_signal = signal.SIGTERM


def test_interrupted_fit_gets_a_picture_at_the_step_it_stopped(tmp_path):
    args = ["fit", *DEFAULT, *TINY, "--trainer.default_root_dir", str(tmp_path)]
    with ExitStack() as cleanup, pytest.raises(Interrupted):
        DynnetCLI(args=args, cleanup=cleanup, callbacks=[StopAt(150)])
    assert image_steps(events(tmp_path)) == [100, 150]


def test_other_loggers_get_nothing(fit, tmp_path):
    fit(*DEFAULT, *TINY, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
        str(tmp_path / "csv"))  # fmt: skip
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
def test_round_scale(peak, scale):
    assert round_scale(peak) == pytest.approx(scale)
    assert round_scale(float("nan")) == 1.0
