"""A sweep's settings: its config file, checked and completed by the command's flags, and how many workers this
machine can run."""

import argparse
import os
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import torch

from dynnet.cli.arguments import flag_values
from dynnet.errors import one_line
from dynnet.fit_checks import available_memory
from dynnet.model import TUTORIAL_OPTIMIZER
from dynnet.runs.yaml_files import load_yaml
from dynnet.sweep.errors import SweepError
from dynnet.sweep.space import OPTIMIZER, flag_value, grid, parse_space, swept_keys
from dynnet.sweep.storage import check_url, experimental_ok

# What a trial can be judged by: the validation metrics dynnet logs (DynamicNet.evaluate), all losses.
OBJECTIVES = ("val/expected_loss", "val/optimality_gap", "val/log10_gap")
# The distance to the optimum: what dynnet is judged by.
DEFAULT_OBJECTIVE = "val/optimality_gap"
# Both losses are minimized; a config can still say maximize for a metric of its own making.
DEFAULT_DIRECTION = "minimize"
# Enough for TPE's 10 random start-up trials and as many guided ones.
DEFAULT_TRIALS = 20
# TPE is Optuna's default and handles conditional spaces (each optimizer's own arguments). The constant liar
# keeps parallel workers from being handed the same point while their trials run.
DEFAULT_SAMPLER = {"class": "TPESampler", "constant_liar": True}
# Stops a trial whose validation metric is worse than the median of earlier trials at the same epoch: cheap and
# safe for a monotone loss curve. Optuna's defaults: prune only after 5 trials completed.
DEFAULT_PRUNER = {"class": "MedianPruner"}
# A running trial writes a heartbeat every 5 s (one small UPDATE); one silent for 20 s is taken for dead and
# marked failed, so a rerun or another worker does not wait long on a killed worker's trial.
DEFAULT_HEARTBEAT_INTERVAL = 5
DEFAULT_GRACE_PERIOD = 20
# Where a sweep writes when neither --root nor the config names a place: runs/ is ignored by git.
DEFAULT_ROOT_PARENT = Path("runs")
# A worker's peak resident memory, measured in sweeps of configs/sweep.yaml with one and two workers on Linux (torch
# 2.13.0 CPU build, Lightning 2.6): 465 MB at most, nearly all of it torch and Lightning. Budgeted with a
# third more for other builds, platforms and larger fits.
WORKER_MEMORY_MB = 600
# Flags that would make a trial something other than a fresh fit in its own run folder under the sweep's root.
REFUSED_FIT_FLAGS = {
    "c": "name the fit config with the sweep config's fit key",
    "config": "name the fit config with the sweep config's fit key",
    "ckpt_path": "every trial is a fresh fit",
    "run": "the sweep names each trial's run folder itself (trial_NNNN)",
}


@dataclass
class Sweep:
    """Everything a sweep needs, from its config file and flags; sent to every worker process."""

    fit_config: Path
    fit_args: list[str]
    space: dict[str, Any]
    objective: str
    direction: str
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    trials: int
    workers: int
    storage: str
    study: str
    root: Path
    heartbeat_interval: int
    grace_period: int
    command: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # marks the trials this command ran


# A sweep config's keys: the settings of a Sweep, its fit config named by the key fit.
KEYS = {f.name for f in fields(Sweep)} - {"fit_config", "command"} | {"fit"}


def load_sweep(path: str, flags: argparse.Namespace) -> Sweep:
    """Read and check a sweep config; flags given on the command line replace the file's values."""
    config = Path(path)
    try:
        raw = load_yaml(config, "sweep config")  # bounded: a YAML bomb is refused, not expanded
    except ValueError as err:
        raise SweepError(str(err)) from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweep config {path}: expected a mapping with fit, space and objective")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise SweepError(f"sweep config {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    if "fit" not in raw or not isinstance(raw["fit"], str):
        raise SweepError(f"sweep config {path}: name the fit config the trials start from, e.g. fit: default.yaml")
    # Relative to the sweep config, so that a config and the fit config beside it work from any folder.
    fit_config = (config.parent / raw["fit"]).resolve()
    if not fit_config.is_file():
        raise SweepError(f"sweep config {path}: fit config {fit_config} does not exist")
    fit_args = _fit_args(raw.get("fit_args"))
    objective = raw.get("objective", DEFAULT_OBJECTIVE)
    if objective not in OBJECTIVES:
        raise SweepError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    direction = raw.get("direction", DEFAULT_DIRECTION)
    if direction not in ("minimize", "maximize"):
        raise SweepError(f"direction must be minimize or maximize, got {direction!r}")
    study = flags.study or raw.get("study") or config.stem
    trials = _positive("--trials", flags.trials if flags.trials is not None else raw.get("trials", DEFAULT_TRIALS))
    if flags.workers is not None:
        workers = _workers("--workers", flags.workers)
    else:
        workers = _workers("workers", raw.get("workers"))
    root = Path(flags.root or raw.get("root") or DEFAULT_ROOT_PARENT / study).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise SweepError(f"root {root} is not a folder")
    storage = flags.storage or raw.get("storage") or f"sqlite:///{root / 'study.db'}"
    check_url(storage)
    interval = _positive("heartbeat_interval", raw.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL))
    grace = _positive("grace_period", raw.get("grace_period", DEFAULT_GRACE_PERIOD))
    if grace <= interval:
        raise SweepError(f"grace_period ({grace} s) must be longer than heartbeat_interval ({interval} s)")
    space = parse_space(raw.get("space"), _fit_optimizer(fit_config, fit_args))
    _refuse_swept(fit_args, space)
    return Sweep(
        fit_config=fit_config,
        fit_args=fit_args,
        space=space,
        objective=objective,
        direction=direction,
        sampler=_class_spec("sampler", raw.get("sampler"), DEFAULT_SAMPLER, space, trials),
        pruner=_class_spec("pruner", raw.get("pruner"), DEFAULT_PRUNER, space, trials),
        trials=trials,
        workers=workers,
        storage=storage,
        study=study,
        root=root,
        heartbeat_interval=interval,
        grace_period=grace,
    )


