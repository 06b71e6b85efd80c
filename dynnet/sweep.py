"""``dynnet-sweep``: search learning rates, optimizers and seeds for dynnet fits with Optuna.

A sweep config (YAML) names the fit config every trial starts from, the search space, the objective and the
sampler and pruner. Each trial is a real ``dynnet fit`` into its own run folder, ``<root>/lightning_logs/trial_<N>``,
so TensorBoard shows every trial as a sibling run with its hyper-parameters. Trials run in worker processes that
share one Optuna study through a database: SQLite in the sweep's root by default, or any database Optuna supports
(``--storage postgresql+psycopg://...``), so the same command started again, or on several machines, continues
the same study until it holds ``--trials`` finished trials.

A trial counts as finished when it completed, was pruned, or failed on its own (diverged, or its fit raised); its
failure reason is kept in the trial's user attributes. A trial whose worker died (killed, interrupted, its machine
lost) is marked failed too, by the heartbeat Optuna's RDB storage keeps or, on the same machine, as soon as its
process is gone; it does not count, so another trial takes its place.

At the end the command prints the best trial and its Result line, and writes ``trials.csv`` and ``sweep.png`` into
the sweep's root.
"""

import argparse
import contextlib
import csv
import inspect
import io
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import yaml
from lightning.pytorch import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from dynnet.checks import import_class
from dynnet.cli import DynnetCLI
from dynnet.errors import USER_ERRORS, Interrupted, one_line
from dynnet.run import runs_dir

PROG = "dynnet-sweep"
# What a trial can be judged by: the validation metrics dynnet logs (DynamicNet.evaluate), all losses.
OBJECTIVES = ("val/expected_loss", "val/optimality_gap", "val/log10_gap")
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
# Tries to open a storage whose tables another command is creating at the same moment.
STORAGE_ATTEMPTS = 5
# How often an idle worker looks again whether the trials others are running finished or died.
POLL_SECONDS = 0.5
# Where a sweep writes when neither --root nor the config names a place: runs/ is ignored by git.
DEFAULT_ROOT_PARENT = Path("runs")
# Names a search space may use besides the optimizer's own arguments.
SEED, OPTIMIZER = "seed", "optimizer"
# dynnet's optimizer when a fit config names none (the tutorial's).
TUTORIAL_OPTIMIZER = "torch.optim.SGD"


@contextlib.contextmanager
def experimental_ok() -> Iterator[None]:
    """The sweep uses Optuna's RDB heartbeat, fail_stale_trials and TPE's constant liar on purpose: their
    "experimental" warnings would repeat in every worker and say nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class SweepError(ValueError):
    """Bad input: a sweep config, flag or storage that cannot work. Reported as one line before any trial starts."""


class TrialFailed(Exception):
    """A trial's fit failed on its own (diverged, bad value, crashed): the trial is failed and the sweep goes on."""


# ------------------------------------------------------------------------------------------------ search space


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool


@dataclass(frozen=True)
class Int:
    low: int
    high: int


@dataclass(frozen=True)
class Choice:
    """A categorical parameter; each option may bring parameters of its own (an optimizer class and its lr)."""

    options: dict[Any, dict[str, Any]]


def parse_space(raw: Any, fit_optimizer: str) -> dict[str, Any]:
    """The search space of a sweep config: parameter name to Float, Int, Choice or a fixed value.

    Names are ``seed`` (the fit's seed_everything), ``optimizer`` (a choice of optimizer classes, each with its own
    sub-space of its arguments), and arguments of the optimizer (``lr``, ``momentum``, ...): of the fit config's
    optimizer, or of every optimizer the ``optimizer`` choice can pick.
    """
    if not isinstance(raw, dict) or not raw:
        raise SweepError("space: expected a mapping of parameter names to ranges, e.g. lr: {log: [1.0e-4, 1.0]}")
    space: dict[str, Any] = {}
    classes = [fit_optimizer]
    if OPTIMIZER in raw:
        space[OPTIMIZER] = _parse_optimizers(raw[OPTIMIZER])
        classes = list(space[OPTIMIZER].options) if isinstance(space[OPTIMIZER], Choice) else [space[OPTIMIZER]]
    for name, spec in raw.items():
        if name == OPTIMIZER:
            continue
        if name == SEED:
            space[name] = _parse_spec(name, spec)
            if not isinstance(space[name], Int) and not _is_int(space[name]):
                raise SweepError("space: seed must be a whole number or an int range, e.g. seed: {int: [0, 9]}")
            continue
        for class_path in classes:
            _check_argument(name, class_path, where="space")
        space[name] = _parse_spec(name, spec)
    if isinstance(space.get(OPTIMIZER), Choice):
        for class_path, subspace in space[OPTIMIZER].options.items():
            for name in subspace:
                if name in space:
                    raise SweepError(f"space: {name} is given both for every optimizer and for {class_path}")
    return space


