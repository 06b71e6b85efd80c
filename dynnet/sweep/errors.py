"""What the sweep reports as one line: bad input, refused before any trial starts, and a stop it was asked for."""

import signal

PROG = "dynnet-sweep"


class SweepError(ValueError):
    """Bad input: a sweep config, flag, storage or study that cannot work. Reported as one line, before any trial
    starts and leaving nothing behind."""


class Stopped(BaseException):
    """The process was sent SIGTERM or SIGINT outside a fit (a fit stops at its next step boundary instead).
    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way mistakes it for a failure."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def raise_stopped(signum: int, frame: object) -> None:
    """The SIGTERM and SIGINT handler of the sweep's processes outside fits."""
    raise Stopped(signum)
