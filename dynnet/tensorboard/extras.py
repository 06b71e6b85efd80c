"""What a TensorBoard run shows besides the scalars the module logs: the run's settings under HPARAMS, linked to
the final validation metrics; a CUSTOM SCALARS layout; a picture of the fit, and the expected loss on a log scale,
at every validation and at the last step; and the Result line at the end."""

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from dynnet.model import DynamicPolynomial
from dynnet.signals import stopped_fit
from dynnet.tensorboard.fit_picture import FitPicture
from dynnet.tensorboard.hparams import (
    experiment_summary,
    hparams_row,
    session_end_summary,
    session_start_summary,
    ticked,
)

# The metrics the HPARAMS tab shows beside the settings: TensorBoard reads their last logged values from the
# run's own scalars, so they are final once the run has ended.
LINKED_METRICS = ("val/expected_loss", "val/optimality_gap")
# The expected loss falls from thousands to its floor near 9: on a linear axis the last two thirds of a run look
# flat, and TensorBoard's layouts cannot ask for a log axis.
LOG10_LOSS = "val/log10_expected_loss"
# Points per curve: at 350 pixels wide, 200 draw the same smooth curves as 2000, and faster.
POINTS = 200


class TensorBoardExtras(Callback):
    """Adds the HPARAMS entry, the custom-scalars layout, the fit image (``val/fit``) and the expected loss's
    log10 (``val/log10_expected_loss``), and the ``result`` text to every TensorBoardLogger of a fit. Rank zero
    only; other loggers are left alone.

    Lightning calls every callback's hooks at every optimizer step here, so this one only acts in hooks that run
    once per fit or once per validation.
    """

    def __init__(self, row: Callable[[dict], dict] | None = None) -> None:
        """
        Args:
            row: Where one HPARAMS experiment (which settings and metrics are its columns) is written for many runs
                together (a sweep's root; TensorBoard shows only one): the run's values as its columns show them.
                The run then writes no experiment of its own.
        """
        self.row = row
        self.picture: FitPicture | None = None
        self.drawn_at: int | None = None  # the step of the latest fit image, or the step training started at

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Before Lightning logs hyper-parameters itself (after this hook, unless enable_autolog_hparams=False):
        # TensorBoard keeps the first HPARAMS entry of a run and ignores later ones.
        self.picture, self.drawn_at = None, None
        writers = _writers(trainer)
        if not writers:
            return
        settings = hparams_row(trainer, pl_module)
        columns = {name: [value] for name, value in settings.items()}
        # Only the metrics' names go in: TensorBoard reads their values from the run's scalars.
        experiment = experiment_summary(columns, ticked(settings), LINKED_METRICS)
        start = session_start_summary(settings if self.row is None else self.row(settings))
        for writer in writers:
            if self.row is None:
                writer.file_writer.add_summary(experiment, 0)
            writer.file_writer.add_summary(start, 0)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed run has its picture at this step already (or never had one): only later steps need drawing.
        self.drawn_at = trainer.global_step
        for writer in _writers(trainer):
            writer.add_custom_scalars(layout(pl_module.model))

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx=0
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._show(trainer, pl_module, batch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last epoch may have had no validation (check_val_every_n_epoch), leaving the last step without one.
        self._show_last_step(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # An interrupted run can be resumed from this step: show where it stands. Other errors leave no state
        # worth a picture (a diverged fit is not finite).
        if stopped_fit(exception):
            self._show_last_step(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        end = session_end_summary()
        for writer in _writers(trainer):
            writer.file_writer.add_summary(end, trainer.global_step)
            writer.add_text("result", f"Result: {pl_module.model.formula()}", trainer.global_step)
        self.picture = None

    def _show_last_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        started = self.drawn_at is not None  # an error before training has no new step to show
        if started and self.drawn_at != trainer.global_step and trainer.datamodule is not None:
            self._show(trainer, pl_module, next(iter(trainer.datamodule.val_dataloader())))

    def _show(self, trainer: Trainer, pl_module: LightningModule, batch: tuple[Tensor, Tensor]) -> None:
        """Log the fit on the points of ``batch`` as ``val/fit``, and the log10 of the expected loss there, at the
        current step, once per step."""
        writers = _writers(trainer)
        if not writers or self.drawn_at == trainer.global_step:
            return
        x, y = batch
        loss = float(pl_module.evaluate(x, y)["expected_loss"])
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
            if math.isfinite(loss) and loss > 0:
                writer.add_scalar(LOG10_LOSS, math.log10(loss), trainer.global_step)
        self.drawn_at = trainer.global_step


def layout(model: DynamicPolynomial) -> dict:
    """The CUSTOM SCALARS tab: the expected loss and the optimality gap on log scales, and one chart per
    coefficient (TensorBoard draws every line of a run in the run's colour, so coefficients sharing a chart could
    not be told apart). Tags are anchored regular expressions, each naming exactly one scalar."""
    powers = [f"x^{p}" for p in range(model.min_degree + 1)]
    # The last coefficient is shared by the powers above min_degree; there are none when max_degree is min_degree.
    powers.append(", ".join(f"x^{p}" for p in range(model.min_degree + 1, model.max_degree + 1)) or "unused")
    return {
        "loss and gap, on log scales": {
            f"{LOG10_LOSS} (the expected loss, log10)": ["Multiline", [f"^{LOG10_LOSS}$"]],
            "val/log10_gap (the optimality gap, log10)": ["Multiline", ["^val/log10_gap$"]],
        },
        "coefficients": {
            f"weights/{name} ({power})": ["Multiline", [f"^weights/{name}$"]]
            for name, power in zip(model.names(), powers)
        },
    }


def image_summary(tag: str, image: np.ndarray) -> Summary:
    """``image`` (height x width x 3, uint8) as the summary ``SummaryWriter.add_image`` writes, but a PNG of 64
    colours: the picture has a few flat colours and their anti-aliasing, so it looks the same, while the file is a
    quarter the size and encoding it, and checksumming it on the way to the event file, take a third of the time."""
    png = io.BytesIO()
    Image.fromarray(image).quantize(64, method=Image.Quantize.FASTOCTREE).save(png, format="PNG")
    height, width, channels = image.shape
    encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=encoded)])


def _numpy(values: Tensor) -> np.ndarray:
    return values.detach().float().cpu().numpy()


def _writers(trainer: Trainer) -> list[SummaryWriter]:
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
