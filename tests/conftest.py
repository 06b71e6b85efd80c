import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Callback

from dynnet.cli import main

ROOT = Path(__file__).resolve().parents[1]
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


def error_of(args: list[str], capsys) -> str:
    """The one-line error `dynnet` exits with for args."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
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