def _parse_optimizers(spec: Any) -> Any:
    """``optimizer: {choice: {torch.optim.SGD: {lr: ...}, torch.optim.Adam: {...}}}``, a list of classes, or one."""
    if isinstance(spec, str):
        _import_optimizer(spec)
        return spec
    if not (isinstance(spec, dict) and list(spec) == ["choice"]):
        raise SweepError("space: optimizer must be a class path or {choice: {CLASS: {ARGUMENT: RANGE, ...}, ...}}")
    options = spec["choice"]
    if isinstance(options, list):
        options = dict.fromkeys(options)
    if not isinstance(options, dict) or not options:
        raise SweepError("space: optimizer: the choice is empty; name at least one optimizer class")
    parsed: dict[Any, dict[str, Any]] = {}
    short_names: dict[str, str] = {}
    for class_path, subspace in options.items():
        if not isinstance(class_path, str):
            raise SweepError(f"space: optimizer: {class_path!r} is not a class path such as torch.optim.Adam")
        _import_optimizer(class_path)
        short = _short(class_path)
        if short in short_names:
            raise SweepError(f"space: optimizer: {short_names[short]} and {class_path} have the same class name")
        short_names[short] = class_path
        subspace = subspace or {}
        if not isinstance(subspace, dict):
            raise SweepError(f"space: optimizer: {class_path}: expected a mapping of its arguments to ranges")
        for name in subspace:
            if name in (SEED, OPTIMIZER):
                raise SweepError(f"space: optimizer: {class_path}: {name} belongs at the top of the space")
            _check_argument(name, class_path, where=f"space: optimizer: {class_path}")
        parsed[class_path] = {name: _parse_spec(f"{short}.{name}", s) for name, s in subspace.items()}
    return Choice(parsed)


def _parse_spec(name: str, spec: Any) -> Any:
    """One parameter's range: ``{log: [low, high]}``, ``{uniform: [low, high]}``, ``{int: [low, high]}``,
    ``{choice: [values]}``, or a fixed value."""
    if not isinstance(spec, dict):
        if isinstance(spec, (list, tuple)):
            raise SweepError(f"space: {name}: a list is ambiguous; write {{choice: [...]}} or {{log: [low, high]}}")
        return _number(spec) if isinstance(spec, str) else spec
    if len(spec) != 1 or next(iter(spec)) not in ("log", "uniform", "int", "choice"):
        raise SweepError(
            f"space: {name}: expected one of {{log: [low, high]}}, {{uniform: [low, high]}}, {{int: [low, high]}}, "
            f"{{choice: [values]}} or a fixed value, got {spec}"
        )
    kind, value = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise SweepError(f"space: {name}: choice needs a non-empty list of values, got {value!r}")
        for option in value:
            if not isinstance(option, (str, int, float, bool)) and option is not None:
                raise SweepError(f"space: {name}: choice values must be numbers, strings or booleans, got {option!r}")
        return Choice({_number(v) if isinstance(v, str) else v: {} for v in value})
    if not isinstance(value, list) or len(value) != 2:
        raise SweepError(f"space: {name}: {kind} needs [low, high], got {value!r}")
    low, high = (_number(v) if isinstance(v, str) else v for v in value)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise SweepError(f"space: {name}: {kind} needs two finite numbers, got {value!r}")
    if low > high:
        raise SweepError(f"space: {name}: the range [{low}, {high}] is empty (low is above high)")
    if kind == "int":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise SweepError(f"space: {name}: int needs whole numbers, got [{low}, {high}]")
        return Int(int(low), int(high))
    if kind == "log" and low <= 0:
        raise SweepError(f"space: {name}: log needs low > 0, got [{low}, {high}]")
    return Float(float(low), float(high), log=kind == "log")


def _check_argument(name: str, class_path: str, where: str) -> None:
    arguments = _optimizer_arguments(class_path)
    if name not in arguments:
        raise SweepError(
            f"{where}: unknown parameter {name!r}: use seed, optimizer, or an argument of {class_path} "
            f"({', '.join(arguments)})"
        )


def _import_optimizer(class_path: str) -> type:
    import torch

    try:
        cls = import_class(class_path)
    except (ImportError, AttributeError, ValueError):  # ValueError: a name without a module
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise SweepError(f"{class_path!r} is not an optimizer class (such as torch.optim.Adam)")
    return cls


def _optimizer_arguments(class_path: str) -> list[str]:
    parameters = inspect.signature(_import_optimizer(class_path)).parameters
    return [p for p in parameters if p != "params"]


