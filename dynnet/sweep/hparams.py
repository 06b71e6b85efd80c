"""TensorBoard's HPARAMS tab on a sweep's root: one row per trial, whose columns are the settings the space names
and whose metrics are the objective and the other validation metrics.

TensorBoard draws the tab from one experiment summary for its whole logdir (see dynnet.tensorboard.hparams), and
takes an arbitrary one where several runs carry one. So the sweep writes it once, as the root's own events file (the run
TensorBoard calls "."), its trials write none, and each trial writes its row: its values, which TensorBoard
matches to the columns by name. A running TensorBoard keeps the first experiment it has read and never rereads a
rewritten one: the summary is complete from the start, its columns and their values taken from the space (which
the study's experiment fixes), not from the trials so far.
"""

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter

from dynnet.runs.folder import runs_dir
from dynnet.sweep.config import OBJECTIVES, Sweep
from dynnet.sweep.errors import write_file
from dynnet.sweep.space import OPTIMIZER, Choice, Float, Int, setting, short_name
from dynnet.tensorboard.hparams import Value, experiment_summary

# The root's events file. A fixed name, replaced whole: every command on the study writes the same bytes there.
EXPERIMENT_FILE = "events.out.tfevents.0.dynnet-sweep"
# An integer range lists its values (the HPARAMS filter offers them) up to this many; a wider one (seeds drawn
# from [0, 2**31)) is a column of text without a filter, rather than a summary of millions of values.
LISTED = 1000
# The summary's time: fixed, so that every command writes the same bytes.
WALL_TIME = 0.0


@dataclass(frozen=True)
class Column:
    """One HPARAMS column: how its values are written, and every value a trial can give it (a number column: its
    ends; None: integers too many to list)."""

    kind: str  # "number", "integer" (written as text: TensorBoard prints every number to five digits), "text", "bool"
    values: list[Value] | None
    varies: bool


def columns(space: dict[str, Any]) -> dict[str, Column]:
    """The columns of a sweep's HPARAMS tab: every parameter of the space, an optimizer's own arguments included,
    with the values of all its ranges, choices and fixed values together."""
    found: dict[str, list[Any]] = {}
    unlisted: set[str] = set()

    def add(parameter: str, spec: Any) -> None:
        name = setting(parameter)
        values = found.setdefault(name, [])
        if isinstance(spec, Float):
            values += [spec.low, spec.high]
        elif isinstance(spec, Int) and spec.high - spec.low < LISTED:
            values += range(spec.low, spec.high + 1)
        elif isinstance(spec, Int):
            values += [spec.low, spec.high]
            unlisted.add(name)
        elif isinstance(spec, Choice):
            values += [short_name(v) for v in spec.options] if parameter == OPTIMIZER else list(spec.options)
        else:
            values.append(short_name(spec) if parameter == OPTIMIZER else spec)

    for parameter, spec in space.items():
        add(parameter, spec)
        if parameter == OPTIMIZER and isinstance(spec, Choice):
            for subspace in spec.options.values():
                for argument, argument_spec in subspace.items():
                    add(argument, argument_spec)
    return {name: _column(values, name in unlisted) for name, values in found.items()}


def _column(values: list[Any], unlisted: bool) -> Column:
    varies = len({repr(v) for v in values}) > 1
    if all(isinstance(v, bool) for v in values):
        return Column("bool", sorted(set(values)), varies)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        if all(isinstance(v, int) for v in values):
            listed = [str(v) for v in sorted(set(values))]
            return Column("integer", None if unlisted else listed, varies)
        return Column("number", [float(min(values)), float(max(values))], varies)
    return Column("text", None if unlisted else sorted({str(v) for v in values}), varies)


def written(column: Column, value: Any) -> Value:
    """A trial's value as its column holds it: one type per column, which TensorBoard needs to sort the rows."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if column.kind == "number" and number:
        return float(value)
    if column.kind == "integer" and number and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    if column.kind == "bool" and isinstance(value, bool):
        return value
    return str(value)


def trial_row(run: dict[str, Value], settings: dict[str, Any], space: dict[str, Any]) -> dict[str, Value]:
    """A trial's HPARAMS values: its run's settings (hparams_row), its swept settings as the root's columns
    show them (an optimizer by its class name, integers as text)."""
    row: dict[str, Any] = dict(run)
    for parameter, value in settings.items():
        row[setting(parameter)] = short_name(value) if parameter == OPTIMIZER else value
    table = columns(space)
    return {name: written(table[name], value) if name in table else value for name, value in row.items()}


def experiment_bytes(sweep: Sweep) -> bytes:
    """The root's events file: the HPARAMS experiment of the sweep, its swept columns marked (TensorBoard ticks
    five marked columns by default), its objective the first metric."""
    table = columns(sweep.space)
    metrics = [sweep.objective, *(m for m in OBJECTIVES if m != sweep.objective)]
    summary = experiment_summary(
        {name: column.values for name, column in table.items()},
        [name for name, column in table.items() if column.varies],
        metrics,
    )
    data = io.BytesIO()
    records = RecordWriter(data)
    records.write(Event(wall_time=WALL_TIME, file_version="brain.Event:2").SerializeToString())
    records.write(Event(wall_time=WALL_TIME, step=0, summary=summary).SerializeToString())
    return data.getvalue()


def write_experiment(sweep: Sweep) -> Path:
    """Write the root's events file, unless it already holds this sweep's experiment (another command on the study
    wrote it). Replaced whole: TensorBoard never sees two."""
    path = runs_dir(sweep.root) / EXPERIMENT_FILE
    data = experiment_bytes(sweep)
    if path.is_file() and path.read_bytes() == data:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data)
    return path
