"""The command line as `dynnet` reads it, around LightningCLI's parser: config files read within bounds, flags the
parser would misread, the optimizer a command means, and how a chosen class or a value is shown."""

import contextlib
import enum
import importlib
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LRSchedulerTypeTuple
from torch.optim import Optimizer

from dynnet.cli.predictions import PredictionCSV
from dynnet.model import TUTORIAL_OPTIMIZER
from dynnet.runs.yaml_files import MAX_BYTES, MAX_VALUES, expanded_size, load_yaml

# Flags whose value is a path that is not a config: every other flag given a file reads it as YAML.
PATH_FLAGS = ("--ckpt_path", "--run", "--predictions.path", "--trainer.default_root_dir")


def add_arguments(parser) -> None:
    """The arguments `dynnet` adds to LightningCLI's: where predictions go, the optimizer and schedule by class,
    the run's name and when the schedule steps."""
    parser.add_lightning_class_args(PredictionCSV, "predictions")
    parser.add_optimizer_args((Optimizer,))
    parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
    parser.add_argument(
        "--run",
        type=str | None,
        default=None,
        help="Name of the run folder under <default_root_dir>/lightning_logs (default: the next version_N for "
        "a new fit; the newest run for --ckpt_path last).",
    )
    parser.add_argument(
        "--lr_interval",
        type=Literal["step", "epoch"],
        default="step",
        help="When lr_scheduler steps: after every optimizer step, or at every epoch end. ReduceLROnPlateau "
        "steps after every validation.",
    )
    titles = {"predictions": "Where `dynnet predict` writes", "lr_scheduler": "Learning-rate schedule"}
    for key, title in titles.items():
        if key in parser.groups:
            parser.groups[key].title = title


def flag_values(args: list[str]) -> Iterator[tuple[str, str]]:
    """Each flag given a value, as (flag, value): ``--flag value``, ``--flag=value`` and ``-c value``."""
    for token, following in zip(args, [*args[1:], None]):
        if token.startswith("--") and "=" in token:
            flag, _, value = token.partition("=")
            yield flag, value
        elif token.startswith("-") and following is not None and not following.startswith("-"):
            yield token, following


def config_files(args: list[str]) -> dict[str, Any]:
    """The YAML config files args name (``-c``, ``--config``, ``--config=``), loaded within bounds, after checking
    what the parser would report without the file's name: an empty file, or a section that is not a mapping."""
    files = {}
    for flag, value in flag_values(args):
        if flag not in ("-c", "--config") or not Path(value).is_file():
            continue  # a missing file is reported by the parser, with its name
        content = load_yaml(value)
        if content is None:
            raise ValueError(f"config file {value} is empty")
        if not isinstance(content, dict):
            raise ValueError(f"config file {value} should map settings to values, got {type(content).__name__}")
        for section in ("model", "data", "trainer"):
            if section in content and not isinstance(content[section], dict | None):
                raise ValueError(
                    f"config file {value}: {section} should map its settings to values (for example "
                    f"{section}: {{{'max_degree: 5' if section == 'model' else '...'}}}), got {content[section]!r}"
                )
        files[value] = content
    return files


def check_flag_values(args: list[str]) -> None:
    """Refuse a flag's value that is a YAML bomb (aliases that expand without end) or megabytes long, before the
    parser reads it as YAML; and likewise a file given as a flag's value (``--trainer FILE``), which the parser
    reads as YAML too."""
    for token in args:
        value = token.partition("=")[2] if token.startswith("--") and "=" in token else token
        if len(value) > MAX_BYTES:
            raise ValueError(
                f"the value {value[:40]!r}... holds {len(value)} characters, more than a config's {MAX_BYTES}"
            )
        with contextlib.suppress(yaml.YAMLError, RecursionError):  # not YAML: the parser says what is wrong with it
            if "&" in value and expanded_size(yaml.safe_load(value), {}) > MAX_VALUES:
                raise ValueError(f"the value {value[:40]!r}... was refused: its YAML aliases expand without end")
    for flag, value in flag_values(args):
        if flag not in (*PATH_FLAGS, "-c", "--config") and Path(value).is_file():  # config files: see config_files
            load_yaml(value, f"{flag} file")


def with_default_optimizer(args: list[str], configs: dict[str, Any]) -> list[str]:
    """args with the tutorial's optimizer chosen first when they set optimizer arguments but nothing chooses a
    class: `dynnet fit --optimizer.lr 1e-7` means the tutorial's SGD at that lr."""
    chooses = any(t.partition("=")[0] in ("--optimizer", "--optimizer.class_path") for t in args)
    chooses |= any(content.get("optimizer") for content in configs.values())
    first = next((i for i, t in enumerate(args) if t.startswith("--optimizer.")), None)
    if chooses or first is None:
        return args
    tutorial = json.dumps(TUTORIAL_OPTIMIZER)
    return [*args[:first], f"--optimizer={tutorial}", *args[first:]]