def suggest(trial: optuna.Trial, space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The fit settings of one trial (``{"optimizer": ..., "lr": ..., "seed": ...}``), drawn from the space.

    A chosen optimizer's own parameters are named ``<class name>.<argument>`` in the study, so that each optimizer
    keeps its own range and history (SGD's lr and Adam's lr differ by orders of magnitude)."""
    settings: dict[str, Any] = {}
    for name, spec in space.items():
        key = prefix + name
        if isinstance(spec, Float):
            settings[name] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
        elif isinstance(spec, Int):
            settings[name] = trial.suggest_int(key, spec.low, spec.high)
        elif isinstance(spec, Choice):
            settings[name] = trial.suggest_categorical(key, list(spec.options))
            settings |= suggest(trial, spec.options[settings[name]], prefix=f"{_short(settings[name])}.")
        else:
            settings[name] = spec
    return settings


def any_point(space: dict[str, Any]) -> list[dict[str, Any]]:
    """One point of each optimizer's branch of the space (the low ends, the first choices): what the fit config
    is checked with before the sweep starts."""
    points = []
    optimizers = space.get(OPTIMIZER)
    branches = list(optimizers.options.items()) if isinstance(optimizers, Choice) else [(None, {})]
    for class_path, subspace in branches:
        point = {}
        for name, spec in {**space, **subspace}.items():
            if isinstance(spec, (Float, Int)):
                point[name] = spec.low
            elif isinstance(spec, Choice):
                point[name] = next(iter(spec.options))
            else:
                point[name] = spec
        if class_path is not None:
            point[OPTIMIZER] = class_path
        points.append(point)
    return points


def fit_flags(settings: dict[str, Any]) -> list[str]:
    """``dynnet fit`` flags for a trial's settings. The optimizer class comes first: dynnet then gives the class its
    own defaults for every argument not given after it."""
    flags = [f"--optimizer={settings[OPTIMIZER]}"] if OPTIMIZER in settings else []
    for name, value in settings.items():
        if name == SEED:
            flags.append(f"--seed_everything={_flag_value(value)}")
        elif name != OPTIMIZER:
            flags.append(f"--optimizer.{name}={_flag_value(value)}")
    return flags


def settings_of(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters as fit settings: ``Adam.lr`` is the lr of the trial's optimizer, Adam."""
    return {name.rpartition(".")[2]: value for name, value in params.items()}


def describe(settings: dict[str, Any]) -> str:
    """``optimizer=Adam lr=0.0123 seed=4``: short and readable, for the lines a sweep prints."""
    shown = []
    for name, value in settings.items():
        if name == OPTIMIZER:
            value = _short(value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        shown.append(f"{name}={value}")
    return " ".join(shown)


# ------------------------------------------------------------------------------------------------ the sweep config


@dataclass
class Sweep:
    """Everything a sweep needs, from its config file and flags; sent to every worker process."""

    config: Path  # the sweep config file
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


KEYS = {
    "fit",
    "fit_args",
    "space",
    "objective",
    "direction",
    "sampler",
    "pruner",
    "trials",
    "workers",
    "storage",
    "study",
    "root",
    "heartbeat_interval",
    "grace_period",
}


def load_sweep(path: str, flags: argparse.Namespace) -> Sweep:
    """Read and check a sweep config; flags given on the command line replace the file's values."""
    config = Path(path)
    try:
        raw = yaml.safe_load(config.read_text())
    except OSError as err:
        raise SweepError(f"sweep config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SweepError(f"sweep config {path} is not valid YAML: {one_line(err)}") from None
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
    objective = raw.get("objective", "val/optimality_gap")  # the distance to the optimum, what dynnet is judged by
    if objective not in OBJECTIVES:
        raise SweepError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    direction = raw.get("direction", DEFAULT_DIRECTION)
    if direction not in ("minimize", "maximize"):
        raise SweepError(f"direction must be minimize or maximize, got {direction!r}")
    study = flags.study or raw.get("study") or config.stem
    trials = _positive("--trials", flags.trials if flags.trials is not None else raw.get("trials", DEFAULT_TRIALS))
    # One worker per core: a trial is a single-threaded loop of small tensor operations.
    workers = _positive("--workers", flags.workers if flags.workers is not None else raw.get("workers", _cores()))
    root = Path(flags.root or raw.get("root") or DEFAULT_ROOT_PARENT / study).expanduser().resolve()
    storage = flags.storage or raw.get("storage") or f"sqlite:///{root / 'study.db'}"
    interval = _positive("heartbeat_interval", raw.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL))
    grace = _positive("grace_period", raw.get("grace_period", DEFAULT_GRACE_PERIOD))
    if grace <= interval:
        raise SweepError(f"grace_period ({grace} s) must be longer than heartbeat_interval ({interval} s)")
    space = parse_space(raw.get("space"), _fit_optimizer(fit_config, raw.get("fit_args")))
    return Sweep(
        config=config,
        fit_config=fit_config,
        fit_args=fit_args,
        space=space,
        objective=objective,
        direction=direction,
        sampler=_class_spec("sampler", raw.get("sampler"), DEFAULT_SAMPLER, space),
        pruner=_class_spec("pruner", raw.get("pruner"), DEFAULT_PRUNER, space),
        trials=trials,
        workers=workers,
        storage=storage,
        study=study,
        root=root,
        heartbeat_interval=interval,
        grace_period=grace,
    )


def _fit_args(raw: Any) -> list[str]:
    """``fit_args``: flags for every trial's fit, as a mapping (``trainer.max_steps: 3000``) or a list of flags."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        args = [f"--{name}={_flag_value(value)}" for name, value in raw.items()]
    elif isinstance(raw, list) and all(isinstance(a, str) for a in raw):
        args = list(raw)
    else:
        raise SweepError("fit_args: expected a mapping of dynnet fit flags to values, e.g. trainer.max_steps: 3000")
    for arg in args:
        name = arg.partition("=")[0].lstrip("-")
        if name in ("trainer.default_root_dir", "run", "ckpt_path", "c", "config"):
            raise SweepError(f"fit_args: the sweep sets --{name} itself (see --root and the config's fit key)")
    return args


def _fit_optimizer(fit_config: Path, fit_args: Any) -> str:
    """The optimizer class the trials train with when the space does not choose one."""
    if isinstance(fit_args, dict) and isinstance(fit_args.get(OPTIMIZER), str):
        return fit_args[OPTIMIZER]
    try:
        spec = (yaml.safe_load(fit_config.read_text()) or {}).get(OPTIMIZER)
    except (OSError, yaml.YAMLError, AttributeError):
        spec = None  # the fit config's own problem: checking the fit (check_fit) names it
    if isinstance(spec, dict):
        spec = spec.get("class_path")
    return spec if isinstance(spec, str) else TUTORIAL_OPTIMIZER


def _class_spec(key: str, raw: Any, default: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
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
    make(key, spec, space)
    return spec


def make(key: str, spec: dict[str, Any], space: dict[str, Any], seed_offset: int = 0) -> Any:
    """The sampler or pruner a spec names, from optuna.samplers or optuna.pruners."""
    module = optuna.samplers if key == "sampler" else optuna.pruners
    cls = getattr(module, spec["class"], None)
    if not isinstance(cls, type):
        raise SweepError(f"{key}: optuna.{key}s has no class {spec['class']!r}")
    kwargs = {k: v for k, v in spec.items() if k != "class"}
    if cls is optuna.samplers.GridSampler and "search_space" not in kwargs:
        kwargs["search_space"] = grid(space)
    if isinstance(kwargs.get("seed"), int):
        # Workers with one seed would draw the same random points; a rerun would repeat the first run's.
        kwargs["seed"] += seed_offset
    try:
        with experimental_ok():
            return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise SweepError(f"{key}: {spec['class']}: {one_line(err)}") from None


def grid(space: dict[str, Any]) -> dict[str, list[Any]]:
    """GridSampler's grid: every value of each int range and choice (seeds 0 to 9: ten trials, one per seed)."""
    points: dict[str, list[Any]] = {}
    for name, spec in space.items():
        if isinstance(spec, Int):
            points[name] = list(range(spec.low, spec.high + 1))
        elif isinstance(spec, Choice) and not any(spec.options.values()):
            points[name] = list(spec.options)
        elif isinstance(spec, (Float, Choice)):
            raise SweepError(f"sampler: GridSampler needs int ranges and plain choices; {name} is not one")
    return points


def _cores() -> int:
    """The cores this process may run on (a container or taskset can allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepError(f"{name} must be a whole number of at least 1, got {value!r}")
    return value


def _number(text: str) -> Any:
    """YAML reads 1e-9 (no dot) as a string: take it as the number it means."""
    try:
        return float(text)
    except ValueError:
        return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


def _short(class_path: Any) -> str:
    return str(class_path).rpartition(".")[2]


# ------------------------------------------------------------------------------------------------ checks


class _ParseOnly(DynnetCLI):
    """dynnet's command line up to its parsed config: checks a trial's flags without creating or training a run."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed


class _Parsed(Exception):
    pass


def base_args(sweep: Sweep, run: str | None = None) -> list[str]:
    """The ``dynnet fit`` arguments every trial shares; a trial adds its settings after them."""
    args = ["fit", "-c", str(sweep.fit_config), f"--trainer.default_root_dir={sweep.root}"]
    if run is not None:
        args.append(f"--run={run}")
    # Several workers' progress displays would interleave on one terminal; the sweep prints one line a trial.
    return [*args, "--trainer.enable_progress_bar=false", *sweep.fit_args]


def check_fit(sweep: Sweep) -> None:
    """Parse the fit of one point of every optimizer's branch, so a bad fit config, flag or argument is reported
    before the sweep starts rather than failing every trial."""
    for point in any_point(sweep.space):
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                _ParseOnly(args=[*base_args(sweep), *fit_flags(point)])
        except _Parsed:
            continue
        except USER_ERRORS as err:
            raise SweepError(f"the trials' fit ({describe(point)}): {one_line(err)}") from None


def open_storage(sweep: Sweep) -> optuna.storages.RDBStorage:
    """The study's database. Its heartbeat settings make a worker's storage beat for each trial it runs, and let
    any process (a worker, the sweep's own) fail the running trials whose heartbeat stopped."""
    url = sweep.storage
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a long-lived worker survives a server restart
    if url.startswith("sqlite"):
        # Workers write to one SQLite file; waiting up to a minute for its lock beats failing a trial on it.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
        for attempt in range(STORAGE_ATTEMPTS):
            try:
                with experimental_ok():
                    return optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=sweep.heartbeat_interval,
                        grace_period=sweep.grace_period,
                    )
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Two commands started together both create the study tables; the second finds them half made.
                if attempt == STORAGE_ATTEMPTS - 1:
                    raise
                time.sleep(1)
    except ImportError as err:  # Optuna wraps the driver's ModuleNotFoundError
        driver = getattr(err.__cause__, "name", None) or getattr(err, "name", None) or "module"
        hint = ": pip install 'dynnet[postgres]'" if url.startswith("postgresql") else ""
        raise SweepError(f"storage {_safe_url(url)}: its database driver {driver} is not installed{hint}") from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, OSError) as err:
        reason = getattr(err, "orig", None) or err
        raise SweepError(f"storage {_safe_url(url)} cannot be opened: {one_line(reason)}") from None


