"""What dynnet.lightning_internals relies on, checked against the installed Lightning: a release that changes one of
them fails here, naming the function to mend. (What the functions achieve is tested where it shows: logged steps,
estimated_stepping_batches, the help, the run's config.)"""

import inspect
from datetime import timedelta

import lightning as L
import pytest
from conftest import fitted_cli, fitted_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

from dynnet import DynamicNet
from dynnet import lightning_internals as internals


class Seen(L.Callback):
    """What Lightning's loop holds at every train batch end, and whether it would log the batch's metrics."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        counted = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.seen.append((trainer.global_step, counted, trainer._logger_connector.should_update_logs))


NO_FILES = {"logger": False, "enable_checkpointing": False}


def test_batch_ended_at_step_sets_what_lightnings_logging_counts(tmp_path):
    seen = Seen()
    trainer = fitted_trainer(tmp_path, max_steps=200, log_every_n_steps=100, callbacks=[seen], **NO_FILES)
    assert [s[:2] for s in seen.seen] == [(50, 49), (100, 99), (150, 149), (200, 199)], (
        "Lightning no longer counts logging by fit_loop.epoch_loop._batches_that_stepped: mend "
        "dynnet.lightning_internals.batch_ended_at_step"
    )
    assert [s[2] for s in seen.seen] == [False, True, False, True], "mend batch_ended_at_step: should_update_logs"
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 200  # Lightning counted the last batch after


def test_log_at_optimizer_steps_wraps_where_lightning_takes_the_step():
    # Lightning's logger connector takes a metric's step from the loop's count of batches that stepped, which the
    # wrapper sets to the optimizer step for the call (the steps this gives: test_plain_trainer's own-logs test).
    assert "epoch_loop._batches_that_stepped" in inspect.getsource(_LoggerConnector.log_metrics), (
        "mend dynnet.lightning_internals.log_at_optimizer_steps"
    )
    trainer = L.Trainer(logger=False)
    internals.log_at_optimizer_steps(trainer)
    wrapped = trainer._logger_connector.log_metrics
    internals.log_at_optimizer_steps(trainer)
    assert trainer._logger_connector.log_metrics is wrapped  # once per Trainer


def test_set_max_steps_is_what_the_trainer_stops_at():
    trainer = L.Trainer(max_steps=300, logger=False)
    internals.set_max_steps(trainer, 100)
    assert trainer.max_steps == 100, "mend dynnet.lightning_internals.set_max_steps: fit_loop.epoch_loop.max_steps"


def test_set_validation_batches_is_what_the_fit_loop_counts(tmp_path):
    class Batches(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.counted = trainer.val_check_batch

    seen = Batches()
    fitted_trainer(tmp_path, max_steps=100, val_check_interval=20, callbacks=[seen], **NO_FILES)  # 2 batches of 10
    assert seen.counted == 2, "mend dynnet.lightning_internals.set_validation_batches: Trainer.val_check_interval"


@pytest.mark.parametrize("interval", ["00:00:00:02", timedelta(seconds=2), {"seconds": 2}])
def test_validation_time_reads_a_time_based_interval(interval):
    assert internals.validation_time(L.Trainer(val_check_interval=interval, logger=False)) == 2.0, (
        "mend dynnet.lightning_internals.validation_time: Trainer._val_check_time_interval"
    )
    assert internals.validation_time(L.Trainer(val_check_interval=10, logger=False)) is None


def test_the_hook_name_is_what_lightning_sets_around_hooks(tmp_path):
    names = []

    class Watched(DynamicNet):
        def on_train_start(self) -> None:
            names.append(getattr(self, internals.HOOK_NAME, None))

    fitted_trainer(tmp_path, Watched, max_steps=1, **NO_FILES)
    assert names == ["on_train_start"], "mend dynnet.lightning_internals.HOOK_NAME"


def test_checkpoint_steps_and_time_read_the_state_key():
    assert internals.checkpoint_steps(ModelCheckpoint(every_n_train_steps=30)) == 30, "mend checkpoint_steps"
    assert internals.checkpoint_steps(ModelCheckpoint()) == 0
    assert internals.checkpoint_saves_by_time(ModelCheckpoint(train_time_interval=timedelta(seconds=1)))
    assert not internals.checkpoint_saves_by_time(ModelCheckpoint()), "mend checkpoint_saves_by_time"


def test_set_rank_is_what_rank_zero_only_reads(monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 3)
    internals.set_rank(L.Trainer(logger=False))
    assert rank_zero_only.rank == 0, "mend dynnet.lightning_internals.set_rank"


def test_the_parser_parts_the_help_and_the_run_config_use(tmp_path):
    cli = fitted_cli(tmp_path)
    assert [c.dest for c in internals.subcommand_choices(cli)] == ["fit", "validate", "test", "predict"], (
        "mend dynnet.lightning_internals.subcommand_choices"
    )
    parser = internals.subcommand_parser(cli, "fit")
    assert "trainer.max_steps" in [a.dest for a in internals.parser_actions(parser)], "mend parser_actions"
    assert "max_steps: 200" in parser.dump(cli.config.fit), "mend dynnet.lightning_internals.subcommand_parser"
