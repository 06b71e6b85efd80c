"""What a resumed checkpoint's states must be: what a fresh fit of the same configuration would save, compared
with the live trainer's own, field by field, as Lightning restores them (loops, data, precision and callbacks when
the model is restored; optimizers and schedulers once they exist, at the fit's start). Anything else is refused in
one line naming the field."""

import copy
import math
import reprlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dynnet.runs.checkpoint import CheckpointError

_LOOPS = ("fit_loop", "validate_loop", "test_loop", "predict_loop")  # what Lightning saves under "loops"


def check_restored_state(checkpoint: dict, trainer) -> None:
    """Refuse, in one line naming the field, a checkpoint whose loops, data, precision or callback states are not
    shaped as this trainer's own: what Lightning restores before training starts (and, for validate, test and
    predict, all it restores besides the model). Called when the model is restored, before any of them is."""
    problem = _restored_problem(checkpoint, trainer)
    if problem:
        raise CheckpointError(f"checkpoint {trainer.ckpt_path} was refused: {problem}")


def check_training_state(checkpoint: dict, trainer, settings: dict) -> None:
    """Refuse, in one line naming the field, a checkpoint whose optimizer, scheduler or run settings are not shaped as
    what this fit's own would save: called once they exist (the fit's start), before Lightning restores them.
    ``settings`` is what this fit records of how it trains (``dynnet.runs.resume.run_settings``)."""
    problem = _training_problem(checkpoint, trainer, settings)
    if problem:
        raise CheckpointError(f"checkpoint {trainer.ckpt_path} was refused: {problem}")


def _restored_callbacks(states: dict, callbacks: list) -> list[tuple[str, Any]]:
    """The live callbacks Lightning gives a state from ``states``, each with its key."""
    return [(callback.state_key, callback) for callback in callbacks if callback.state_key in states]


def _restored_problem(checkpoint: dict, trainer) -> str | None:
    reference = {"loops": {name: getattr(trainer, name).state_dict() for name in _LOOPS}}
    plugin, data = trainer.precision_plugin, trainer.datamodule
    if plugin.state_dict():  # Lightning saves the plugin's state only when it has one
        reference[type(plugin).__qualname__] = plugin.state_dict()
    if data is not None:
        reference[type(data).__qualname__] = data.state_dict()
    fitting = trainer.state.fn == "fit"
    for key, expected in reference.items():
        if key in checkpoint or fitting or key == "loops":  # absent, Lightning would leave it as it starts
            problem = _difference(checkpoint.get(key), expected, key)
            if problem:
                return problem
    states = checkpoint.get("callbacks", {})  # Lightning ignores the states of callbacks this trainer lacks
    for key, callback in _restored_callbacks(states, trainer.callbacks):
        # A callback's fields are its own; what a field maps may vary with the run (the Run's schedule arguments
        # with the config that gave them, a ModelCheckpoint's scores by file), as plain values.
        fields = {field: {} if isinstance(value, dict) else value for field, value in callback.state_dict().items()}
        problem = _difference(states[key], fields, f"callbacks[{key.split('{')[0]!r}]", paths=True)
        if problem:
            return problem
    # Lightning's step count under manual optimization, where global_step comes from when the loops are restored.
    steps = checkpoint["loops"]["fit_loop"]["epoch_loop.manual_optimization.optim_step_progress"]["total"]["completed"]
    if steps != checkpoint["global_step"]:
        return f"its loops count {steps} optimizer steps, and its global_step says {checkpoint['global_step']}"
    return None


def _training_problem(checkpoint: dict, trainer, settings: dict) -> str | None:
    optimizers, saved = trainer.optimizers, checkpoint.get("optimizer_states")
    if not isinstance(saved, list) or len(saved) != len(optimizers):
        return f"its optimizer_states should be a list of {len(optimizers)} optimizer states, as this fit has"
    for i, (state, optimizer) in enumerate(zip(saved, optimizers)):
        problem = _optimizer_problem(state, optimizer, f"optimizer_states[{i}]")
        if problem:
            return problem
    schedulers = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
    return _difference(checkpoint.get("lr_schedulers"), schedulers, "lr_schedulers") or _difference(
        checkpoint["run_settings"], settings, "run_settings", settings=True
    )


