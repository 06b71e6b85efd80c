"""Every file dynnet writes (checkpoints, configs, the run lock, CSV and JSON outputs, the sweep's files) is written
here: whole or not at all, and never in place of what is not a regular file."""

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

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
    writer of a run removes. The temporary name is unique per write and never follows a symlink (it is created
    with O_EXCL), so concurrent writers cannot tear or redirect each other's files. Only a regular file is ever
    replaced: a symbolic link, device, FIFO or directory at path is refused and left as it was.
    """
    path = Path(path)
    descriptor, temporary = _new_temporary(path)
    try:
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
        temporary.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # name the file the user knows, not the temporary
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new hidden file beside path, opened for writing. Created with the permissions any new file gets (the
    kernel applies the umask to 0o666), which tempfile's owner-only files would not have."""
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:  # another writer's name, by a one-in-four-billion chance: draw another
            continue
        except OSError as err:  # name the file the user knows, not the temporary
            raise OSError(err.errno, err.strerror, str(path)) from None