def open_study(sweep: Sweep) -> optuna.Study:
    """Create the study, or continue it when it exists; refuse one that optimizes something else."""
    storage = open_storage(sweep)
    study = optuna.create_study(storage=storage, study_name=sweep.study, direction=sweep.direction, load_if_exists=True)
    if study.direction.name.lower() != sweep.direction:
        raise SweepError(
            f"study {sweep.study} exists and {study.direction.name.lower()}s; this config {sweep.direction}s"
        )
    objective = study.user_attrs.get("objective")
    if objective is None:
        study.set_user_attr("objective", sweep.objective)
    elif objective != sweep.objective:
        raise SweepError(
            f"study {sweep.study} exists with objective {objective}, not {sweep.objective}: use another --study"
        )
    if not study.get_trials(deepcopy=False):
        # A new study numbers its trials from 0: runs of an earlier study in the same root would collide.
        taken = sorted(p.name for p in runs_dir(sweep.root).glob("trial_*"))
        if taken:
            raise SweepError(
                f"study {sweep.study} is new but {runs_dir(sweep.root)} already holds {taken[0]}: "
                "use another --root, or the storage of the study that wrote it"
            )
    return study


def _safe_url(url: str) -> str:
    """The storage URL without its password, for messages."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


# ------------------------------------------------------------------------------------------------ the workers


def tally(study: optuna.Study) -> tuple[int, int]:
    """(finished, running): trials that count towards the total, and trials still in flight. Marks dead trials
    failed first, so that they neither count nor hold the sweep up."""
    fail_lost_trials(study)
    finished = running = 0
    for trial in study.get_trials(deepcopy=False):
        finished += counts(trial)
        running += trial.state == TrialState.RUNNING
    return finished, running


def counts(trial: FrozenTrial) -> bool:
    """Whether a trial counts towards the total: completed, pruned, or failed by its own fit (it has a reason)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "reason" in trial.user_attrs


