"""The `dynnet` command's entry point: from the moment its code runs, a stop signal ends it with its line.

Importing torch and Lightning takes seconds. Until training starts (where the run's own handlers stop it at a
step boundary and save), SIGTERM, SIGINT or SIGHUP print `stopped by SIG... before training started` and exit
with 128 + the signal's number. While torch and Lightning are imported there is nothing to undo, and the process
ends at once: library code can turn an exception raised inside it into another error, or drop it. After that,
the stop unwinds through every cleanup on the way (the run's lock is released and a run folder this command
created, still empty, is removed); however the code it interrupted handles it, the command exits with the
signal's code, and a fit whose training starts after it stops before its first step (see dynnet.run).
"""

import ctypes
import os
import signal
import sys
from contextlib import ExitStack

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Set by a fit's rank 0 for the processes Lightning launches for DDP: its process id.
LAUNCHER = "DYNNET_LAUNCHER_PID"


# The stop signal received before training started, if any; and whether the heavy imports are still running.
received: int | None = None
_importing = True


def main(args: list[str] | None = None) -> None:
    global received, _importing
    received = None
    with ExitStack() as handlers:
        for signum in STOP_SIGNALS:
            handlers.callback(signal.signal, signum, signal.signal(signum, _stop))
        _end_with_launcher()
        # torch's C++ warnings print stack frames of their own (a DDP peer that went away prints dozens of lines);
        # dynnet reports such a failure in one line. Set before torch is imported, which reads it once.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        from dynnet.cli import main as run  # the heavy imports, now that a signal is handled

        _importing = False
        try:
            run(args)
        except BaseException:
            if received is None:
                raise
        if received is not None:  # its line is printed; whatever became of the exit it raised, this is the stop
            raise SystemExit(128 + received) from None


def _stop(signum: int, frame) -> None:
    global received
    received = signum
    print(f"stopped by {signal.Signals(signum).name} before training started", file=sys.stderr, flush=True)
    if _importing:
        os._exit(128 + signum)
    raise SystemExit(128 + signum)


def _end_with_launcher() -> None:
    """In a process that rank 0 launched for DDP: be killed when rank 0 ends, however it ends, rather than wait
    for it in a rendezvous that never comes. Rank 0 reports why the run stopped."""
    launcher = os.environ.get(LAUNCHER)
    if not launcher or int(launcher) == os.getpid() or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # it ended before the line above took effect
        raise SystemExit(f"dynnet: error: rank 0 (process {launcher}) ended before this process started")