def _fit_args(raw: Any) -> list[str]:
    """``fit_args``: flags for every trial's fit, as a mapping (``trainer.max_steps: 3000``) or a list of flags.
    Flags that would redirect or replace a trial are refused here; the parsed fit is checked too (check_fit),
    which catches the same settings given another way (``--trainer={default_root_dir: ...}``)."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        args = [f"--{name}={flag_value(value)}" for name, value in raw.items()]
    elif isinstance(raw, list) and all(isinstance(a, str) for a in raw):
        args = list(raw)
    else:
        raise SweepError("fit_args: expected a mapping of dynnet fit flags to values, e.g. trainer.max_steps: 3000")
    for arg in args:
        name = arg.partition("=")[0]
        if name.startswith("-") and name.lstrip("-") in REFUSED_FIT_FLAGS:
            raise SweepError(f"fit_args: {name} is refused: {REFUSED_FIT_FLAGS[name.lstrip('-')]}")
    return args


def _refuse_swept(fit_args: list[str], space: dict[str, Any]) -> None:
    """A fit flag for a setting the space draws would be replaced in every trial, or (an optimizer argument
    before the optimizer class the trial picks) dropped: refused rather than silently ignored."""
    swept = swept_keys(space)
    for arg in fit_args:
        name = arg.partition("=")[0].lstrip("-")
        if name in swept or (OPTIMIZER in space and name.split(".")[0] == OPTIMIZER):
            where = "in each optimizer's entry of the space" if OPTIMIZER in space else "in the space"
            raise SweepError(f"fit_args: --{name} is a setting the space sweeps: give it {where}, as a range or value")


def _fit_optimizer(fit_config: Path, fit_args: list[str]) -> str:
    """The optimizer class the trials train with when the space does not choose one: fit_args's, else the fit
    config's, else the tutorial's."""
    flags = ("--optimizer", "--optimizer.class_path")
    chosen = [value for flag, value in flag_values(fit_args) if flag in flags and not value.startswith("{")]
    if chosen:
        return chosen[-1]
    try:
        spec = (load_yaml(fit_config) or {}).get(OPTIMIZER)
    except (ValueError, AttributeError):
        spec = None  # the fit config's own problem: checking the fit (check_fit) names it
    if isinstance(spec, dict):
        spec = spec.get("class_path")
    return spec if isinstance(spec, str) else TUTORIAL_OPTIMIZER["class_path"]


def _class_spec(key: str, raw: Any, default: dict[str, Any], space: dict[str, Any], trials: int) -> dict[str, Any]:
    """``sampler: {class: TPESampler, seed: 0}`` or ``sampler: RandomSampler``; checked by building it once."""
    if raw is None:
        spec = dict(default)
    elif isinstance(raw, str):
        spec = {"class": raw}
    elif isinstance(raw, dict) and isinstance(raw.get("class"), str):
        spec = dict(raw)
    else:
        raise SweepError(f"{key}: expected a class name of optuna.{key}s, or {{class: NAME, ARGUMENT: VALUE, ...}}")
    if key == "sampler" and spec["class"] == "TPESampler":
        spec = {"constant_liar": True} | spec  # parallel workers: see DEFAULT_SAMPLER
    make(key, spec, space, trials)
    return spec


def make(key: str, spec: dict[str, Any], space: dict[str, Any], trials: int, seed_offset: int = 0) -> Any:
    """The sampler or pruner a spec names, from optuna.samplers or optuna.pruners; a grid of more points than the
    sweep's trials is refused before it is made."""
    module = optuna.samplers if key == "sampler" else optuna.pruners
    cls = getattr(module, spec["class"], None)
    if not isinstance(cls, type):
        raise SweepError(f"{key}: optuna.{key}s has no class {spec['class']!r}")
    kwargs = {k: v for k, v in spec.items() if k != "class"}
    if cls is optuna.samplers.GridSampler:
        kwargs["search_space"] = grid(kwargs.get("search_space", space), trials)
    if isinstance(kwargs.get("seed"), int):
        # Workers with one seed would draw the same random points; a rerun would repeat the first run's.
        kwargs["seed"] += seed_offset
    try:
        with experimental_ok():
            return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise SweepError(f"{key}: {spec['class']}: {one_line(err)}") from None


def _workers(name: str, value: Any) -> int:
    """The workers asked for, or by default as many as the machine holds; more than it holds is refused."""
    cap, why = worker_cap()
    if cap < 1:
        raise SweepError(f"not enough memory for one worker ({why})")
    if value is None:
        return cap
    workers = _positive(name, value)
    if workers > cap:
        raise SweepError(f"{name} {workers}: this machine runs at most {cap} workers ({why})")
    return workers


def worker_cap() -> tuple[int, str]:
    """How many workers this machine can run, and why: one per core (a trial is a single-threaded loop of small
    tensor operations), and as many as the available memory holds."""
    count = cores()
    memory = available_memory(torch.device("cpu"))
    if memory is None:
        return count, f"{count} cores; the available memory is unknown here"
    by_memory = memory // (WORKER_MEMORY_MB * 2**20)
    why = f"{count} cores; {memory >> 20} MB of memory available, about {WORKER_MEMORY_MB} MB a worker"
    return min(count, by_memory), why


def cores() -> int:
    """The cores this process may run on (a container or taskset can allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepError(f"{name} must be a whole number of at least 1, got {value!r}")
    return value