def fail_lost_trials(study: optuna.Study) -> None:
    """Mark failed the running trials whose worker is gone: stale heartbeats (any machine), and trials of this
    machine whose process no longer exists (at once, without waiting for the grace period)."""
    with experimental_ok():
        optuna.storages.fail_stale_trials(study)
    here = _process_space()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if here is not None and trial.user_attrs.get("process_space") == here and not _alive(pid):
            with contextlib.suppress(ValueError, RuntimeError):  # another worker failed it first
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def _process_space() -> str | None:
    """Which processes a pid names here: the boot of this machine and the pid namespace (a container)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _alive(pid: Any) -> bool:
    if not _is_int(pid):
        return True  # not ours to judge: the heartbeat decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class TrialWatch(Callback):
    """Keeps the trial's trainer, whose step count is wanted also when the fit ends by an exception."""

    def __init__(self) -> None:
        self.trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer


def objective(trial: optuna.Trial, sweep: Sweep) -> float:
    """One trial: a dynnet fit with the trial's settings into ``<root>/lightning_logs/trial_<number>``."""
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("process_space", _process_space())
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("command", sweep.command)
    settings = suggest(trial, sweep.space)
    name = f"trial_{trial.number}"
    run = runs_dir(sweep.root) / name
    trial.set_user_attr("run", str(run))
    watch = TrialWatch()
    pruning = PyTorchLightningPruningCallback(trial, monitor=sweep.objective)
    output = io.StringIO()  # the fit's own lines, kept in the run folder rather than mixed into the sweep's
    start = time.perf_counter()
    outcome = ""
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output), ExitStack() as cleanup:
            cli = DynnetCLI(
                args=[*base_args(sweep, name), *fit_flags(settings)], cleanup=cleanup, callbacks=[pruning, watch]
            )
            metrics = cli.model.evaluate(*next(iter(cli.datamodule.val_dataloader())))
        value = float(metrics[sweep.objective.partition("/")[2]])
        if not math.isfinite(value):
            raise TrialFailed(f"{sweep.objective} is {value}")
        trial.set_user_attr("result", cli.model.model.formula())
        outcome = f"complete: {sweep.objective} {value:.6g}"
        return value
    except optuna.TrialPruned:
        reported = watch.trainer.callback_metrics.get(sweep.objective) if watch.trainer is not None else None
        outcome = f"pruned at step {_steps(watch)}" + (f": {sweep.objective} {float(reported):.6g}" if reported else "")
        raise
    except (Interrupted, KeyboardInterrupt, SystemExit):
        # Stopped from outside (Ctrl-C, SIGTERM): the trial did not fail on its own, so it gets no reason and
        # does not count; the worker stops.
        outcome = "stopped: the worker was interrupted"
        raise KeyboardInterrupt from None
    except Exception as err:
        reason = (
            one_line(err) if isinstance(err, (*USER_ERRORS, TrialFailed)) else f"{type(err).__name__}: {one_line(err)}"
        )
        output.write(traceback.format_exc())
        trial.set_user_attr("reason", reason)
        outcome = f"failed: {reason}"
        raise TrialFailed(reason) from err
    finally:
        seconds = time.perf_counter() - start
        trial.set_user_attr("steps", _steps(watch))
        trial.set_user_attr("seconds", round(seconds, 3))
        if run.is_dir():
            with contextlib.suppress(OSError):
                (run / "sweep.log").write_text(output.getvalue())
        print(
            f"trial {trial.number} {outcome} ({describe(settings)}; {_steps(watch)} steps, {seconds:.1f} s)", flush=True
        )


