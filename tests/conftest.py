import csv
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from lightning.pytorch import Callback
from optuna.trial import TrialState

from dynnet.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT, FAST = str(ROOT / "configs" / "default.yaml"), str(ROOT / "configs" / "fast.yaml")  # the shipped configs
RESULT = re.compile(r"^Result: y = (\S+) \+ (\S+) x \+ (\S+) x\^2 \+ (\S+) x\^3 \+ (\S+) x\^4 \? \+ \S+ x\^5 \?$", re.M)

# A few hundred steps, two epochs, no progress display: what most CLI tests need, in a second or two.
TINY = [
    "--seed_everything",
    "3",
    "--trainer.max_steps",
    "200",
    "--trainer.log_every_n_steps",
    "20",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--data.steps_per_epoch",
    "100",
    "--data.steps_per_batch",
    "50",
]


def run_dir(root: Path, name: str = "version_0") -> Path:
    """A run folder under root."""
    return root / "lightning_logs" / name


def last(root: Path, name: str = "version_0") -> Path:
    """A run's last checkpoint."""
    return run_dir(root, name) / "checkpoints" / "last.ckpt"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def result(text: str) -> list[float]:
    """The five numbers of the last Result line in text."""
    matches = RESULT.findall(text)
    assert matches, f"no Result line in:\n{text}"
    return [float(v) for v in matches[-1]]


def dynnet(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`dynnet ARGS` run as a real command, its output captured (kwargs for subprocess.run: env, cwd, check)."""
    return subprocess.run([sys.executable, "-m", "dynnet", *args], capture_output=True, text=True, **kwargs)


def stop_line(stderr: str, stop: str) -> list[str]:
    """The resume command a stopped fit printed as its last line, ``<stop>; resume with: COMMAND``, as words."""
    line = stderr.strip().splitlines()[-1]
    prefix = f"{stop}; resume with: "
    assert line.startswith(prefix), line
    return shlex.split(line[len(prefix) :])


def plain_loop(*args: str) -> list[float]:
    """Run scripts/plain_loop.py (the tutorial's loop) and return its final a, b, c, d, e."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plain_loop.py"), *args], capture_output=True, text=True, check=True
    ).stdout
    return result(out)


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch):
    """LightningCLI warns when sys.argv holds arguments besides the list main() gets: here, pytest's own."""
    monkeypatch.setattr(sys, "argv", ["dynnet"])


@pytest.fixture
def fit(tmp_path, capsys):
    """Run `dynnet fit` in-process into tmp_path; returns (stdout, stderr)."""

    def run(*args: str, root: Path = tmp_path) -> tuple[str, str]:
        main(["fit", *args, "--trainer.default_root_dir", str(root)])
        captured = capsys.readouterr()
        return captured.out, captured.err

    return run


def error_of(args: list[str], capsys, command=main) -> str:
    """The one-line error `dynnet` (or ``command``) exits with for args."""
    with pytest.raises(SystemExit) as exit_info:
        command(args)
    assert exit_info.value.code not in (0, None)
    message = exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err
    return message.strip()


class SignalAt(Callback):
    """Sends this process a signal at a hook, at a step: a signal that arrives at that moment of a fit.
    (`--trainer.callbacks+=conftest.SignalAt --trainer.callbacks.hook on_fit_start`)"""

    def __init__(self, hook: str = "on_before_optimizer_step", step: int = 0, signum: int = 15) -> None:
        self.hook, self.step, self.signum, self.sent = hook, step, signum, False
        setattr(self, hook, self._send)

    def _send(self, trainer, *args) -> None:
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


# ------------------------------------------------------------------------------------------------ sweeps

# Tiny fits: 200 steps, a validation (a pruning point) every 50, no progress display: well under a second each.
TINY_FIT = {
    "trainer.max_steps": 200,
    "trainer.log_every_n_steps": 50,
    "data.steps_per_epoch": 50,
    "data.steps_per_batch": 50,
}
# The tutorial's SGD without momentum: lr 1e-3 diverges within a few steps; lr 1e-9 barely moves, so its gap after
# 50 steps (5e4 to 2e5 for seeds 0 and 1) is above the threshold pruner's limit; 1e-8 and 4e-8 are below it (2e4
# at most) and complete.
GRID = {
    "fit": str(ROOT / "configs" / "default.yaml"),
    "fit_args": TINY_FIT | {"optimizer.momentum": 0.0},
    "space": {"lr": {"choice": [1.0e-3, 1.0e-9, 1.0e-8, 4.0e-8]}, "seed": {"int": [0, 1]}},
    "sampler": "GridSampler",  # every point exactly once: which trials diverge and which are pruned is known
    "pruner": {"class": "ThresholdPruner", "upper": 3.0e4},
    "trials": 8,
    "heartbeat_interval": 1,
    "grace_period": 3,
}
# The shape of a real sweep: a choice of optimizers, each with its own learning-rate range, and seeds.
SEARCH = {
    "fit": str(ROOT / "configs" / "fast.yaml"),
    "fit_args": TINY_FIT | {"lr_scheduler.T_max": 200},
    "space": {
        "seed": {"int": [0, 3]},
        "optimizer": {
            "choice": {
                "torch.optim.SGD": {"lr": {"log": [1.0e-9, 1.0e-8]}, "momentum": {"uniform": [0.0, 0.9]}},
                "torch.optim.Adam": {"lr": {"log": [1.0e-2, 0.3]}},
            }
        },
    },
    "sampler": "RandomSampler",  # unseeded: two commands started together must not draw the same points
    "heartbeat_interval": 1,
    "grace_period": 3,
}
# A pruner that would stop every trial at its last validation (step 200 of TINY_FIT) and at no other: a trial that
# trains every step must be complete all the same.
PRUNE_AT_THE_END = {"class": "ThresholdPruner", "upper": 0.0, "n_warmup_steps": 200}


def sweep_file(path: Path, config: dict, **changes) -> Path:
    path.write_text(yaml.safe_dump(config | changes, sort_keys=False))
    return path


def load(root: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'study.db'}")


def rows(root: Path) -> list[dict]:
    with (root / "trials.csv").open() as file:
        return list(csv.DictReader(file))


def sweep_command(*args: str) -> list[str]:
    """The dynnet-sweep console script of this environment (the one pip installs from pyproject's scripts)."""
    return [str(Path(sys.executable).with_name("dynnet-sweep")), *args]


def best_lines(out: str) -> tuple[re.Match, str, str]:
    """The best trial's line (number, settings, value, run), its Result and its rerun command."""
    best = re.search(r"^Best trial (\d+): (.*), val/optimality_gap (\S+), run (\S+)$", out, re.M)
    assert best, out
    result = re.search(r"^Result: (y = .*)$", out, re.M)
    rerun = re.search(r"^Rerun: (\S+ -m dynnet fit .*)$", out, re.M)
    assert result and rerun, out
    return best, result.group(1), rerun.group(1)


def running(root: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's running trials, once the sweep has created its study (a trial's run folder is there): opening
    the database before would race the sweep creating its tables."""
    if not list((root / "lightning_logs").glob("trial_*")):
        return []
    return load(root, name).get_trials(states=(TrialState.RUNNING,))
