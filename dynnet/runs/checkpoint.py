"""Checkpoints that are whole, unchanged and what dynnet writes, read without running code or unbounded memory,
and saved whole (through dynnet.runs.files) with finite parameters."""

import io
import math
import os
import pickle
import reprlib
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from packaging.version import InvalidVersion, Version

from dynnet.model import MAX_DEGREE, MAX_MIN_DEGREE
from dynnet.runs.files import write_atomically

# A dynnet checkpoint is a few kilobytes: scalars, optimizer state and bookkeeping. A larger file is not one, and is
# refused before torch reads it.
MAX_CHECKPOINT_BYTES = 1 << 20
# What dynnet and Lightning write nests a few levels deep (an optimizer's per-parameter state is at the fifth); code
# that walks a checkpoint recursively (deepcopy, comparisons) must never come near Python's recursion limit.
MAX_NESTING = 32
_DOS_DIRECTORY = 0x10  # the directory bit of a zip record's external (MS-DOS) attributes
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip record's local header, down to its name's and extra field's lengths
_OLDEST_LIGHTNING = Version("2.0.0")  # Lightning restructures checkpoints older than this, which dynnet never wrote


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe, oversized, malformed or foreign."""


def load_checkpoint(
    path: str | os.PathLike | IO[bytes], map_location: Any = "cpu", *, strict: bool = True
) -> dict[str, Any]:
    """Read a dynnet checkpoint weights-only, after bounding its size and checking every record against the CRC-32
    written with it, and check what every reader uses: the model, its hyper-parameters, the degree generator and
    counts, the step and the run's settings. A resume checks the rest against its trainer
    (``dynnet.runs.checkpoint_state``).

    ``strict`` is load_state_dict's: when False, the state_dict may lack parameters or hold others, and only the
    model's parameters it holds are checked. Raises a one-line CheckpointError for anything that is not a whole,
    unchanged dynnet checkpoint.
    """
    if hasattr(path, "read"):  # an open binary file, as Lightning's load_from_checkpoint takes too
        source, path = path, Path(str(getattr(path, "name", "in the file object given")))
    else:
        source = path = Path(path).expanduser()
        if path.is_dir():
            raise CheckpointError(f"checkpoint {path} is a directory; give the .ckpt file inside it")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
    data = _intact_bytes(source, path)
    try:
        # From the bytes just checked, not the file again: a file replaced in between is never what gets used.
        checkpoint = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        if "Unsupported global" in str(err):  # the weights-only unpickler met a class or function to call
            refusal = "was refused: it holds objects other than tensors and plain data"
            raise CheckpointError(f"checkpoint {path} {refusal}") from None
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint)") from err
    problem = _malformation(checkpoint, strict)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")
    return checkpoint


def _intact_bytes(source: Path | IO[bytes], path: Path) -> bytes:
    """A checkpoint file's bytes, read once and at most MAX_CHECKPOINT_BYTES, refused unless every zip record is
    stored as torch.save stores it and matches its CRC-32.

    torch.save stores each record (data.pkl, every tensor's data) uncompressed, one after another, with its real
    CRC-32, which torch's reader never verifies; zipfile does, and a CRC-32 detects every change of up to 32
    consecutive bits. A record compressed, declared at another size than it stores, or lying over another or
    outside the file is refused before anything is read from it: nothing is ever unpacked, and no record is
    larger than the file.
    """
    try:
        if isinstance(source, Path):
            with open(source, "rb") as file:
                data = file.read(MAX_CHECKPOINT_BYTES + 1)
        else:
            data = source.read(MAX_CHECKPOINT_BYTES + 1)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} is unreadable: {err.strerror}") from None
    if len(data) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"checkpoint {path} was refused: it is larger than a dynnet checkpoint's {MAX_CHECKPOINT_BYTES} bytes"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint)") from None
    with archive:
        records = sorted(archive.infolist(), key=lambda record: record.header_offset)
        for record in records:
            if record.compress_type != zipfile.ZIP_STORED:
                method = zipfile.compressor_names.get(record.compress_type, f"method {record.compress_type}")
                raise CheckpointError(
                    f"checkpoint {path} was refused: it unpacks to {record.file_size} bytes, it says, from a record "
                    f"compressed with {method} ({record.filename}); torch.save compresses none"
                )
        end = 0  # where the previous record's bytes end
        for record in records:
            problem = _record_problem(archive, data, record, end)
            if problem:
                raise CheckpointError(
                    f"checkpoint {path} is damaged: its bytes changed after it was written ({problem})"
                )
            end = _record_end(data, record)
    return data


def _record_end(data: bytes, record: zipfile.ZipInfo) -> int:
    """Where a stored record's bytes end: after its local header, the name and extra field that header gives the
    lengths of, and its data (past the file's end when the header is cut off)."""
    header = data[record.header_offset : record.header_offset + _LOCAL_HEADER.size]
    if len(header) < _LOCAL_HEADER.size:
        return len(data) + 1
    _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    return record.header_offset + _LOCAL_HEADER.size + name_length + extra_length + record.compress_size


def _record_problem(archive: zipfile.ZipFile, data: bytes, record: zipfile.ZipInfo, after: int) -> str | None:
    """Why one stored zip record of a checkpoint cannot be trusted, or None when it lies in the file, after the
    record before it, and its bytes match their CRC-32."""
    name = record.filename
    # torch's reader takes a record marked as a directory (a DOS attribute torch never writes) for an empty one,
    # and its tensor for whatever memory it was given, whatever the CRC-32 covers.
    if record.is_dir() or record.external_attr & _DOS_DIRECTORY:
        return f"record {name} is marked as a directory"
    # Readers differ in which size they trust; the CRC-32 covers only the bytes read.
    if record.file_size != record.compress_size:
        return f"record {name} declares {record.file_size} bytes and stores {record.compress_size}"
    if record.header_offset < after or _record_end(data, record) > archive.start_dir:
        return f"record {name} overlaps another or lies outside the records"
    try:
        archive.read(record)  # zipfile raises on a CRC-32 that does not match the bytes read
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError) as err:
        return str(err)
    return None


def _malformation(checkpoint: Any, strict: bool) -> str | None:
    """What is wrong with a loaded checkpoint's bounds, structure or the contents every reader uses, or None."""
    required = {"state_dict", "hyper_parameters", "degree_generator", "degree_counts", "run_settings"}
    if not isinstance(checkpoint, dict) or not required <= checkpoint.keys():
        return "is not a dynnet checkpoint"
    problem = _size_problem(checkpoint)
    if problem:
        return f"was refused: it {problem}"
    hparams = checkpoint["hyper_parameters"]
    if not isinstance(hparams, dict) or not all(isinstance(hparams.get(k), int) for k in ("min_degree", "max_degree")):
        return "is malformed: its hyper_parameters lack the integer min_degree and max_degree"
    low, high = hparams["min_degree"], hparams["max_degree"]
    if not (0 <= low <= MAX_MIN_DEGREE and low <= high <= MAX_DEGREE):
        bounds = f"0 <= min_degree <= {MAX_MIN_DEGREE}, min_degree <= max_degree <= {MAX_DEGREE}"
        return f"was refused: it declares degrees {low} to {high}, outside {bounds}"
    expected = {f"model.coefficients.{i}" for i in range(low + 1)} | {"model.shared"}
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or (strict and state.keys() != expected):
        return f"is malformed: its state_dict should hold exactly {', '.join(sorted(expected))}"
    for name in sorted(expected & state.keys()):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != () or not tensor.is_floating_point():
            return f"is malformed: parameter {name} should be one floating-point number"
        if not math.isfinite(tensor.item()):
            return f"was refused: parameter {name} is {tensor.item()}, not a finite number"
    problem = _degree_counts_problem(checkpoint["degree_counts"], high - low + 1)
    if problem:
        return f"was refused: {problem}"
    problem = _generator_problem(checkpoint["degree_generator"])
    if problem:
        return f"is malformed: degree_generator is not a random generator's state ({problem})"
    if not _is_count(checkpoint.get("global_step")):
        return "is malformed: it has no step count (global_step)"
    version = checkpoint.get("pytorch-lightning_version")
    try:
        # Read (and, for older ones, restructured) by Lightning before any of dynnet's hooks sees the checkpoint.
        known = isinstance(version, str) and Version(version) >= _OLDEST_LIGHTNING
    except InvalidVersion:
        known = False
    if not known:
        shown = reprlib.repr(version)
        return f"is malformed: its pytorch-lightning_version is {shown}, not Lightning {_OLDEST_LIGHTNING} or later"
    # What a resume reads before the trainer that checks the rest exists.
    settings = checkpoint["run_settings"]
    mappings = ("optimizer_args", "lr_scheduler_args", "data")
    if not isinstance(settings, dict) or not all(isinstance(settings.get(k, {}), dict) for k in mappings):
        return "is malformed: run_settings should map optimizer_args, lr_scheduler_args and data to their values"
    if not isinstance(checkpoint.get("callbacks", {}), dict):
        return "is malformed: callbacks should map each callback to its state"
    return None


def _size_problem(checkpoint: dict) -> str | None:
    """What makes a loaded checkpoint unsafe to walk, or None: containers nested deeper than MAX_NESTING, more values
    than its file has bytes (each value counted wherever it is used: shared ones can multiply), or a tensor larger
    than the file (a view can repeat one stored number). Walked without recursion, before anything recursive does."""
    left = MAX_CHECKPOINT_BYTES
    pending = [(checkpoint, 0)]
    while pending:
        value, depth = pending.pop()
        left -= 1
        if left < 0:
            return f"holds more than {MAX_CHECKPOINT_BYTES} values"
        if isinstance(value, torch.Tensor):
            if value.numel() * value.element_size() > MAX_CHECKPOINT_BYTES:
                return f"holds a tensor of shape {tuple(value.shape)}, larger than a checkpoint file"
        elif isinstance(value, (dict, list, tuple)):
            if depth == MAX_NESTING:
                return f"nests lists or mappings more than {MAX_NESTING} deep"
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            pending.extend((item, depth + 1) for item in items)
    return None


def _generator_problem(state: Any) -> str | None:
    """What keeps state from being exactly what random.Random.getstate() gives (version 3, 624 words and a position,
    gauss's next value), or None: so that setstate can neither raise nor take a state no generator was in."""
    if not (isinstance(state, tuple) and len(state) == 3):
        return "it should be a version, 625 numbers and gauss's next value"
    version, internal, gauss = state
    if type(version) is not int or version != 3:
        return f"its version is {reprlib.repr(version)}, not 3"
    if not (isinstance(internal, tuple) and len(internal) == 625):
        return "it should hold 625 numbers"
    for i, word in enumerate(internal[:624]):
        if type(word) is not int or not 0 <= word < 2**32:
            return f"word {i} is {reprlib.repr(word)}, not a whole number from 0 to 2**32 - 1"
    if type(internal[624]) is not int or not 0 <= internal[624] <= 624:
        return f"its position is {reprlib.repr(internal[624])}, not a whole number from 0 to 624"
    if gauss is not None and not (type(gauss) is float and math.isfinite(gauss)):
        return f"gauss's next value is {reprlib.repr(gauss)}, not None or a finite number"
    return None


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _degree_counts_problem(counts: Any, degrees: int) -> str | None:
    """What is wrong with the per-degree draw counts TensorBoard plots, or None.

    Their sum is not tied to global_step: a model trained by fits on two Trainers has drawn more degrees than the
    second one's steps. Past 2**53 a float64 share of the draws would no longer count each one.
    """
    if not isinstance(counts, list) or len(counts) != degrees:
        return f"degree_counts should be {degrees} counts, one per degree"
    for degree, count in enumerate(counts):
        if not _is_count(count):
            return f"degree_counts[{degree}] is {reprlib.repr(count)}, not a whole number of draws"
    if sum(counts) >= 2**53:
        return "degree_counts add up to 2**53 draws or more"
    return None


class SafeCheckpointIO(TorchCheckpointIO):
    """Saves with ``write_atomically``, so a kill mid-save leaves the previous checkpoint whole; refuses to save
    non-finite parameters; loads with ``load_checkpoint``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        for name, tensor in checkpoint["state_dict"].items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"refusing to save {path}: parameter {name} is not finite")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda file: torch.save(checkpoint, file))

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location)