def join_negative_numbers(args: list[str]) -> list[str]:
    """``--flag -1e-3`` as ``--flag=-1e-3``: argparse would take a negative number in e-notation for a flag."""
    joined: list[str] = []
    for token in args:
        previous = joined[-1] if joined else ""
        if re.fullmatch(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf", token) and previous.startswith("--"):
            if "=" not in previous:
                joined[-1] = f"{previous}={token}"
                continue
        joined.append(token)
    return joined


def arguments_after_class_flag(args: list[str], key: str) -> set[str] | None:
    """When args choose key's class by flag, the names of the arguments given for it after that flag; else None."""
    explicit: set[str] | None = None
    for i, token in enumerate(args):
        name, _, value = token.partition("=")
        if name in (f"--{key}", f"--{key}.class_path"):
            explicit = set()
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value.lstrip().startswith("{"):
                with contextlib.suppress(yaml.YAMLError, AttributeError):
                    explicit |= set(yaml.safe_load(value).get("init_args") or {})
        elif explicit is not None and name.startswith(f"--{key}."):
            explicit.add(name[len(key) + 3 :].removeprefix("init_args."))
    return explicit


def class_defaults(class_path: str) -> dict[str, Any]:
    parameters = inspect.signature(import_class(class_path)).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.default is not inspect.Parameter.empty and p.name not in ("params", "optimizer")
    }


def as_call(obj: object) -> str:
    """``Class(arg=value, ...)``: an optimizer's or scheduler's lr and every argument it was given a value for
    other than its class's default."""
    parameters = inspect.signature(type(obj)).parameters.values()
    names = [p.name for p in parameters if p.name not in ("params", "optimizer", "last_epoch", "verbose")]
    defaults = class_defaults(f"{type(obj).__module__}.{type(obj).__qualname__}")
    values = dict(getattr(obj, "defaults", {})) or {k: getattr(obj, k) for k in names if hasattr(obj, k)}
    shown = {
        k: v for k, v in values.items() if k == "lr" or (k in names and defaults.get(k, inspect.Parameter.empty) != v)
    }
    return f"{type(obj).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def settle_classes(config: Namespace, args: list[str]) -> None:
    """The optimizer and schedule a command means: the tutorial's optimizer when nothing names one, and a class
    chosen by flag from its own defaults. jsonargparse keeps a previous class's arguments when a flag names a new
    class (`-c default.yaml --optimizer torch.optim.Adam` would train Adam at SGD's lr 1e-8)."""
    if config.get("optimizer") is None:
        config.optimizer = Namespace(class_path=TUTORIAL_OPTIMIZER["class_path"])
        defaults = class_defaults(TUTORIAL_OPTIMIZER["class_path"])
        config.optimizer.init_args = Namespace(defaults | TUTORIAL_OPTIMIZER["init_args"])
    for key in ("optimizer", "lr_scheduler"):
        explicit = arguments_after_class_flag(args, key)
        if explicit is not None and config.get(key) is not None:
            spec = config[key]
            given = {k: v for k, v in vars(spec.get("init_args") or Namespace()).items() if k in explicit}
            spec.init_args = Namespace(class_defaults(spec.class_path) | given)


def clip_in_module(config: Namespace) -> None:
    """Give the Trainer's gradient clipping to DynamicNet, which clips in its step loop: Lightning's Trainer clips
    only under automatic optimization."""
    trainer = config.trainer
    if trainer.gradient_clip_val is not None:
        config.model.gradient_clip_val = trainer.gradient_clip_val
        config.model.gradient_clip_algorithm = trainer.gradient_clip_algorithm or "norm"
        trainer.gradient_clip_val = trainer.gradient_clip_algorithm = None


def named(key: str, config: Namespace, args: list[str], files: dict[str, Any]) -> str:
    """A setting as the user gave it: ``--key value``, or ``key: value (in FILE)`` when one of the config files
    set it and no flag did."""
    value = config
    for part in key.split("."):
        if isinstance(value, Namespace) and part not in value and "init_args" in value:
            value = value.init_args  # a class's argument
        value = value.get(part) if isinstance(value, Namespace) else None
    value = getattr(value, "class_path", value)  # a class given as a Namespace: its name
    if not any(t == f"--{key}" or t.startswith(f"--{key}=") for t in args):
        for path, content in reversed(files.items()):
            node = content
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
                node = node.get("init_args", node) if isinstance(node, dict) and "class_path" in node else node
            if node is not None:
                return f"{key}: {value} (in {path})"
    return f"--{key} {value}"


def writable(value: Any) -> Any:
    """value with what jsonargparse cannot write inside a callback's arguments (an enum such as Timer's interval,
    a torch.device such as StochasticWeightAveraging's) as the text that parses back to it."""
    if isinstance(value, Namespace):
        for key, item in vars(value).items():
            setattr(value, key, writable(item))
    elif isinstance(value, list):
        return [writable(v) for v in value]
    elif isinstance(value, enum.Enum):
        return value.name
    elif isinstance(value, torch.device):
        return str(value)
    return value


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of dotted keys (trainer.max_steps, optimizer.init_args.lr); lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= dotted(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def as_list(value: Any) -> list:
    """A Trainer argument that takes one object or a list of them, as a list."""
    return list(value) if isinstance(value, list) else [] if value is None else [value]


def import_class(class_path: str) -> type:
    """The class a config names by its dotted path."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)