def _steps(watch: TrialWatch) -> int:
    return watch.trainer.global_step if watch.trainer is not None else 0


def work(sweep: Sweep, index: int) -> None:
    """A worker process: runs trials one at a time until the study holds sweep.trials finished trials."""
    # Ctrl-C reaches every worker; SIGTERM (from the sweep's own process when it is stopped) ends the worker the
    # same way between fits. During a fit dynnet stops the fit at a step boundary first.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Each worker's lines are the sweep's; Optuna's own (a trial finished, failed with a traceback) would repeat them.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    import torch

    # Workers share the cores: one training thread each, more only when cores outnumber workers.
    torch.set_num_threads(max(1, _cores() // sweep.workers))
    try:
        storage = open_storage(sweep)
        earlier = len(optuna.load_study(study_name=sweep.study, storage=storage).trials)
        sampler = make("sampler", sweep.sampler, sweep.space, seed_offset=1000 * earlier + index)
        pruner = make("pruner", sweep.pruner, sweep.space)
        study = optuna.load_study(study_name=sweep.study, storage=storage, sampler=sampler, pruner=pruner)
        while True:
            finished, running = tally(study)
            if finished >= sweep.trials:
                return
            if finished + running >= sweep.trials:
                # Other workers' trials may complete the study, or die and leave their place to this one.
                time.sleep(POLL_SECONDS)
                continue
            study.optimize(
                lambda trial: objective(trial, sweep), n_trials=1, catch=(TrialFailed,), gc_after_trial=False
            )
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGTERM)
    except SweepError as err:
        sys.exit(f"{PROG}: error: worker {index}: {err}")


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_workers(sweep: Sweep) -> list[str]:
    """Start the workers and wait for them; the lines that say how each one that did not end normally ended."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or torch state forked
    workers = [context.Process(target=work, args=(sweep, i), name=f"{PROG} worker {i}") for i in range(sweep.workers)]
    for worker in workers:
        worker.start()
    print(f"Workers: {', '.join(f'{i} (pid {w.pid})' for i, w in enumerate(workers))}", flush=True)
    problems = []
    pending = list(workers)
    try:
        while pending:
            ready = multiprocessing.connection.wait([w.sentinel for w in pending])
            for worker in [w for w in pending if w.sentinel in ready]:
                worker.join()  # reaps it, so another worker sees its pid gone and fails its trial at once
                pending.remove(worker)
                if worker.exitcode != 0:
                    problems.append(f"worker {workers.index(worker)} (pid {worker.pid}) {_exit(worker.exitcode)}")
                    print(f"{PROG}: {problems[-1]}; the others go on", file=sys.stderr, flush=True)
    finally:
        for worker in pending:  # interrupted: stop the rest, each at its next step boundary
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        for worker in pending:
            worker.join(timeout=60)
    return problems


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


# ------------------------------------------------------------------------------------------------ results


def trial_rows(trials: list[FrozenTrial], objective: str) -> tuple[list[str], list[dict[str, Any]]]:
    """trials.csv: one row per trial with its settings, state, objective, steps, seconds, run folder and reason."""
    names: list[str] = []
    rows = []
    for trial in trials:
        settings = settings_of(trial.params)
        names += [n for n in settings if n not in names]
        attrs = trial.user_attrs
        state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(trial.state.name, "running")
        reason = attrs.get("reason", "")
        if trial.state == TrialState.FAIL and not reason:
            reason = "lost: its worker stopped before the fit ended (killed or interrupted)"
        seconds = attrs.get("seconds")
        if seconds is None and trial.duration is not None:
            seconds = round(trial.duration.total_seconds(), 3)
        rows.append(
            {"trial": trial.number, "state": state, objective: _value(trial), **settings}
            | {
                "steps": attrs.get("steps", ""),
                "seconds": seconds if seconds is not None else "",
                "run": attrs.get("run", ""),
            }
            | {"reason": reason}
        )
    return ["trial", "state", objective, *names, "steps", "seconds", "run", "reason"], rows


def _value(trial: FrozenTrial) -> float | str:
    """A completed trial's objective; a pruned trial's last reported value; nothing for a failed one."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return ""


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict[str, Any]], objective: str, title: str) -> None:
    """The objective against the learning rate, one colour per optimizer, log axes: completed trials filled,
    pruned ones hollow at their last reported value, failed ones as crosses along the top."""
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    by_lr = any("lr" in row and row["lr"] != "" for row in rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_short(row.get(OPTIMIZER)) if row.get(OPTIMIZER) else "trials", []).append(row)
    # A gap at the optimum can come out a hair below 0 in float64: drawn at the floor of the log axis instead.
    floor = 1e-16
    for (name, group), color in zip(groups.items(), [f"C{i}" for i in range(10)] * 10):
        for state, style in (("complete", {"marker": "o"}), ("pruned", {"marker": "o", "mfc": "none"})):
            points = [
                (_x(r, by_lr), max(float(r[objective]), floor))
                for r in group
                if r["state"] == state and r[objective] != ""
            ]
            if points:
                xs, ys = zip(*points)
                axes.plot(xs, ys, ls="none", color=color, ms=6, **style)
        failed = [_x(r, by_lr) for r in group if r["state"] == "failed" and _x(r, by_lr) is not None]
        if failed:
            axes.plot(
                failed,
                [1.0] * len(failed),
                ls="none",
                marker="x",
                color=color,
                transform=axes.get_xaxis_transform(),
                clip_on=False,
            )
        axes.plot([], [], ls="none", marker="o", color=color, label=name)
    if by_lr:
        axes.set_xscale("log")
    if any(r[objective] != "" and float(r[objective]) > 0 for r in rows) and objective != "val/log10_gap":
        axes.set_yscale("log")
    handles, _ = axes.get_legend_handles_labels()
    handles += [
        Line2D([], [], ls="none", marker="o", color="0.4", label="complete"),
        Line2D([], [], ls="none", marker="o", mfc="none", color="0.4", label="pruned (last value)"),
        Line2D([], [], ls="none", marker="x", color="0.4", label="failed"),
    ]
    axes.legend(handles=handles, fontsize="small", loc="best")
    axes.set(xlabel="learning rate" if by_lr else "trial", ylabel=objective, title=title)
    axes.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _x(row: dict[str, Any], by_lr: bool) -> float | None:
    if not by_lr:
        return row["trial"]
    return row["lr"] if row.get("lr") not in (None, "") else None


