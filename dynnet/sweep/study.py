"""The study: one experiment, recorded when the study is created and refused when a sweep would run another in
it; and its trials' tally, with the trials of dead workers marked failed."""

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dynnet.runs.folder import runs_dir
from dynnet.sweep.config import Sweep
from dynnet.sweep.errors import SweepError, shown
from dynnet.sweep.space import plain
from dynnet.sweep.storage import experimental_ok, open_storage, storage_errors

# The study's system attribute that records its experiment: kept off optuna-dashboard's page, which lists a study's
# user attributes.
EXPERIMENT = "dynnet:experiment"
# The study's system attribute naming the latest command that ran trials in it (Sweep.command).
COMMAND = "dynnet:command"


def experiment(sweep: Sweep, fit: dict[str, Any]) -> dict[str, Any]:
    """What every trial of the sweep runs: the parsed fit (see check_fit), the space, the objective and the
    direction; as the study stores it (JSON)."""
    record = {"fit": fit, "space": plain(sweep.space), "objective": sweep.objective, "direction": sweep.direction}
    return json.loads(json.dumps(record))


def open_study(sweep: Sweep, record: dict[str, Any]) -> optuna.Study:
    """Create the study with its experiment's record, or continue it when it exists and runs the same experiment."""
    storage = open_storage(sweep.storage, sweep.heartbeat_interval, sweep.grace_period)
    with storage_errors(sweep.storage, "failed"):
        if sweep.study in optuna.study.get_all_study_names(storage):
            study = optuna.load_study(study_name=sweep.study, storage=storage)  # read only, unless it runs trials
        else:
            # A new study numbers its trials from 0: runs of an earlier study in the same root would collide.
            taken = sorted(p.name for p in runs_dir(sweep.root).glob("trial_*"))
            if taken:
                raise SweepError(
                    f"study {sweep.study} is new but {runs_dir(sweep.root)} already holds {taken[0]}: "
                    "use another --root, or the storage of the study that wrote it"
                )
            # load_if_exists: another command may create it at the same moment.
            study = optuna.create_study(
                storage=storage, study_name=sweep.study, direction=sweep.direction, load_if_exists=True
            )
        study_id = storage.get_study_id_from_name(sweep.study)
        recorded = storage.get_study_system_attrs(study_id).get(EXPERIMENT)
        if recorded is None:
            if study.get_trials(deepcopy=False):
                raise SweepError(
                    f"study {sweep.study} holds trials but no record of the experiment they ran (an older "
                    "dynnet-sweep started it): use a new --study name"
                )
            storage.set_study_system_attr(study_id, EXPERIMENT, record)
            with experimental_ok():
                study.set_metric_names([sweep.objective])  # optuna-dashboard and plots name the objective
            return study
        if tally(study)[0] < sweep.trials:
            # Trials to run: a database that cannot take them (read-only) is refused now, by a first write (of
            # this command's mark, a value new to it), rather than in every worker.
            storage.set_study_system_attr(study_id, COMMAND, sweep.command)
    try:
        differences = _differences(_flat(recorded), _flat(record))
    except (TypeError, ValueError, KeyError, AttributeError):
        raise SweepError(f"study {sweep.study} holds a malformed experiment record: use a new --study name") from None
    if differences:
        key, theirs, ours = differences[0]
        others = [d[0] for d in differences[1:]]
        more = f" (and {len(others)} more: {', '.join(others[:3])}{', ...' if others[3:] else ''})" if others else ""
        raise SweepError(
            f"study {sweep.study} holds another experiment: {key} is {shown(ours)} here but {shown(theirs)} in the "
            f"study{more}; use a new --study name"
        )
    return study


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    flat = dict(record["fit"])
    flat |= {f"space.{name}": spec for name, spec in record["space"].items()}
    return flat | {"objective": record["objective"], "direction": record["direction"]}


def _differences(recorded: dict[str, Any], here: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, the study's value, this sweep's value) for every key whose values differ, in this sweep's order."""
    absent = object()
    keys = [*here, *(k for k in recorded if k not in here)]
    pairs = [(key, recorded.get(key, absent), here.get(key, absent)) for key in keys]
    return [(key, "absent" if a is absent else a, "absent" if b is absent else b) for key, a, b in pairs if a != b]


def tally(study: optuna.Study) -> tuple[int, int]:
    """(finished, running): trials that count towards the total, and trials still in flight. Marks dead trials
    failed first, so that they neither count nor hold the sweep up."""
    fail_lost_trials(study)
    finished = running = 0
    for trial in study.get_trials(deepcopy=False):
        finished += counts(trial)
        running += trial.state == TrialState.RUNNING
    return finished, running


def counts(trial: FrozenTrial) -> bool:
    """Whether a trial counts towards the total: completed, pruned, or failed by its own fit (it has a reason)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "reason" in trial.user_attrs


def fail_lost_trials(study: optuna.Study) -> None:
    """Mark failed the running trials whose worker is gone: stale heartbeats (any machine), and trials of this
    machine whose process no longer exists (at once, without waiting for the grace period)."""
    with experimental_ok():
        optuna.storages.fail_stale_trials(study)
    here = process_space()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if here is not None and trial.user_attrs.get("process_space") == here and not _alive(pid):
            with contextlib.suppress(ValueError, RuntimeError):  # another worker failed it first
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def process_space() -> str | None:
    """Which processes a pid names here: the boot of this machine and the pid namespace (a container)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _alive(pid: Any) -> bool:
    """Whether the process runs: it exists and is not a zombie (a dead worker whose parent died too, waiting for
    a reaper that may never come in a container)."""
    if not isinstance(pid, int) or isinstance(pid, bool):
        return True  # not ours to judge: the heartbeat decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    with contextlib.suppress(OSError, IndexError):
        # The state follows the name in parentheses, which may itself hold spaces or parentheses.
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return True
