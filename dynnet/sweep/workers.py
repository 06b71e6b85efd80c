"""The worker processes: each runs trials one at a time until the study holds its total. Stopped (the sweep's
SIGTERM or Ctrl-C), a worker ends its fit at the next step boundary and marks its trial lost; a worker whose
sweep's main process died (killed with SIGKILL, say) does the same by itself."""

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time

import optuna

from dynnet.signals import SWEEP_SIGNALS, Stopped, raise_stopped
from dynnet.sweep.config import Sweep, cores, make
from dynnet.sweep.errors import PROG, SweepError
from dynnet.sweep.storage import open_storage, storage_errors
from dynnet.sweep.study import tally
from dynnet.sweep.trial import Discarded, Objective, TrialFailed

# How often an idle worker looks again whether the trials others are running finished or died.
POLL_SECONDS = 0.5
# How long a stopped worker may take to reach its fit's next step boundary and tell its trial (a step takes well
# under a millisecond; waiting for a locked SQLite file can take up to its one-minute timeout). Then it is killed,
# and its trial marked lost as its process is gone.
STOP_SECONDS = 70


def work(sweep: Sweep, index: int) -> None:
    """A worker process: runs trials one at a time until the study holds sweep.trials finished trials."""
    for signum in SWEEP_SIGNALS:
        signal.signal(signum, raise_stopped)
    _stop_with_parent(index)
    # Each worker's lines are the sweep's; Optuna's own (a trial finished, failed with a traceback) would repeat them.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    import torch

    # Workers share the cores: one training thread each, more only when cores outnumber workers.
    torch.set_num_threads(max(1, cores() // sweep.workers))
    try:
        storage = open_storage(sweep.storage, sweep.heartbeat_interval, sweep.grace_period)
        with storage_errors(sweep.storage, "failed"):  # the database lost, say: one line, not a traceback
            earlier = len(optuna.load_study(study_name=sweep.study, storage=storage).trials)
            sampler = make("sampler", sweep.sampler, sweep.space, sweep.trials, seed_offset=1000 * earlier + index)
            pruner = make("pruner", sweep.pruner, sweep.space, sweep.trials)
            study = optuna.load_study(study_name=sweep.study, storage=storage, sampler=sampler, pruner=pruner)
            objective = Objective(sweep)
            while True:
                finished, running = tally(study)
                if finished >= sweep.trials:
                    return
                if finished + running >= sweep.trials:
                    # Other workers' trials may complete the study, or die and leave their place to this one.
                    time.sleep(POLL_SECONDS)
                    continue
                with contextlib.suppress(Discarded):  # its line is printed; the next trial takes its place
                    study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False)
                if objective.stop is not None:
                    raise Stopped(objective.stop)
    except Stopped as stop:
        sys.exit(128 + stop.signum)
    except SweepError as err:
        sys.exit(f"{PROG}: error: worker {index}: {err}")


def _stop_with_parent(index: int) -> None:
    """Stop this worker as the sweep would, should the sweep's main process die: multiprocessing's sentinel of
    the parent becomes ready when it is gone, however it ended."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        # The process's own stderr: a fit in progress redirects sys.stderr into its sweep.log. Whoever read the
        # sweep's output may be gone with it.
        with contextlib.suppress(OSError):
            print(f"{PROG}: worker {index} (pid {os.getpid()}): the sweep's main process is gone", file=sys.__stderr__)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def run_workers(sweep: Sweep) -> list[str]:
    """Start the workers and wait for them; the lines that say how each one that did not end normally ended.
    Stopped (SIGTERM or SIGINT), it stops them with the same signal and waits until they have told their trials."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or torch state forked
    workers = [context.Process(target=work, args=(sweep, i), name=f"worker {i}") for i in range(sweep.workers)]
    problems = []
    pending: list[multiprocessing.Process] = []
    try:
        for worker in workers:
            worker.start()
            pending.append(worker)
        print(f"Workers: {', '.join(f'{i} (pid {w.pid})' for i, w in enumerate(workers))}", flush=True)
        while pending:
            ready = multiprocessing.connection.wait([w.sentinel for w in pending])
            for worker in [w for w in pending if w.sentinel in ready]:
                worker.join()  # reaps it, so another worker sees its pid gone and fails its trial at once
                pending.remove(worker)
                if worker.exitcode != 0:
                    problems.append(f"{worker.name} (pid {worker.pid}) {_exit(worker.exitcode)}")
                    print(f"{PROG}: {problems[-1]}; the others go on", file=sys.stderr, flush=True)
    except Stopped as stop:
        _stop(pending, stop.signum)
        raise
    return problems


def _stop(workers: list[multiprocessing.Process], signum: int) -> None:
    """Stop the workers at their fits' next step boundaries, and wait until they have told their trials."""
    # A second Ctrl-C must not cut the wait short and leave workers running; the caller restores the handlers.
    for each in SWEEP_SIGNALS:
        signal.signal(each, signal.SIG_IGN)
    for worker in workers:
        if worker.is_alive():
            os.kill(worker.pid, signum)
    deadline = time.monotonic() + STOP_SECONDS
    for worker in workers:
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            print(f"{PROG}: {worker.name} (pid {worker.pid}) did not stop; killed", file=sys.stderr, flush=True)
            worker.kill()
            worker.join()


def _exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