def report(study: optuna.Study, sweep: Sweep) -> bool:
    """Print the study's counts and its best trial with its Result line; write trials.csv and sweep.png. Whether
    the study holds its total of finished trials."""
    fail_lost_trials(study)
    trials = study.get_trials(deepcopy=False)
    columns, rows = trial_rows(trials, sweep.objective)
    csv_path, png_path = sweep.root / "trials.csv", sweep.root / "sweep.png"
    write_csv(csv_path, columns, rows)
    plot(png_path, rows, sweep.objective, f"{sweep.study}: {sweep.objective} of each trial")
    finished = sum(counts(t) for t in trials)
    tallies = {
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL and counts(t) for t in trials),
        "lost": sum(t.state == TrialState.FAIL and not counts(t) for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
    }
    ran = sum(t.user_attrs.get("command") == sweep.command for t in trials)
    print(
        f"Study {sweep.study}: {finished} of {sweep.trials} trials finished "
        f"({', '.join(f'{n} {state}' for state, n in tallies.items() if n or state != 'running')}); "
        f"this command ran {ran}",
        flush=True,
    )
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        run = best.user_attrs.get("run", "?")
        if best.user_attrs.get("host", socket.gethostname()) != socket.gethostname():
            run = f"{best.user_attrs['host']}:{run}"  # the trial ran on another machine
        print(
            f"Best trial {best.number}: {describe(settings_of(best.params))}, {sweep.objective} {best.value:.6g}, "
            f"run {run}"
        )
        print(f"Result: {best.user_attrs.get('result', '?')}")
    else:
        print("No trial completed yet: no best trial")
    print(f"Trials: {csv_path}; picture: {png_path}", flush=True)
    return finished >= sweep.trials


