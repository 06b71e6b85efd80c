"""What a TensorBoard run shows besides the scalars the module logs: the run's settings under HPARAMS, linked to
the final validation metrics; a CUSTOM SCALARS layout; a picture of the fit at every validation and at the last
step; and the Result line at the end."""

import inspect
import io
import math
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from dynnet.errors import Interrupted
from dynnet.module import is_plain

# The metrics the HPARAMS tab shows beside the settings: TensorBoard reads their last logged values from the
# run's own scalars, so they are final once the run has ended.
LINKED_METRICS = ("val/expected_loss", "val/optimality_gap")

# Tags are regular expressions in a layout: anchored, so that each names exactly the scalars meant.
LAYOUT = {
    "loss": {"train/loss and val/expected_loss": ["Multiline", ["^train/loss$", "^val/expected_loss$"]]},
    "optimality gap": {
        "val/optimality_gap": ["Multiline", ["^val/optimality_gap$"]],
        "val/log10_gap (the gap on a log scale)": ["Multiline", ["^val/log10_gap$"]],
    },
    "coefficients": {"coef/*": ["Multiline", ["^coef/"]]},
}

# Points per curve: at 640 pixels wide, 200 draw the same smooth curves as 2000, and faster.
POINTS = 200
# 640 x 480 pixels, where matplotlib's default font sizes read well.
FIGSIZE, DPI = (8, 6), 80
STYLES = ("-", "--", ":", "-.")
# A scheduler's arguments that are not settings: the optimizer it drives, the step it resumes from, printing.
NOT_SCHEDULER_SETTINGS = ("optimizer", "last_epoch", "verbose")
# Where a ScaledPanel puts its ticks, as fractions of its current scale.
SCALED_TICKS = (-1.0, -0.5, 0.0, 0.5, 1.0)


