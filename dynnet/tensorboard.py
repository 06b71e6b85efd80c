"""What a TensorBoard run shows besides the scalars the module logs: the fit as a picture at every
validation, and at the end the hyper-parameters linked to the final expected loss and the Result line."""

import matplotlib

matplotlib.use("Agg")  # no display: render to memory

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402


class TensorBoardExtras(Callback):
    """Adds the fit image (``val/fit``), the hyper-parameters with ``hp/expected_loss`` and the ``result``
    text to every TensorBoardLogger of the run. Rank zero only; other loggers are left alone."""

    def __init__(self) -> None:
        self.figure = None

    def _writers(self, trainer: Trainer) -> list:
        if not trainer.is_global_zero:
            return []
        return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def on_validation_batch_end(self, trainer, pl_module: LightningModule, outputs, batch, batch_idx, dataloader_idx=0):
        writers = self._writers(trainer)
        if not writers or trainer.sanity_checking:
            return
        x, y = batch
        every = max(1, len(x) // 200)  # 200 points draw the same picture as 2000 at this size
        x, y = x[::every].float().cpu(), y[::every].float().cpu()
        model = pl_module.model
        with torch.no_grad():
            predictions = {k: p.float().cpu() for k, p in model.at_each_degree(x.to(model.shared)).items()}
        image = self._draw(x, y, predictions)
        for writer in writers:
            writer.add_image("val/fit", image, trainer.global_step, dataformats="HWC")

    def _draw(self, x, y, predictions: dict) -> np.ndarray:
        """The fit as an RGB array: sin(x) and each degree's prediction above, their residuals below."""
        if self.figure is None:
            # Axes, ticks and legend never change: drawn once and kept as a background, so each call only draws
            # the curves onto it (fixed limits keep the background valid; far-off early curves are clipped).
            self.figure, (top, bottom) = plt.subplots(2, 1, figsize=(5, 4), dpi=72, sharex=True, height_ratios=[2, 1])
            top.plot(x, y, "k", lw=2, label="sin(x)")
            self.lines = {
                k: (
                    top.plot(x, y, lw=1, label=f"degree {k}", animated=True)[0],
                    bottom.plot(x, y, lw=1, animated=True)[0],
                )
                for k in predictions
            }
            top.set(xlim=(float(x.min()), float(x.max())), ylim=(-1.5, 1.5), title="sin(x) and the fit at each degree")
            top.legend(loc="upper left", fontsize="small")
            bottom.set(ylim=(-0.5, 0.5), ylabel="residual", xlabel="x")
            bottom.axhline(0, color="k", lw=0.5)
            self.figure.canvas.draw()
            self.background = self.figure.canvas.copy_from_bbox(self.figure.bbox)
        canvas = self.figure.canvas
        canvas.restore_region(self.background)
        for k, (line, residual) in self.lines.items():
            line.set_data(x, predictions[k])
            residual.set_data(x, predictions[k] - y)
            line.axes.draw_artist(line)
            residual.axes.draw_artist(residual)
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writers = self._writers(trainer)
        if not writers:
            return
        final = trainer.callback_metrics.get("val/expected_loss")
        hparams = dict(pl_module.hparams_initial)
        if trainer.datamodule is not None:
            hparams |= dict(trainer.datamodule.hparams_initial)
        optimizer = trainer.optimizers[0]
        hparams |= {
            "optimizer": type(optimizer).__name__,
            "lr": optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]),
        }
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and final is not None:
                logger.log_hyperparams(hparams, {"hp/expected_loss": float(final)}, step=trainer.global_step)
        for writer in writers:
            writer.add_text("result", f"Result: {pl_module.model.formula()}", trainer.global_step)
            writer.flush()
        if self.figure is not None:
            plt.close(self.figure)
            self.figure = None
