"""Stop signals, in one place: how SIGTERM, SIGINT and SIGHUP stop dynnet's commands, and what they raise.

- From the `dynnet` command's first moment until a fit takes over (``stop_before_training``): the signal prints
  ``stopped by SIG... before training started`` and ends the command with 128 + the signal's number. While torch
  and Lightning are being imported the process ends at once (library code can turn an exception raised inside it
  into another error, or drop it); after that the stop unwinds through every cleanup on the way, and is kept
  (``received``) so that a fit whose training starts anyway stops before its first step.
- During a fit (``stop_fit_on``, which the run's callback installs): the fit stops at the next optimizer step
  boundary, saves, and raises ``Stopped`` with the step.
- In the sweep outside fits (``raising_stopped``): ``Stopped`` is raised where the process is.

Processes that a DDP fit's rank 0 launches end with it, however it ends (``die_with_launcher``).
Only the standard library is imported here: the command installs its handlers before the heavy imports.
"""

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What dynnet-sweep stops on (a hang-up of the terminal leaves its workers' trials to finish).
SWEEP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Set by a fit's rank 0 for the processes Lightning launches for DDP: its process id.
LAUNCHER = "DYNNET_LAUNCHER_PID"

# The stop signal received before training started, if any; and whether the heavy imports are still running. Only
# this module writes them.
_received: int | None = None
_importing = True


class Stopped(BaseException):
    """A stop signal stopped a command: a fit at a step boundary (``step``), or the sweep between fits. A
    BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way mistakes it for a failure."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        self.signum, self.step = signum, step
        self.saved_run: str | None = None  # the run folder whose last.ckpt now holds this step, once saved
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}{where}")


def stopped_fit(exception: BaseException) -> bool:
    """Whether exception is a fit's stop at a step boundary (what a run saves), not a sweep's stop outside fits."""
    return isinstance(exception, Stopped) and exception.step is not None


@contextmanager
def stop_before_training() -> Iterator[None]:
    """Handle the stop signals from here until a fit takes over (see the module's docstring)."""
    global _received
    _received = None
    with ExitStack() as handlers:
        keep_handlers(handlers)
        for signum in STOP_SIGNALS:
            signal.signal(signum, _stop_now)
        yield


def imported() -> None:
    """The heavy imports are done: from now on a stop unwinds rather than ending the process at once."""
    global _importing
    _importing = False


def received() -> int | None:
    """The stop signal that arrived before training started, if any."""
    return _received


def _stop_now(signum: int, frame) -> None:
    global _received
    _received = signum
    print(f"stopped by {signal.Signals(signum).name} before training started", file=sys.stderr, flush=True)
    if _importing:
        os._exit(128 + signum)
    raise SystemExit(128 + signum)


def stop_fit_on(request: Callable[[int], None]) -> None:
    """Have the stop signals call ``request(signum)``, which asks a fit to stop at its next step boundary; a stop
    that came before training (and that the code it interrupted swallowed) asks at once."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: request(signum))
    if _received is not None:
        request(_received)


def keep_handlers(cleanup: ExitStack, signums: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Put back the current handlers of ``signums`` when ``cleanup`` closes."""
    for signum in signums:
        cleanup.callback(signal.signal, signum, signal.getsignal(signum))


def raise_stopped(signum: int, frame: object) -> None:
    """The handler of the sweep's processes outside fits."""
    raise Stopped(signum)


@contextmanager
def raising_stopped() -> Iterator[None]:
    """Raise Stopped on the sweep's signals inside the block; the previous handlers come back after it, for a
    caller that runs the command in-process."""
    with ExitStack() as handlers:
        keep_handlers(handlers, SWEEP_SIGNALS)
        for signum in SWEEP_SIGNALS:
            signal.signal(signum, raise_stopped)
        yield


def die_with_launcher() -> None:
    """In a process that rank 0 launched for DDP: be killed when rank 0 ends, however it ends, rather than wait
    for it in a rendezvous that never comes. Rank 0 reports why the run stopped."""
    launcher = os.environ.get(LAUNCHER)
    if not launcher or int(launcher) == os.getpid() or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # it ended before the line above took effect
        raise SystemExit(f"dynnet: error: rank 0 (process {launcher}) ended before this process started")
