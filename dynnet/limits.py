"""What a fit's numbers and memory can hold: refused before any tensor is made, whoever starts the fit."""

import contextlib
import math
from pathlib import Path

import torch


def check_numbers(n_points: int, low: float, high: float, max_degree: int, min_degree: int, dtype: torch.dtype) -> None:
    """Refuse a fit whose squared error the training dtype cannot hold."""
    largest = max(abs(low), abs(high))
    biggest = torch.finfo(dtype).max
    # The loss sums n squared residuals of size up to |x|^max_degree, and its gradient has the same scale.
    for degree in range(max(max_degree, 1) + 1):
        scale = n_points * largest ** (2 * degree)
        if not scale < biggest:
            remedies = ["trainer.precision 64-true" if dtype != torch.float64 else None]
            remedies.append(f"a model.max_degree below {degree}" if degree > min_degree else None)
            remedies += ["a narrower interval (data.low, data.high)", "fewer points (data.n_points)"]
            raise ValueError(
                f"{dtype} cannot hold this fit: the squared error of x**{degree} over {n_points} points with "
                f"|x| up to {largest:g} reaches {scale:.3g}, beyond {dtype}'s largest {biggest:.3g}; use "
                + ", ".join(r for r in remedies if r)
            )


def check_memory(what: str, need: int, device: torch.device) -> None:
    """Refuse work that needs more memory than the device has available."""
    have = available_memory(device)
    if have is not None and need > have:
        raise ValueError(
            f"{what} needs about {need / 2**30:.1f} GiB, but {have / 2**30:.1f} GiB is available: use fewer points "
            "(data.n_points)"
        )


def training_bytes(n_points: int, max_degree: int, dtype: torch.dtype, processes: int = 1) -> int:
    """Peak memory of a fit's tensors on one machine: the data, x**0 .. x**max_degree, and the forward and
    backward temporaries of a step (about six more vectors), each n_points long; evaluation adds a few MB."""
    size = torch.finfo(dtype).bits // 8
    per_process = math.ceil(n_points / processes)
    return (2 * n_points + (max_degree + 7) * per_process * processes) * size + (64 << 20)


def prediction_bytes(n_points: int, min_degree: int, max_degree: int, dtype: torch.dtype) -> int:
    """Peak memory of predicting n_points: the data, the powers of x and a column per degree and the expected value;
    then the CSV, built whole before it is written (a Python float per number, about 32 bytes, and its text)."""
    size = torch.finfo(dtype).bits // 8
    columns = (max_degree - min_degree + 1) + 3  # x, the target, each degree's prediction, the expected one
    return n_points * ((max_degree + 1 + columns) * size + columns * 72) + (64 << 20)


def available_memory(device: torch.device) -> int | None:
    """Bytes new work can use: the GPU's free memory, or the host's available memory (within a cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = [line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    if not found:  # a kernel older than 3.14, or a container that hides it: nothing to check against
        return None
    have = int(found[0]) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit, used = (Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current"))
        if limit != "max":
            have = min(have, int(limit) - int(used))
    return have