class TensorBoardExtras(Callback):
    """Adds the HPARAMS entry, the custom-scalars layout, the fit image (``val/fit``) and the ``result`` text to
    every TensorBoardLogger of a fit. Rank zero only; other loggers are left alone.

    Lightning calls every callback's hooks at every optimizer step here, so this one only acts in hooks that run
    once per fit or once per validation.
    """

    def __init__(self) -> None:
        self.picture: FitPicture | None = None
        self.drawn_at: int | None = None  # the step of the latest fit image, or the step training started at
        self.session_end: Summary | None = None  # the HPARAMS entry's "finished" mark, written when the fit ends

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before Lightning logs hyper-parameters itself (after this hook, unless enable_autolog_hparams=False):
        # TensorBoard keeps the first HPARAMS entry of a run and ignores later ones.
        self.picture, self.drawn_at = None, None
        writers = _writers(trainer)
        if not writers:
            return
        # Only the metrics' names go in: TensorBoard reads their values from the run's scalars.
        summaries = hparams_summaries(run_hparams(trainer, pl_module), dict.fromkeys(LINKED_METRICS))
        experiment, session_start, self.session_end = summaries
        for writer in writers:
            writer.file_writer.add_summary(experiment, 0)
            writer.file_writer.add_summary(session_start, 0)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed run has its picture at this step already (or never had one): only later steps need drawing.
        self.drawn_at = trainer.global_step
        for writer in _writers(trainer):
            writer.add_custom_scalars(LAYOUT)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx=0
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._draw(trainer, pl_module, batch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last epoch may have had no validation (check_val_every_n_epoch), leaving the last step without one.
        self._draw_last_step(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # An interrupted run can be resumed from this step: show where it stands. Other errors leave no state
        # worth a picture (a diverged fit is not finite).
        if isinstance(exception, Interrupted):
            self._draw_last_step(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for writer in _writers(trainer):
            writer.file_writer.add_summary(self.session_end, trainer.global_step)
            writer.add_text("result", f"Result: {pl_module.model.formula()}", trainer.global_step)
        self.picture = None

    def _draw_last_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        started = self.drawn_at is not None  # an error before training has no new step to show
        if started and self.drawn_at != trainer.global_step and trainer.datamodule is not None:
            self._draw(trainer, pl_module, next(iter(trainer.datamodule.val_dataloader())))

    def _draw(self, trainer: Trainer, pl_module: LightningModule, batch: tuple[Tensor, Tensor]) -> None:
        """Log the fit on the points of ``batch`` as ``val/fit`` at the current step, once per step."""
        writers = _writers(trainer)
        if not writers or self.drawn_at == trainer.global_step:
            return
        x, y = batch
        # float64: float32 cannot count to n_points - 1 beyond 2**24 points, and would round past the end
        pick = torch.linspace(0, len(x) - 1, min(len(x), POINTS), dtype=torch.float64).round().long().to(x.device)
        x, y = x[pick], y[pick]
        with torch.no_grad():
            predictions = {k: _numpy(p) for k, p in pl_module.model.at_each_degree(x).items()}
        if self.picture is None:
            self.picture = FitPicture(_numpy(x), _numpy(y), list(predictions))
        summary = image_summary("val/fit", self.picture.draw(predictions))
        for writer in writers:
            writer.file_writer.add_summary(summary, trainer.global_step)
        self.drawn_at = trainer.global_step


class FitPicture:
    """The fit as an RGB image: sin(x) and each degree's fit; each fit minus sin(x); each fit minus the mean of
    the degrees' fits, which tells the degrees apart once their curves coincide. The two lower panels follow the
    size of their curves (see ScaledPanel).

    Everything but the curves is drawn once and kept as a background; each picture restores it and draws only the
    curves (blitting): a few milliseconds, where a full draw takes over a hundred.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, degrees: list[int]) -> None:
        self.y = y
        self.figure = Figure(figsize=FIGSIZE, dpi=DPI)
        canvas = FigureCanvasAgg(self.figure)
        fit, residual, spread = self.figure.subplots(3, 1, sharex=True, height_ratios=[2, 1.2, 1.2])
        rows = math.ceil((len(degrees) + 1) / 6)  # of the legend, above the panels
        self.figure.subplots_adjust(left=0.14, right=0.98, bottom=0.08, top=1 - 0.06 * rows, hspace=0.15)
        target = fit.plot(x, y, color="0.6", lw=5)[0]  # wide and grey, so that the fits show on top of it
        self.lines = {degree: fit.plot(x, y, **_style(i))[0] for i, degree in enumerate(degrees)}
        labels = ["sin(x)", *(f"degree {degree}" for degree in degrees)]
        self.figure.legend(
            [target, *self.lines.values()], labels, loc="upper center", ncols=min(len(labels), 6), fontsize=12,
            frameon=False,
        )  # fmt: skip
        fit.set(xlim=(float(x[0]), float(x[-1])), ylim=(-1.5, 1.5), ylabel="y")
        self.residual = ScaledPanel(residual, x, degrees, "fit − sin(x)")
        self.spread = ScaledPanel(spread, x, degrees, "fit − mean fit")
        spread.set_xlabel("x")
        for axes in (fit, residual, spread):  # in line, and clear of the scaled panels' widest tick labels
            axes.yaxis.set_label_coords(-0.115, 0.5)
        canvas.draw()
        self.background = canvas.copy_from_bbox(self.figure.bbox)

    def draw(self, predictions: dict[int, np.ndarray]) -> np.ndarray:
        """The picture for ``predictions`` (degree -> values at x) as a height x width x 3 uint8 array."""
        canvas = self.figure.canvas
        canvas.restore_region(self.background)
        for degree, line in self.lines.items():
            line.set_ydata(predictions[degree])
            line.axes.draw_artist(line)
        mean = np.mean(list(predictions.values()), axis=0)
        self.residual.draw({degree: p - self.y for degree, p in predictions.items()})
        self.spread.draw({degree: p - mean for degree, p in predictions.items()})
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # the buffer is reused by the next picture


class ScaledPanel:
    """A panel of one curve per degree whose scale follows the curves' size: from hundreds early in training to
    thousandths at its end.

    Its limits never change, so the figure's background stays valid: it draws the curves divided by a round scale
    and labels its ticks in that scale. The labels are drawn once per scale and kept as pixels, since text is the
    slowest thing to draw.
    """

    def __init__(self, axes: Axes, x: np.ndarray, degrees: list[int], ylabel: str) -> None:
        self.axes = axes
        self.lines = {degree: axes.plot(x, np.zeros_like(x), **_style(i))[0] for i, degree in enumerate(degrees)}
        axes.set(ylim=(-1.1, 1.1), yticks=SCALED_TICKS, ylabel=ylabel)
        axes.tick_params(axis="y", labelleft=False)  # drawn by _draw_tick_labels, for the current scale
        axes.axhline(0, color="k", lw=0.5)
        self.tick_labels = [
            axes.text(-0.01, tick, "", transform=axes.get_yaxis_transform(), ha="right", va="center", animated=True)
            for tick in SCALED_TICKS
        ]
        self.tick_pixels: dict[float, Any] = {}  # scale -> its tick labels, drawn

    def draw(self, curves: dict[int, np.ndarray]) -> None:
        scale = round_scale(max(float(np.abs(c).max()) for c in curves.values()))
        self._draw_tick_labels(scale)
        for degree, line in self.lines.items():
            line.set_ydata(curves[degree] / scale)
            self.axes.draw_artist(line)

    def _draw_tick_labels(self, scale: float) -> None:
        canvas = self.axes.figure.canvas
        if scale in self.tick_pixels:
            canvas.restore_region(self.tick_pixels[scale])
            return
        for label, tick in zip(self.tick_labels, SCALED_TICKS):
            label.set_text(_tick_label(tick * scale))
            self.axes.draw_artist(label)
        # Left of the panel, from a little below its bottom tick to a little above its top one.
        panel = self.axes.get_window_extent()
        area = Bbox.from_extents(0, panel.y0 - DPI / 8, panel.x0, panel.y1 + DPI / 8)
        self.tick_pixels[scale] = canvas.copy_from_bbox(area)


def _style(i: int) -> dict[str, Any]:
    """The i-th degree's line: its own colour and line style, so that curves on top of each other still show."""
    return {"color": f"C{i % 10}", "ls": STYLES[i % len(STYLES)], "lw": 1.8, "animated": True}


def _tick_label(value: float) -> str:
    """As matplotlib labels ticks: the shortest form, and a minus sign rather than a hyphen."""
    return f"\N{MINUS SIGN}{-value:g}" if value < 0 else f"{value:g}"


def round_scale(peak: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``peak``: a limit whose tick labels read well."""
    if not (math.isfinite(peak) and peak > 0):
        return 1.0
    power = 10.0 ** math.floor(math.log10(peak))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= peak)


def image_summary(tag: str, image: np.ndarray) -> Summary:
    """``image`` (height x width x 3, uint8) as the summary ``SummaryWriter.add_image`` writes, but a PNG of 64
    colours: the picture has a few flat colours and their anti-aliasing, so it looks the same, while the file is a
    quarter the size and encoding it, and checksumming it on the way to the event file, take a third of the time."""
    png = io.BytesIO()
    Image.fromarray(image).quantize(64, method=Image.Quantize.FASTOCTREE).save(png, format="PNG")
    height, width, channels = image.shape
    encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=encoded)])


def run_hparams(trainer: Trainer, pl_module: LightningModule) -> dict[str, float | str]:
    """What the run trains with, under the names of the dynnet options that set it.

    TensorBoard stores every number as a float and shows it with five significant digits (2000 as "2000.0",
    3 as "3.0000"); only text shows as written. Floats stay numbers, so runs can be sorted and filtered by them
    (the learning rate); integers and everything else are given as text.
    """
    settings: dict[str, Any] = {
        "seed_everything": pl_module.seed,
        "trainer.max_steps": trainer.max_steps,
        "trainer.precision": trainer.precision,
    }
    # Keys starting with "_" are LightningCLI's bookkeeping (_instantiator, _class_path), not settings.
    settings |= {f"model.{k}": v for k, v in pl_module.hparams.items() if not k.startswith("_")}
    if trainer.datamodule is not None:
        settings |= {f"data.{k}": v for k, v in trainer.datamodule.hparams.items() if not k.startswith("_")}
    optimizer = trainer.optimizers[0]
    settings["optimizer"] = type(optimizer).__name__
    settings |= {f"optimizer.{k}": v for k, v in optimizer.defaults.items()}
    settings |= _scheduler_settings(trainer)
    return {k: _shown(v) for k, v in settings.items() if is_plain(v)}


def _scheduler_settings(trainer: Trainer) -> dict[str, Any]:
    if not trainer.lr_scheduler_configs:
        return {"lr_scheduler": "none", "lr_interval": "none"}
    config = trainer.lr_scheduler_configs[0]
    scheduler = config.scheduler
    # A scheduler keeps most of its arguments as attributes of the same name; the others are left out.
    names = [n for n in inspect.signature(type(scheduler)).parameters if n not in NOT_SCHEDULER_SETTINGS]
    settings = {f"lr_scheduler.{n}": getattr(scheduler, n) for n in names if hasattr(scheduler, n)}
    # dynnet steps ReduceLROnPlateau after every validation, whatever its configured interval.
    interval = "validation" if config.reduce_on_plateau else config.interval
    return {"lr_scheduler": type(scheduler).__name__, **settings, "lr_interval": interval}


def _shown(value: Any) -> float | str:
    if isinstance(value, float) and math.isfinite(value):
        return value
    return str(value)  # text for TensorBoard; also a non-finite float, which its JSON cannot carry


def _numpy(values: Tensor) -> np.ndarray:
    return values.detach().float().cpu().numpy()


def _writers(trainer: Trainer) -> list[SummaryWriter]:
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
