"""What a TensorBoard run shows besides the scalars the module logs: the fit as a picture at every
validation, and at the end the hyper-parameters linked to the final expected loss and the Result line."""

import matplotlib

matplotlib.use("Agg")  # no display: render to memory

import matplotlib.pyplot as plt  # noqa: E402
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
        with torch.no_grad():
            predictions = {
                k: pl_module.model(x, k) for k in range(pl_module.model.min_degree, pl_module.model.max_degree + 1)
            }
        figure = self._draw(x.cpu(), y.cpu(), {k: p.float().cpu() for k, p in predictions.items()}, trainer.global_step)
        for writer in writers:
            writer.add_figure("val/fit", figure, trainer.global_step, close=False)

    def _draw(self, x, y, predictions, step):
        # One small figure, redrawn in place: rendering is the only real cost here, about 20 ms.
        if self.figure is None:
            self.figure, (self.top, self.bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True, height_ratios=[2, 1])
        self.top.clear(), self.bottom.clear()
        self.top.plot(x, y, "k", lw=2, label="sin(x)")
        for degree, prediction in predictions.items():
            self.top.plot(x, prediction, lw=1, label=f"degree {degree}")
            self.bottom.plot(x, prediction - y, lw=1, label=f"degree {degree}")
        self.top.set_title(f"fit at step {step}")
        self.top.legend(loc="upper left", fontsize="small")
        self.bottom.axhline(0, color="k", lw=0.5)
        self.bottom.set_ylabel("residual")
        self.bottom.set_xlabel("x")
        return self.figure

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
