"""What a `dynnet` command prints: the Lightning lines and warnings it leaves out because dynnet says what a run
did itself, and the command that reruns it."""

import logging
import os
import sys
import threading
import warnings

import torch

from dynnet.cli.arguments import as_call

# Lightning's informational lines (accelerator availability, advertising, "fit stopped", restore notices) would
# interleave with the progress display; dynnet prints what a run did itself. Warnings still show.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").setLevel(logging.WARNING)
# The seed is in the run's config.yaml; its "Seed set to" line would precede every one-line error.
logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)


def ignore_warnings(fit: bool) -> None:
    """Lightning's warnings that do not apply to dynnet. Set when a command starts (not at import), so that they
    hold inside warning contexts such as pytest's too."""
    messages = [
        # main() passes LightningCLI the arguments after joining negative numbers to their flags (see
        # dynnet.cli.arguments.join_negative_numbers); LightningCLI warns when it gets a list while sys.argv has
        # arguments too.
        "LightningCLI's args parameter is intended to run from within Python",
        # Lightning's use of a deprecated torch API; nothing a dynnet user can act on.
        ".*isinstance\\(treespec, LeafSpec\\)",
        # DynamicNet's own configure_optimizers, the tutorial's SGD, is meant to give way to the config's optimizer.
        "`DynamicNet.configure_optimizers` will be overridden by",
        # ModelCheckpoint(every_n_train_steps) under manual optimization warns that it saves the state after the
        # step: that is what dynnet means by step N.
        "Using ModelCheckpoint with manual optimization and every_n_train_steps",
        # A run folder holds the run's own files; loggers and checkpoints given into it are meant to share it.
        "Checkpoint directory .* exists and is not empty",
        "Experiment logs directory .* exists and is not empty",
    ]
    if not fit:
        messages += [
            # Evaluation needs only the weights; the run's callbacks that wrote the checkpoint do not apply.
            "Be aware that when using `ckpt_path`, callbacks used to create",
            # Evaluation has no logger on purpose; Lightning builds its printed results from logged metrics.
            "You called `self.log\\(.*, logger=True\\)` but have no logger",
        ]
    for message in messages:
        warnings.filterwarnings("ignore", message=message)


def quiet_write_errors(args: threading.ExceptHookArgs) -> None:
    if not issubclass(args.exc_type, OSError):
        threading.__excepthook__(args)


def optimizer_line(optimizer, lr_scheduler, interval: str) -> str:
    """The fit's line naming its optimizer and schedule, with every argument that is not its class's default."""
    schedule = f"{as_call(lr_scheduler)} every {interval}" if lr_scheduler is not None else "none"
    if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        schedule = f"{as_call(lr_scheduler)} after every validation"
    return f"Optimizer: {as_call(optimizer)}; lr_scheduler: {schedule}"


def dynnet_command(*args: str) -> list[str]:
    """The words that run ``dynnet ARGS`` as this process was run: the same ``dynnet`` script (a relative path
    works from the same folder, as the README's ``.venv/bin/dynnet`` does), else this interpreter with ``-m
    dynnet``, since a bare ``dynnet`` is found only when its folder is on PATH. Join them with shlex.join."""
    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) == "dynnet" and os.sep in script:
        return [script, *args]
    return [sys.executable, "-m", "dynnet", *args]
