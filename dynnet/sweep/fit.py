"""The ``dynnet fit`` every trial runs: its arguments, and the check, before the sweep starts, that dynnet accepts
it, that it is a fresh fit in its own run folder under the sweep's root, and what exactly it runs."""

import contextlib
import io
import json
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from dynnet.cli.arguments import dotted
from dynnet.cli.command import DynnetCLI
from dynnet.errors import USER_ERRORS, one_line
from dynnet.signals import Stopped
from dynnet.sweep.config import Sweep
from dynnet.sweep.errors import SweepError
from dynnet.sweep.space import OPTIMIZER, brief, ends, fit_flags, swept_keys

# The run a check names, in a scratch root removed after it.
PROBE_RUN = "trial_check"
# Keys of the parsed fit that differ between the trials of one experiment by design: where the run is and its
# name. The fit config's file name (config) does not matter, only what it sets.
PER_TRIAL = ("config", "run", "trainer.default_root_dir")


def run_name(number: int) -> str:
    """Trial N's run folder name: zero-padded so that TensorBoard, which sorts runs by name, lists trials in order
    (up to trial 9999)."""
    return f"trial_{number:04d}"


def base_args(sweep: Sweep, root: Path, run: str) -> list[str]:
    """The ``dynnet fit`` arguments every trial shares; a trial adds its settings after them."""
    args = ["fit", "-c", str(sweep.fit_config), f"--trainer.default_root_dir={root}", f"--run={run}"]
    # Several workers' progress displays would interleave on one terminal; the sweep prints one line a trial.
    return [*args, "--trainer.enable_progress_bar=false", *sweep.fit_args]


class _Checked(Exception):
    """A check's fit got through everything dynnet refuses before the first step."""


class _StopBeforeTraining(Callback):
    """Ends a check's fit once the model's first hooks have refused what they refuse, before any validation or
    step."""

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        raise _Checked

    def on_train_start(self, trainer, pl_module) -> None:
        raise _Checked


class _Check(DynnetCLI):
    """dynnet's command line on one trial's arguments, as far as the start of training: every refusal a trial's fit
    would meet, without training. Keeps the config as parsed."""

    def __init__(self, root: Path, **kwargs: Any) -> None:
        self.root = root
        super().__init__(**kwargs)

    def before_instantiate_classes(self) -> None:
        # As the study stores it (JSON): paths and enums as text, tuples as lists.
        self.parsed = dotted(json.loads(json.dumps(self.config[self.subcommand].as_dict(), default=str)))
        _check_trial(self.parsed, self.root)  # before dynnet makes a run folder where the config says
        super().before_instantiate_classes()

    def fit(self, **kwargs: Any) -> None:
        processes = self.trainer.world_size
        if processes != 1:  # Lightning would launch the others by running the sweep's own command again
            raise ValueError(f"a trial trains in one process, but trainer.devices and num_nodes make {processes}")
        with contextlib.suppress(_Checked):
            super().fit(**kwargs)
        if self.model.stop_signal is not None:  # SIGTERM or Ctrl-C during the check: the fit kept it for its step
            raise Stopped(self.model.stop_signal)


def check_fit(sweep: Sweep) -> dict[str, Any]:
    """Take the fits of both ends of every optimizer's branch of the space as far as the start of training, so that
    a fit config, flag or value dynnet refuses is reported before the sweep starts rather than failing every trial;
    refuse fit_args that would redirect or replace a trial. Returns what every trial's fit runs: the parsed config
    of the first point as dotted keys, without what differs between trials by design (the run's name and place,
    the swept settings)."""
    with tempfile.TemporaryDirectory(prefix="dynnet-sweep-check-") as scratch:
        parsed = [_check(sweep, Path(scratch, str(i)), point) for i, point in enumerate(ends(sweep.space))]
    swept = swept_keys(sweep.space)
    return {
        key: value
        for key, value in parsed[0].items()
        if key not in PER_TRIAL and key not in swept and not (OPTIMIZER in sweep.space and key.startswith("optimizer."))
    }


def _check(sweep: Sweep, root: Path, point: dict[str, Any]) -> dict[str, Any]:
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), ExitStack() as cleanup:
            cli = _Check(
                root,
                args=[*base_args(sweep, root, PROBE_RUN), *fit_flags(point)],
                cleanup=cleanup,
                callbacks=[_StopBeforeTraining()],
            )
    except SystemExit:
        raise SweepError("fit_args make dynnet fit exit without training (--print_config or --help?)") from None
    except SweepError:
        raise
    except USER_ERRORS as err:
        raise SweepError(f"the trials' fit ({brief(point)}): {one_line(err)}") from None
    return cli.parsed


def _check_trial(config: dict[str, Any], root: Path) -> None:
    """Refuse a fit that is not a fresh, complete fit in its own run folder: the report names that folder, and
    the rerun command reads its config."""
    if config["trainer.default_root_dir"] != str(root):
        raise SweepError("fit_args set trainer.default_root_dir: trials go under the sweep's root (--root)")
    if config["run"] != PROBE_RUN:
        raise SweepError("fit_args set run: the sweep names each trial's run folder itself (trial_NNNN)")
    if config["ckpt_path"] is not None:
        raise SweepError("fit_args set ckpt_path: every trial is a fresh fit")
    for key in ("trainer.fast_dev_run", "trainer.barebones"):
        if config[key]:
            raise SweepError(f"fit_args set {key}: a trial keeps a full run folder (config, logs, checkpoints)")
