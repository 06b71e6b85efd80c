"""Check dynnet on a GPU: a short fit on cuda, compared with the same fit on the CPU, with steps per second.

    python scripts/gpu_check.py                 # 3000 steps of the default config
    python scripts/gpu_check.py --steps 30000

The two devices round differently, and this model's slow directions let rounding differences build up
(on CPU alone, reordering the float32 sums moves the tiny shared coefficient by up to 2% over 30000 steps),
so the coefficient vectors are compared as a whole: |gpu - cpu| / |cpu| must stay below 1e-4.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def fit(accelerator: str, steps: int) -> tuple[list[float], str]:
    with tempfile.TemporaryDirectory() as root:
        out = subprocess.run(
            [sys.executable, "-m", "dynnet", "fit", "-c", str(ROOT / "configs" / "default.yaml"),
             "--trainer.accelerator", accelerator, "--trainer.max_steps", str(steps),
             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", root],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
    if out.returncode:
        sys.exit(f"gpu_check: the {accelerator} fit failed:\n{out.stderr[-3000:]}")
    numbers = re.search(r"^Result: y = (\S+) \+ (\S+) x \+ (\S+) x\^2 \+ (\S+) x\^3 \+ (\S+) x\^4", out.stdout, re.M)
    speed = re.search(r"^Trained .*$", out.stdout, re.M).group(0)
    return [float(v) for v in numbers.groups()], speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    gpu, gpu_speed = fit("gpu", args.steps)
    cpu, cpu_speed = fit("cpu", args.steps)
    print(f"gpu: {gpu_speed}\ncpu: {cpu_speed}")
    difference = (torch.tensor(gpu) - torch.tensor(cpu)).norm() / torch.tensor(cpu).norm()
    print(f"gpu {gpu}\ncpu {cpu}\nrelative difference: {difference:.2e}")
    if difference > 1e-4:
        sys.exit("gpu_check: FAILED, the GPU run differs from the CPU run by more than 1e-4")
    print("gpu_check: OK")


if __name__ == "__main__":
    main()