# ------------------------------------------------------------------------------------------------ the command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        sys.exit(f"{self.prog}: error: {message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Search learning rates, optimizers and seeds for dynnet fits with Optuna. Every trial is a "
        "dynnet fit in its own run folder, ROOT/lightning_logs/trial_N. Rerunning the same command continues the "
        "study; several machines given one --storage URL work on one study. At the end it prints the best trial "
        "and its Result line and writes ROOT/trials.csv and ROOT/sweep.png.",
        epilog="Flags override the config's keys of the same name. See the README's section Sweeps.",
    )
    parser.add_argument(
        "config",
        metavar="CONFIG",
        help="the sweep config (YAML): the fit config to start from (fit), flags for every fit (fit_args), the "
        "search space (space), the objective and its direction, the sampler and the pruner",
    )
    parser.add_argument(
        "--trials",
        type=int,
        metavar="N",
        help=f"finish when the study holds N finished trials (complete, pruned or failed), counting earlier runs "
        f"of the study; a trial whose worker died does not count (default: the config's trials, else {DEFAULT_TRIALS})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="W",
        help="trials run in W processes at once on this machine (default: the config's workers, else the number "
        "of cores)",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="the study's database, any SQLAlchemy URL Optuna supports, e.g. "
        "postgresql+psycopg://user:password@host/db (default: the config's storage, else sqlite:///ROOT/study.db)",
    )
    parser.add_argument(
        "--study",
        metavar="NAME",
        help="the study's name in the storage (default: the config's study, else the config file's name)",
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="where the runs (DIR/lightning_logs), trials.csv and sweep.png go (default: the config's root, "
        "else runs/STUDY)",
    )
    return parser


def main(args: list[str] | None = None) -> None:
    flags = parser().parse_args(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created": the sweep's first line says so
    try:
        sweep = load_sweep(flags.config, flags)
        check_fit(sweep)
    except SweepError as err:
        sys.exit(f"{PROG}: error: {err}")
    created = not sweep.root.exists()
    try:
        sweep.root.mkdir(parents=True, exist_ok=True)  # before the study: the default SQLite file lives there
        study = open_study(sweep)
        finished, _ = tally(study)
    except SweepError as err:
        if created:  # bad input leaves nothing behind
            with contextlib.suppress(OSError):
                sweep.root.rmdir()
        sys.exit(f"{PROG}: error: {err}")
    print(
        f"Study {sweep.study} in {_safe_url(sweep.storage)}: {finished} of {sweep.trials} trials finished; "
        f"runs under {runs_dir(sweep.root)}",
        flush=True,
    )
    problems: list[str] = []
    if finished < sweep.trials:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            problems = run_workers(sweep)
        except KeyboardInterrupt:
            report(study, sweep)
            print(f"{PROG}: interrupted; run the same command again to continue the study", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        finally:
            signal.signal(signal.SIGTERM, previous)
    if not report(study, sweep):
        reason = "; ".join(problems) or "the workers stopped"
        sys.exit(f"{PROG}: error: the study is not finished ({reason}); run the same command again to continue it")


if __name__ == "__main__":
    main()
