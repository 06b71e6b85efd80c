"""Data parallelism and precision by flag: every launch mode gives the one-process answer."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import DEFAULT, free_port, plain_loop, result, stop_line

from dynnet.runs.checkpoint import load_checkpoint

# The default config, shortened to 2000 steps (one epoch), as the README's scale-out commands run it.
SHORT = ["-c", DEFAULT, "--trainer.max_steps", "2000", "--trainer.enable_progress_bar", "false"]
FIT = ["-m", "dynnet", "fit", *SHORT]
DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def launched_result(tmp_path, *args: str, launcher: tuple[str, ...] = (sys.executable,)) -> list[float]:
    """The Result of `dynnet fit SHORT ARGS` started by launcher (a Python process by default) into tmp_path."""
    out = subprocess.run(
        [*launcher, *FIT, *args, "--trainer.default_root_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return result(out.stdout)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> torch.Tensor:
    return torch.tensor(launched_result(tmp_path_factory.mktemp("one")), dtype=torch.float64)


def assert_same(params: list[float], reference: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(params, dtype=torch.float64), reference, rtol=1e-5, atol=0)


@pytest.mark.slow
def test_ddp_launched_by_lightning_gives_the_one_process_result(tmp_path, one_process):
    assert_same(launched_result(tmp_path, *DDP, "--trainer.devices", "2"), one_process)


@pytest.mark.slow
def test_torchrun_gives_the_one_process_result(tmp_path, one_process):
    launcher = (*TORCHRUN, "--standalone", "--nproc_per_node", "2")
    assert_same(launched_result(tmp_path, *DDP, "--trainer.devices", "2", launcher=launcher), one_process)


@pytest.mark.slow
def test_two_nodes_on_one_machine_give_the_one_process_result(tmp_path, one_process):
    port = free_port()
    nodes = []
    for rank in (0, 1):
        launcher = [*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                    "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip
        args = [*DDP, "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.default_root_dir", str(tmp_path)]
        nodes.append(
            subprocess.Popen([*launcher, *FIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert_same(result(outputs[0][0]), one_process)  # node 0 holds global rank 0, which reports


def test_float64_matches_a_float64_plain_loop(fit_output):
    # In this process; bf16-mixed on a CPU: test_lightning's test_float64_and_bf16_mixed_train.
    out, _ = fit_output(
        *SHORT, "--trainer.precision", "64-true", "--seed_everything", "2", "--trainer.max_steps", "300"
    )
    assert result(out) == plain_loop("--float64", "--seed", "2", "--steps", "300")


@pytest.mark.slow
def test_sigterm_under_ddp_stops_every_process_at_one_step_and_resumes_exactly(tmp_path):
    long = [*FIT, *DDP, "--trainer.devices", "2", "--trainer.max_steps", "4000", "--data.steps_per_epoch", "1000",
            "--trainer.log_every_n_steps", "1000"]  # fmt: skip
    whole = subprocess.run([sys.executable, *long, "--trainer.default_root_dir", str(tmp_path / "whole")],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    root = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, *long, "--trainer.default_root_dir", str(root)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    checkpoint = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    while not checkpoint.exists() and process.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)  # to rank 0 only, as a scheduler signalling the job's main process
    _, err = process.communicate(timeout=300)
    step = load_checkpoint(checkpoint)["global_step"]
    assert process.returncode == 143, err[-3000:]
    assert stop_line(err, f"stopped by SIGTERM at step {step}")[-4:] == ["--ckpt_path", "last", "--run", "version_0"]
    assert 1000 <= step < 4000
    resumed = subprocess.run([sys.executable, *long, "--ckpt_path", "last", "--trainer.default_root_dir", str(root)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert result(resumed.stdout) == result(whole.stdout)