def _optimizer_problem(saved: Any, optimizer: torch.optim.Optimizer, where: str) -> str | None:
    """What keeps ``saved`` from being a state of ``optimizer`` (``where`` in the checkpoint), or None.

    Its settings may hold other numbers (a resume may change them); its parameter groups must list this optimizer's
    parameters in order (torch pairs them with states by position), and each parameter's state must be what this
    optimizer writes at a step (see ``_difference``).
    """
    live = optimizer.state_dict()
    if not isinstance(saved, dict) or saved.keys() != live.keys():
        return f"its {where} should hold an optimizer's {' and '.join(live)}"
    groups = saved["param_groups"]
    problem = _difference(groups, live["param_groups"], f"{where}['param_groups']", settings=True)
    if problem:
        return problem
    for i, (group, own) in enumerate(zip(groups, live["param_groups"])):
        if group["params"] != own["params"]:
            shown = reprlib.repr(group["params"])
            return f"its {where}['param_groups'][{i}]['params'] is {shown}, where this optimizer's are {own['params']}"
    state, stepped = saved["state"], _stepped_state(optimizer, groups)
    if not isinstance(state, dict):
        return _unlike(state, stepped, f"{where}['state']")
    if state.keys() - stepped.keys():
        return f"its {where}['state'] holds {_listed(state.keys() - stepped.keys())}, which this optimizer does not"
    return _difference(state, {index: stepped[index] for index in state}, f"{where}['state']")


