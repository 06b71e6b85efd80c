"""Checkpoints and outputs that are whole and finite, and checkpoints read without running code or unbounded memory."""

import os
import pickle
import tempfile
import zipfile
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe, oversized, malformed or foreign."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a dynnet checkpoint weights-only, after bounding its size, and check its contents before use.

    Raises a one-line CheckpointError for anything that is not a whole dynnet checkpoint.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the .ckpt file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError, EOFError):
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint)") from None
    if max(declared, path.stat().st_size) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"checkpoint {path} was refused: it unpacks to {declared} bytes, more than a dynnet checkpoint's "
            f"{MAX_CHECKPOINT_BYTES}"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        if "Unsupported global" in str(err):  # the weights-only unpickler met a class or function to call
            refusal = "was refused: it holds objects other than tensors and plain data"
            raise CheckpointError(f"checkpoint {path} {refusal}") from None
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint)") from err
    problem = _malformation(checkpoint)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")
    return checkpoint


def _malformation(checkpoint: Any) -> str | None:
    """What is wrong with a loaded checkpoint's structure, or None when it is a usable dynnet checkpoint."""
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
    if not isinstance(state, dict) or state.keys() != expected:
        return f"is malformed: its state_dict should hold exactly {', '.join(sorted(expected))}"
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != () or not tensor.is_floating_point():
            return f"is malformed: parameter {name} should be one floating-point number"
    counts = checkpoint["degree_counts"]
    if not isinstance(counts, list) or len(counts) != high - low + 1 or not all(isinstance(c, int) for c in counts):
        return f"is malformed: degree_counts should be {high - low + 1} whole numbers"
    generator = checkpoint["degree_generator"]  # random.Random's state: (version, 625 words, gauss's next value)
    if not (isinstance(generator, tuple) and len(generator) == 3 and isinstance(generator[1], tuple)):
        return "is malformed: degree_generator is not a random generator's state"
    if not isinstance(checkpoint.get("global_step"), int) or checkpoint["global_step"] < 0:
        return "is malformed: it has no step count (global_step)"
    settings = checkpoint["run_settings"]
    mappings = ("optimizer_args", "lr_scheduler_args", "data")
    if not isinstance(settings, dict) or not all(isinstance(settings.get(k, {}), dict) for k in mappings):
        return "is malformed: run_settings should map optimizer_args, lr_scheduler_args and data to their values"
    if not isinstance(checkpoint.get("callbacks", {}), dict):
        return "is malformed: callbacks should map each callback to its state"
    return None


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through a new, exclusively created temporary file beside it, synced and renamed into place.

    A kill mid-write leaves the previous file whole and at most a hidden temporary file, which the next
    writer of a run removes. The temporary name is unique per write and never follows a symlink (mkstemp
    creates it with O_EXCL), so concurrent writers cannot tear or redirect each other's files.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, 0o666 & ~_UMASK)
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
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
