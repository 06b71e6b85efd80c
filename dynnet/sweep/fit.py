"""The ``dynnet fit`` every trial runs: its arguments, and the check, before the sweep starts, that it parses, that
it is a fresh fit in its own run folder under the sweep's root, and what exactly it runs."""

import contextlib
import io
import json
from typing import Any

from dynnet.cli import DynnetCLI
from dynnet.errors import USER_ERRORS, one_line
from dynnet.sweep.config import Sweep
from dynnet.sweep.errors import SweepError
from dynnet.sweep.space import OPTIMIZER, SEED, any_point, describe, fit_flags

# The run a parsed check names; no folder is made.
PROBE_RUN = "trial_check"
# Keys of the parsed fit that differ between the trials of one experiment by design: where the run is and its
# name. The fit config's file name (config) does not matter, only what it sets.
PER_TRIAL = ("config", "run", "trainer.default_root_dir")


def run_name(number: int) -> str:
    """Trial N's run folder name: zero-padded so that TensorBoard, which sorts runs by name, lists trials in order
    (up to trial 9999)."""
    return f"trial_{number:04d}"


def base_args(sweep: Sweep, run: str) -> list[str]:
    """The ``dynnet fit`` arguments every trial shares; a trial adds its settings after them."""
    args = ["fit", "-c", str(sweep.fit_config), f"--trainer.default_root_dir={sweep.root}", f"--run={run}"]
    # Several workers' progress displays would interleave on one terminal; the sweep prints one line a trial.
    return [*args, "--trainer.enable_progress_bar=false", *sweep.fit_args]


class _ParseOnly(DynnetCLI):
    """dynnet's command line up to its parsed config: checks a trial's flags without creating or training a run."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config[self.subcommand].as_dict())


class _Parsed(Exception):
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


def check_fit(sweep: Sweep) -> dict[str, Any]:
    """Parse the fit of one point of every optimizer's branch, so that a bad fit config, flag or argument is
    reported before the sweep starts rather than failing every trial; refuse fit_args that would redirect or
    replace a trial. Returns what every trial's fit runs: the parsed config of the first point as dotted keys,
    without what differs between trials by design (the run's name and place, the swept settings)."""
    parsed = [_parse(sweep, point) for point in any_point(sweep.space)]
    for config in parsed:
        _check_trial(config, sweep)
    swept = {f"optimizer.init_args.{name}" for name in sweep.space if name not in (SEED, OPTIMIZER)}
    if SEED in sweep.space:
        swept.add("seed_everything")
    return {
        key: value
        for key, value in parsed[0].items()
        if key not in PER_TRIAL and key not in swept and not (OPTIMIZER in sweep.space and key.startswith("optimizer."))
    }


def _parse(sweep: Sweep, point: dict[str, Any]) -> dict[str, Any]:
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            _ParseOnly(args=[*base_args(sweep, PROBE_RUN), *fit_flags(point)])
    except _Parsed as done:
        # As the study stores it (JSON): paths and enums as text, tuples as lists.
        return _dotted(json.loads(json.dumps(done.config, default=str)))
    except SystemExit:
        raise SweepError("fit_args make dynnet fit exit without training (--print_config or --help?)") from None
    except USER_ERRORS as err:
        raise SweepError(f"the trials' fit ({describe(point)}): {one_line(err)}") from None


def _check_trial(config: dict[str, Any], sweep: Sweep) -> None:
    """Refuse a fit that is not a fresh, complete fit in its own run folder: the report names that folder, and
    the rerun command reads its config."""
    if config["trainer.default_root_dir"] != str(sweep.root):
        raise SweepError("fit_args set trainer.default_root_dir: trials go under the sweep's root (--root)")
    if config["run"] != PROBE_RUN:
        raise SweepError("fit_args set run: the sweep names each trial's run folder itself (trial_NNNN)")
    if config["ckpt_path"] is not None:
        raise SweepError("fit_args set ckpt_path: every trial is a fresh fit")
    for key in ("trainer.fast_dev_run", "trainer.barebones"):
        if config[key]:
            raise SweepError(f"fit_args set {key}: a trial keeps a full run folder (config, logs, checkpoints)")


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of dotted keys (trainer.max_steps); lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _dotted(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat
