"""The LightningModule that trains a DynamicPolynomial on the full batch, many optimizer steps per batch."""

import os
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from dynnet.checkpoint import load_checkpoint
from dynnet.model import DynamicPolynomial, design, expected_loss, optimum, polynomial


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or parameter."""


class DynamicNet(LightningModule):
    """Trains the random-depth polynomial with the sum-reduced squared error, as the tutorial does.

    Each train batch carries a number of optimizer steps (see ``dynnet.data.StepBatches``); this module runs
    them in a tight loop of its own, because Lightning's per-step machinery costs more than this model's
    whole step. Every step still counts in ``trainer.global_step``, so ``max_steps`` keeps its meaning;
    ``lr_scheduler:`` schedulers step once per optimizer step. Lightning's per-step hooks
    (``on_before_backward``, ``on_before_optimizer_step``, ...) are not called.
    """

    def __init__(self, min_degree: int = 3, max_degree: int = 5) -> None:
        """
        Args:
            min_degree: Lowest degree drawn; every power up to it has its own coefficient. The tutorial uses 3.
            max_degree: Highest degree drawn; the powers above min_degree share one coefficient. The tutorial
                uses 5.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = DynamicPolynomial(min_degree, max_degree)
        self.automatic_optimization = False
        # How often each degree has been drawn; saved in checkpoints with the generator.
        self.degree_counts = [0] * (max_degree - min_degree + 1)
        self.last_loss: Tensor | None = None

    def setup(self, stage: str) -> None:
        # torch.initial_seed() is the run's seed once seed_everything has run; broadcasting rank 0's makes every
        # process draw the same degree at every step even when the processes were seeded differently.
        self.model.rng.seed(self.trainer.strategy.broadcast(torch.initial_seed()))

    def on_train_start(self) -> None:
        if isinstance(self.trainer.model, DistributedDataParallel):
            # Gradients are summed across processes by _sum_gradients; DDP's own averaging would shrink the
            # update by the process count, and its unused-parameter check trips whenever degree 3 skips e.
            self.trainer.model.require_backward_grad_sync = False

    def training_step(self, batch: tuple[Tensor, Tensor, int], batch_idx: int) -> None:
        x, y, steps = batch
        step = self.global_step
        if self.trainer.max_steps >= 0:
            steps = min(steps, self.trainer.max_steps - step)
        optimizer = self.optimizers().optimizer
        schedulers = [c for c in self.trainer.lr_scheduler_configs if c.interval == "step"]
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        distributed = self.trainer.world_size > 1
        log_every = self.trainer.log_every_n_steps
        # Looked up once per batch: the loop below is the whole training cost and runs thousands of times.
        model = self.model
        coefficients, shared = list(model.coefficients), model.shared
        params = [*coefficients, shared]
        powers = model.powers(x)
        losses = []
        for _ in range(steps):
            degree = model.draw_degree()
            loss = F.mse_loss(polynomial(powers, degree, coefficients, shared), y, reduction="sum")
            optimizer.zero_grad()
            loss.backward()
            if distributed:
                _sum_gradients(params)
            optimizer.step()
            # What LightningOptimizer.step records, without its per-step hooks: global_step counts this step.
            progress.increment_ready()
            progress.increment_completed()
            step += 1
            for config in schedulers:
                if step % config.frequency == 0:
                    config.scheduler.step()
            self.degree_counts[degree - model.min_degree] += 1
            losses.append(loss.detach())
            if log_every and step % log_every == 0:
                self._log_train(loss.detach(), step)
        if losses:
            self._check_finite(torch.stack(losses), step)
            self.last_loss = losses[-1]

    def on_train_epoch_end(self) -> None:
        epoch = self.current_epoch + 1
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "epoch" and epoch % config.frequency == 0:
                if config.reduce_on_plateau:
                    config.scheduler.step(self.trainer.callback_metrics[config.monitor])
                else:
                    config.scheduler.step()

    def _log_train(self, loss: Tensor, step: int) -> None:
        if self.trainer.world_size > 1:
            loss = self.trainer.strategy.reduce(loss, reduce_op="sum")  # each process holds one slice's sum
        values = torch.cat([loss.reshape(1), self.model.flat().detach()]).tolist()
        metrics = {"train/loss": values[0]}
        metrics |= {f"coef/{name}": v for name, v in zip(self.model.names(), values[1:])}
        metrics["train/lr"] = self.optimizers().optimizer.param_groups[0]["lr"]
        total = sum(self.degree_counts)
        for degree, count in enumerate(self.degree_counts, self.model.min_degree):
            metrics[f"degree/{degree}"] = count / total
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def _check_finite(self, losses: Tensor, last_step: int) -> None:
        finite = torch.isfinite(losses)
        if bool(finite.all()) and bool(torch.isfinite(self.model.flat()).all()):
            return
        # All processes hold the same parameters, so they all stop here together.
        bad = int((~finite).nonzero()[0]) if not bool(finite.all()) else len(losses) - 1
        step = last_step - len(losses) + bad + 1
        lr = self.optimizers().optimizer.param_groups[0]["lr"]
        raise DivergenceError(
            f"training diverged at step {step}: the loss became {losses[bad].item()}; "
            f"try a smaller learning rate, e.g. --optimizer.lr {lr / 10:g}"
        )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._log_expected_loss(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._log_expected_loss(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        predictions = {f"degree_{k}": p for k, p in self.model.at_each_degree(x).items()}
        expected = torch.stack(list(predictions.values())).mean(0)
        return {"x": x, "target": y} | predictions | {"expected": expected}

    def _log_expected_loss(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        # float64 and every degree at once: deterministic, and exact enough to compare with the optimum.
        x, y = (t.double() for t in batch)
        matrices = design(x, self.model.min_degree, self.model.max_degree)
        loss = expected_loss(self.model.flat().double(), matrices, y)
        best = expected_loss(optimum(matrices, y), matrices, y)
        metrics = {f"{stage}/expected_loss": loss, f"{stage}/optimality_gap": loss / best - 1}
        # "step" sets the x-axis of these points to the optimizer step, as for train/loss.
        self.log_dict(metrics | {"step": float(self.global_step)}, sync_dist=True)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike, map_location: Any = None, **kwargs: Any):
        """Rebuild a trained module from a dynnet checkpoint, read weights-only.

        Unlike Lightning's version this never imports or calls anything the checkpoint names (its
        ``_instantiator`` hyper-parameter): the class is this one, built from the two degrees.
        """
        checkpoint = load_checkpoint(checkpoint_path, map_location or "cpu")
        degrees = {key: checkpoint["hyper_parameters"][key] for key in ("min_degree", "max_degree")}
        module = cls(**(degrees | kwargs))
        module.load_state_dict(checkpoint["state_dict"])
        module.on_load_checkpoint(checkpoint)
        return module

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["degree_generator"] = self.model.rng.getstate()
        checkpoint["degree_counts"] = list(self.degree_counts)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.model.rng.setstate(checkpoint["degree_generator"])
        self.degree_counts = list(checkpoint["degree_counts"])


def _sum_gradients(params: list[Tensor]) -> None:
    """Make every process's gradient the full-batch one: the loss is a sum over slices, so gradients add.

    A parameter the drawn degree leaves out (the shared one at the lowest degree) has no gradient on any
    process, since all draw the same degree, and keeps none, so the optimizer skips it as in one process.
    """
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.stack(grads)
    torch.distributed.all_reduce(flat)
    for grad, total in zip(grads, flat):
        grad.copy_(total)
