"""The HPARAMS tab: a run's settings beside its final metrics, written as TensorBoard's hparams plugin reads them.

TensorBoard draws the tab from one *experiment* summary (its columns: each setting's name, type and values, and
the metrics) and, per run, a *session start* summary (that run's values) and a *session end* summary (finished).
Its dashboard (2.21) ticks five setting columns by default, a number fixed in its code: those marked as
differing first, each group in name order. Numbers have one type, float64, which its table prints with five
significant digits (3 as 3.0000, 0.9 as 0.90000); text shows as written.
"""

import inspect
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from google.protobuf import struct_pb2
from lightning.pytorch import LightningModule, Trainer
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from dynnet.runs.resume import is_number, is_plain

Value = bool | int | float | str

# What people tune, most tuned first: a run marks the first five it has, the columns TensorBoard ticks.
TUNED = (
    "optimizer",
    "optimizer.lr",
    "optimizer.momentum",
    "seed_everything",
    "trainer.max_steps",
    "model.min_degree",
    "model.max_degree",
)
TICKED = 5  # TensorBoard's HPARAMS dashboard ticks this many setting columns by default; nothing logged changes it
# A scheduler's arguments that are not settings: the optimizer it drives, the step it resumes from, printing.
NOT_SCHEDULER_SETTINGS = ("optimizer", "last_epoch", "verbose")


def hparams_row(trainer: Trainer, pl_module: LightningModule) -> dict[str, Value]:
    """What the run trains with, under the names of the dynnet options that set it.

    Every number of the model, the data, the optimizer and the scheduler is listed, so that runs of one kind
    have the same columns; their other arguments (flags such as ``foreach`` or ``nesterov``, choices such as
    ``gradient_clip_algorithm``) only when set to something other than their default.
    """
    settings: dict[str, Any] = {
        "seed_everything": pl_module.seed,
        "trainer.max_steps": trainer.max_steps,
        "trainer.precision": trainer.precision,
    }
    settings |= _arguments("model", type(pl_module), pl_module.hparams)
    if trainer.datamodule is not None:
        settings |= _arguments("data", type(trainer.datamodule), trainer.datamodule.hparams)
    optimizer = trainer.optimizers[0]
    settings["optimizer"] = type(optimizer).__name__
    settings |= _arguments("optimizer", type(optimizer), optimizer.defaults)
    if trainer.lr_scheduler_configs:
        config = trainer.lr_scheduler_configs[0]
        scheduler = config.scheduler
        settings["lr_scheduler"] = type(scheduler).__name__
        # A scheduler keeps most of its arguments as attributes of the same name; the others are left out.
        names = [n for n in _defaults(type(scheduler)) if n not in NOT_SCHEDULER_SETTINGS]
        arguments = {n: getattr(scheduler, n) for n in names if hasattr(scheduler, n)}
        settings |= _arguments("lr_scheduler", type(scheduler), arguments)
        # dynnet steps ReduceLROnPlateau after every validation, whatever its configured interval.
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        settings["lr_interval"] = "validation" if plateau else config.interval
    else:
        settings["lr_scheduler"] = "none"
    return {name: _value(v) for name, v in settings.items() if is_plain(v)}


def ticked(settings: Collection[str]) -> list[str]:
    """The settings to mark, so that TensorBoard ticks them: the first five of TUNED that ``settings`` has."""
    return [name for name in TUNED if name in settings][:TICKED]


def experiment_summary(
    settings: Mapping[str, Sequence[Value] | None], marked: Collection[str], metrics: Sequence[str]
) -> Summary:
    """The HPARAMS columns: each setting with the values its runs take, typed from them (all numbers: a number,
    all booleans: a boolean, else text; None: text whose values are not listed, which TensorBoard offers no
    filter for), and the metrics TensorBoard shows beside them, read from each run's scalars of that tag (their
    last values). The ``marked`` settings are marked as differing, which is what makes TensorBoard list them
    first and tick them.

    For one run, the values are its own; for runs compared together (a sweep), every value they can take.
    TensorBoard uses one experiment summary for its whole logdir: where several runs carry one, whichever its
    reader lists first, which varies from one start of TensorBoard to the next.
    """
    infos = [_info(name, values, name in marked) for name, values in settings.items()]
    experiment = api_pb2.Experiment(
        hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in metrics]
    )
    return _summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))


def session_start_summary(settings: Mapping[str, Value]) -> Summary:
    """One run's values, which TensorBoard matches to the experiment's columns by name."""
    start = plugin_data_pb2.SessionStartInfo()
    for name, value in settings.items():
        start.hparams[name].CopyFrom(_proto_value(value))
    return _summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start))


def session_end_summary() -> Summary:
    """The mark of a run that finished."""
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    return _summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))


def _arguments(prefix: str, cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (arguments of ``cls`` by name) that are numbers, or that differ from cls's defaults."""
    defaults = _defaults(cls)
    # Keys starting with "_" are LightningCLI's bookkeeping (_instantiator, _class_path), not settings.
    return {
        f"{prefix}.{name}": value
        for name, value in values.items()
        if not name.startswith("_") and (is_number(value) or name not in defaults or defaults[name] != value)
    }


def _defaults(cls: type) -> dict[str, Any]:
    """The arguments ``cls`` takes, with their defaults (``inspect.Parameter.empty`` where none), also those a
    subclass passes on as ``*args, **kwargs`` (LightningCLI's ReduceLROnPlateau adds ``monitor`` so)."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            for name, parameter in list(inspect.signature(klass.__init__).parameters.items())[1:]:  # after self
                if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                    defaults.setdefault(name, parameter.default)
    return defaults


def _value(value: Any) -> Value:
    if isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return str(value)  # a tuple or None as written; also a non-finite float, which TensorBoard's JSON cannot carry


def _info(name: str, values: Sequence[Value] | None, marked: bool) -> api_pb2.HParamInfo:
    if values is None:
        kind, domain = api_pb2.DATA_TYPE_STRING, {}
    elif all(isinstance(v, bool) for v in values):
        kind, domain = api_pb2.DATA_TYPE_BOOL, {"domain_discrete": _list(sorted(set(values)))}
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        interval = api_pb2.Interval(min_value=min(values), max_value=max(values))
        kind, domain = api_pb2.DATA_TYPE_FLOAT64, {"domain_interval": interval}
    else:
        kind, domain = api_pb2.DATA_TYPE_STRING, {"domain_discrete": _list(sorted({str(v) for v in values}))}
    return api_pb2.HParamInfo(name=name, type=kind, differs=marked, **domain)


def _list(values: Sequence[Value]) -> struct_pb2.ListValue:
    return struct_pb2.ListValue(values=[_proto_value(v) for v in values])


def _proto_value(value: Value) -> struct_pb2.Value:
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, (int, float)):
        return struct_pb2.Value(number_value=value)
    return struct_pb2.Value(string_value=str(value))


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))])
