"""The LightningModule that trains a DynamicPolynomial on the full batch, many optimizer steps per batch."""

import math
import numbers
import os
import signal
import time
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from dynnet.checkpoint import load_checkpoint
from dynnet.errors import DivergenceError, Interrupted
from dynnet.model import DynamicPolynomial, ExpectedLoss, polynomial


class DynamicNet(LightningModule):
    """Trains the random-depth polynomial with the sum-reduced squared error, as the tutorial does.

    Each train batch carries a run of optimizer steps (see ``dynnet.data.TrainItems``). Every step goes through
    Lightning's manual-optimization API (``manual_backward`` and the LightningOptimizer's ``step`` with a closure),
    so Lightning counts it in ``global_step`` and its per-step hooks, gradient clipping and precision plugin apply;
    Lightning's per-batch work is paid once per batch. Schedulers step once per optimizer step (``interval:
    step``), once per epoch (``interval: epoch``), or after each validation (``ReduceLROnPlateau``).
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
        self.automatic_optimization = False  # the step loop drives the optimizer, through Lightning's public API
        # Gradient clipping before every optimizer step, as Trainer(gradient_clip_val=...) does in automatic
        # optimization; `dynnet fit` moves the Trainer's flags here, since the Trainer refuses them for this loop.
        self.gradient_clip_val: float | None = None
        self.gradient_clip_algorithm: str | None = None
        # A signal number, set by a signal handler: training stops at the next step boundary and raises Interrupted.
        self.stop_signal: int | None = None
        # How often each degree has been drawn; saved in checkpoints with the generator.
        self.degree_counts = [0] * (max_degree - min_degree + 1)
        self.last_loss: Tensor | None = None
        self.shown_at = 0.0  # when train/loss was last given to the progress bar
        self.seed: int | None = None
        # When the scheduler steps, and the arguments it was configured with: set by `dynnet fit`, recorded in
        # checkpoints so that a resume can tell a changed schedule.
        self.lr_interval = "step"
        self.lr_scheduler_args: dict = {}
        self.resumed_from: dict | None = None  # the run settings a loaded checkpoint was trained with
        self.evaluated_step: int | None = None  # the optimizer step of the last evaluation logged
        self._evaluation: tuple[Tensor, ExpectedLoss, Tensor] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning records the running hook's name around every hook call, a dozen times an optimizer step here.
        # nn.Module's __setattr__ type-checks every assignment for parameters, modules and buffers (about 2 us),
        # which this plain string never is; a tenth of the training time went to it.
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        # torch.initial_seed() is the run's seed once seed_everything has run; broadcasting rank 0's makes every
        # process draw the same degree at every step even when the processes were seeded differently.
        self.seed = self.trainer.strategy.broadcast(torch.initial_seed())
        self.model.rng.seed(self.seed)
        self._evaluation = None

    def on_train_start(self) -> None:
        if self.resumed_from is not None:
            self._apply_changed_optimizer_arguments(self.resumed_from.get("optimizer_args", {}))

    # ----------------------------------------------------------------------------------------------- training

    def training_step(self, batch: tuple[Tensor, Tensor, int, int], batch_idx: int) -> None:
        x, y, first, steps = batch
        if first != self.global_step:
            raise RuntimeError(f"the train item starts at step {first}, but training is at step {self.global_step}")
        optimizer = self.optimizers()
        step_schedulers = [c for c in self.trainer.lr_scheduler_configs if c.interval == "step" and not _plateau(c)]
        distributed = self.trainer.world_size > 1
        # Looked up once per item: the loop below is the whole training cost and runs thousands of times.
        model = self.model
        coefficients, shared = list(model.coefficients), model.shared
        params = [*coefficients, shared]
        powers = model.powers(x)  # x**p never changes for the full batch: computed once per item
        losses = []
        step = first
        stop = None
        # Gradients are summed across processes by _sum_gradients: DDP's own synchronization would average them
        # (shrinking the update by the process count) and trip on the shared coefficient degree 3 leaves out.
        with optimizer.toggle_model(sync_grad=False):
            for _ in range(steps):
                degree = model.draw_degree()  # one draw per optimizer step, so LBFGS re-evaluates the same degree
                evaluations = []

                # Called by the optimizer within this iteration (several times by LBFGS), so it binds this step's
                # degree and list.
                def closure(degree: int = degree, evaluations: list = evaluations) -> Tensor:
                    nonlocal stop
                    loss = F.mse_loss(polynomial(powers, degree, coefficients, shared), y, reduction="sum")
                    optimizer.zero_grad()
                    self.manual_backward(loss)
                    if distributed:
                        stop = _sum_gradients(params, self.stop_signal)
                    evaluations.append(loss.detach())
                    return loss

                optimizer.step(closure=closure)
                step += 1
                losses.append(evaluations[0])  # the loss at the step's starting point, as the tutorial reports it
                self.degree_counts[degree - model.min_degree] += 1
                for config in step_schedulers:
                    if step % config.frequency == 0:
                        self.lr_scheduler_step(config.scheduler, None)
                if not distributed:
                    stop = self.stop_signal
                if stop is not None:
                    break
        self._check_finite(torch.stack(losses), first, x, y)
        self.last_loss = losses[-1]
        now = time.monotonic()
        if self.trainer.progress_bar_callback is not None and now - self.shown_at > 0.25:
            # For Lightning's progress bars, which redraw a few times a second at most.
            self.log("train/loss", self.last_loss, prog_bar=True, logger=False)
            self.shown_at = now
        every = self.trainer.log_every_n_steps
        if self.loggers and every and step % every == 0:
            self._log_train(self.last_loss, step)
        if stop is not None:
            self.stop_signal = stop
            if len(losses) < steps:
                # Mid-item: Lightning has not finished this batch, so a resumed run fetches its rest again.
                raise Interrupted(stop, step)
            # The item is done: Lightning finishes it (and an epoch's end, validation) as an uninterrupted run
            # would, and the next batch stops before its first step.

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        stop = self.stop_signal
        if self.trainer.world_size > 1:  # a signal that came between steps reached only some processes
            flag = torch.tensor(float(stop or 0), device=self.device)
            stop = _agreed_stop(stop, self.trainer.strategy.reduce(flag, reduce_op="sum"))
        if stop is not None:
            raise Interrupted(stop, self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Where automatic optimization clips: after the on_before_optimizer_step hooks, with gradients unscaled.
        if self.gradient_clip_val:
            self.configure_gradient_clipping(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def on_train_epoch_end(self) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "epoch" and not _plateau(config):
                if (self.current_epoch + 1) % config.frequency == 0:
                    self.lr_scheduler_step(config.scheduler, None)

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

    def _check_finite(self, losses: Tensor, first: int, x: Tensor, y: Tensor) -> None:
        finite = torch.isfinite(losses)
        if bool(finite.all()) and bool(torch.isfinite(self.model.flat()).all()):
            return
        # All processes hold the same parameters, so they all stop here together.
        bad = int((~finite).nonzero()[0]) if not bool(finite.all()) else len(losses) - 1
        step = first + bad + 1
        advice = self._divergence_advice(step, first, x, y)
        raise DivergenceError(f"training diverged at step {step}: the loss became {losses[bad].item()}; {advice}")

    def _divergence_advice(self, step: int, first: int, x: Tensor, y: Tensor) -> str:
        """What to change: the learning rate only when an update can have caused the blow-up."""
        optimizer = self.optimizers().optimizer
        group = optimizer.param_groups[0]
        lr = group["lr"]
        dtype = self.model.shared.dtype
        if lr == 0 or (step == 1 and first == 0):
            return (
                f"no update caused it (it happened {'with lr 0' if lr == 0 else 'at the first step'}): {dtype} "
                f"overflows (its largest value is {torch.finfo(dtype).max:.3g}); train in float64 "
                "(--trainer.precision 64-true), or use a smaller --model.max_degree or a narrower interval"
            )
        suggestion = lr / 10
        if isinstance(optimizer, torch.optim.SGD):
            # Gradient descent with heavy-ball momentum m is stable on this quadratic while lr * curvature stays
            # below 2 (1 + m); a quarter of that bound leaves room for the switching between degrees.
            quadratic = ExpectedLoss(x, y, self.model.min_degree, self.model.max_degree)
            if self.trainer.world_size > 1:  # each process holds one slice of the points: the sums add
                quadratic.gram = self.trainer.strategy.reduce(quadratic.gram, reduce_op="sum")
            curvature = quadratic.largest_curvature()
            suggestion = min(suggestion, 0.5 * (1 + group.get("momentum", 0)) / curvature)
        return f"try a smaller learning rate, e.g. --optimizer.lr {_round_down(suggestion):g}"

    def _apply_changed_optimizer_arguments(self, trained: dict) -> None:
        """Apply the configured optimizer arguments that differ from the ones the checkpoint was trained with.

        The learning rate is rescaled, so a schedule keeps its shape from the resumed step on.
        """
        optimizer = self.optimizers().optimizer
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        for name, new in optimizer.defaults.items():
            old = trained.get(name, new)
            if old == new:
                continue
            if not is_number(new) or not is_number(old):
                raise ValueError(
                    f"--optimizer.{name} is {new}, but the checkpoint was trained with {old}; this argument cannot "
                    "change in the middle of a run: start a new run, or resume with the same value"
                )
            for i, group in enumerate(optimizer.param_groups):
                if name == "lr":
                    group["lr"] *= new / old
                    if "initial_lr" in group:
                        group["initial_lr"] = new
                    for scheduler in schedulers:
                        if hasattr(scheduler, "base_lrs"):
                            scheduler.base_lrs[i] = new
                else:
                    group[name] = new
            if self.trainer.is_global_zero:
                print(f"Resumed with optimizer {name}={new} (the run had {old})", flush=True)

    # ----------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The expected loss of the current coefficients on (x, y), its gap to the optimum, in float64."""
        key = (x.data_ptr(), x.numel(), x.device)
        if self._evaluation is None or self._evaluation[0] != key:
            expected = ExpectedLoss(x, y, self.model.min_degree, self.model.max_degree)
            self._evaluation = (key, expected, expected(expected.optimum()))  # once per run: the data never changes
        _, expected, best = self._evaluation
        loss = expected(self.model.flat().detach())
        gap = loss / best - 1
        # At the optimum the gap is 0 up to float64 rounding, which can make it a hair negative.
        return {"expected_loss": loss, "optimality_gap": gap, "log10_gap": torch.log10(gap.clamp_min(1e-16))}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        metrics = self._log_evaluation(batch, "val")
        if self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            for config in self.trainer.lr_scheduler_configs:
                if _plateau(config):
                    # Lightning drops a scheduler's monitor under manual optimization; LightningCLI's
                    # ReduceLROnPlateau keeps its own, torch's monitors the expected loss.
                    monitor = getattr(config.scheduler, "monitor", "val/expected_loss")
                    if monitor not in metrics:
                        raise ValueError(
                            f"ReduceLROnPlateau monitors {monitor!r}, which validation does not log; "
                            f"use one of {', '.join(metrics)}"
                        )
                    self.lr_scheduler_step(config.scheduler, metrics[monitor])

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._log_evaluation(batch, "test")

    def _log_evaluation(self, batch: tuple[Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        metrics = {f"{stage}/{name}": value for name, value in self.evaluate(*batch).items()}
        # For callbacks (early stopping, checkpoints) and validate's and test's results. During a fit the loggers
        # get the metrics at the optimizer step, as train/* (Lightning would log them against its count of train
        # batches).
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        if not self.trainer.barebones:  # which turns Lightning's logging off
            self.log_dict(metrics, sync_dist=True, logger=not fitting)
        if fitting and not self.trainer.sanity_checking:
            self.log_evaluation(metrics)
        return metrics

    def log_evaluation(self, metrics: dict[str, Tensor]) -> None:
        """Send evaluation metrics to the loggers at the current optimizer step (rank zero writes)."""
        values = {name: float(value) for name, value in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)
        self.evaluated_step = self.global_step

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        predictions = {f"degree_{k}": p for k, p in self.model.at_each_degree(x).items()}
        expected = torch.stack(list(predictions.values())).mean(0)
        return {"x": x, "target": y} | predictions | {"expected": expected}

    # ----------------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike, map_location: Any = None, **kwargs: Any):
        """Rebuild a trained module from a dynnet checkpoint, read weights-only and checked before use.

        Unlike Lightning's version this never imports or calls anything the checkpoint names (its
        ``_instantiator`` hyper-parameter): the class is this one, built from the two degrees.
        """
        checkpoint = load_checkpoint(checkpoint_path, map_location or "cpu")
        degrees = {key: checkpoint["hyper_parameters"][key] for key in ("min_degree", "max_degree")}
        module = cls(**(degrees | kwargs))
        module.to(checkpoint["state_dict"]["model.shared"].dtype)  # a float64 run's numbers stay float64
        module.load_state_dict(checkpoint["state_dict"])
        module.on_load_checkpoint(checkpoint)
        return module

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["degree_generator"] = self.model.rng.getstate()
        checkpoint["degree_counts"] = list(self.degree_counts)
        trainer = self.trainer
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        # What the run was trained with, so that a resume can tell a changed setting from an unchanged one.
        checkpoint["run_settings"] = {
            "seed": self.seed,
            "precision": str(trainer.precision),
            "optimizer": class_path(type(optimizer)) if optimizer else None,
            "optimizer_args": {k: v for k, v in optimizer.defaults.items() if is_plain(v)} if optimizer else {},
            "lr_scheduler": class_path(type(schedulers[0])) if schedulers else None,
            "lr_scheduler_args": {k: v for k, v in self.lr_scheduler_args.items() if is_plain(v)},
            "lr_interval": self.lr_interval,
            "data": dict(trainer.datamodule.hparams) if trainer.datamodule is not None else {},
            # Steps in a train batch, which val_check_interval (counted in batches) depends on.
            "item_steps": getattr(trainer.datamodule, "steps_per_batch", None),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.model.rng.setstate(checkpoint["degree_generator"])
        self.degree_counts = list(checkpoint["degree_counts"])
        self.resumed_from = checkpoint["run_settings"]


def _sum_gradients(params: list[Tensor], stop_signal: int | None) -> int | None:
    """Make every process's gradient the full-batch one, and agree on whether to stop, in one all-reduce.

    The loss is a sum over slices, so gradients add. A parameter the drawn degree leaves out (the shared one at
    the lowest degree) has no gradient on any process, since all draw the same degree, and keeps none, so the
    optimizer skips it as in one process. The last element carries the signal numbers processes received.
    """
    grads = [p.grad for p in params if p.grad is not None]
    flag = torch.tensor(float(stop_signal or 0), dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.stack([*grads, flag])
    torch.distributed.all_reduce(flat)
    for grad, total in zip(grads, flat):
        grad.copy_(total)
    return _agreed_stop(stop_signal, flat[-1])


def _agreed_stop(own: int | None, received: Tensor) -> int | None:
    """The signal to stop with, given the sum of the signal numbers all processes received (0: none did). A
    process that got no signal itself stops as if terminated."""
    return (own or signal.SIGTERM) if received.item() > 0 else None


def _plateau(config) -> bool:
    return isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _round_down(value: float) -> float:
    """value rounded down to one significant digit, so a suggested learning rate reads as a plain number."""
    exponent = math.floor(math.log10(value))
    return math.floor(value / 10**exponent) * 10**exponent


def class_path(cls: type) -> str:
    """Where a class is defined (torch.optim.sgd.SGD), as checkpoints record it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def is_number(value: Any) -> bool:
    """A number, or a tuple or list of numbers (Adam's betas): an optimizer argument a resume can change."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
        isinstance(value, tuple | list) and all(is_number(v) for v in value)
    )


def is_plain(value: Any) -> bool:
    """A value that reads as itself (no tensors, functions or objects): data a weights-only checkpoint holds."""
    return (
        value is None
        or isinstance(value, (bool, int, float, str))
        or (isinstance(value, tuple) and all(is_plain(v) for v in value))
    )
