"""Checkpoints that are whole, finite and read without running code."""

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe or foreign."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a dynnet checkpoint with torch's weights-only unpickler, or raise a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        if "Unsupported global" in str(err):  # the weights-only unpickler met a class or function to call
            refusal = "was refused: it holds objects other than tensors and plain data"
            raise CheckpointError(f"checkpoint {path} {refusal}") from None
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint)") from err
    if (
        not isinstance(checkpoint, dict)
        or not {"state_dict", "hyper_parameters", "degree_generator"} <= checkpoint.keys()
    ):
        raise CheckpointError(f"checkpoint {path} is not a dynnet checkpoint")
    return checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """Saves by writing a temporary file beside the target, syncing it and renaming it over the target, so a
    kill mid-save leaves the previous checkpoint whole; refuses to save non-finite parameters; loads with
    ``load_checkpoint``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        for name, tensor in checkpoint["state_dict"].items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"refusing to save {path}: parameter {name} is not finite")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")  # one saver (rank 0); a leftover is overwritten next time
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location)
