import math
import re
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet.cli import main


def test_ci_runs_the_readme_test_command_as_written():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.endswith("python -m pytest")
    assert f"```bash\n{command}\n```" in (ROOT / "README.md").read_text()


def test_readme_quick_start_trains_the_default_config():
    assert "&& .venv/bin/dynnet fit -c configs/default.yaml\n" in (ROOT / "README.md").read_text()


def bash_commands() -> list[str]:
    """Every command in the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands += [part.strip() for part in command.split("&&")]
    return commands


def test_every_command_runs_from_the_clone_as_written():
    # One way throughout: the virtual environment's programs, from the clone's folder.
    commands = bash_commands()
    assert len(commands) > 20
    for command in commands:
        assert re.match(r"(python3 -m venv \.venv$|(srun )?\.venv/bin/\w)", command), command


def test_every_file_the_readme_names_exists():
    named = set(
        re.findall(
            r"(?<![\w/])((?:configs|scripts|docs|tests|benchmark|dynnet)/[\w./-]*\.(?:yaml|py|png|json))",
            (ROOT / "README.md").read_text(),
        )
    )
    assert len(named) > 20
    assert [name for name in sorted(named) if not (ROOT / name).is_file()] == []


def flag_examples() -> list[str]:
    """Every backquoted example in the README's flag table."""
    table = (ROOT / "README.md").read_text().split("| to change | flag |")[1].split("\n\n")[0]
    return [example for row in table.splitlines()[2:] for example in re.findall(r"`(--[^`]+)`", row.split("|")[2])]


def test_the_flag_table_has_its_examples():
    assert len(flag_examples()) >= 14


@pytest.mark.slow
@pytest.mark.parametrize("example", flag_examples())
def test_every_flag_example_trains(tmp_path, monkeypatch, example):
    if "gpu" in example and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    args = ["fit", "-c", str(ROOT / "configs" / "default.yaml"), *shlex.split(example), "--trainer.max_steps", "600",
            "--data.steps_per_epoch", "200", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    if "--trainer.default_root_dir" in example:
        args[args.index("--trainer.default_root_dir") + 1] = str(tmp_path / "runs")
    else:
        args += ["--trainer.default_root_dir", str(tmp_path / "runs")]
    monkeypatch.chdir(tmp_path)
    if "ddp" in example:  # Lightning starts the other process by running the command again: a real command
        run = subprocess.run([sys.executable, "-m", "dynnet", *args], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    else:
        main(args)
    [folder] = (tmp_path / "runs" / "lightning_logs").iterdir()
    losses = [e.value for e in EventAccumulator(str(folder)).Reload().Scalars("val/expected_loss")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
