import csv
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import lightning as L
import optuna
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from optuna.trial import TrialState

from dynnet import DynamicNet, SineData
from dynnet.cli import main
from dynnet.cli.command import DynnetCLI

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
# A user's own lightning.Trainer without a progress display or summary (fitted_trainer's default), and what it
# takes besides for TINY's steps and logging.
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
TINY_TRAINER = {"max_steps": 200, "log_every_n_steps": 20}


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
def fit_output(tmp_path, capsys):
    """`dynnet fit ARGS` run in this process into tmp_path (or root=): returns its (stdout, stderr)."""

    def run(*args: str, root: Path = tmp_path) -> tuple[str, str]:
        main(["fit", *args, "--trainer.default_root_dir", str(root)])
        captured = capsys.readouterr()
        return captured.out, captured.err

    return run


def fitted_cli(root: Path, *args: str, callbacks: list[Callback] | None = None) -> DynnetCLI:
    """The DynnetCLI of `dynnet fit -c configs/default.yaml TINY ARGS` run in this process into root, after the fit:
    its trainer, model and datamodule. callbacks: extra callbacks, as a program that drives dynnet gives them."""
    with ExitStack() as cleanup:
        return DynnetCLI(
            ["fit", "-c", DEFAULT, *TINY, *args, "--trainer.default_root_dir", str(root)],
            cleanup=cleanup,
            callbacks=callbacks,
        )


def fitted_trainer(
    root: Path,
    module: L.LightningModule | Callable[[], L.LightningModule] = DynamicNet,
    seed: int = 3,
    data: dict | None = None,
    ckpt_path: Path | None = None,
    **trainer_args,
) -> L.Trainer:
    """The Trainer of a user's own Lightning fit into root: seeded first (as seed_everything in a config does), then
    module fitted (or resumed from ckpt_path) on SineData with epochs of 100 steps and batches of at most 50 (and
    data's settings), by lightning.Trainer(QUIET | trainer_args). module: a class or factory, built after seeding as
    the command builds its model, or a module built already. trainer.lightning_module is the module."""
    L.seed_everything(seed)
    module = module if isinstance(module, L.LightningModule) else module()
    trainer = L.Trainer(default_root_dir=root, **(QUIET | trainer_args))
    data_module = SineData(**({"steps_per_epoch": 100, "steps_per_batch": 50} | (data or {})))
    trainer.fit(module, data_module, ckpt_path=ckpt_path)
    return trainer


class Plateau(DynamicNet):
    """The tutorial's SGD under a ReduceLROnPlateau that watches for a rise of a falling loss (mode max, patience 0),
    with eps and a scheduler dict's monitor if given."""

    def __init__(self, eps: float | None = None, monitor: str | None = None) -> None:
        super().__init__()
        self.eps, self.monitor = eps, monitor

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1e-8, momentum=0.9)
        kwargs = {"eps": self.eps} if self.eps is not None else {}
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=0, **kwargs)
        schedule = {"scheduler": plateau} | ({"monitor": self.monitor} if self.monitor else {})
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def fitted_checkpoint(root: Path, *args: str) -> Path:
    """The last.ckpt of `dynnet fit -c configs/default.yaml TINY ARGS` run in this process into root, for a fixture
    wider than a test (which no_pytest_argv does not reach)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["dynnet"])
        fitted_cli(root, *args)
    return last(root)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """The last.ckpt (step 200) of one `dynnet fit -c configs/default.yaml TINY` run, trained once for the session,
    in root/lightning_logs/version_0/checkpoints. Tests read it, or copy it (copied_run) to change it."""
    return fitted_checkpoint(tmp_path_factory.mktemp("trained"))


def copied_run(checkpoint: Path, root: Path) -> Path:
    """A copy of checkpoint's run folder, as root/lightning_logs/<run>; returns the copy of checkpoint."""
    run = checkpoint.parents[1]
    shutil.copytree(run, root / "lightning_logs" / run.name)
    return root / checkpoint.relative_to(run.parents[1])


def crafted_checkpoint(source: Path, change: Callable[[dict], object], path: Path | None = None) -> Path:
    """source's contents changed by change, written by torch.save to path (source itself by default): whole and with
    valid CRC-32s, so that only a check of its contents can refuse it. Returns the path written."""
    contents = torch.load(source, weights_only=True)
    change(contents)
    path = source if path is None else path
    torch.save(contents, path)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    return path


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
