"""The ``dynnet`` command: LightningCLI over DynamicNet and SineData, keeping run folders.

- ``main`` (here): the entry point. It handles the stop signals from its first moment, before the seconds that
  importing torch and Lightning take (see dynnet.signals), then runs the command.
- ``command``: ``DynnetCLI``, parsing and the run's defaults, and ``run``, which reports how the command ended.
- ``arguments``: the command line as dynnet reads it (config files within bounds, the optimizer a command means).
- ``checks``: what the command refuses from its config before it builds anything.
- ``checkpoints``: what ``--ckpt_path`` means, checked before a resume.
- ``trainer``: the Trainer's defaults (progress display, the run's callback, TensorBoard), each replaced by the
  user's own.
- ``help``, ``console``: what ``--help`` says, and what the command prints and leaves out.
- ``predictions``: ``dynnet predict``'s CSV and ``dynnet-export``.
"""

import os

from dynnet import signals


def main(args: list[str] | None = None) -> None:
    """Run the command line; ``args`` stands in for ``sys.argv[1:]`` so tests and scripts can call it directly."""
    with signals.stop_before_training():
        signals.die_with_launcher()
        # torch's C++ warnings print stack frames of their own (a DDP peer that went away prints dozens of lines);
        # dynnet reports such a failure in one line. Set before torch is imported, which reads it once.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        from dynnet.cli.command import run  # the heavy imports, now that a signal is handled

        signals.imported()
        try:
            run(args)
        except BaseException:
            if signals.received() is None:
                raise
        if signals.received() is not None:  # its line is printed; whatever became of its exit, this is the stop
            raise SystemExit(128 + signals.received()) from None
