"""Checkpoints that are whole, unchanged and plausible, read without running code or unbounded memory; outputs that
are written whole and replace only regular files."""

import io
import math
import os
import pickle
import reprlib
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dynnet.model import MAX_DEGREE, MAX_MIN_DEGREE

# mkstemp creates files readable by their owner only; outputs get the permissions any new file would.
_UMASK = os.umask(0)
os.umask(_UMASK)
# A dynnet checkpoint is a few kilobytes: scalars, optimizer state and bookkeeping. Anything that would unpack to
# more is not one, and is refused before torch reads it (a small compressed file can declare gigabytes).
MAX_CHECKPOINT_BYTES = 1 << 20
_DOS_DIRECTORY = 0x10  # the directory bit of a zip record's external (MS-DOS) attributes


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe, oversized, malformed or foreign."""


def load_checkpoint(
    path: str | os.PathLike | IO[bytes], map_location: Any = "cpu", *, strict: bool = True
) -> dict[str, Any]:
    """Read a dynnet checkpoint weights-only, after bounding its size and checking every record against the CRC-32
    written with it, and check its contents before use.

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
    """A checkpoint file's bytes, read once and at most MAX_CHECKPOINT_BYTES, refused unless every zip record
    matches its CRC-32.

    torch's writer stores each record (data.pkl, every tensor's data) uncompressed with its real CRC-32, which
    torch's reader never verifies; zipfile does, and a CRC-32 detects every change of up to 32 consecutive bits.
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
        declared = sum(record.file_size for record in archive.infolist())
        if declared > MAX_CHECKPOINT_BYTES:  # before anything is unpacked: a small file can declare gigabytes
            raise CheckpointError(
                f"checkpoint {path} was refused: it unpacks to {declared} bytes, more than a dynnet checkpoint's "
                f"{MAX_CHECKPOINT_BYTES}"
            )
        for record in archive.infolist():
            problem = _record_problem(archive, record)
            if problem:
                raise CheckpointError(
                    f"checkpoint {path} is damaged: its bytes changed after it was written ({problem})"
                )
    return data


def _record_problem(archive: zipfile.ZipFile, record: zipfile.ZipInfo) -> str | None:
    """Why one zip record of a checkpoint cannot be trusted, or None when its bytes match their CRC-32."""
    # torch's reader takes a record marked as a directory (a DOS attribute torch never writes) for an empty one,
    # and its tensor for whatever memory it was given, whatever the CRC-32 covers.
    if record.is_dir() or record.external_attr & _DOS_DIRECTORY:
        return f"record {record.filename} is marked as a directory"
    try:
        archive.read(record)  # zipfile raises on a CRC-32 that does not match the bytes read
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError) as err:
        return str(err)
    return None


def _malformation(checkpoint: Any, strict: bool) -> str | None:
    """What is wrong with a loaded checkpoint's structure or contents, or None when it is a usable dynnet
    checkpoint."""
    required = {"state_dict", "hyper_parameters", "degree_generator", "degree_counts", "run_settings"}
    if not isinstance(checkpoint, dict) or not required <= checkpoint.keys():
        return "is not a dynnet checkpoint"
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
    generator = checkpoint["degree_generator"]  # random.Random's state: (version, 625 words, gauss's next value)
    if not (isinstance(generator, tuple) and len(generator) == 3 and isinstance(generator[1], tuple)):
        return "is malformed: degree_generator is not a random generator's state"
    if not _is_count(checkpoint.get("global_step")):
        return "is malformed: it has no step count (global_step)"
    settings = checkpoint["run_settings"]
    mappings = ("optimizer_args", "lr_scheduler_args", "data")
    if not isinstance(settings, dict) or not all(isinstance(settings.get(k, {}), dict) for k in mappings):
        return "is malformed: run_settings should map optimizer_args, lr_scheduler_args and data to their values"
    problem = _optimizer_problem(checkpoint, settings.get("optimizer_args", {}))
    if problem:
        return problem
    if not isinstance(checkpoint.get("callbacks", {}), dict):
        return "is malformed: callbacks should map each callback to its state"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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


# The param-group entries torch's optimizers (and the schedulers that add to them: OneCycleLR, CyclicLR) hold as
# numbers, as tuples of numbers, and as flags. A checkpoint that changes their type would otherwise fail, or
# train differently, steps after loading.
_NUMBERS = {
    "lr", "initial_lr", "max_lr", "min_lr", "momentum", "base_momentum", "max_momentum", "dampening", "weight_decay",
    "eps", "alpha", "rho", "lr_decay", "initial_accumulator_value", "lambd", "t0", "momentum_decay", "beta2_decay",
    "d", "tolerance_grad", "tolerance_change", "max_iter", "max_eval", "history_size", "ns_steps",
}  # fmt: skip
_TUPLES = {"betas", "etas", "step_sizes", "ns_coefficients"}
_FLAGS = {"nesterov", "maximize", "amsgrad", "centered", "capturable", "differentiable", "decoupled_weight_decay"}
_OPTIONAL_FLAGS = {"foreach", "fused"}  # None: torch chooses the implementation


def _is_number(value: Any) -> bool:
    """A finite real number: a Python int or float (not a bool), or a one-element real tensor (torch accepts a
    tensor lr)."""
    if isinstance(value, torch.Tensor):
        real = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
        return real and math.isfinite(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer no float can hold (weights-only unpickling allows some 600 digits)
        return False


def _is_numbers(value: Any, none_allowed: bool = False) -> bool:
    return isinstance(value, (tuple, list)) and all(_is_number(v) or (none_allowed and v is None) for v in value)


def _hyperparameter_problem(group: dict, where: str) -> str | None:
    """What is wrong with one optimizer param group's (or the recorded optimizer arguments') values, or None."""
    for key, value in group.items():
        if key in _NUMBERS:
            # Adafactor's eps is a pair whose first element may be None (its default).
            ok = _is_number(value) or (key == "eps" and _is_numbers(value, none_allowed=True))
            wanted = "a finite number"
        elif key in _TUPLES:
            ok, wanted = _is_numbers(value), "finite numbers"
        elif key in _FLAGS or key in _OPTIONAL_FLAGS:
            ok = isinstance(value, bool) or (value is None and key in _OPTIONAL_FLAGS)
            wanted = "True or False"
        else:
            continue
        if not ok:
            return f"was refused: {where} sets {key} to {reprlib.repr(value)}, which should be {wanted}"
    return None


def _optimizer_problem(checkpoint: dict, recorded_args: dict) -> str | None:
    """What is wrong with the optimizer and scheduler states Lightning restores on resume, or with the optimizer
    arguments the run recorded, or None. The states may be absent (evaluation needs neither); present, they hold
    dynnet's one optimizer, since Lightning pairs states with optimizers and would leave one without its state."""
    problem = _hyperparameter_problem(recorded_args, "its run_settings' optimizer_args")
    if problem:
        return problem
    states = checkpoint.get("optimizer_states")
    if states is not None:
        if not (isinstance(states, list) and len(states) == 1 and isinstance(states[0], dict)):
            return "is malformed: optimizer_states should be a list holding the one optimizer's state"
        state, groups = states[0].get("state"), states[0].get("param_groups")
        if not isinstance(state, dict) or not all(isinstance(s, dict) for s in state.values()):
            return "is malformed: its optimizer state should map each parameter's index to that parameter's state"
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            return "is malformed: its optimizer state should list its parameter groups (param_groups)"
        for group in groups:
            params = group.get("params")
            if not isinstance(params, list) or not all(_is_count(p) for p in params):
                return "is malformed: its optimizer's parameter groups should list their parameters' indices"
            problem = _hyperparameter_problem(group, "its optimizer state")
            if problem:
                return problem
    schedulers = checkpoint.get("lr_schedulers", [])
    if not isinstance(schedulers, list) or not all(isinstance(s, dict) for s in schedulers):
        return "is malformed: lr_schedulers should be a list of learning-rate scheduler states"
    return None


_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def file_kind(path: str | os.PathLike) -> str | None:
    """What path is when it exists and is not a regular file ("a symbolic link", "a directory", ...), without
    following a symbolic link; None for a regular file or nothing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    return None if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "a special file")


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through a new, exclusively created temporary file beside it, synced and renamed into place.

    A kill mid-write leaves the previous file whole and at most a hidden temporary file, which the next
    writer of a run removes. The temporary name is unique per write and never follows a symlink (mkstemp
    creates it with O_EXCL), so concurrent writers cannot tear or redirect each other's files. Only a regular
    file is ever replaced: a symbolic link, device, FIFO or directory at path is refused and left as it was.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, 0o666 & ~_UMASK)
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        # Checked again right before the rename, which would replace whatever is at path (run as root, a
        # /dev/null), whatever a caller checked before its work.
        kind = file_kind(path)
        if kind is not None:
            raise ValueError(f"refusing to replace {path}: it is {kind}, not a regular file")
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # name the file the user knows, not the temporary
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


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
