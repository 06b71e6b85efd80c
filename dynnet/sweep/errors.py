"""What the sweep reports as one line: bad input, refused before any trial starts; and the files it writes, whole
or not at all."""

import json
from pathlib import Path
from typing import Any

from dynnet.errors import one_line
from dynnet.runs.files import file_kind, write_atomically

PROG = "dynnet-sweep"
# How much of a value a refusal quotes.
SHOWN_CHARACTERS = 60


class SweepError(ValueError):
    """Bad input: a sweep config, flag, storage or study that cannot work. Reported as one line, before any trial
    starts and leaving nothing behind."""


def shown(value: Any) -> str:
    """A value as a refusal quotes it: JSON, so that a line break or an escape sequence shows rather than acts,
    cut short."""
    text = json.dumps(value, default=str)
    return text if len(text) <= SHOWN_CHARACTERS else text[: SHOWN_CHARACTERS - 3] + "..."


def printable(line: str) -> str:
    """A line built from what a study holds (a shared database is input), with every character that would break
    it or drive the terminal (a line break, an escape) written as its escape instead."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def write_file(path: Path, data: bytes) -> None:
    """Write one of the sweep's files through dynnet's checked writer: whole or not at all, and never in place of
    what is not a regular file (a symbolic link, a folder); a failure is one line naming the file."""
    try:
        write_atomically(path, lambda file: file.write(data))
    except ValueError as err:  # what is there is not a regular file
        raise SweepError(str(err)) from None
    except OSError as err:
        raise SweepError(f"cannot write {one_line(err)}") from None


def check_replaceable(path: Path) -> None:
    """Refuse, before anything starts, an output path that holds something the sweep must not replace."""
    kind = file_kind(path)
    if kind is not None:
        raise SweepError(f"{path} is {kind}, not a regular file: dynnet-sweep writes its own file there; move it away")
