"""A sweep's search space: what each trial may set (its seed, its optimizer and the optimizer's arguments), how a
trial draws its settings from it, and the ``dynnet fit`` flags that apply them."""

import inspect
import math
from dataclasses import dataclass
from typing import Any

import optuna

from dynnet.cli.arguments import import_class
from dynnet.sweep.errors import SweepError

# Names a search space may use besides the optimizer's own arguments.
SEED, OPTIMIZER = "seed", "optimizer"
# The widest integers a study records exactly (it stores every parameter as a float64).
LARGEST_INT = 2**53


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
        short = short_name(class_path)
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
        if max(abs(low), abs(high)) > LARGEST_INT:
            raise SweepError(
                f"space: {name}: int [{low}, {high}] goes beyond ±2**53, the integers a study records exactly"
            )
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


def plain(space: Any) -> Any:
    """A space, or one parameter's range, written back as a sweep config writes it: what a study records."""
    if isinstance(space, dict):
        return {name: plain(spec) for name, spec in space.items()}
    if isinstance(space, Float):
        return {"log" if space.log else "uniform": [space.low, space.high]}
    if isinstance(space, Int):
        return {"int": [space.low, space.high]}
    if isinstance(space, Choice):
        if any(space.options.values()):
            return {"choice": {option: plain(subspace) for option, subspace in space.options.items()}}
        return {"choice": list(space.options)}
    return space


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
            settings |= suggest(trial, spec.options[settings[name]], prefix=f"{short_name(settings[name])}.")
        else:
            settings[name] = spec
    return settings


def ends(space: dict[str, Any]) -> list[dict[str, Any]]:
    """Two points of each optimizer's branch of the space, every range at its low end (and every choice at its
    first value), then at its high end (its last): what the fits are checked with before the sweep starts."""
    points = []
    optimizers = space.get(OPTIMIZER)
    branches = list(optimizers.options.items()) if isinstance(optimizers, Choice) else [(None, {})]
    for class_path, subspace in branches:
        for end in (0, -1):
            point = {}
            for name, spec in {**space, **subspace}.items():
                if isinstance(spec, (Float, Int)):
                    point[name] = (spec.low, spec.high)[end]
                elif isinstance(spec, Choice):
                    point[name] = list(spec.options)[end]
                else:
                    point[name] = spec
            if class_path is not None:
                point[OPTIMIZER] = class_path
            points.append(point)
    return points


def grid(space: dict[str, Any], trials: int) -> dict[str, list[Any]]:
    """GridSampler's grid: every value of each int range and choice (seeds 0 to 9: ten trials, one per seed), or of
    each list a config's own ``search_space`` gives. Each point is a trial: a grid of more points than the sweep's
    trials is refused with its size, before any value is listed (a wide range would fill the memory)."""
    if not isinstance(space, dict):
        raise SweepError("sampler: GridSampler's search_space must map parameter names to lists of values")
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, Int):
            values[name] = range(spec.low, spec.high + 1)  # not listed yet
        elif isinstance(spec, list):
            values[name] = spec
        elif isinstance(spec, Choice) and not any(spec.options.values()):
            values[name] = list(spec.options)
        elif isinstance(spec, (Float, Choice)):
            raise SweepError(f"sampler: GridSampler needs int ranges and plain choices; {name} is not one")
    points = math.prod(len(v) for v in values.values())
    if points > trials:
        raise SweepError(
            f"sampler: GridSampler's grid holds {points} points, more than the sweep's {trials} trials: narrow its "
            "ranges, or give as many trials"
        )
    return {name: list(v) for name, v in values.items()}


def setting(name: str) -> str:
    """The ``dynnet fit`` setting a space's parameter sets, under the name dynnet's own HPARAMS entry gives it."""
    if name == SEED:
        return "seed_everything"
    return OPTIMIZER if name == OPTIMIZER else f"optimizer.{name}"


def swept_keys(space: dict[str, Any]) -> set[str]:
    """The settings a space sets in every trial, as flags and as the parsed fit names them (optimizer.init_args.lr)."""
    arguments = {f"optimizer.init_args.{name}" for name in space if name not in (SEED, OPTIMIZER)}
    return {setting(name) for name in space} | arguments


def fit_flags(settings: dict[str, Any]) -> list[str]:
    """``dynnet fit`` flags for a trial's settings. The optimizer class comes first: dynnet then gives the class its
    own defaults for every argument not given after it."""
    names = sorted(settings, key=lambda name: name != OPTIMIZER)
    return [f"--{setting(name)}={flag_value(settings[name])}" for name in names]


def settings_of(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters as fit settings: ``Adam.lr`` is the lr of the trial's optimizer, Adam."""
    return {name.rpartition(".")[2]: value for name, value in params.items()}


def brief(settings: dict[str, Any]) -> str:
    """``optimizer=Adam lr=0.0123 seed=4``: short and readable, for the lines a sweep prints."""
    shown = []
    for name, value in settings.items():
        if name == OPTIMIZER:
            value = short_name(value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        shown.append(f"{name}={value}")
    return " ".join(shown)


def flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


def short_name(class_path: Any) -> str:
    return str(class_path).rpartition(".")[2]


def _number(text: str) -> Any:
    """YAML reads 1e-9 (no dot) as a string: take it as the number it means."""
    try:
        return float(text)
    except ValueError:
        return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
