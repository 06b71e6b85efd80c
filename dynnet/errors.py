"""How dynnet stops: the errors its commands report as one line, and the stop a signal asks for."""

import signal

from jsonargparse import ArgumentError
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# A message longer than this is cut: a value pasted into a config (a 45 MB callback list) must not become a
# "one-line" error of megabytes.
MAX_LINE = 400


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or parameter."""


class Interrupted(Exception):
    """A stop signal (SIGTERM, SIGINT, SIGHUP) stopped the command: training at a step boundary, or the command
    before training started (``step`` None)."""

    def __init__(self, signum: int, step: int | None) -> None:
        self.signum, self.step = signum, step
        self.saved_run: str | None = None  # the run folder whose last.ckpt now holds this step, once saved
        where = f"at step {step}" if step is not None else "before training started"
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")


# Errors that a user's input, files or a run's numbers cause: shown as one line unless DYNNET_DEBUG is set.
USER_ERRORS = (ValueError, ArgumentError, OSError, DivergenceError, MisconfigurationException)


def one_line(err: BaseException) -> str:
    """An error as one line of at most MAX_LINE characters: an OSError names its file; other messages lose their
    line breaks."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = " ".join(str(err).split())
    return text if len(text) <= MAX_LINE else f"{text[: MAX_LINE - 30]} ... ({len(text)} characters in all)"
