"""The LightningModule that trains a DynamicPolynomial on the full batch, many optimizer steps per batch."""

import inspect
import math
import numbers
import os
import warnings
from typing import IO, Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from dynnet.data import SineData
from dynnet.distributed import agreed_stop, sum_gradients
from dynnet.divergence import check_finite
from dynnet.fit_checks import check_optimization, check_start, is_plateau, plateau_monitor
from dynnet.lightning_internals import (
    HOOK_NAME,
    attached_trainer,
    batch_ended_at_step,
    log_at_optimizer_steps,
    log_metrics,
    set_rank,
)
from dynnet.model import TUTORIAL_OPTIMIZER, DynamicPolynomial, ExpectedLoss, polynomial
from dynnet.runs.checkpoint import load_checkpoint
from dynnet.runs.checkpoint_state import check_restored_state, check_training_state
from dynnet.runs.resume import DATA, apply_changed_optimizer_arguments, check_same_run, class_path, run_settings
from dynnet.runs.yaml_files import load_yaml
from dynnet.signals import Stopped

# An expected loss this many times its minimum is a poor fit: the tutorial's run ends 1.2% above it, and an
# optimizer at a learning rate that has not converged ends hundreds of times above.
POOR_FIT = 10


class DynamicNet(LightningModule):
    """Trains the random-depth polynomial with the sum-reduced squared error, as the tutorial does.

    Each train batch carries a run of optimizer steps (see ``dynnet.data.TrainItems``). Every step goes through
    Lightning's manual-optimization API (``manual_backward`` and the LightningOptimizer's ``step`` with a closure),
    so Lightning counts it in ``global_step`` and its per-step hooks, gradient clipping and precision plugin apply;
    Lightning's per-batch work is paid once per batch. Schedulers step once per optimizer step (``interval:
    step``), once per epoch (``interval: epoch``), or after each validation (``ReduceLROnPlateau``).

    It trains with the tutorial's SGD unless something configures another optimizer (``dynnet fit`` from its
    config, or a subclass's ``configure_optimizers``). ``forward(x)`` is the expected prediction.
    """

    runs_of_steps = True  # SineData serves it runs of optimizer steps (see dynnet.data.SineData)

    def __init__(
        self,
        min_degree: int = 3,
        max_degree: int = 5,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
    ) -> None:
        """
        Args:
            min_degree: Lowest degree drawn; every power up to it has its own coefficient. The tutorial uses 3.
            max_degree: Highest degree drawn; the powers above min_degree share one coefficient. The tutorial
                uses 5.
            gradient_clip_val: Clip the gradient before every optimizer step to this norm (or value); None or 0
                does not clip. Lightning's Trainer(gradient_clip_val) only applies to automatic optimization;
                `dynnet fit --trainer.gradient_clip_val` sets this one.
            gradient_clip_algorithm: "norm" clips the gradients' total norm, "value" each element.
        """
        super().__init__()
        if gradient_clip_val is not None and not (
            isinstance(gradient_clip_val, numbers.Real) and math.isfinite(gradient_clip_val) and gradient_clip_val >= 0
        ):
            raise ValueError(f"gradient_clip_val must be a finite number of at least 0, got {gradient_clip_val!r}")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be norm or value, got {gradient_clip_algorithm!r}")
        # The model's hyper-parameters: what a checkpoint needs to rebuild it. Clipping is how one fit trains, and a
        # resumed fit takes it from its own settings (LightningCLI would otherwise restore the checkpoint's).
        self.save_hyperparameters(ignore=["gradient_clip_val", "gradient_clip_algorithm"])
        self.model = DynamicPolynomial(min_degree, max_degree)
        self.automatic_optimization = False  # the step loop drives the optimizer, through Lightning's public API
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        # A small batch to show the model's shapes and to export it: to_onnx() and to_torchscript(method="trace").
        self.example_input_array = torch.linspace(-math.pi, math.pi, 8)
        # A signal number, set by a signal handler: training stops at the next step boundary and raises Stopped.
        self.stop_signal: int | None = None
        # How often each degree has been drawn; saved in checkpoints with the generator.
        self.degree_counts = [0] * (max_degree - min_degree + 1)
        self.last_loss: Tensor | None = None
        self.seed: int | None = None
        self.resumed_from: dict | None = None  # the run settings a loaded checkpoint was trained with
        self.evaluated_step: int | None = None  # the optimizer step of the last evaluation logged
        self._evaluation: tuple[Tensor, ExpectedLoss, Tensor] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning records the running hook's name around every hook call, a dozen times an optimizer step here.
        # nn.Module's __setattr__ type-checks every assignment for parameters, modules and buffers (about 2 us),
        # which this plain string never is; a tenth of the training time went to it.
        if name == HOOK_NAME:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        """The expected prediction at x: the polynomial's mean over the equally likely degrees, the function whose
        squared error from the targets the expected loss averages. ``self.model(x)`` draws a degree instead."""
        return self.model.expected(x)

    def to_torchscript(self, file_path=None, method: str | None = "script", example_inputs=None, **kwargs):
        """Lightning's, by tracing: TorchScript cannot script the degree generator, which is Python's."""
        if method != "trace":
            raise ValueError("DynamicNet cannot be scripted (its degree generator is Python's): use method='trace'")
        return super().to_torchscript(file_path, method, example_inputs, **kwargs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The tutorial's optimizer: SGD with lr 1e-8 and momentum 0.9. `dynnet fit` replaces it with its config's
        optimizer and lr_scheduler; in Python, override this method to train with another."""
        return torch.optim.SGD(self.parameters(), **TUTORIAL_OPTIMIZER["init_args"])

    def configure_callbacks(self) -> list:
        # The first hook of every fit (and validate, test, predict), called before Lightning checks its own
        # settings and before anything is set up or written: dynnet's refusals come from here, the same one line
        # whoever built the Trainer. It adds no callbacks: dynnet's defaults are the `dynnet` command's, visible
        # and replaceable.
        trainer = self.trainer
        set_rank(trainer)  # the Trainer's rank, whatever rank variables a shell holds
        check_start(self, trainer)
        return []

    def setup(self, stage: str) -> None:
        log_at_optimizer_steps(self.trainer)  # a user's self.log lands at the optimizer step, as dynnet's own metrics
        if stage == "fit":
            _keep_scheduler_monitors(self)
            # Lightning's warning that such a checkpoint holds the state after the step's update: what dynnet means
            # by the step, as every dynnet checkpoint does; its advice (save state before optimizer.step) does not
            # apply.
            warnings.filterwarnings("ignore", "Using ModelCheckpoint with manual optimization and every_n_train_steps")
        if self.seed is None:
            # torch.initial_seed() is the run's seed once seed_everything has run; broadcasting rank 0's makes
            # every process draw the same degree at every step even when the processes were seeded differently.
            # Seeded once: a second fit continues the first one's draws, as one longer fit would.
            self.seed = self.trainer.strategy.broadcast(torch.initial_seed())
            self.model.rng.seed(self.seed)
        self._evaluation = None

    def on_fit_start(self) -> None:
        trainer = self.trainer
        # A resumed optimizer and scheduler state, checked now that this fit's own exist, before Lightning loads it.
        resumed, self._unchecked_training_state = getattr(self, "_unchecked_training_state", None), None
        if resumed is not None:
            schedulers = trainer.lr_scheduler_configs
            now = {"optimizer": class_path(type(trainer.optimizers[0])) if trainer.optimizers else None}
            now["lr_scheduler"] = class_path(type(schedulers[0].scheduler)) if schedulers else None
            check_same_run(trainer.ckpt_path, resumed, now)
            check_training_state(resumed, trainer, run_settings(trainer, self.seed))
        check_optimization(trainer)

    def on_train_start(self) -> None:
        if self.resumed_from is not None:
            apply_changed_optimizer_arguments(self, self.resumed_from.get("optimizer_args", {}))
            # A checkpoint saved at an epoch's end has Lightning replay that end, where EarlyStopping reads the
            # validation it saw, which a checkpoint does not keep: give callbacks the evaluation of the restored state,
            # the same numbers that validation logged (float64, from the same points).
            x, y = next(iter(self.trainer.datamodule.val_dataloader()))
            restored = {f"val/{name}": value for name, value in self.evaluate(x, y).items()}
            self.trainer.callback_metrics.update(
                {k: v for k, v in restored.items() if k not in self.trainer.callback_metrics}
            )

    # ----------------------------------------------------------------------------------------------- training

    def training_step(self, batch: tuple[Tensor, Tensor, int, int], batch_idx: int) -> None:
        x, y, first, steps = batch
        if first != self.global_step:
            raise RuntimeError(f"the train item starts at step {first}, but training is at step {self.global_step}")
        optimizer = self.optimizers()
        step_schedulers = [c for c in self.trainer.lr_scheduler_configs if c.interval == "step" and not is_plateau(c)]
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
                        stop = sum_gradients(params, self.stop_signal)
                    evaluations.append(loss.detach())
                    return loss

                try:
                    optimizer.step(closure=closure)
                except RuntimeError:  # an update too large for the dtype (an lr a schedule grew past it): a divergence
                    check_finite(self, torch.stack([*losses, *evaluations]), first, x, y)
                    raise
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
        check_finite(self, torch.stack(losses), first, x, y)
        self.last_loss = losses[-1]
        batch_ended_at_step(self.trainer)  # so that what Lightning counts in batches counts these steps
        if not self.trainer.barebones:  # which turns Lightning's logging off
            # The loss of the batch's last step, for callbacks (EarlyStopping, ModelCheckpoint) and progress bars;
            # the loggers get train/loss at every log_every_n_steps step instead (_log_train). Summed across
            # processes, each of which holds one slice's sum.
            distributed = self.trainer.world_size > 1
            self.log("train/loss", self.last_loss, prog_bar=True, logger=False, sync_dist=distributed, reduce_fx="sum")
        every = self.trainer.log_every_n_steps
        if self.loggers and every and step % every == 0:
            self._log_train(self.last_loss, step)
        if stop is not None:
            self.stop_signal = stop
            if len(losses) < steps:
                # Mid-item: Lightning has not finished this batch, so a resumed run fetches its rest again.
                raise Stopped(stop, step)
            # The item is done: Lightning finishes it (and an epoch's end, validation) as an uninterrupted run
            # would, and the next batch stops before its first step.

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        stop = self.stop_signal
        if self.trainer.world_size > 1:  # a signal that came between steps reached only some processes
            flag = torch.tensor(float(stop or 0), device=self.device)
            stop = agreed_stop(stop, self.trainer.strategy.reduce(flag, reduce_op="sum"))
        if stop is not None:
            raise Stopped(stop, self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Where automatic optimization clips: after the on_before_optimizer_step hooks, with gradients unscaled.
        if self.gradient_clip_val:
            self.configure_gradient_clipping(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def on_train_epoch_end(self) -> None:
        if self.global_step % self.trainer.datamodule.steps_per_epoch:
            return  # an epoch cut short by max_steps: Lightning steps epoch schedulers only after whole epochs
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == "epoch" and not is_plateau(config):
                if (self.current_epoch + 1) % config.frequency == 0:
                    self.lr_scheduler_step(config.scheduler, None)

    def _log_train(self, loss: Tensor, step: int) -> None:
        if self.trainer.world_size > 1:
            loss = self.trainer.strategy.reduce(loss, reduce_op="sum")  # each process holds one slice's sum
        values = torch.cat([loss.reshape(1), self.model.flat().detach()]).tolist()
        # TensorBoard's Scalars and Time Series tabs group tags by their first part and open only the first two
        # groups in tag order (character codes, case-sensitive): the coefficients' and the degrees' groups sort
        # after train/ and val/, so that the loss and the gap open and these wait below.
        metrics = {"train/loss": values[0]}
        metrics |= {f"weights/{name}": v for name, v in zip(self.model.names(), values[1:])}
        metrics["train/lr"] = self.optimizers().optimizer.param_groups[0]["lr"]
        total = sum(self.degree_counts)
        for degree, count in enumerate(self.degree_counts, self.model.min_degree):
            metrics[f"with_degree/{degree}"] = count / total
        log_metrics(self.trainer, metrics, step)

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

    def quality(self, data: SineData | None = None) -> str:
        """How good the fit is, in one line: the expected loss on the data's points, its closed-form minimum, and
        how far above it the fit is; a plain word when that is far. The data: the given SineData, else the one the
        module's Trainer fitted or evaluated it on, else SineData()'s (the tutorial's). ``dynnet fit``,
        ``validate`` and ``test`` print it after their results."""
        trainer = attached_trainer(self)
        if data is None:
            fitted = trainer.datamodule if trainer is not None else None
            data = fitted if isinstance(fitted, SineData) else SineData()
        if not hasattr(data, "x"):  # not set up by a Trainer: the points as a fit makes them
            data.setup("validate")
        expected = ExpectedLoss(data.x, data.y, self.model.min_degree, self.model.max_degree)
        loss = float(expected(self.model.flat().detach().to(data.x.device)))
        best = float(expected(expected.optimum()))
        ratio = loss / best
        if ratio <= POOR_FIT:
            return f"Expected loss: {loss:.5g}, {100 * max(ratio - 1, 0):.3g}% above its closed-form minimum {best:.5g}"
        return (
            f"Expected loss: {loss:.5g}, {ratio:,.0f} times its closed-form minimum {best:.5g}: a poor fit; train "
            "longer (max_steps), or search optimizers and learning rates with dynnet-sweep"
        )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        metrics = self._log_evaluation(batch, "val")
        if self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            for config in self.trainer.lr_scheduler_configs:
                if is_plateau(config):  # its monitor was checked when the fit started
                    self.lr_scheduler_step(config.scheduler, metrics[plateau_monitor(config)])

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

    def on_train_end(self) -> None:
        self.log_final_evaluation()

    def log_final_evaluation(self) -> None:
        """Log val/* at the final step when Lightning's validation did not run there (an interrupt, or an epoch
        that check_val_every_n_epoch skips). Only logged: early stopping, schedulers and best checkpoints see just
        Lightning's validations, so an interrupted run continues exactly as if it had not been interrupted."""
        trainer = self.trainer
        if not trainer.loggers or trainer.fast_dev_run or trainer.limit_val_batches == 0:
            return
        if self.evaluated_step != trainer.global_step:
            x, y = next(iter(trainer.datamodule.val_dataloader()))
            self.log_evaluation({f"val/{name}": value for name, value in self.evaluate(x, y).items()})

    def log_evaluation(self, metrics: dict[str, Tensor]) -> None:
        """Send evaluation metrics to the loggers at the current optimizer step (rank zero writes)."""
        log_metrics(self.trainer, {name: float(value) for name, value in metrics.items()}, self.global_step)
        self.evaluated_step = self.global_step

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        predictions = {f"degree_{k}": p for k, p in self.model.at_each_degree(x).items()}
        return {"x": x, "target": y} | predictions | {"expected": self(x)}

    # ----------------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ):
        """Rebuild a trained module from a dynnet checkpoint, read weights-only and checked before use.

        Lightning's arguments mean what they mean in Lightning: the hyper-parameters in ``hparams_file`` (YAML)
        replace the checkpoint's and ``kwargs`` replace both; ``strict=False`` loads a state_dict that matches the
        module only in part. Unlike Lightning's version this never imports or calls anything the checkpoint names
        (its ``_instantiator`` hyper-parameter): the class is this one, and ``weights_only=False``, which would
        let a checkpoint run code, is refused.
        """
        if weights_only is False:
            raise ValueError(
                "load_from_checkpoint(weights_only=False) is refused: dynnet checkpoints hold only tensors and plain "
                "data, and are always read without running code from them"
            )
        checkpoint = load_checkpoint(checkpoint_path, map_location or "cpu", strict=strict is not False)
        hparams = dict(checkpoint["hyper_parameters"])
        if hparams_file is not None:
            given = load_yaml(hparams_file, "hparams_file")
            if not isinstance(given, dict):
                raise ValueError(f"hparams_file {hparams_file} should map hyper-parameters to values")
            accepted = inspect.signature(cls.__init__).parameters
            # A run's own hparams.yaml holds the data's settings too, which Lightning drops here, as this does.
            unknown = sorted(set(given) - set(accepted) - set(inspect.signature(SineData.__init__).parameters))
            if unknown:
                raise ValueError(
                    f"hparams_file {hparams_file} sets {', '.join(unknown)}, which {cls.__name__} does not take"
                )
            hparams |= given
        accepted = inspect.signature(cls.__init__).parameters
        module = cls(**({k: v for k, v in hparams.items() if k in accepted} | kwargs))
        state = checkpoint["state_dict"]
        module.to(next(iter(state.values()), module.model.shared).dtype)  # a float64 run's numbers stay float64
        module.load_state_dict(state, strict=module.strict_loading if strict is None else strict)
        module.on_load_checkpoint(checkpoint)
        return module

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["degree_generator"] = self.model.rng.getstate()
        checkpoint["degree_counts"] = list(self.degree_counts)
        checkpoint["run_settings"] = run_settings(self.trainer, self.seed)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainer = attached_trainer(self)
        if trainer is not None:  # restored by a Trainer, which loads the rest next (not load_from_checkpoint)
            fitting = trainer.state.fn == TrainerFn.FITTING
            if fitting:  # the same refusals as `dynnet fit --ckpt_path`, for a Trainer of the user's own
                data = trainer.datamodule.hparams if trainer.datamodule is not None else {}
                # Not the seed: the degree draws continue from the checkpoint's generator, whatever this process's seed.
                now = {"trainer.precision": str(trainer.precision)}
                now |= {f"model.{k}": self.hparams[k] for k in ("min_degree", "max_degree")}
                check_same_run(trainer.ckpt_path, checkpoint, now | {f"data.{k}": data.get(k) for k in DATA})
            check_restored_state(checkpoint, trainer)
            self._unchecked_training_state = checkpoint if fitting else None  # see on_fit_start
        self.model.rng.setstate(checkpoint["degree_generator"])
        if len(checkpoint["degree_counts"]) == len(self.degree_counts):  # else other degrees (strict=False)
            self.degree_counts = list(checkpoint["degree_counts"])
        self.resumed_from = checkpoint["run_settings"]


def _keep_scheduler_monitors(module: LightningModule) -> None:
    """Have the module's configure_optimizers keep a scheduler dict's ``monitor``, which Lightning drops under
    manual optimization with a warning that the scheduler must be stepped by hand: DynamicNet steps every
    scheduler, and a ReduceLROnPlateau on the metric its dict names, as Lightning's automatic optimization does."""
    configure = module.configure_optimizers
    if getattr(configure, "keeps_monitors", False):
        return

    def take_monitors(conf: Any) -> Any:
        if isinstance(conf, dict) and "scheduler" in conf:
            if isinstance(conf["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau) and "monitor" in conf:
                conf["scheduler"].monitor = conf["monitor"]  # kept in its state, so a resume steps on it too
            return {k: v for k, v in conf.items() if k not in ("monitor", "strict", "reduce_on_plateau")}
        if isinstance(conf, dict):
            return {k: take_monitors(v) for k, v in conf.items()}
        if isinstance(conf, (list, tuple)):
            return type(conf)(take_monitors(c) for c in conf)
        return conf

    def configure_optimizers() -> Any:
        return take_monitors(configure())

    configure_optimizers.keeps_monitors = True
    module.configure_optimizers = configure_optimizers
