"""The errors dynnet's commands report as one line."""

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# A message longer than this is cut: a value pasted into a config (a 45 MB callback list) must not become a
# "one-line" error of megabytes.
MAX_LINE = 400


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or parameter."""


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


def lost_peer(err: RuntimeError) -> bool:
    """Whether err is a distributed run's failure to reach another process: torch's distributed errors, and gloo's
    and NCCL's, which torch raises as plain RuntimeErrors naming their library."""
    distributed = torch.distributed.is_available()
    return distributed and (
        isinstance(err, torch.distributed.DistError) or any(s in str(err) for s in ("gloo", "NCCL"))
    )