def _stepped_state(optimizer: torch.optim.Optimizer, groups: list) -> dict:
    """The per-parameter state ``optimizer`` writes at a step under ``groups`` (the checkpoint's settings, compared
    with its own already): a twin of it, on zeroed copies of its parameters, takes a step with zero gradients."""
    if isinstance(optimizer, torch.optim.LBFGS):
        # LBFGS keeps one state for all its parameters, under the first, with a history that grows with the steps
        # taken; a step without a gradient returns before recording it. Its values are checked as plain values.
        return {groups[0]["params"][0]: {}}
    twin = type(optimizer).__new__(type(optimizer))
    copies = [
        {**group, "params": [torch.zeros_like(p, requires_grad=True) for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    twin.__setstate__({"defaults": optimizer.defaults, "state": defaultdict(dict), "param_groups": copies})
    # An optimizer may hold state before its first step (Adagrad's sums): the twin starts from a copy of it.
    twin.load_state_dict({"state": copy.deepcopy(optimizer.state_dict()["state"]), "param_groups": groups})
    for group in twin.param_groups:
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    twin.step()
    return twin.state_dict()["state"]


def _difference(value: Any, reference: Any, where: str, *, settings: bool = False, paths: bool = False) -> str | None:
    """Why ``value``, at ``where`` in a checkpoint, is not what this configuration writes there (``reference``),
    or None: the same mapping keys, list lengths and types, strings equal; tensors of the same shape and dtype
    (floating-point in any precision where the reference's is); numbers finite, or the reference's own infinity;
    signs kept where they mean something (below).

    A mapping the reference leaves empty (an optimizer's state before a step, a ModelCheckpoint's best_k_models),
    and a place where it holds None (nothing recorded yet), may hold plain values, or lists of them.
    ``settings``: values a resume may change, where any finite number may replace a number (or a one-number
    tensor) and anything else must be the reference's. ``paths``: a callback's state, whose strings may differ
    (they name its files, which ``files_outside`` checks).
    """
    if isinstance(reference, dict):
        if not isinstance(value, dict):
            return _unlike(value, reference, where)
        if reference and value.keys() != reference.keys():  # an empty one leaves its keys open
            extra, missing = value.keys() - reference.keys(), reference.keys() - value.keys()
            if extra:
                return f"its {where} holds {_listed(extra)}, which this configuration does not write"
            return f"its {where} lacks {_listed(missing)}"
        items = ((item, reference.get(key), f"{where}[{key!r}]") for key, item in value.items())
    elif isinstance(reference, (list, tuple)):
        if type(value) is not type(reference):
            return _unlike(value, reference, where)
        if len(value) != len(reference):
            return f"its {where} holds {len(value)} values, where this configuration has {len(reference)}"
        items = ((item, expected, f"{where}[{i}]") for i, (item, expected) in enumerate(zip(value, reference)))
    else:
        return _leaf_problem(value, reference, where, settings, paths)
    for item, expected, inner in items:
        problem = _difference(item, expected, inner, settings=settings, paths=paths)
        if problem:
            return problem
    return None


def _leaf_problem(value: Any, reference: Any, where: str, settings: bool, paths: bool) -> str | None:
    if settings and _is_number(reference):
        if not _is_number(value):
            return _unlike(value, reference, where)
        if not _finite(value):
            return f"its {where} is {_shown(value)}, not a finite number"
        # A resume may change a setting's value, not its sign: a negative lr or weight decay would train uphill.
        return f"its {where} is {_shown(value)}, below 0" if float(value) < 0 <= float(reference) else None
    if settings or (isinstance(reference, str) and not paths):
        if type(value) is not type(reference) or not _same(value, reference):
            return f"its {where} is {_shown(value)}, where this configuration has {_shown(reference)}"
        return None
    if reference is None:
        return _loose_problem(value, where)
    if isinstance(reference, torch.Tensor):
        if not isinstance(value, torch.Tensor):
            return _unlike(value, reference, where)
        # A metric's precision is the run's; torch casts an optimizer's state to its parameter's.
        floating = value.is_floating_point() and reference.is_floating_point()
        if value.shape != reference.shape or not (floating or value.dtype == reference.dtype):
            return _unlike(value, reference, where)
    elif isinstance(reference, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _unlike(value, reference, where)
    elif type(value) is not type(reference):  # ints stay ints (counts), bools bools, strings strings
        return _unlike(value, reference, where)
    if not _is_number(value) and not isinstance(value, torch.Tensor):
        return None
    if not (_finite(value) or _same(value, reference)):
        return f"its {where} is {_shown(value)}, not a finite number"
    # Signs kept: a whole number stays positive (a period, which a scheduler divides by) or non-negative (a count)
    # where the reference's is; a tensor stays non-negative where the reference's is positive (an optimizer's step
    # count: Adam divides by 1 - beta ** step; a product of factors below 1 may underflow to 0).
    if isinstance(reference, int) and (value < 0 <= reference or value <= 0 < reference):
        return f"its {where} is {value}, where this configuration has a whole number of at least {min(reference, 1)}"
    if isinstance(reference, torch.Tensor) and reference.numel() == 1 and 0 < reference.item() < math.inf:
        if value.item() < 0:
            return f"its {where} is {_shown(value)}, where this configuration has a number of at least 0"
    return None


def _loose_problem(value: Any, where: str) -> str | None:
    """What keeps a value the reference says nothing of (None, or in a mapping it leaves empty) from being a plain
    value or a list of them, or None."""
    for inner in value if isinstance(value, (list, tuple)) else [value]:
        if not _is_plain(inner):
            return f"its {where} holds {_shown(inner)}, where this configuration has plain values"
    return None


def _is_number(value: Any) -> bool:
    """A Python number, or a tensor holding one (torch takes a tensor lr)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, str)):
        return True
    return (_is_number(value) or isinstance(value, torch.Tensor)) and _finite(value)


def _finite(value: Any) -> bool:
    """Whether a number, or every number of a tensor, is finite: an int only within 64 bits, as torch holds one."""
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, float) and math.isfinite(value)


def _same(value: Any, reference: Any) -> bool:
    """Whether value is the reference's own value (an infinity a fresh trainer starts from: a best score to beat)."""
    if isinstance(value, torch.Tensor):
        return torch.equal(value.cpu(), reference.cpu())
    return value == reference


def _unlike(value: Any, reference: Any, where: str) -> str:
    return f"its {where} is {_shown(value)}, where this configuration has {_kind(reference)}"


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    kinds = {bool: "True or False", int: "a whole number", float: "a number", str: "a string", dict: "a mapping",
             list: "a list", tuple: "a tuple", type(None): "None"}  # fmt: skip
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), f"a {type(value).__name__}")


def _shown(value: Any) -> str:
    """A value as a refusal names it: a number or string itself, anything else by its kind."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return f"{value.item()!r} ({_kind(value)})"
    if value is None or isinstance(value, (bool, int, float, str)):
        return reprlib.repr(value)
    return _kind(value)


def _listed(keys: set) -> str:
    return ", ".join(reprlib.repr(key) for key in sorted(keys, key=repr))


def files_outside(states: dict, callbacks: list, run: Path | None, skip: str) -> str | None:
    """The first file a live callback's restored state names outside the run (or the folder the callback was
    configured to write to), resolved as the callback would use it ('..' and symbolic links followed), or None.

    A callback names its files in fields whose names end in "path" (ModelCheckpoint's best_model_path,
    last_model_path, dirpath, ...) and as the keys of a mapping whose name ends in "models" (its best_k_models): it
    may later write or delete them (a ModelCheckpoint deletes its previous best), whether or not its state names a
    folder. Other strings (EarlyStopping's message, a monitor's name) are not files. ``skip``: a callback's key
    whose state names no such path (the Run's own, checked by the Run).
    """
    for key, callback in _restored_callbacks(states, callbacks):
        own = getattr(callback, "dirpath", None)
        folders = [Path(folder).resolve() for folder in (run, own) if folder]
        for name in _named_files(states[key]) if key != skip else ():
            try:
                path = Path(name).resolve()
            except ValueError:  # a NUL byte: no file is named so, and no name with one lies in a folder
                path = None
            if path is None or not any(folder == path or folder in path.parents for folder in folders):
                return f"its {key.split('{')[0]} state names {name!r}, outside the run"
    return None


def _named_files(state: Any) -> Iterator[str]:
    """The non-empty strings a callback state holds as files: the values of fields named ``*path`` and the keys of
    mappings named ``*models``, at any depth."""
    if isinstance(state, dict):
        for key, value in state.items():
            if isinstance(key, str) and key.endswith("path") and isinstance(value, str) and value:
                yield value
            elif isinstance(key, str) and key.endswith("models") and isinstance(value, dict):
                yield from (name for name in value if isinstance(name, str) and name)
            else:
                yield from _named_files(value)
    elif isinstance(state, (list, tuple)):
        for item in state:
            yield from _named_files(item)
