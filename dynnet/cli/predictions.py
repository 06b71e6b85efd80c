"""Using a trained checkpoint without writing code: predictions as CSV, the polynomial as JSON."""

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from dynnet.errors import one_line
from dynnet.module import DynamicNet
from dynnet.runs.checkpoint import CheckpointError
from dynnet.runs.files import file_kind, write_atomically
from dynnet.runs.folder import run_of


class PredictionCSV(Callback):
    """Writes what `dynnet predict` computes to a CSV file, one row per point."""

    def __init__(self, path: str | None = None) -> None:
        """
        Args:
            path: The CSV file to write: x, the target, the prediction at each degree, and the expected
                prediction (the mean over the equally likely degrees). Default: predictions.csv in the
                checkpoint's run folder, or in default_root_dir.
        """
        self.path = path
        self.rows: list[dict[str, torch.Tensor]] = []

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self.rows.append(outputs)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(self.path or Path(trainer.default_root_dir) / "predictions.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = list(self.rows[0])
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(columns)
        for batch in self.rows:
            writer.writerows(zip(*(batch[c].tolist() for c in columns)))
        write_atomically(path, lambda file: file.write(text.getvalue().encode()))
        self.rows = []
        print(f"Predictions: {path}", flush=True)


def prediction_path(config) -> str:
    """Where `dynnet predict` writes, checked before any work: --predictions.path, else predictions.csv in the
    checkpoint's run (or default_root_dir)."""
    run = run_of(Path(config.ckpt_path)) if config.ckpt_path else None
    given = config.predictions.path or str((run or Path(config.trainer.default_root_dir)) / "predictions.csv")
    check_output_path(given, inputs=[config.ckpt_path, *(str(c) for c in config.get("config") or [])])
    return str(Path(given).expanduser())


def check_output_path(path: str | os.PathLike, inputs: list[str | os.PathLike | None]) -> None:
    """Refuse, before any work, an output path that is not a new or regular file, or is one of the files the
    command reads. A symbolic link is refused, not followed: writing replaces only regular files."""
    if os.fspath(path).endswith(("/", os.sep)):
        raise ValueError(f"output {os.fspath(path)} is a directory; give a file name")
    path = Path(path).expanduser()
    kind = file_kind(path)
    if kind == "a directory":
        raise ValueError(f"output {path} is a directory; give a file name")
    if kind is not None:
        raise ValueError(f"output {path} is {kind}, not a regular file; give the name of a regular file or a new one")
    for source in inputs:
        if source and path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise ValueError(f"output {path} is {source}, which this command reads; choose another file")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"output {path} cannot be written: {path.parent} is not a directory")


def export(checkpoint_path: str | os.PathLike) -> dict:
    """The fitted polynomial of a checkpoint, as plain data."""
    module = DynamicNet.load_from_checkpoint(checkpoint_path)
    model = module.model
    names = model.names()
    values = model.flat().tolist()
    shared = list(range(model.min_degree + 1, model.max_degree + 1))
    return {
        "min_degree": model.min_degree,
        "max_degree": model.max_degree,
        "coefficients": dict(zip(names, values)),
        "powers": {name: [p] for p, name in enumerate(names[:-1])} | {names[-1]: shared},
        "degree": f"drawn uniformly from {model.min_degree} to {model.max_degree} at every evaluation",
        "result": f"Result: {model.formula()}",
    }


def export_main(args: list[str] | None = None) -> None:
    """``dynnet-export CHECKPOINT [-o FILE]``: write a checkpoint's fitted polynomial as JSON."""
    parser = argparse.ArgumentParser(
        prog="dynnet-export", description="Write a checkpoint's fitted polynomial as JSON."
    )
    parser.add_argument("checkpoint", help="a checkpoint written by dynnet fit")
    parser.add_argument("-o", "--output", help="the JSON file to write (default: the checkpoint's name with .json)")
    options = parser.parse_args(args)
    given = options.output or str(Path(options.checkpoint).with_suffix(".json"))
    output = Path(given).expanduser()
    try:
        check_output_path(given, inputs=[options.checkpoint])
        polynomial = export(options.checkpoint)
        # load_checkpoint refused non-finite coefficients; allow_nan=False keeps NaN and Infinity, which are not
        # JSON, out of the file whatever reaches it.
        text = json.dumps(polynomial, indent=2, allow_nan=False) + "\n"
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(output, lambda file: file.write(text.encode()))
    except (CheckpointError, ValueError, OSError) as err:
        sys.exit(f"dynnet-export: error: {one_line(err)}")
    print(f"Wrote {output}")
